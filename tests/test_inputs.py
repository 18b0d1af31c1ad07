"""Bad input gets a ValueError that names the problem; input is never modified."""

import threading

import numpy as np
import pytest

import zocalo_xrc as zx

GI = {
    "steps_x": 14.0, "steps_y": 9.0, "dx_mm": 0.02, "dy_mm": 0.02, "micronsPerPixelX": 0.806,
    "micronsPerPixelY": 0.806, "snapshot_offsetXPixel": 339.0, "snapshot_offsetYPixel": 236.0,
    "snaked": 1, "orientation": "horizontal",
}


def test_gridinfo_from_ispyb_accepts_float_steps_and_int_flags():
    g = zx.GridInfo.from_ispyb({**GI, "extra": "ignored"})
    assert (g.steps_x, g.steps_y, g.snaked, g.orientation) == (14, 9, True, "horizontal")
    assert isinstance(g.steps_x, int) and g.image_count == 126
    assert zx.GridInfo.from_ispyb(g.to_ispyb()) == g
    assert zx.GridInfo.from_ispyb({**GI, "snaked": False, "orientation": "Vertical"}).orientation == "vertical"


@pytest.mark.parametrize(
    "change, words",
    [
        ({"steps_x": None}, "missing key 'steps_x'"),
        ({"steps_y": 0}, "steps_y must be positive"),
        ({"steps_x": -3.0}, "steps_x must be positive"),
        ({"steps_x": 14.5}, "steps_x must be a whole number"),
        ({"steps_x": "14"}, "steps_x must be a number"),
        ({"dx_mm": 0}, "dx_mm must be positive"),
        ({"micronsPerPixelY": float("nan")}, "micronsPerPixelY must be finite"),
        ({"snapshot_offsetXPixel": "3"}, "snapshot_offsetXPixel must be a number"),
        ({"snaked": 2}, "snaked must be true/false or 0/1"),
        ({"snaked": "yes"}, "snaked must be"),
        ({"orientation": "diagonal"}, "orientation must be 'horizontal' or 'vertical', got 'diagonal'"),
        ({"orientation": None}, "missing key 'orientation'"),
    ],
)
def test_gridinfo_rejects_bad_keys_by_name(change, words):
    gi = {k: v for k, v in {**GI, **change}.items() if v is not None}
    with pytest.raises(ValueError, match="gridinfo: " + words.replace("(", r"\(").replace(")", r"\)")):
        zx.GridInfo.from_ispyb(gi)


GRID = zx.GridInfo.from_ispyb(GI)


@pytest.mark.parametrize(
    "counts, words",
    [
        (np.zeros(125), "expected 126 values for a 14 x 9 grid, got 125"),
        (np.zeros((14, 9)), "counts: expected a 1-D array, got shape (14, 9)"),
        ([], "counts: expected a 1-D array|counts: empty grid"),
        ([1.5] + [0] * 125, "counts: non-integer count 1.5 at [0]"),
        ([0] * 125 + [float("nan")], "counts: nan at [125] is not a count"),
        ([0] * 125 + [float("inf")], "is not a count"),
        ([0] * 3 + [-2] + [0] * 122, "negative count -2 at image 4"),
        (["a"] * 126, "expected integer counts, got dtype <U1"),
        ([True] * 126, "expected integer counts, got dtype bool"),
        ([[1, 2], [3]], "counts: not an array of counts"),
    ],
)
def test_bad_2d_counts(counts, words):
    with pytest.raises(ValueError) as e:
        zx.centre_2d(counts, GRID)
    assert any(w in str(e.value) for w in words.split("|")), str(e.value)


@pytest.mark.parametrize(
    "xy, xz, words",
    [
        (np.ones((3, 2)), np.ones((4, 2)), "xy and xz must share x: xy has nx=3, xz has nx=4"),
        (np.ones(3), np.ones((3, 2)), "xy: expected a 2-D array, got shape (3,)"),
        (np.ones((3, 2, 1)), np.ones((3, 2)), "xy: expected a 2-D array, got shape (3, 2, 1)"),
        (np.ones((3, 2)), np.ones((3, 0)), "xz: empty grid (shape (3, 0))"),
        (np.ones((0, 2)), np.ones((0, 2)), "xy: empty grid"),
        ([[1, -1]], [[1]], "xy: negative count -1 at [0, 1]"),
        ([[1]], [[0.5]], "xz: non-integer count 0.5 at [0, 0]"),
        ([[1]], [[np.nan]], "xz: nan at [0, 0] is not a count"),
        ([[2**62]], [[4]], "overflows a 64-bit integer"),
        ([[1]], [[2**64 - 1]], "does not fit a 64-bit integer"),
    ],
)
def test_bad_3d_input(xy, xz, words):
    with pytest.raises(ValueError) as e:
        zx.centre_3d(xy, xz)
    assert words in str(e.value)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"threshold": float("nan")}, "threshold must be a finite number"),
        ({"threshold_absolute": "3"}, "threshold_absolute must be a finite number"),
        ({"sample_id": 1.5}, "sample_id must be an integer or None"),
        ({"multipin_sample_ids": {"one": 5}}, "well number 'one' is not an integer"),
        ({"well_limits": [(0, 1, 2)]}, "well_limits[0]: expected a (lower, upper) pair"),
        ({"well_limits": [(0, float("inf"))]}, "well_limits[0][1] must be a finite number"),
        ({"threshold": -1}, "threshold must be from 0 to 1 (a fraction of the largest voxel), got -1"),
        ({"threshold": 2.0}, "threshold must be from 0 to 1 (a fraction of the largest voxel), got 2.0"),
        ({"threshold_absolute": -0.5}, "threshold_absolute must be 0 or more (a spot count), got -0.5"),
        ({"well_limits": [(0, 1), (5, 2)]}, "well_limits[1]: the lower limit 5 is above the upper 2"),
        ({"multipin_sample_ids": {0: 5}}, "multipin_sample_ids: well number 0 is out of range (wells are numbered from 1)"),
    ],
)
def test_bad_3d_parameters(kwargs, words):
    with pytest.raises(ValueError) as e:
        zx.centre_3d([[1]], [[1]], **kwargs)
    assert words in str(e.value)


def test_3d_scans_need_two_collections_sharing_x():
    other = zx.GridInfo.from_ispyb({**GI, "steps_x": 10})
    counts = np.ones(126, dtype=np.int64)
    with pytest.raises(ValueError, match="both have DCID 7"):
        zx.centre_3d_scans(zx.GridScan(7, counts, GRID), zx.GridScan(7, counts, GRID))
    with pytest.raises(ValueError, match="must share x"):
        zx.centre_3d_scans(zx.GridScan(7, counts, GRID), zx.GridScan(8, np.ones(90), other))
    with pytest.raises(ValueError, match=r"xz \(DCID 8\): .*expected 126 values"):
        zx.centre_3d_scans(zx.GridScan(7, counts, GRID), zx.GridScan(8, counts[:-1], GRID))


def test_reshape_grid_arguments():
    a = zx.reshape_grid(range(6), steps_x=3, steps_y=2, snaked=True, orientation="horizontal")
    assert a.tolist() == [[0, 5], [1, 4], [2, 3]]
    with pytest.raises(TypeError, match="not both"):
        zx.reshape_grid(range(6), GRID, steps_x=3)
    with pytest.raises(TypeError, match="needs grid"):
        zx.reshape_grid(range(6), steps_x=3)
    with pytest.raises(ValueError, match="orientation"):
        zx.reshape_grid(range(6), steps_x=3, steps_y=2, snaked=True, orientation="up")


@pytest.mark.parametrize("change, words", [
    ({"steps_x": -1}, "steps_x must be positive, got -1"),
    ({"steps_y": 0}, "steps_y must be positive, got 0"),
    ({"steps_x": 2**64}, "steps_x must be at most 2147483647"),
    ({"steps_y": 2.5}, "steps_y must be a whole number, got 2.5"),
    ({"snaked": 2}, "snaked must be true/false or 0/1, got 2"),
])
def test_reshape_grid_names_a_bad_scan_value(change, words):
    with pytest.raises(ValueError) as e:
        zx.reshape_grid(range(6), **{"steps_x": 3, "steps_y": 2, "snaked": True, "orientation": "horizontal", **change})
    assert str(e.value).startswith(words)


def test_a_grid_made_directly_is_checked_as_one_read_from_ispyb():
    fields = dict(steps_x=14.0, steps_y=9, dx_mm=0.02, dy_mm=0.02, microns_per_pixel_x=0.806, microns_per_pixel_y=0.806,
                  snapshot_offset_x_px=339, snapshot_offset_y_px=236.0, snaked=1, orientation="Horizontal")
    assert zx.GridInfo(**fields) == GRID and isinstance(zx.GridInfo(**fields).steps_x, int)
    for change, words in [({"steps_x": -1}, "GridInfo: steps_x must be positive, got -1"),
                          ({"dy_mm": 0}, "GridInfo: dy_mm must be positive, got 0"),
                          ({"snapshot_offset_x_px": float("nan")}, "GridInfo: snapshot_offset_x_px must be finite"),
                          ({"orientation": "up"}, "GridInfo: orientation must be 'horizontal' or 'vertical'")]:
        with pytest.raises(ValueError) as e:
            zx.GridInfo(**{**fields, **change})
        assert str(e.value).startswith(words)


@pytest.mark.parametrize("dx_mm, words", [(0, "dx_mm must be positive (a box's width), got 0"),
                                          (-0.02, "dx_mm must be positive (a box's width), got -0.02"),
                                          (float("inf"), "dx_mm must be a finite number")])
def test_well_limits_need_a_box_width(dx_mm, words):
    with pytest.raises(ValueError) as e:
        zx.well_limits("multipin_6x1600+1000", dx_mm)
    assert str(e.value).startswith(words)


def test_inputs_are_never_modified():
    rng = np.random.default_rng(1)
    xy, xz = rng.poisson(3, (20, 15)), rng.poisson(3, (20, 12))
    xy0, xz0 = xy.copy(), xz.copy()
    zx.centre_3d(xy, xz, threshold_absolute=4, well_limits=[(0, 9)], multipin_sample_ids={1: 5})
    np.testing.assert_array_equal(xy, xy0)
    np.testing.assert_array_equal(xz, xz0)
    counts = rng.poisson(3, 126)
    c0 = counts.copy()
    zx.centre_2d(counts, GRID)
    zx.reshape_grid(counts, GRID)
    np.testing.assert_array_equal(counts, c0)


def test_non_contiguous_and_other_integer_dtypes():
    rng = np.random.default_rng(2)
    xy, xz = rng.poisson(3, (20, 30)), rng.poisson(3, (20, 12))
    want = zx.centre_3d(xy[:, ::2], xz)
    assert zx.centre_3d(np.asfortranarray(xy[:, ::2]).astype(np.uint16), xz.astype(np.int32)) == want
    assert zx.centre_3d(xy[:, ::2].astype(float), xz.tolist()) == want


def test_concurrent_callers_get_their_own_answers():
    """The GIL is released while computing: threads run side by side safely."""
    rng = np.random.default_rng(3)
    inputs = [(rng.poisson(2, (60, 30)), rng.poisson(2, (60, 30))) for _ in range(4)]
    want = [zx.centre_3d(a, b) for a, b in inputs]
    got = [None] * 4

    def work(i):
        for _ in range(20):
            got[i] = zx.centre_3d(*inputs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want
