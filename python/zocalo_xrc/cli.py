"""``zocalo-xrc``: X-ray centring from the command line.

    zocalo-xrc centre scan.json [--json] [--plot out.png]

A 2D case is ``{"counts": [...], "gridinfo": {...}}``; a 3D case is
``{"grids": [{"dcid": ..., "counts": [...], "gridinfo": {...}}, {...}]}``.
Either may add ``sample_id``, ``loop_type`` and ``multipin_sample_ids``; a 3D
case may add ``threshold`` and ``threshold_absolute``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from ._native import XrcResults
from ._results import GridScan2DResult
from .centring import GridScan, centre_2d, centre_3d_scans, well_limits
from .grid import GridInfo, reshape_grid


class CaseError(ValueError):
    """The input file does not describe a 2D or 3D case."""


def load_case(path: Path) -> dict[str, Any]:
    try:
        case = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CaseError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(case, dict) or not ("grids" in case or {"counts", "gridinfo"} <= case.keys()):
        raise CaseError(f"{path}: expected a 2D case (counts, gridinfo) or a 3D case (grids)")
    return case


def _pin(case: dict[str, Any], grid: GridInfo) -> dict[str, Any]:
    loop_type = case.get("loop_type")
    return {
        "sample_id": case.get("sample_id"),
        "multipin_sample_ids": case.get("multipin_sample_ids"),
        "well_limits": well_limits(loop_type, grid.dx_mm) if loop_type else None,
    }


def scans_of(case: dict[str, Any]) -> list[GridScan]:
    """The two grids of a 3D case, lower DCID (xy) first."""
    grids = case.get("grids")
    if not isinstance(grids, list) or len(grids) != 2:
        raise CaseError("a 3D case needs exactly two grids")
    scans = []
    for k, g in enumerate(grids):
        try:
            scans.append(GridScan(int(g["dcid"]), g["counts"], GridInfo.from_ispyb(g["gridinfo"])))
        except (KeyError, TypeError) as e:
            raise CaseError(f"grids[{k}]: needs dcid, counts and gridinfo ({e!r})") from None
    return sorted(scans, key=lambda s: s.dcid)


def run_case(case: dict[str, Any]) -> tuple[GridScan2DResult | XrcResults, list[tuple[str, Any]]]:
    """Centre a case; return the result and the grids ``(label, A[x][y])`` for display."""
    if "grids" in case:
        scans = scans_of(case)
        options = {k: case[k] for k in ("threshold", "threshold_absolute") if k in case}
        results = centre_3d_scans(*scans, **options, **_pin(case, scans[0].grid))
        shown = [(f"xy (DCID {s.dcid})" if i == 0 else f"xz (DCID {s.dcid})", reshape_grid(s.counts, s.grid))
                 for i, s in enumerate(scans)]
        return results, shown
    grid = GridInfo.from_ispyb(case["gridinfo"])
    result = centre_2d(case["counts"], grid, **_pin(case, grid))
    return result, [("xy", reshape_grid(case["counts"], grid))]


def format_2d(r: GridScan2DResult) -> str:
    sx, sy = r.steps
    lines = [f"2D X-ray centring: {sx} x {sy} grid, status {r.status} ({r.message})"]
    if r.ok:
        lines += [
            f"  centre (grid boxes):   x = {r.centre_x_box:.3f}, y = {r.centre_y_box:.3f}",
            f"  centre (snapshot px):  x = {r.centre_x:.2f}, y = {r.centre_y:.2f}",
            f"  best image:            #{r.best_image} with {r.reflections_in_best_image} spots",
            f"  best region:           {r.n_voxels} boxes, total count {r.total_count:g}, "
            f"max voxel {tuple(r.max_voxel)}",
            f"  sample id:             {r.sample_id}",
        ]
    return "\n".join(lines)


def format_3d(results: XrcResults, shape: tuple[int, int, int]) -> str:
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


def plot(result: GridScan2DResult | XrcResults, grids: list[tuple[str, Any]], out: Path) -> None:
    """Heat maps of the grid(s), centres marked, bounding boxes drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Rectangle
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'zocalo-xrc[plot]'") from None

    fig, axes = plt.subplots(1, len(grids), figsize=(6 * len(grids), 4.5), squeeze=False)
    for k, (ax, (label, grid)) in enumerate(zip(axes[0], grids)):
        image = ax.imshow(grid.T, origin="upper", cmap="viridis", interpolation="nearest")
        fig.colorbar(image, ax=ax, label="spots")
        ax.set_title(label)
        ax.set_xlabel("x (boxes)")
        ax.set_ylabel("y (boxes)" if k == 0 else "z (boxes)")
        if isinstance(result, GridScan2DResult):
            if result.ok and result.region_bounds:
                (x0, y0), (x1, y1) = result.region_bounds
                ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="red", lw=1.5))
                ax.plot(result.centre_x_box - 0.5, result.centre_y_box - 0.5, "rx", ms=10)
            continue
        for rank, r in enumerate(result, 1):
            lo, hi = r.bounding_box
            j = 1 + k  # y for the xy grid, z for the xz grid
            ax.add_patch(Rectangle((lo[0] - 0.5, lo[j] - 0.5), hi[0] - lo[0], hi[j] - lo[j],
                                   fill=False, edgecolor="red" if rank == 1 else "orange", lw=1.5))
            ax.plot(r.centre_of_mass[0] - 0.5, r.centre_of_mass[j] - 0.5, "x",
                    color="red" if rank == 1 else "orange", ms=10)
            ax.annotate(str(rank), (hi[0] - 0.5, lo[j] - 0.5), color="white", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zocalo-xrc", description="X-ray centring for MX grid scans")
    commands = parser.add_subparsers(dest="command", required=True)
    centre = commands.add_parser("centre", help="centre a 2D or 3D grid scan from a JSON file")
    centre.add_argument("file", type=Path, help="JSON: a 2D case (counts, gridinfo) or a 3D case (grids)")
    centre.add_argument("--json", action="store_true", help="print the result in Diamond's wire shape")
    centre.add_argument("--plot", type=Path, metavar="OUT.png", help="draw the grids with the results marked")
    demo = commands.add_parser(
        "demo", help="trigger Zocalo for a 3D scan and wait for its results (an in-process broker unless --broker)"
    )
    demo.add_argument("file", type=Path, help="a 3D case file: its counts stand in for Zocalo's spot finding")
    demo.add_argument("--broker", metavar="URL|ENVIRONMENT", help="an amqp:// URL or a zocalo environment")
    demo.add_argument("--beamline", default="i03")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return run_demo(args)

    try:
        case = load_case(args.file)
        result, grids = run_case(case)
    except OSError as e:
        print(f"zocalo-xrc: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"zocalo-xrc: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(result.to_json() if isinstance(result, XrcResults) else json.dumps(result.to_dict()))
    elif isinstance(result, XrcResults):
        (nx, ny), nz = grids[0][1].shape, grids[1][1].shape[1]
        print(format_3d(result, (nx, ny, nz)))
    else:
        print(format_2d(result))
    if args.plot:
        plot(result, grids, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from . import demo
    from .transport import TransportError

    try:
        results, scans = demo.run(args.file, args.broker, args.beamline)
    except (OSError, ValueError, TransportError, TimeoutError) as e:
        print(f"zocalo-xrc demo: {e}", file=sys.stderr)
        return 1
    where = f"RabbitMQ ({args.broker})" if args.broker else "an in-process broker"
    print(f"Triggered Zocalo for DCIDs {scans[0].dcid} and {scans[1].dcid} through {where}; its results:")
    xy, xz = scans
    print(format_3d(results, (xy.grid.steps_x, xy.grid.steps_y, xz.grid.steps_y)))
    if len(results):
        position = demo.geometry(scans).to_motor(results[0])
        print("best crystal, relative to the first box (mm): x = {:.4f}, y = {:.4f}, z = {:.4f}".format(*position.centre_mm))
    return 0


if __name__ == "__main__":
    sys.exit(main())
