"""What Diamond's CPU per-image analysis reports for one image, from its spots.

python-dlstbx's ``per_image_analysis`` runs DIALS on each image, keeps the
spots whose centroid resolution ``d`` satisfies ``d_min <= d <= d_max``
(``d_max`` 40 Å by default), drops spots at the beam centre (``|d*| = 0``),
then DIALS's ``stats_for_reflection_table`` counts them: ``n_spots_total``,
``n_spots_no_ice`` (spots off the hexagonal-ice powder rings),
``n_spots_4A`` (``d > 4`` Å, ice or not) and ``total_intensity`` (summed over
the spots off the ice rings).

The detector is flat and normal to the beam, the beam hits it at the beam
centre, and parallax is ignored (dlstbx runs DIALS with
``disable_parallax_correction``). Pixel coordinates follow DIALS: pixel
``(row i, column j)`` covers ``[j, j+1) x [i, i+1)``, its centre is
``(j + 0.5, i + 0.5)``; the Eiger's ``beam_center_x/y`` are in the same frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import numpy as np
from numpy.typing import ArrayLike, NDArray

#: Hexagonal ice Ih, as DIALS's ``ice_rings_selection``: a = b, c (Å), P6_3/mmc.
ICE_A = 4.498
ICE_C = 7.338
#: Full width of an ice ring in d*^2 (Å^-2); a spot is on a ring when it lies
#: within half of it: ``|d*^2 - ring| < width / 2`` (DIALS's PowderRingFilter).
ICE_RING_WIDTH = 0.004
D_MAX = 40.0
LOW_RESOLUTION_A = 4.0


@dataclass(frozen=True, slots=True)
class Geometry:
    """Where the detector is: what the resolution of a pixel needs."""

    beam_centre_px: tuple[float, float]  # (x, y): fast, slow
    distance_mm: float
    pixel_size_mm: tuple[float, float]  # (x, y)
    wavelength_A: float
    image_size: tuple[int, int]  # (width, height)

    def __post_init__(self) -> None:
        if not (self.distance_mm > 0 and self.wavelength_A > 0):
            raise ValueError(
                f"detector distance ({self.distance_mm} mm) and wavelength"
                f" ({self.wavelength_A} Å) must be positive"
            )
        if not all(p > 0 for p in self.pixel_size_mm):
            raise ValueError(f"pixel size {self.pixel_size_mm} mm must be positive")


def d_star_sq(x: ArrayLike, y: ArrayLike, geometry: Geometry) -> NDArray[np.float64]:
    """``1/d^2`` (Å^-2) at detector positions ``x, y`` (pixels): ``(2 sin θ / λ)^2``."""
    bx, by = geometry.beam_centre_px
    px, py = geometry.pixel_size_mm
    dx = (np.asarray(x, dtype=np.float64) - bx) * px
    dy = (np.asarray(y, dtype=np.float64) - by) * py
    two_theta = np.arctan2(np.hypot(dx, dy), geometry.distance_mm)
    d_star = 2.0 * np.sin(two_theta / 2.0) / geometry.wavelength_A
    result: NDArray[np.float64] = d_star * d_star
    return result


def d_spacing(x: ArrayLike, y: ArrayLike, geometry: Geometry) -> NDArray[np.float64]:
    """Resolution ``d`` (Å) at detector positions ``x, y`` (pixels); inf at the beam."""
    with np.errstate(divide="ignore"):
        result: NDArray[np.float64] = 1.0 / np.sqrt(d_star_sq(x, y, geometry))
    return result


def _ice_d_star_sq(h: NDArray[np.int64], k: NDArray[np.int64], l: NDArray[np.int64]) -> NDArray[np.float64]:  # noqa: E741
    result: NDArray[np.float64] = (4.0 / 3.0) * (h * h + h * k + k * k) / ICE_A**2 + (
        l * l
    ) / ICE_C**2
    return result


@lru_cache(maxsize=64)
def ice_rings_d_star_sq(d_min: float) -> NDArray[np.float64]:
    """The hexagonal-ice rings (d*^2, Å^-2, sorted, distinct) down to ``d_min`` Å.

    As DIALS's PowderRingFilter: rings are generated a half-width beyond
    ``d_min``; P6_3/mmc allows every (h, k, l) except ``l`` odd on
    ``h h -2h l`` and its equivalents (``h = k``, ``k = -2h``, ``h = -2k``,
    which includes ``0 0 l``).
    """
    if not d_min > 0:
        raise ValueError(f"d_min must be positive, not {d_min}")
    limit = 1.0 / d_min**2 + ICE_RING_WIDTH / 2.0
    n_hk = int(np.ceil(ICE_A * np.sqrt(limit))) + 1
    n_l = int(np.ceil(ICE_C * np.sqrt(limit))) + 1
    grid = np.meshgrid(
        np.arange(-n_hk, n_hk + 1),
        np.arange(-n_hk, n_hk + 1),
        np.arange(0, n_l + 1),
        indexing="ij",
    )
    h, k, l = (axis.ravel() for axis in grid)  # noqa: E741
    glide_class = (h == k) | (k == -2 * h) | (h == -2 * k)
    allowed = ~(glide_class & (l % 2 == 1))
    ds2 = _ice_d_star_sq(h, k, l)
    keep = allowed & (ds2 > 0) & (ds2 <= limit)
    result: NDArray[np.float64] = np.unique(ds2[keep])
    return result


def on_ice_ring(
    d_star_sq_values: NDArray[np.float64], width: float = ICE_RING_WIDTH
) -> NDArray[np.bool_]:
    """Which d*^2 values lie on an ice ring: ``|d*^2 - ring| < width / 2``."""
    values = np.asarray(d_star_sq_values, dtype=np.float64)
    if values.size == 0:
        return np.zeros(values.shape, dtype=bool)
    if not width > 0:
        raise ValueError(f"ice ring width must be positive, not {width}")
    rings = ice_rings_d_star_sq(float(1.0 / np.sqrt(values.max())))
    near = np.abs(values[..., None] - rings) < width / 2.0
    return np.asarray(near.any(axis=-1), dtype=bool)


@dataclass(frozen=True, slots=True)
class ImageStats:
    """Per image, what Diamond's CPU PIA sends on (the resolution estimates,
    which it sends only past 10 spots off the ice rings, are not made here)."""

    n_spots_total: int
    n_spots_no_ice: int
    n_spots_4A: int
    total_intensity: float


def image_stats(
    x: ArrayLike,
    y: ArrayLike,
    intensity: ArrayLike,
    geometry: Geometry,
    *,
    d_min: Optional[float] = None,
    d_max: Optional[float] = D_MAX,
    filter_ice: bool = True,
    ice_ring_width: float = ICE_RING_WIDTH,
) -> ImageStats:
    """Count one image's spots as dlstbx's per_image_analysis does.

    ``x, y``: spot centroids (pixels, DIALS's convention); ``intensity``: each
    spot's summed counts. ``d_max``/``d_min`` None: no limit that side.
    """
    xs = np.asarray(x, dtype=np.float64).ravel()
    ys = np.asarray(y, dtype=np.float64).ravel()
    counts = np.asarray(intensity, dtype=np.float64).ravel()
    if not xs.shape == ys.shape == counts.shape:
        raise ValueError(
            f"x, y and intensity differ in length: {xs.size}, {ys.size}, {counts.size}"
        )
    if d_max is not None and d_min is not None and d_min > d_max:
        raise ValueError(f"d_min {d_min} Å is above d_max {d_max} Å")
    ds2 = d_star_sq(xs, ys, geometry)
    with np.errstate(divide="ignore"):
        d = 1.0 / np.sqrt(ds2)
    keep = ds2 > 0
    if d_min is not None:
        keep &= d >= d_min
    if d_max is not None:
        keep &= d <= d_max
    ds2, d, counts = ds2[keep], d[keep], counts[keep]
    ice = on_ice_ring(ds2, ice_ring_width) if filter_ice else np.zeros(ds2.shape, bool)
    return ImageStats(
        n_spots_total=int(ds2.size),
        n_spots_no_ice=int((~ice).sum()),
        n_spots_4A=int((d > LOW_RESOLUTION_A).sum()),
        total_intensity=float(counts[~ice].sum()),
    )
