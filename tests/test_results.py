"""XrcResults: a sequence of XrcResult held as columns."""

import json
from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import zocalo_xrc as zx

coord = st.integers(0, 500)
result = st.builds(
    zx.XrcResult,
    centre_of_mass=st.tuples(*[st.floats(0, 500, allow_nan=False)] * 3),
    max_voxel=st.tuples(coord, coord, coord),
    max_count=st.integers(0, 10**12).map(float),
    n_voxels=st.integers(1, 10**6),
    total_count=st.sampled_from([1.0, 2.0, 3.0, 5.0, 5.0, 1e17, 0.5]),
    sample_id=st.one_of(st.none(), st.integers(0, 2**40)),
    bounding_box=st.tuples(st.tuples(coord, coord, coord), st.tuples(coord, coord, coord)),
)


@given(st.lists(result, max_size=12))
def test_round_trip_and_json(rows):
    rs = zx.XrcResults(rows)
    assert len(rs) == len(rows)
    assert list(rs) == rows
    assert [rs[i] for i in range(-len(rows), len(rows))] == rows + rows if rows else True
    assert rs.to_dicts() == [r.to_dict() for r in rows]
    assert rs.to_json() == json.dumps(rs.to_dicts())
    assert json.loads(rs.to_json()) == rs.to_dicts()


@given(st.lists(result, max_size=12), st.sampled_from(["max_count", "total_count", "n_voxels"]), st.booleans())
def test_sorted_is_stable(rows, by, descending):
    got = list(zx.XrcResults(rows).sorted(by=by, descending=descending))
    want = sorted(rows, key=lambda r: getattr(r, by), reverse=descending)  # Python's sort is stable
    assert got == want


def test_columns():
    rows = [
        zx.XrcResult((1.5, 2.5, 3.5), (1, 2, 3), 10.0, 4, 30.0, 7, ((1, 2, 3), (2, 4, 5))),
        zx.XrcResult((4.0, 5.0, 6.0), (3, 4, 5), 12.0, 2, 20.0, None, ((3, 4, 5), (5, 6, 7))),
    ]
    rs = zx.XrcResults(rows)
    assert rs.centre_of_mass.dtype == np.float64 and rs.centre_of_mass.shape == (2, 3)
    assert rs.max_voxel.dtype == np.int64 and rs.max_voxel.tolist() == [[1, 2, 3], [3, 4, 5]]
    assert rs.bounding_box.shape == (2, 2, 3) and rs.bounding_box[1].tolist() == [[3, 4, 5], [5, 6, 7]]
    assert rs.max_count.tolist() == [10.0, 12.0]
    assert rs.total_count.tolist() == [30.0, 20.0]
    assert rs.n_voxels.dtype == np.int64 and rs.n_voxels.tolist() == [4, 2]
    assert rs.sample_id.tolist() == [7, None]
    assert rs.sample_id.dtype == np.int64
    assert rs.sorted().max_count.tolist() == [12.0, 10.0]
    assert rs.sorted(by="total_count")[0] == rows[0]


def test_empty_results_are_no_crystal():
    rs = zx.centre_3d([[0, 0]], [[0]])
    assert len(rs) == 0 and not rs and list(rs) == []
    assert rs.centre_of_mass.shape == (0, 3)
    assert rs.bounding_box.shape == (0, 2, 3)
    assert rs.to_json() == "[]"
    assert "0 results" in repr(rs)


def test_sequence_behaviour():
    rs = zx.centre_3d([[5, 0, 5], [0, 0, 0], [5, 0, 5]], [[1], [0], [1]])
    assert isinstance(rs, Sequence)
    assert len(rs) == 4
    assert rs[-1] == rs[3]
    assert rs[1:3] == zx.XrcResults([rs[1], rs[2]])
    assert rs[::-1][0] == rs[3]
    with pytest.raises(IndexError, match="index 4 out of range for 4 results"):
        rs[4]
    with pytest.raises(TypeError):
        rs["a"]
    assert rs != [r for r in rs]
    with pytest.raises(ValueError, match="expected one of"):
        rs.sorted(by="centre")
    with pytest.raises(TypeError, match=r"results\[0\]: expected an XrcResult"):
        zx.XrcResults([{"centre_of_mass": [1, 2, 3]}])


def test_result_objects_are_frozen_and_hashable():
    (r,) = zx.centre_3d([[2]], [[3]], sample_id=4)
    assert r == zx.XrcResult((0.5, 0.5, 0.5), (0, 0, 0), 6.0, 1, 6.0, 4, ((0, 0, 0), (1, 1, 1)))
    assert hash(r) == hash(zx.centre_3d([[2]], [[3]], sample_id=4)[0])
    with pytest.raises(AttributeError):
        r.max_count = 3.0
