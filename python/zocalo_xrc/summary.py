"""Results in words, for people: what the CLI prints and what the service
writes to a 2D step's ``log``. Below the CLI and the service, so that both
can use it without either importing the other."""

from __future__ import annotations

from ._native import XrcResults
from ._results import GridScan2DResult


def format_2d(r: GridScan2DResult) -> str:
    """A 2D result: the grid, the status, and where the best region is."""
    sx, sy = r.steps
    said = "" if r.message == r.status else f" ({r.message})"
    lines = [f"2D X-ray centring: {sx} x {sy} grid, status {r.status}{said}"]
    if r.ok:
        lines += [
            f"  centre (grid boxes):   x = {r.centre_x_box:.3f}, y = {r.centre_y_box:.3f}",
            f"  centre (snapshot px):  x = {r.centre_x:.2f}, y = {r.centre_y:.2f}",
            f"  best image:            #{r.best_image} with {r.reflections_in_best_image} spots",
            f"  best region:           {r.n_voxels} boxes, total count {r.total_count:g}, "
            f"max voxel {tuple(r.max_voxel or ())}",
            f"  sample id:             {r.sample_id}",
        ]
    return "\n".join(lines)


def format_3d(results: XrcResults, shape: tuple[int, int, int]) -> str:
    """3D results as a table, one row a region, on an ``nx x ny x nz`` volume."""
    nx, ny, nz = shape
    lines = [f"3D X-ray centring: {nx} x {ny} x {nz} boxes, {len(results)} result(s)"]
    if not len(results):
        lines.append("  no crystal found")
        return "\n".join(lines)
    header = ("#", "centre of mass (x, y, z)", "max voxel", "max count", "voxels", "total count", "sample", "bounding box")
    rows = []
    for i, r in enumerate(results, 1):
        (x0, y0, z0), (x1, y1, z1) = r.bounding_box
        rows.append((
            str(i),
            "({:.3f}, {:.3f}, {:.3f})".format(*r.centre_of_mass),
            "({}, {}, {})".format(*r.max_voxel),
            f"{r.max_count:g}",
            str(r.n_voxels),
            f"{r.total_count:g}",
            "-" if r.sample_id is None else str(r.sample_id),
            f"[{x0}:{x1}, {y0}:{y1}, {z0}:{z1}]",
        ))
    widths = [max(len(row[c]) for row in [header, *rows]) for c in range(len(header))]
    for row in [header, *rows]:
        lines.append("  " + "  ".join(cell.rjust(w) for cell, w in zip(row, widths)))
    return "\n".join(lines)
