"""Draw one detector frame with its spots circled, saved as a PNG.

Counts on a log scale (or linear, clipped at a percentile), up to a high
percentile of the valid pixels so that a few bright spots do not wash the
frame out; pixels that are masked, negative, above the trusted maximum or
hold the detector's invalid value are drawn in a separate colour. Axes in
pixels, and in mm from the beam centre when the geometry is known.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .resolution import Geometry

Scale = Literal["log", "linear"]


def _invalid(
    frame: NDArray[Any], mask: Optional[NDArray[np.bool_]], trusted_max: Optional[float]
) -> NDArray[np.bool_]:
    invalid = frame < 0
    if frame.dtype.kind == "u":
        invalid |= frame >= np.iinfo(frame.dtype).max - 1  # the Eiger's flag values
    if frame.dtype.kind == "f":
        invalid |= ~np.isfinite(frame)
    if mask is not None:
        invalid |= ~mask
    if trusted_max is not None:
        invalid |= frame > trusted_max
    result: NDArray[np.bool_] = invalid
    return result


def plot_spots(
    path: Union[str, os.PathLike[str]],
    frame: NDArray[Any],
    x: ArrayLike = (),
    y: ArrayLike = (),
    *,
    bounding_boxes: Optional[ArrayLike] = None,
    geometry: Optional[Geometry] = None,
    mask: Optional[NDArray[np.bool_]] = None,
    trusted_max: Optional[float] = None,
    scale: Scale = "log",
    percentile: float = 99.5,
    title: Optional[str] = None,
) -> Path:
    """Save ``frame`` with circles at the spot centroids ``x, y`` (pixels,
    DIALS's convention: pixel centres on half-integers). ``bounding_boxes``
    (n x 4: x0, x1, y0, y1) size the circles; without them they are 5 px."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import PatchCollection
    from matplotlib.colors import Normalize, SymLogNorm
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Circle

    frame = np.asarray(frame)
    if frame.ndim != 2 or frame.size == 0:
        raise ValueError(f"a frame is a non-empty 2D array, not shape {frame.shape}")
    if mask is not None and mask.shape != frame.shape:
        raise ValueError(f"mask shape {mask.shape} is not the frame shape {frame.shape}")
    if scale not in ("log", "linear"):
        raise ValueError(f"scale is 'log' or 'linear', not {scale!r}")
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], not {percentile}")
    xs = np.asarray(x, dtype=np.float64).ravel()
    ys = np.asarray(y, dtype=np.float64).ravel()
    if xs.shape != ys.shape:
        raise ValueError(f"{xs.size} x and {ys.size} y centroids")
    radii = np.full(xs.shape, 5.0)
    if bounding_boxes is not None:
        boxes = np.asarray(bounding_boxes, dtype=np.float64).reshape(-1, 4)
        if len(boxes) != len(xs):
            raise ValueError(f"{len(boxes)} bounding boxes for {len(xs)} spots")
        half = np.maximum(boxes[:, 1] - boxes[:, 0], boxes[:, 3] - boxes[:, 2]) / 2
        radii = np.maximum(half * 1.5, 3.0)

    invalid = _invalid(frame, mask, trusted_max)
    counts = np.ma.masked_array(frame.astype(np.float64), mask=invalid)
    good = counts.compressed()
    top = float(np.percentile(good, percentile)) if good.size else 1.0
    top = max(top, 1.0)
    norm: Normalize
    if scale == "log":
        norm = SymLogNorm(linthresh=1.0, vmin=0.0, vmax=top)
    else:
        norm = Normalize(vmin=0.0, vmax=top)

    figure = Figure(figsize=(8, 7), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    cmap = _colour_map()
    height, width = frame.shape
    image = axes.imshow(
        counts, cmap=cmap, norm=norm, origin="upper", interpolation="nearest",
        extent=(0, width, height, 0),
    )
    bar = figure.colorbar(image, ax=axes, extend="max", fraction=0.046, pad=0.14)
    if scale == "log":
        decades = [10.0**k for k in range(int(np.log10(top)) + 1)]
        bar.set_ticks(sorted({0.0, *decades, top}))
        bar.ax.set_yticklabels([f"{t:g}" for t in sorted({0.0, *decades, top})])
    bar.set_label(f"counts ({'log' if scale == 'log' else 'linear'}, clipped at the {percentile:g}th percentile)")

    handles: list[Any] = []
    if xs.size:
        circles = [Circle((cx, cy), r) for cx, cy, r in zip(xs, ys, radii)]
        axes.add_collection(PatchCollection(circles, facecolor="none", edgecolor="red", linewidth=0.8))
    handles.append(Line2D([], [], marker="o", linestyle="none", markerfacecolor="none",
                          markeredgecolor="red", label=f"{xs.size} spots"))
    if invalid.any():
        handles.append(Line2D([], [], marker="s", linestyle="none", color=cmap.get_bad(),
                              label=f"{int(invalid.sum())} invalid pixels"))
    axes.set_xlabel("x (pixels)")
    axes.set_ylabel("y (pixels)")
    axes.set_xlim(0, width)
    axes.set_ylim(height, 0)
    if geometry is not None:
        bx, by = geometry.beam_centre_px
        px, py = geometry.pixel_size_mm
        axes.plot([bx], [by], marker="+", color="tab:blue", markersize=12, linestyle="none")
        handles.append(Line2D([], [], marker="+", linestyle="none", color="tab:blue", label="beam centre"))
        top_axis = axes.secondary_xaxis("top", functions=_pixels_to_mm(bx, px))
        top_axis.set_xlabel("x from the beam (mm)")
        right_axis = axes.secondary_yaxis("right", functions=_pixels_to_mm(by, py))
        right_axis.set_ylabel("y from the beam (mm)")
    axes.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.0, -0.1), ncols=3, frameon=False)
    if title:
        axes.set_title(title)
    out = Path(path)
    figure.savefig(out, format="png")
    return out


def _colour_map() -> Any:
    from matplotlib import colormaps

    return colormaps["Greys"].with_extremes(bad="#9ecae1")  # light blue: invalid


Transform = Callable[[ArrayLike], ArrayLike]


def _pixels_to_mm(centre_px: float, pixel_mm: float) -> tuple[Transform, Transform]:
    def to_mm(pixels: ArrayLike) -> ArrayLike:
        return (np.asarray(pixels, dtype=np.float64) - centre_px) * pixel_mm

    def to_pixels(mm: ArrayLike) -> ArrayLike:
        return np.asarray(mm, dtype=np.float64) / pixel_mm + centre_px

    return to_mm, to_pixels
