"""The numpy reference of DIALS's strong-pixel rules, checked by hand and
against a line-by-line transcription of DIALS's C++ loops
(src/dials/algorithms/image/threshold/local.h, filter/distance.h) on small
frames, where DIALS's double summed-area tables are exact."""

from __future__ import annotations

import math
from typing import Any, Optional

import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import numpy as np
import pytest
from dispersion_reference import (
    BIG,
    box_sums,
    find_spots,
    strong_pixels,
    strong_pixels_extended,
    valid_pixels,
)
from hypothesis import given, settings
from numpy.typing import NDArray

# --- DIALS's C++, transcribed (T = double, as DIALS runs on flex.double) ---


def _dials_sat(src: NDArray[Any], mask: NDArray[np.bool_]) -> list[list[tuple[int, float, float]]]:
    ysize, xsize = src.shape
    table: list[list[tuple[int, float, float]]] = []
    for j in range(ysize):
        m, x, y = 0, 0.0, 0.0
        row = []
        for i in range(xsize):
            v = float(src[j, i])
            mm = 1 if (mask[j, i] and v < BIG) else 0
            m += mm
            x += mm * v
            y += mm * v * v
            if j == 0:
                row.append((m, x, y))
            else:
                above = table[j - 1][i]
                row.append((above[0] + m, above[1] + x, above[2] + y))
        table.append(row)
    return table


def _dials_box(table: list[list[tuple[int, float, float]]], j: int, i: int, k: int) -> tuple[float, float, float]:
    ysize, xsize = len(table), len(table[0])
    i0, i1 = i - k - 1, min(i + k, xsize - 1)
    j0, j1 = j - k - 1, min(j + k, ysize - 1)
    m = x = y = 0.0
    if i0 >= 0 and j0 >= 0:
        d00, d10, d01 = table[j0][i0], table[j1][i0], table[j0][i1]
        m += d00[0] - (d10[0] + d01[0])
        x += d00[1] - (d10[1] + d01[1])
        y += d00[2] - (d10[2] + d01[2])
    elif i0 >= 0:
        d10 = table[j1][i0]
        m -= d10[0]
        x -= d10[1]
        y -= d10[2]
    elif j0 >= 0:
        d01 = table[j0][i1]
        m -= d01[0]
        x -= d01[1]
        y -= d01[2]
    d11 = table[j1][i1]
    return m + d11[0], x + d11[1], y + d11[2]


def dials_dispersion(
    src: NDArray[Any], mask: NDArray[np.bool_], nsig_b: float, nsig_s: float,
    threshold: float, min_count: int, k: int = 3, gain: Optional[NDArray[np.float64]] = None,
) -> NDArray[np.bool_]:
    table = _dials_sat(src, mask)
    dst = np.zeros(src.shape, dtype=bool)
    for j in range(src.shape[0]):
        for i in range(src.shape[1]):
            m, x, y = _dials_box(table, j, i, k)
            v = float(src[j, i])
            if mask[j, i] and m >= min_count and x >= 0 and v > threshold:
                if gain is None:
                    a = m * y - x * x - x * (m - 1)
                    b = m * v - x
                    c = x * nsig_b * math.sqrt(2 * (m - 1))
                    d = nsig_s * math.sqrt(x * m)
                else:
                    g = float(gain[j, i])
                    a = m * y - x * x
                    b = m * v - x
                    c = g * x * (m - 1 + nsig_b * math.sqrt(2 * (m - 1)))
                    d = nsig_s * math.sqrt(g * x * m)
                dst[j, i] = a > c and b > d
    return dst


def _dials_chebyshev(src: NDArray[np.bool_], value: bool) -> NDArray[np.int64]:
    height, width = src.shape
    big = height + width
    dst = np.zeros(src.shape, dtype=np.int64)
    for j in range(height):
        for i in range(width):
            n = dst[j - 1, i] if j > 0 else big
            w = dst[j, i - 1] if i > 0 else big
            nw = dst[j - 1, i - 1] if (j > 0 and i > 0) else big
            ne = dst[j - 1, i + 1] if (j > 0 and i < width - 1) else big
            dst[j, i] = 0 if src[j, i] == value else 1 + min(min(n, w), min(ne, nw))
    for j in range(height, 0, -1):
        for i in range(width, 0, -1):
            s = dst[j, i - 1] if j < height else big
            e = dst[j - 1, i] if i < width else big
            sw = dst[j, i - 2] if (j < height and i > 1) else big
            se = dst[j, i] if (j < height and i < width) else big
            other = min(min(s, e), min(se, sw))
            if other < dst[j - 1, i - 1]:
                dst[j - 1, i - 1] = 1 + other
    return dst


def dials_dispersion_extended(
    src: NDArray[Any], mask: NDArray[np.bool_], nsig_b: float, nsig_s: float,
    threshold: float, min_count: int, k: int = 3, gain: Optional[NDArray[np.float64]] = None,
) -> NDArray[np.bool_]:
    table = _dials_sat(src, mask)
    dst = np.zeros(src.shape, dtype=bool)
    for j in range(src.shape[0]):
        for i in range(src.shape[1]):
            m, x, y = _dials_box(table, j, i, k)
            if not mask[j, i]:
                dst[j, i] = True
            elif m >= min_count and x >= 0:
                if gain is None:
                    a = m * y - x * x - x * (m - 1)
                    c = x * nsig_b * math.sqrt(2 * (m - 1))
                else:
                    g = float(gain[j, i])
                    a = m * y - x * x
                    c = g * x * (m - 1 + nsig_b * math.sqrt(2 * (m - 1)))
                dst[j, i] = a > c
    distance = _dials_chebyshev(dst, False)
    dst = np.where(mask, ~(dst & (distance >= k)), False)
    table = _dials_sat(src, dst)
    final = np.zeros(src.shape, dtype=bool)
    for j in range(src.shape[0]):
        for i in range(src.shape[1]):
            m, x, _ = _dials_box(table, j, i, k + 2)
            v = float(src[j, i])
            if mask[j, i] and m >= 0 and x >= 0:
                mean = x / m if m >= 2 else 0.0
                g = 1.0 if gain is None else float(gain[j, i])
                local = v >= mean + nsig_s * math.sqrt(g * mean)
                final[j, i] = (not dst[j, i]) and v > threshold and local
    return final


# --- frames -----------------------------------------------------------------


def _frame(seed: int, shape: tuple[int, int]) -> tuple[NDArray[np.int32], NDArray[np.bool_]]:
    """Poisson background, a few bright blobs, masked and negative pixels,
    values past the trusted maximum and past 2^24."""
    rng = np.random.default_rng(seed)
    image = rng.poisson(rng.uniform(0.2, 5.0), shape).astype(np.int64)
    for _ in range(rng.integers(0, 4)):
        y, x = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        image[max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2] += rng.integers(5, 200)
    flat = image.reshape(-1)
    picks = rng.choice(flat.size, size=min(6, flat.size), replace=False)
    flat[picks[:2]] = -1  # gaps as int32 reads them
    flat[picks[2:4]] = 10_000  # above the trusted maximum below
    flat[picks[4:]] = BIG + 5  # valid, but left out of the box sums
    mask = rng.random(shape) > 0.1
    return image.astype(np.int32), mask


SHAPES = [(15, 20), (9, 9), (1, 17), (5, 3), (24, 11)]
CASES = [(seed, SHAPES[seed % len(SHAPES)]) for seed in range(10)]


@pytest.mark.parametrize(("seed", "shape"), CASES)
@pytest.mark.parametrize("with_gain", [False, True])
def test_reference_matches_dials_loops(seed: int, shape: tuple[int, int], with_gain: bool) -> None:
    image, mask = _frame(seed, shape)
    gain = np.random.default_rng(seed + 100).uniform(0.5, 2.0, shape) if with_gain else None
    valid = valid_pixels(image, mask, trusted_max=BIG * 2)
    valid &= image != 10_000  # the same cut, as a trusted maximum of 9999 would make
    valid_t = valid_pixels(image, mask & (image != 10_000), trusted_max=BIG * 2)
    assert (valid == valid_t).all()
    for nsig_b, nsig_s, min_count in [(6.0, 3.0, 2), (3.0, 3.0, 3), (1.0, 0.5, 2)]:
        expected = dials_dispersion(image, valid, nsig_b, nsig_s, 0.0, min_count, gain=gain)
        got = strong_pixels(
            image, mask & (image != 10_000), trusted_max=BIG * 2, sigma_background=nsig_b,
            sigma_strong=nsig_s, min_local=min_count, gain=gain,
        )
        assert (got == expected).all(), (nsig_b, nsig_s, min_count)
        expected = dials_dispersion_extended(image, valid, nsig_b, nsig_s, 0.0, min_count, gain=gain)
        got = strong_pixels_extended(
            image, mask & (image != 10_000), trusted_max=BIG * 2, sigma_background=nsig_b,
            sigma_strong=nsig_s, min_local=min_count, gain=gain,
        )
        assert (got == expected).all(), (nsig_b, nsig_s, min_count)


def test_loops_and_reference_find_something() -> None:
    """The comparison above is not between two empty masks."""
    found = sum(
        int(strong_pixels(*_frame(seed, shape), sigma_background=3.0).sum())
        + int(strong_pixels_extended(*_frame(seed, shape), sigma_background=3.0).sum())
        for seed, shape in CASES
    )
    assert found > 20


# --- by hand ------------------------------------------------------------------


def test_box_sums_clip_at_edges() -> None:
    ones = np.ones((20, 20), dtype=np.uint16)
    m, x, y = box_sums(ones, np.ones(ones.shape, bool), 3)
    assert m[0, 0] == 16 and m[0, 10] == 28 and m[10, 10] == 49 and m[19, 19] == 16
    assert (x == m).all() and (y == m).all()


def test_box_sums_are_exact_past_2_to_53() -> None:
    """49 squares of 2^24 - 1 sum to more than 2^53: int64 keeps every unit."""
    v = BIG - 1
    image = np.full((7, 7), v, dtype=np.uint32)
    image[0, 0] = v - 2
    m, x, y = box_sums(image, np.ones(image.shape, bool), 3)
    exact = 48 * v * v + (v - 2) * (v - 2)  # odd, past 2^53
    assert exact > 2**53 and int(y[3, 3]) == exact and int(x[3, 3]) == 49 * v - 2
    assert float(np.float64(exact)) != exact  # a float64 table could not hold it


def test_one_bright_pixel_on_flat_background() -> None:
    """m = 49, x = 148, y = 10048 around a 100 among ones:
    a = 49*10048 - 148^2 - 148*48 = 463344 > c = 148*6*sqrt(96) = 8700.6,
    b = 49*100 - 148 = 4752 > d = 3*sqrt(148*49) = 255.5: strong; its
    neighbours (v = 1: b = 49 - 148 < 0) are not."""
    image = np.ones((21, 21), dtype=np.uint32)
    image[10, 10] = 100
    strong = strong_pixels(image)
    assert strong.sum() == 1 and strong[10, 10]
    # Extended: the 7x7 block around it is not background; eroded by 3 it
    # is the 3x3 block; the 11x11 mean outside that is 1; 100 >= 1 + 3 only.
    extended = strong_pixels_extended(image)
    assert extended.sum() == 1 and extended[10, 10]
    spots = find_spots(image, strong, min_spot_size=1)
    assert len(spots) == 1 and spots.size[0] == 1
    assert spots.centroid[0].tolist() == [10.5, 10.5]
    assert spots.bounding_box[0].tolist() == [10, 11, 10, 11]
    assert spots.intensity[0] == 100
    assert len(find_spots(image, strong)) == 0  # smaller than 3 pixels


def test_flat_frame_has_no_strong_pixels() -> None:
    """Variance 0: a = 49*49c^2 - (49c)^2 - 49c*48 < 0."""
    image = np.full((30, 30), 7, dtype=np.uint16)
    assert not strong_pixels(image).any()
    assert not strong_pixels_extended(image).any()


def test_pixel_past_2_to_24_is_left_out_of_its_own_box() -> None:
    """v = 2^25 among ones: m = 48, x = y = 48, a = 48*48 - 48^2 - 48*47 < 0."""
    image = np.ones((21, 21), dtype=np.uint32)
    image[10, 10] = 2 * BIG
    assert not strong_pixels(image).any()
    image[10, 10] = BIG - 1  # counted: strong
    assert strong_pixels(image)[10, 10]


def test_invalid_pixels_are_never_strong_and_not_counted() -> None:
    image = np.ones((21, 21), dtype=np.int32)
    image[10, 10] = 100
    mask = np.ones(image.shape, bool)
    mask[10, 10] = False
    assert not strong_pixels(image, mask).any()
    assert not strong_pixels(image, trusted_max=99).any()
    assert strong_pixels(image, trusted_max=100)[10, 10]  # the maximum is trusted
    image[10, 10] = -1
    assert not strong_pixels(image).any()
    # A neighbourhood with fewer than min_local valid pixels: nothing.
    image[10, 10] = 100
    lonely = np.zeros(image.shape, bool)
    lonely[10, 10] = True
    assert not strong_pixels(image, lonely).any()


def test_spots_are_four_connected_with_dials_bounding_boxes() -> None:
    strong = np.zeros((8, 10), bool)
    strong[1, 1:4] = True  # a row of 3
    strong[2, 4] = True  # touches (1, 3) only by a corner: its own spot
    strong[5:7, 6:8] = True  # a 2x2 square
    image = np.arange(80, dtype=np.float64).reshape(8, 10) + 1
    spots = find_spots(image, strong, min_spot_size=1)
    assert spots.size.tolist() == [3, 1, 4]
    assert spots.bounding_box.tolist() == [[1, 4, 1, 2], [4, 5, 2, 3], [6, 8, 5, 7]]
    w = image[1, 1:4]
    assert spots.centroid[0, 0] == pytest.approx((w * np.array([1.5, 2.5, 3.5])).sum() / w.sum())
    assert spots.centroid[0, 1] == 1.5
    assert spots.intensity.tolist() == [w.sum(), image[2, 4], image[5:7, 6:8].sum()]
    assert find_spots(image, strong).size.tolist() == [3, 4]
    assert find_spots(image, strong, max_spot_size=3).size.tolist() == [3]
    assert find_spots(image, strong, min_spot_size=4, max_spot_size=None).size.tolist() == [4]


# --- DIALS's own tests (tests/algorithms/image/threshold/test_local.py) ------


def _dials_test_image() -> tuple[NDArray[np.float64], NDArray[np.bool_], NDArray[np.float64]]:
    """As DIALS's test class builds it, smaller: Gaussian spots of 100 on a
    Poisson background of 5, 1 % of pixels masked, gains in [1, 2)."""
    rng = np.random.default_rng(7)
    n = 300
    image = np.zeros((n, n))
    yy, xx = np.mgrid[0:11, 0:11]
    spot = np.exp(-((yy - 5) ** 2 + (xx - 5) ** 2) / 2**2)
    for _ in range(40):
        x, y = rng.integers(0, n, 2)
        for j in range(11):
            for i in range(11):
                if 0 <= x + i - 5 < n and 0 <= y + j - 5 < n:
                    image[y + j - 5, x + i - 5] = rng.poisson(100 * spot[j, i])
    image += rng.poisson(5, (n, n))
    return image, rng.random((n, n)) < 0.99, rng.random((n, n)) + 1.0


@pytest.mark.parametrize("rule", [strong_pixels, strong_pixels_extended])
def test_dials_expectations(rule: Any) -> None:
    image, mask, gain = _dials_test_image()
    kw: dict[str, Any] = dict(sigma_background=3.0, sigma_strong=3.0, min_local=2)
    plain = rule(image, mask, **kw)
    assert plain.sum() > 100
    # the same as a transposed image, transposed
    assert (rule(image.T, mask.T, **kw).T == plain).all()
    if rule is strong_pixels:
        # scaling both the image and the gain does not change the result
        assert (rule(image, mask, gain=gain, **kw) == rule(2 * image, mask, gain=2 * gain, **kw)).all()
        # a gain of 1 is no gain
        assert (rule(image, mask, gain=np.ones_like(gain), **kw) == plain).all()


def test_extended_mean_of_fewer_than_two_background_pixels_is_zero() -> None:
    """All masked but P = 100 and its neighbour Q = 1 (not background: their
    box holds both), and B = 90 four pixels right of P (background: its box
    holds only itself). P and Q are eroded (B is 4 and 5 away); their 11x11
    box holds one background pixel, B, so the mean is 0, not 90, and both
    are strong (with a mean of 90, P = 100 < 90 + 3*sqrt(90) would not be)."""
    image = np.zeros((15, 15), dtype=np.int32)
    mask = np.zeros(image.shape, bool)
    for (row, column), value in {(7, 7): 100, (7, 6): 1, (7, 11): 90}.items():
        image[row, column] = value
        mask[row, column] = True
    expected = np.zeros(image.shape, bool)
    expected[7, 6:8] = True
    assert (strong_pixels_extended(image, mask) == expected).all()
    assert (dials_dispersion_extended(image, mask, 6.0, 3.0, 0.0, 2) == expected).all()


@settings(max_examples=60, deadline=None)
@given(
    image=hnp.arrays(
        np.int64, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=13),
        elements=st.one_of(st.integers(0, 30), st.integers(-2, 2**25), st.just(BIG)),
    ),
    data=st.data(),
    nsig_b=st.floats(0.0, 8.0),
    nsig_s=st.floats(0.0, 5.0),
    min_count=st.integers(2, 6),
    threshold=st.sampled_from([0.0, 2.0]),
)
def test_reference_matches_dials_loops_on_any_frame(
    image: NDArray[np.int64], data: st.DataObject, nsig_b: float, nsig_s: float,
    min_count: int, threshold: float,
) -> None:
    mask = data.draw(hnp.arrays(np.bool_, image.shape))
    valid = valid_pixels(image, mask)
    kw: dict[str, Any] = dict(
        sigma_background=nsig_b, sigma_strong=nsig_s, min_local=min_count, global_threshold=threshold
    )
    assert (strong_pixels(image, mask, **kw) == dials_dispersion(image, valid, nsig_b, nsig_s, threshold, min_count)).all()
    assert (
        strong_pixels_extended(image, mask, **kw)
        == dials_dispersion_extended(image, valid, nsig_b, nsig_s, threshold, min_count)
    ).all()
