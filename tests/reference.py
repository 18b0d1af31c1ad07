"""A plain numpy/scipy X-ray centring, written from the spec for the tests.

It follows Diamond's service the straightforward way (a dense volume,
scipy.ndimage.label and friends) so that the Rust core can be checked against
it on random inputs. Slow by design; never used outside the tests.
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage as ndi


def reshape(counts, steps_x, steps_y, snaked, orientation):
    data = np.array(counts, dtype=np.int64)
    if orientation == "vertical":
        data = data.reshape(steps_x, steps_y)
    else:
        data = data.reshape(steps_y, steps_x).T.copy()
    if snaked and orientation == "horizontal":
        data[:, 1::2] = data[::-1, 1::2]
    elif snaked and orientation == "vertical":
        data[1::2, :] = data[1::2, ::-1]
    return data


def tag(sample_id, multipin_ids, limits, position):
    if not limits:
        return sample_id
    for k, (lo, hi) in enumerate(limits):
        if lo <= position <= hi:
            return multipin_ids.get(k + 1)
    return None


def well_limits(loop_type, dx_mm):
    import re

    m = re.search(r"multipin_(\d+)x(\d+)\+(\d+)", loop_type)
    if not m:
        return []
    n, w, o = (int(g) for g in m.groups())
    step = dx_mm * 1000
    return [((o + w * k - w / 2) / step, (o + w * k + w / 2) / step) for k in range(n)]


def centre_2d(counts, gi, sample_id=None, multipin_ids=None, limits=None):
    multipin_ids, limits = multipin_ids or {}, limits or []
    counts = np.asarray(counts, dtype=np.int64)
    steps = [gi["steps_x"], gi["steps_y"]]
    box = [1000 * gi["dx_mm"] / gi["micronsPerPixelX"], 1000 * gi["dy_mm"] / gi["micronsPerPixelY"]]
    offset = [gi["snapshot_offsetXPixel"], gi["snapshot_offsetYPixel"]]
    out = dict.fromkeys(["centre_of_mass", "max_voxel", "max_count", "n_voxels", "total_count", "sample_id"])
    out.update(steps=steps, box_size_px=box, snapshot_offset=offset)
    out.update(dict.fromkeys(["centre_x", "centre_y", "centre_x_box", "centre_y_box"]))
    out.update(status="fail", message="No good images found")
    out.update(dict.fromkeys(["best_image", "reflections_in_best_image", "best_region"]))
    idx = int(np.argmax(counts))
    m = int(counts[idx])
    if m == 0:
        return out
    b = reshape(counts, gi["steps_x"], gi["steps_y"], gi["snaked"], gi["orientation"]).T
    kept = (2 * b >= m) * b
    labels, n = ndi.label(kept, structure=np.ones((3, 3)))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    best = int(np.argmax(sizes)) + 1  # argmax takes the first of equals
    region = labels == best
    ys, xs = np.nonzero(region)  # raster order
    n_cells = len(xs)
    com_y, com_x = ndi.center_of_mass(region)
    my, mx = ndi.maximum_position(kept, region)
    cx, cy = com_x + 0.5, com_y + 0.5
    out.update(
        centre_of_mass=[cx, cy], max_voxel=[int(mx), int(my)], max_count=float(m), n_voxels=n_cells,
        total_count=float(b[region].sum()), sample_id=tag(sample_id, multipin_ids, limits, com_y),
        centre_x=offset[0] + cx * box[0], centre_y=offset[1] + cy * box[1], centre_x_box=cx,
        centre_y_box=cy, status="ok", message="ok", best_image=idx + 1, reflections_in_best_image=m,
        best_region=[[int(y), int(x)] for y, x in zip(ys, xs)],
    )
    return out


def _label_stats(volume, mask):
    """Per 26-connected component of ``mask`` (raster order): DLS's statistics."""
    kept = volume * mask
    labels, n = ndi.label(kept, structure=np.ones((3, 3, 3)))
    slices = ndi.find_objects(labels)
    stats = []
    for index in range(1, n + 1):
        com = [c + 0.5 for c in ndi.center_of_mass(kept, labels, index)]
        mv = [int(i) for i in ndi.maximum_position(kept, labels, index)]
        sx, sy, sz = slices[index - 1]
        stats.append({
            "centre_of_mass": com,
            "max_voxel": mv,
            "max_count": float(kept[tuple(mv)]),
            "n_voxels": int(np.count_nonzero(labels == index)),
            "total_count": float(int(ndi.sum_labels(kept, labels, index))),
            "bounding_box": [[sx.start, sy.start, sz.start], [sx.stop, sy.stop, sz.stop]],
        })
    return stats


def centre_3d(xy, xz, threshold=0.25, threshold_absolute=0, sample_id=None, multipin_ids=None, limits=None):
    multipin_ids, limits = multipin_ids or {}, limits or []
    xy = np.array(xy, dtype=np.int64)
    xz = np.array(xz, dtype=np.int64)
    xy[xy < threshold_absolute] = 0
    xz[xz < threshold_absolute] = 0
    volume = xy[:, :, None] * xz[:, None, :]
    if limits:
        regions, n = ndi.label(volume > 0, structure=np.ones((3, 3, 3)))
        masks = [regions == r for r in range(1, n + 1)]
    else:
        masks = [np.ones(volume.shape, dtype=bool)]
    results = []
    for mask in masks:
        m = int(volume[mask].max()) if mask.any() else 0
        if m == 0:
            continue
        keep = mask & (volume.astype(float) >= threshold * float(m))
        results += _label_stats(volume, keep)
    for r in results:
        r["sample_id"] = tag(sample_id, multipin_ids, limits, r["centre_of_mass"][0])
    results.sort(key=lambda r: r["total_count"], reverse=True)
    keys = ["centre_of_mass", "max_voxel", "max_count", "n_voxels", "total_count", "sample_id", "bounding_box"]
    return [{k: r[k] for k in keys} for r in results]
