"""centre_3d against (a) the scipy reference of the tests and (b) cc3d + numpy.

Goals (issue 12): typical <= 10 us, large <= 50 us, noisy <= 0.4 ms, the huge
1000x500x500 scan (where the dense peers cannot allocate the volume) under 1 ms,
and a 1x1x1 call (the call overhead) under 3 us.
"""

import cc3d
import numpy as np
import pytest
import scipy.ndimage as ndi

import reference
import zocalo_xrc as zx
from workloads import DENSE_TOO_LARGE, WORKLOADS


def cc3d_centre_3d(xy, xz, threshold=0.25):
    """The same results with connected-components-3d and vectorised numpy."""
    volume = xy[:, :, None] * xz[:, None, :]
    m = volume.max()
    if m == 0:
        return []
    kept = np.where(volume.astype(float) >= threshold * float(m), volume, 0)
    labels, n = cc3d.connected_components(kept > 0, connectivity=26, return_N=True, out_dtype=np.uint32)
    flat = labels.ravel()
    where = np.flatnonzero(flat)
    lab, val = flat[where], kept.ravel()[where]
    x, y, z = np.unravel_index(where, volume.shape)
    total = np.bincount(lab, weights=val, minlength=n + 1)[1:]
    com = np.stack([np.bincount(lab, weights=val * c, minlength=n + 1)[1:] / total + 0.5 for c in (x, y, z)], 1)
    n_vox = np.bincount(lab, minlength=n + 1)[1:]
    first_max = np.lexsort((where, -val, lab))  # per label: largest value, then raster order
    starts = np.searchsorted(lab[first_max], np.arange(1, n + 1))
    best = where[first_max[starts]]
    boxes = ndi.find_objects(labels)
    order = np.argsort(-total, kind="stable")
    return [
        {
            "centre_of_mass": com[i].tolist(),
            "max_voxel": [int(c) for c in np.unravel_index(best[i], volume.shape)],
            "max_count": float(kept.ravel()[best[i]]),
            "n_voxels": int(n_vox[i]),
            "total_count": float(total[i]),
            "bounding_box": [[s.start for s in boxes[i]], [s.stop for s in boxes[i]]],
        }
        for i in order
    ]


@pytest.fixture(scope="module", params=list(WORKLOADS))
def workload(request):
    xy, xz = WORKLOADS[request.param]()
    return request.param, xy, xz


def compressed_reference(xy, xz, threshold=0.25):
    """The reference on a volume too large for it: cut down to the x, y and z
    that hold kept voxels, with a margin of one (so that what was apart stays
    apart), and mapped back. Coordinates are exact; centres of mass, computed
    in the cut-down box, are mapped back by the offset of their block."""
    a_max, b_max = xy.max(1), xz.max(1)
    t = threshold * float((a_max * b_max).max())
    axes = [
        (a_max * b_max).astype(float) >= t,
        ((xy * b_max[:, None]).astype(float) >= t).any(0),
        ((xz * a_max[:, None]).astype(float) >= t).any(0),
    ]
    keep = []
    for kept in axes:
        near = kept.copy()
        near[1:] |= kept[:-1]
        near[:-1] |= kept[1:]
        keep.append(np.flatnonzero(near))
    xs, ys, zs = keep
    results = reference.centre_3d(xy[np.ix_(xs, ys)], xz[np.ix_(xs, zs)], threshold)
    for r in results:
        lo, hi = r["bounding_box"]
        r["centre_of_mass"] = [c + (k[l] - l) for c, k, l in zip(r["centre_of_mass"], keep, lo)]
        r["max_voxel"] = [int(k[i]) for k, i in zip(keep, r["max_voxel"])]
        r["bounding_box"] = [[int(k[i]) for k, i in zip(keep, lo)], [int(k[i - 1]) + 1 for k, i in zip(keep, hi)]]
    return results


def test_zocalo_xrc(record, workload):
    name, xy, xz = workload
    results = record("centre_3d", name, "zocalo-xrc", zx.centre_3d, xy, xz)
    if name not in DENSE_TOO_LARGE:
        assert results.to_dicts() == reference.centre_3d(xy, xz)
        return
    got, want = results.to_dicts(), compressed_reference(xy, xz)
    assert len(got) == len(want) == 3
    for g, w in zip(got, want):
        assert g["centre_of_mass"] == pytest.approx(w.pop("centre_of_mass"), rel=1e-12)
        assert {k: v for k, v in g.items() if k != "centre_of_mass"} == w


def test_cc3d_numpy(record, workload):
    name, xy, xz = workload
    if name in DENSE_TOO_LARGE:
        pytest.skip(DENSE_TOO_LARGE[name])
    results = record("centre_3d", name, "cc3d+numpy", cc3d_centre_3d, xy, xz)
    ours = [{k: v for k, v in r.items() if k != "sample_id"} for r in zx.centre_3d(xy, xz).to_dicts()]
    assert results == ours


def test_scipy_reference(record, workload):
    name, xy, xz = workload
    if name in DENSE_TOO_LARGE:
        pytest.skip(DENSE_TOO_LARGE[name])
    # DLS-style: one scipy.ndimage pass per label. Seconds on the noisy volume.
    rounds = 2 if name.startswith("noisy") else 5
    record("centre_3d", name, "scipy reference", reference.centre_3d, xy, xz, rounds=rounds)
