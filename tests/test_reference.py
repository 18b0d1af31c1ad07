"""Property tests: the Rust core against the plain scipy reference in reference.py."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import reference
import zocalo_xrc as zx

# Sparse small counts make ties, touching corners, many components and empty grids.
count = st.one_of(st.just(0), st.just(0), st.integers(0, 4), st.integers(0, 60))


def grid(max_x=7, max_y=7):
    return st.tuples(st.integers(1, max_x), st.integers(1, max_y)).flatmap(
        lambda s: hnp.arrays(np.int64, s, elements=count)
    )


@st.composite
def gridinfo(draw, max_steps=9):
    return {
        "steps_x": draw(st.integers(1, max_steps)),
        "steps_y": draw(st.integers(1, max_steps)),
        "dx_mm": draw(st.sampled_from([0.005, 0.01, 0.02, 0.035])),
        "dy_mm": draw(st.sampled_from([0.005, 0.01, 0.02, 0.05])),
        "micronsPerPixelX": draw(st.sampled_from([0.44, 0.806, 1.0, 1.25])),
        "micronsPerPixelY": draw(st.sampled_from([0.44, 0.806, 1.0, 1.25])),
        "snapshot_offsetXPixel": draw(st.sampled_from([0.0, 339.273, 10.5])),
        "snapshot_offsetYPixel": draw(st.sampled_from([0.0, 236.727, 20.25])),
        "snaked": draw(st.booleans()),
        "orientation": draw(st.sampled_from(["horizontal", "vertical"])),
    }


@given(gi=gridinfo(), data=st.data())
def test_reshape_matches_reference(gi, data):
    n = gi["steps_x"] * gi["steps_y"]
    counts = data.draw(hnp.arrays(np.int64, n, elements=st.integers(0, 10**6)))
    got = zx.reshape_grid(counts, zx.GridInfo.from_ispyb(gi))
    want = reference.reshape(counts, gi["steps_x"], gi["steps_y"], gi["snaked"], gi["orientation"])
    assert got.dtype == np.int64 and got.shape == (gi["steps_x"], gi["steps_y"])
    np.testing.assert_array_equal(got, want)


@given(gi=gridinfo(), data=st.data(), sample_id=st.one_of(st.none(), st.integers(1, 10**7)))
def test_centre_2d_matches_reference(gi, data, sample_id):
    counts = data.draw(hnp.arrays(np.int64, gi["steps_x"] * gi["steps_y"], elements=count))
    got = zx.centre_2d(counts, zx.GridInfo.from_ispyb(gi), sample_id=sample_id).to_dict()
    assert got == reference.centre_2d(counts, gi, sample_id)


@given(gi=gridinfo(), data=st.data())
def test_centre_2d_multi_sample_pin(gi, data):
    counts = data.draw(hnp.arrays(np.int64, gi["steps_x"] * gi["steps_y"], elements=count))
    limits = [(0.0, 2.0), (2.5, 4.0), (4.0, 9.0)]
    ids = {1: 11, 2: 12, 3: 13}
    got = zx.centre_2d(counts, zx.GridInfo.from_ispyb(gi), sample_id=11, multipin_sample_ids=ids, well_limits=limits)
    assert got.to_dict() == reference.centre_2d(counts, gi, 11, ids, limits)


@given(
    xy=grid(),
    data=st.data(),
    threshold=st.sampled_from([0.25, 0.05, 0.5, 0.0, 1.0, 0.3333]),
    threshold_absolute=st.sampled_from([0, 0, 3, 5, 2.5]),
    sample_id=st.one_of(st.none(), st.integers(1, 10**7)),
)
def test_centre_3d_matches_reference(xy, data, threshold, threshold_absolute, sample_id):
    xz = data.draw(st.integers(1, 7).flatmap(lambda nz: hnp.arrays(np.int64, (xy.shape[0], nz), elements=count)))
    got = zx.centre_3d(xy, xz, threshold=threshold, threshold_absolute=threshold_absolute, sample_id=sample_id)
    assert got.to_dicts() == reference.centre_3d(xy, xz, threshold, threshold_absolute, sample_id)


@given(xy=grid(max_x=12), data=st.data(), threshold=st.sampled_from([0.25, 0.05, 0.6]))
def test_centre_3d_multi_sample_pin_matches_reference(xy, data, threshold):
    xz = data.draw(st.integers(1, 5).flatmap(lambda nz: hnp.arrays(np.int64, (xy.shape[0], nz), elements=count)))
    limits = [(0.0, 3.0), (3.5, 7.0), (7.0, 11.0)]
    ids = {1: 21, 2: 22, 3: 23}
    got = zx.centre_3d(xy, xz, threshold=threshold, threshold_absolute=3, sample_id=21,
                       multipin_sample_ids=ids, well_limits=limits)
    assert got.to_dicts() == reference.centre_3d(xy, xz, threshold, 3, 21, ids, limits)


@given(
    shape=st.tuples(st.integers(1, 40), st.integers(1, 30), st.integers(1, 30)),
    seed=st.integers(0, 2**32 - 1),
    mean=st.sampled_from([0.3, 2.0, 8.0]),
)
def test_centre_3d_on_noisy_volumes(shape, seed, mean):
    """Larger, noisy volumes: many components of odd shapes."""
    nx, ny, nz = shape
    rng = np.random.default_rng(seed)
    xy, xz = rng.poisson(mean, (nx, ny)), rng.poisson(mean, (nx, nz))
    assert zx.centre_3d(xy, xz).to_dicts() == reference.centre_3d(xy, xz)


@st.composite
def product_scans(draw):
    """Grids aimed at how the core reads the volume: slices of many rows that
    share a cut-off (few distinct counts), or more than 16 cut-offs in a slice,
    long runs across 64-value words (nz not a multiple of 64), ties for the
    maximum within and across runs; counts whose products pass 2^53 (the
    float rounding of the threshold), or whose bounds need 128-bit sums
    (a few large spikes). The big ones stay small enough for the reference's
    int64 sums."""
    kind = draw(st.sampled_from(["few", "smooth", "distinct", "near 2^53", "spikes"]))
    nx = draw(st.integers(1, 3 if kind != "near 2^53" else 2))
    if kind == "near 2^53":
        ny, nz = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    else:
        ny, nz = draw(st.integers(1, 40)), draw(st.sampled_from([1, 5, 63, 64, 65, 127, 128, 129, 150]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))

    def smooth(n):
        peak, width = rng.uniform(0, n), rng.uniform(1, n / 2 + 1)
        return np.round(60 * np.exp(-0.5 * ((np.arange(n) - peak) / width) ** 2) + rng.integers(0, 3, n))

    def spiked(shape):
        a = rng.integers(0, 4, shape)
        a.flat[rng.integers(0, a.size, 3)] = rng.integers(2**21, 2**22, 3)
        return a

    if kind == "few":
        xy, xz = rng.choice([0, 1, 2, 3, 5, 8], (nx, ny)), rng.choice([0, 0, 1, 2, 3, 8], (nx, nz))
    elif kind == "smooth":
        xy, xz = np.array([smooth(ny) for _ in range(nx)]), np.array([smooth(nz) for _ in range(nx)])
    elif kind == "distinct":  # every row its own cut-off
        xy = np.array([rng.permutation(ny) + 1 for _ in range(nx)])
        xz = np.array([smooth(nz) for _ in range(nx)])
    elif kind == "near 2^53":
        xy = 2**27 + rng.integers(-3, 4, (nx, ny)) * rng.integers(0, 2, (nx, ny))
        xz = 2**26 + rng.integers(-3, 4, (nx, nz)) * rng.integers(0, 2, (nx, nz))
    else:
        xy, xz = spiked((nx, ny)), spiked((nx, nz))
    return xy.astype(np.int64), xz.astype(np.int64), kind in ("near 2^53", "spikes")


def same_results(got, want, big):
    """Equal, field by field. With sums beyond 2^53 the reference's centres of
    mass are float sums (the core's are exact sums, divided once) and its
    order is by float totals that may tie where the exact ones do not: then
    centres agree to 1e-12 and the order is compared by exact fields."""
    if not big:
        return got == want
    key = lambda r: (-r["total_count"], r["max_voxel"], r["bounding_box"])  # noqa: E731
    got, want = sorted(got, key=key), sorted(want, key=key)
    for g, w in zip(got, want):
        assert g["centre_of_mass"] == pytest.approx(w.pop("centre_of_mass"), rel=1e-12, abs=0)
        del g["centre_of_mass"]
    return got == want


@given(
    scan=product_scans(),
    threshold=st.sampled_from([0.25, 0.0, 0.1, 0.5, 0.9, 0.99999999, 0.9999999999999999, 1.0]),
    threshold_absolute=st.sampled_from([0, 0, 2, 3.5]),
)
def test_centre_3d_on_product_structure(scan, threshold, threshold_absolute):
    xy, xz, big = scan
    got = zx.centre_3d(xy, xz, threshold=threshold, threshold_absolute=threshold_absolute)
    assert same_results(got.to_dicts(), reference.centre_3d(xy, xz, threshold, threshold_absolute), big)


@given(scan=product_scans(), threshold=st.sampled_from([0.25, 0.05, 0.6]))
def test_centre_3d_multi_sample_pin_on_product_structure(scan, threshold):
    xy, xz, big = scan
    limits, ids = [(0.0, 1.0), (1.5, 3.0)], {1: 21, 2: 22}
    got = zx.centre_3d(xy, xz, threshold=threshold, sample_id=21, multipin_sample_ids=ids, well_limits=limits)
    assert same_results(got.to_dicts(), reference.centre_3d(xy, xz, threshold, 0, 21, ids, limits), big)


@given(
    n=st.integers(1, 8),
    w=st.integers(1, 3000),
    o=st.integers(0, 3000),
    dx=st.sampled_from([0.01, 0.02, 0.005]),
    junk=st.sampled_from(["", "x", "Standard "]),
)
def test_well_limits_match_reference(n, w, o, dx, junk):
    loop_type = f"{junk}multipin_{n}x{w}+{o}"
    assert zx.well_limits(loop_type, dx) == reference.well_limits(loop_type, dx)


def test_one_by_n_and_n_by_one():
    for xy, xz in [([[5]], [[7]]), ([[1, 2, 3, 0, 9]], [[4]]), ([[1], [2], [0], [9]], [[4], [1], [1], [4]])]:
        assert zx.centre_3d(xy, xz).to_dicts() == reference.centre_3d(xy, xz)


def test_large_counts_keep_exact_sums():
    """Sums beyond 2**53: exact integer sums, one division, as the spec says."""
    xy = np.full((3, 2), 3_000_000_000, dtype=np.int64)
    xz = np.full((3, 2), 1_000_000_000, dtype=np.int64)
    (r,) = zx.centre_3d(xy, xz)
    assert r.total_count == float(12 * 3 * 10**18)
    assert r.centre_of_mass == (1.5, 1.0, 1.0)


def test_300_by_200_by_200_volume():
    """The largest scans: 12 million voxels, checked against dense numpy sums."""
    rng = np.random.default_rng(300)
    xy, xz = rng.poisson(1.5, (300, 200)), rng.poisson(1.5, (300, 200))
    xy[140:150, 90:100] += 40
    xz[140:150, 60:75] += 40
    results = zx.centre_3d(xy, xz)
    volume = xy[:, :, None] * xz[:, None, :]
    kept = volume[volume >= 0.25 * volume.max()]
    assert results.n_voxels.sum() == kept.size
    assert results.total_count.sum() == float(kept.sum())
    best = results[0]
    assert best.bounding_box == ((140, 90, 60), (150, 100, 75))
    assert best.max_count == float(volume.max())
