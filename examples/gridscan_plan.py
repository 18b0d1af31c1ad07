"""A 3D grid scan's X-ray centring in a Bluesky plan shaped like Hyperion's:
stage the results device, run the grid scan (the callback triggers Zocalo),
read the best crystal, convert it to mm and move the sample there.

    python examples/gridscan_plan.py                    # everything in this process
    python examples/gridscan_plan.py --broker amqp://user:pass@host/vhost

Zocalo's side is a local Zocalo (``zocalo_xrc.local``): zocalo's dispatcher
and recipes, ISPyB (SQLite) holding the scan, Mimas, per-image analysis
simulated from the recorded spot counts of ``examples/scan3d.json``, and the
project's X-ray centring service. Needs ``pip install 'zocalo-xrc[bluesky,local]'``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import bluesky.plan_stubs as bps
from bluesky.run_engine import RunEngine
from ophyd_async.core import soft_signal_rw
from ophyd_async.plan_stubs import ensure_connected
from ophyd_async.sim import SimMotor

import zocalo_xrc as zx
from zocalo_xrc.bluesky import ZOCALO_HW_READ, ZocaloCallback, ZocaloResults, start_infos_from_omega_map
from zocalo_xrc.local import LocalZocalo, Scan

SCAN = Scan.load(Path(__file__).parent / "scan3d.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", default=None, help="an amqp:// URL (default: a broker in this process)")
    args = parser.parse_args()
    with LocalZocalo(broker=args.broker) as local:
        registered = local.add_scan(SCAN, name="example_1")  # in ISPyB: the group, its two collections, their grids
        run(local, registered.dcids)


def run(local: LocalZocalo, dcids: tuple[int, ...]) -> None:
    transport = local.transport()
    xy, xz = SCAN.grids
    geometry = zx.GridGeometry(x_start_mm=-1.2, x_step_mm=xy.dx_mm, x_steps=xy.steps_x, y_start_mm=0.35,
                               y_step_mm=xy.dy_mm, y_steps=xy.steps_y, z_start_mm=0.1, z_step_mm=xz.dy_mm,
                               z_steps=xz.steps_y)
    zocalo = ZocaloResults(name="zocalo", channel=f"xrc.{SCAN.beamline}", results_source="GPU", timeout_s=30,
                           connection=transport)
    x, y, z = SimMotor("x"), SimMotor("y"), SimMotor("z")
    file_writer = soft_signal_rw(str, "example_1", name="eiger_odin_file_writer_id")
    RE = RunEngine(call_returns_result=True)
    RE.subscribe(ZocaloCallback("do_fgs", connection=transport, results=zocalo,
                                start_info_generator_factory=lambda: start_infos_from_omega_map([0, 90])))
    md = {"subplan_name": "do_fgs",  # what Hyperion's ISPyB callback puts in the grid scan's start document
          "omega_to_scan_spec": {"0": xy.steps_x * xy.steps_y, "90": xz.steps_x * xz.steps_y},
          "grid_plane_to_id_map": {"0": dcids[0], "90": dcids[1]}}

    def grid_scan_and_move() -> Any:
        yield from ensure_connected(zocalo, x, y, z, file_writer)
        yield from bps.stage(zocalo, wait=True)  # subscribe before the collection starts
        yield from bps.open_run(md=md)
        yield from bps.create(name=ZOCALO_HW_READ)  # the detector's file: Zocalo is started
        yield from bps.read(file_writer)
        yield from bps.save()
        # ... the fast grid scan itself would run here ...
        yield from bps.close_run()  # Zocalo is told the collections ended
        yield from bps.trigger(zocalo, wait=True)  # the result of this scan
        centres = yield from bps.rd(zocalo.centre_of_mass)
        counts = yield from bps.rd(zocalo.max_count)
        best = geometry.boxes_to_mm(tuple(c - 0.5 for c in centres[0]))  # box k centred on k
        yield from bps.mv(x, best[0], y, best[1], z, best[2])
        yield from bps.unstage(zocalo, wait=True)
        return centres, counts, best

    centres, counts, best = RE(grid_scan_and_move()).plan_result
    print(f"{len(centres)} crystal(s); the best (max count {counts[0]:.0f}) at "
          f"{', '.join(f'{v:.3f}' for v in centres[0])} boxes")
    print(f"moved to x {best[0]:.4f} mm, y {best[1]:.4f} mm, z {best[2]:.4f} mm")


if __name__ == "__main__":
    main()
