"""The spec's worked cases reproduce exactly: == on dicts, floats bit for bit."""

import json

import numpy as np
import pytest

import vectors
import zocalo_xrc as zx


def cases(kind):
    return [pytest.param(c, id=c["name"]) for c in vectors.vectors()[kind]]


def options(case):
    """The keyword arguments of centre_3d that a 3D case sets."""
    keys = ("threshold", "threshold_absolute", "sample_id", "multipin_sample_ids", "well_limits")
    return {k: case[k] for k in keys}


@pytest.mark.parametrize("case", cases("3d"))
def test_3d_vector(case):
    results = zx.centre_3d(case["xy"], case["xz"], **options(case))
    assert results.to_dicts() == case["expected"]
    assert [r.to_dict() for r in results] == case["expected"]
    assert results.to_json() == json.dumps(case["expected"])
    # Bit for bit, not merely ==.
    for got, want in zip(results.centre_of_mass.tolist(), [e["centre_of_mass"] for e in case["expected"]]):
        assert [float(g).hex() for g in got] == [float(w).hex() for w in want]


@pytest.mark.parametrize("case", cases("2d"))
def test_2d_vector(case):
    result = zx.centre_2d(case["counts"], zx.GridInfo.from_ispyb(case["gridinfo"]), sample_id=case["sample_id"])
    assert result.to_dict() == case["expected"]
    assert list(result.to_dict()) == list(case["expected"])  # key order
    assert json.dumps(result.to_dict()) == json.dumps(case["expected"])


@pytest.mark.parametrize("case", cases("3d"))
def test_3d_vector_from_acquisition_order(case):
    """The same case given as two collections in acquisition order (lower DCID = xy)."""
    xy, xz = np.array(case["xy"]), np.array(case["xz"])

    def collection(dcid, grid):
        nx, ny = grid.shape
        info = zx.GridInfo.from_ispyb({
            "steps_x": float(nx), "steps_y": float(ny), "dx_mm": 0.02, "dy_mm": 0.02,
            "micronsPerPixelX": 1.0, "micronsPerPixelY": 1.0, "snapshot_offsetXPixel": 0,
            "snapshot_offsetYPixel": 0, "snaked": 1, "orientation": "horizontal",
        })
        # Invert the layout: image i sits at the cell reshape_grid puts it in.
        order = zx.reshape_grid(np.arange(nx * ny), info)
        counts = np.empty(nx * ny, dtype=np.int64)
        counts[order.ravel()] = grid.ravel()
        return zx.GridScan(dcid, counts, info)

    results = zx.centre_3d_scans(collection(1002, xz), collection(1001, xy), **options(case))
    assert results.to_dicts() == case["expected"]
