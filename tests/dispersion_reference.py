"""A plain numpy/scipy reference of DIALS's strong-pixel rules and spots.

Written to be read, not to be fast. It follows DIALS's
``src/dials/algorithms/image/threshold/local.h`` (``DispersionThreshold``,
``DispersionExtendedThreshold``):

* A pixel is *valid* when the mask says so, it is not negative and not
  above the trusted maximum (dxtbx's trusted range, inclusive). The box sums
  count valid pixels below 2^24 (DIALS's cut): ``m`` pixels, their sum ``x``,
  the sum of their squares ``y``, over the (2k+1)^2 box clipped at the edges.
* Box sums of integer images are exact (int64: a box of 49 squares below
  2^48 stays below 2^54); float images are summed in float64. The decision
  is then made in double precision, in DIALS's order of operations.

Spots are 4-connected groups of strong pixels (``scipy.ndimage.label``), in
the raster order of each group's first pixel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from numpy.typing import NDArray
from scipy import ndimage  # type: ignore[import-untyped]

#: DIALS counts a pixel in the box sums only below this value.
BIG = 1 << 24

Gain = Union[float, NDArray[np.float64], None]


def valid_pixels(
    image: NDArray[Any], mask: Optional[NDArray[np.bool_]] = None, trusted_max: Optional[float] = None
) -> NDArray[np.bool_]:
    """Masked in (True = good), not negative, not above ``trusted_max``."""
    valid = np.ones(image.shape, dtype=bool) if mask is None else mask.astype(bool).copy()
    valid &= image >= 0
    if trusted_max is not None:
        valid &= image <= trusted_max
    return valid


def _box_sum_1d(values: NDArray[Any], k: int, axis: int) -> NDArray[Any]:
    """Sum over ``[i - k, i + k]`` along ``axis``, clipped at the ends."""
    pad = [(0, 0)] * values.ndim
    pad[axis] = (k, k)
    padded = np.pad(values, pad)  # zeros: outside the image adds nothing
    windows = sliding_window_view(padded, 2 * k + 1, axis=axis)
    result: NDArray[Any] = windows.sum(axis=-1, dtype=values.dtype)
    return result


def box_sum(values: NDArray[Any], k: int) -> NDArray[Any]:
    """Sum over the (2k+1) x (2k+1) box around each pixel, clipped at the edges."""
    return _box_sum_1d(_box_sum_1d(values, k, axis=1), k, axis=0)


def box_sums(
    image: NDArray[Any], counted: NDArray[np.bool_], k: int
) -> tuple[NDArray[np.int64], NDArray[Any], NDArray[Any]]:
    """(m, x, y): how many ``counted`` pixels in each box, their sum, the sum
    of their squares; int64 for integer images, float64 for float ones."""
    kind = np.int64 if image.dtype.kind in "iub" else np.float64
    v = np.where(counted, image, 0).astype(kind)
    return box_sum(counted.astype(np.int64), k), box_sum(v, k), box_sum(v * v, k)


def _as_double(*arrays: NDArray[Any]) -> list[NDArray[np.float64]]:
    return [np.asarray(a, dtype=np.float64) for a in arrays]


def dispersion_test(
    m: NDArray[Any],
    x: NDArray[Any],
    y: NDArray[Any],
    v: Optional[NDArray[Any]],
    sigma_background: float,
    sigma_strong: float,
    gain: Gain,
) -> NDArray[np.bool_]:
    """DIALS's two inequalities in double precision (``v`` None: only the
    background one, as the extended rule's first pass). Without a gain:
    ``a = m*y - x*x - x*(m-1) > c = x*nsig_b*sqrt(2*(m-1))`` and
    ``b = m*v - x > d = nsig_s*sqrt(x*m)``; with gain g:
    ``a = m*y - x*x > c = g*x*(m - 1 + nsig_b*sqrt(2*(m-1)))``,
    ``d = nsig_s*sqrt(g*x*m)``. Callers select ``m >= min_count, x >= 0``."""
    m, x, y = _as_double(m, x, y)
    with np.errstate(invalid="ignore", divide="ignore"):
        root = np.sqrt(2 * (m - 1))
        if gain is None:
            a = m * y - x * x - x * (m - 1)
            c = x * sigma_background * root
        else:
            g = np.asarray(gain, dtype=np.float64)
            a = m * y - x * x
            c = g * x * (m - 1 + sigma_background * root)
        result: NDArray[np.bool_] = a > c
        if v is not None:
            b = m * np.asarray(v, dtype=np.float64) - x
            if gain is None:
                d = sigma_strong * np.sqrt(x * m)
            else:
                d = sigma_strong * np.sqrt(g * x * m)
            result = result & (b > d)
    return result


def strong_pixels(
    image: NDArray[Any],
    mask: Optional[NDArray[np.bool_]] = None,
    *,
    trusted_max: Optional[float] = None,
    sigma_background: float = 6.0,
    sigma_strong: float = 3.0,
    min_local: int = 2,
    global_threshold: float = 0.0,
    kernel: int = 3,
    gain: Gain = None,
) -> NDArray[np.bool_]:
    """DIALS's ``dispersion`` rule: which pixels are strong."""
    valid = valid_pixels(image, mask, trusted_max)
    m, x, y = box_sums(image, valid & (image < BIG), kernel)
    candidate = valid & (m >= min_local) & (x >= 0) & (image > global_threshold)
    return candidate & dispersion_test(m, x, y, image, sigma_background, sigma_strong, gain)


def strong_pixels_extended(
    image: NDArray[Any],
    mask: Optional[NDArray[np.bool_]] = None,
    *,
    trusted_max: Optional[float] = None,
    sigma_background: float = 6.0,
    sigma_strong: float = 3.0,
    min_local: int = 2,
    global_threshold: float = 0.0,
    kernel: int = 3,
    gain: Gain = None,
) -> NDArray[np.bool_]:
    """DIALS's ``dispersion_extended`` rule (its default), as its current code:

    1. not background: invalid pixels, and valid ones passing the background
       inequality (``m >= min_local``, ``x >= 0``) over the (2k+1)^2 box;
    2. erode: keep those at Chebyshev distance >= k from the nearest
       background pixel (the image's outside is not background);
    3. the mean over the (2k+5)^2 box of the valid pixels below 2^24 outside
       the eroded region (``x/m``, 0 if ``m < 2``);
    4. strong: valid, eroded, ``x >= 0``, ``v > global_threshold`` and
       ``v >= mean + nsig_s*sqrt(g*mean)``."""
    valid = valid_pixels(image, mask, trusted_max)
    m, x, y = box_sums(image, valid & (image < BIG), kernel)
    dispersed = (m >= min_local) & (x >= 0) & dispersion_test(
        m, x, y, None, sigma_background, sigma_strong, gain
    )
    not_background = ~valid | dispersed
    # Chebyshev distance >= k to a background pixel <=> no background pixel
    # within distance k-1: a minimum over the (2k-1)^2 box, outside counting as True.
    eroded = not_background & ndimage.minimum_filter(
        not_background, size=2 * kernel - 1, mode="constant", cval=True
    )
    background = valid & ~eroded
    m2, x2, _ = box_sums(image, background & (image < BIG), kernel + 2)
    m2d, x2d = _as_double(m2, x2)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(m2d >= 2, x2d / m2d, 0.0)
        g = 1.0 if gain is None else np.asarray(gain, dtype=np.float64)
        local = np.asarray(image, dtype=np.float64) >= mean + sigma_strong * np.sqrt(g * mean)
    result: NDArray[np.bool_] = valid & (x2 >= 0) & eroded & (image > global_threshold) & local
    return result


@dataclass(frozen=True)
class Spots:
    """Spots of one image, one row each, in raster order of their first pixel."""

    size: NDArray[np.int64]  # pixels
    centroid: NDArray[np.float64]  # (n, 2): x, y; pixel centres on half-integers
    intensity: NDArray[np.float64]  # summed counts
    bounding_box: NDArray[np.int64]  # (n, 4): x0, x1, y0, y1, half-open

    def __len__(self) -> int:
        return len(self.size)


FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)


def find_spots(
    image: NDArray[Any],
    strong: NDArray[np.bool_],
    *,
    min_spot_size: int = 3,
    max_spot_size: Optional[int] = 1000,
    max_separation: Optional[float] = None,
) -> Spots:
    """4-connected groups of strong pixels, kept when
    ``min_spot_size <= size <= max_spot_size`` (None: no maximum) and, with
    ``max_separation``, when the centre of their first brightest pixel (raster
    order) is at most that far from the centroid (DIALS's PeakCentroidDistanceFilter)."""
    labels, n = ndimage.label(strong, structure=FOUR_CONNECTED)
    index = np.arange(1, n + 1)
    size = np.bincount(labels.ravel(), minlength=n + 1)[1:].astype(np.int64)
    values = np.asarray(image, dtype=np.float64)
    rows, columns = np.indices(image.shape)
    intensity = np.asarray(ndimage.sum_labels(values, labels, index), dtype=np.float64).reshape(n)
    cx = np.asarray(ndimage.sum_labels(values * (columns + 0.5), labels, index)).reshape(n)
    cy = np.asarray(ndimage.sum_labels(values * (rows + 0.5), labels, index)).reshape(n)
    with np.errstate(invalid="ignore", divide="ignore"):
        centroid = np.stack([cx / intensity, cy / intensity], axis=1).reshape(n, 2)
    boxes = ndimage.find_objects(labels)
    bounding_box = np.array(
        [[s[1].start, s[1].stop, s[0].start, s[0].stop] for s in boxes if s is not None],
        dtype=np.int64,
    ).reshape(n, 4)
    keep = size >= min_spot_size
    if max_spot_size is not None:
        keep &= size <= max_spot_size
    if max_separation is not None and n:
        peaks = np.asarray(ndimage.maximum_position(np.where(strong, values, -np.inf), labels, index), dtype=np.float64)
        peak_xy = peaks[:, ::-1] + 0.5
        keep &= np.hypot(*(centroid - peak_xy).T) <= max_separation
    return Spots(size[keep], centroid[keep], intensity[keep], bounding_box[keep])
