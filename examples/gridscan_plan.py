"""A 3D grid scan's X-ray centring in a Bluesky plan shaped like Hyperion's:
stage the results device, run the grid scan (the callback triggers Zocalo),
read the best crystal, convert it to mm and move the sample there.

    python examples/gridscan_plan.py                    # everything in this process
    python examples/gridscan_plan.py --broker amqp://user:pass@host/vhost

Zocalo's side is a local Zocalo (``zocalo_xrc.local``): zocalo's dispatcher
and recipes, ISPyB (SQLite) holding the scan, Mimas, per-image analysis
simulated from the recorded spot counts of ``examples/scan3d.json``, and the
project's X-ray centring service. Where ``--broker`` has a Zocalo running
already (``zocalo-xrc local up``), the scan is registered in that one's state
directory (``--state``, as ``zocalo-xrc local add-scan``) and the plan talks to
it. Needs ``pip install 'zocalo-xrc[bluesky,local]'``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import bluesky.plan_stubs as bps
from bluesky.run_engine import RunEngine, RunEngineResult
from bluesky.utils import FailedStatus
from ophyd_async.core import soft_signal_rw
from ophyd_async.plan_stubs import ensure_connected
from ophyd_async.sim import SimMotor

import zocalo_xrc as zx
from zocalo_xrc.bluesky import ZOCALO_HW_READ, ZocaloCallback, ZocaloResults, start_infos_from_omega_map
from zocalo_xrc.client import connect
from zocalo_xrc.local import BrokerInUseError, LocalZocalo, Scan
from zocalo_xrc.local.ispyb import Ispyb
from zocalo_xrc.local.zocalo import StateDirectory, default_state_directory, prepare_results_queue, register_scan
from zocalo_xrc.messaging import Transport
from zocalo_xrc.messaging.rabbitmq import AmqpTransport

SCAN = Scan.load(Path(__file__).parent / "scan3d.json")
NAME = "example_1"  # the detector's file


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", default=None,
                        help="an amqp:// URL or a zocalo environment (default: a broker in this process); "
                             "one with a `zocalo-xrc local up` running is used as it is")
    parser.add_argument("--state", type=Path, default=None,
                        help="the state directory of that `local up` (default: its default, "
                             f"{default_state_directory()})")
    args = parser.parse_args()
    try:
        try:
            with LocalZocalo(broker=args.broker) as local:
                registered = local.add_scan(SCAN, name=NAME)  # in ISPyB: the group, its two collections, their grids
                run(local.transport(), registered.dcids)
        except BrokerInUseError:  # a Zocalo runs there: register the scan with it, as `local add-scan` does
            run_on_the_running_zocalo(args.broker, StateDirectory((args.state or default_state_directory()).resolve()))
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # one line, as the command line's errors
        cause = e.__cause__ if isinstance(e, FailedStatus) and e.__cause__ is not None else e  # a device's error
        print(f"gridscan_plan.py: {(str(cause).strip() or type(cause).__name__).splitlines()[0]}", file=sys.stderr)
        return 1
    return 0


def run_on_the_running_zocalo(broker: str, state: StateDirectory) -> None:
    transport = connect(broker)
    try:
        if not state.zocalo_config.exists():
            where = transport.settings.url() if isinstance(transport, AmqpTransport) else broker  # no password
            raise FileNotFoundError(f"{where} has a Zocalo running, but {state.path} is no local Zocalo's state "
                                    "directory: give --state the one of its `zocalo-xrc local up`")
        with Ispyb(state.ispyb_url) as db:
            registered = register_scan(db, state, SCAN, NAME)
        prepare_results_queue(state, SCAN.beamline)
        run(transport, registered.dcids)
    finally:
        transport.close()


def run(transport: Transport, dcids: tuple[int, ...]) -> None:
    xy, xz = SCAN.grids
    geometry = zx.GridGeometry(x_start_mm=-1.2, x_step_mm=xy.dx_mm, x_steps=xy.steps_x, y_start_mm=0.35,
                               y_step_mm=xy.dy_mm, y_steps=xy.steps_y, z_start_mm=0.1, z_step_mm=xz.dy_mm,
                               z_steps=xz.steps_y)
    zocalo = ZocaloResults(name="zocalo", channel=f"xrc.{SCAN.beamline}", results_source="GPU", timeout_s=30,
                           connection=transport)
    x, y, z = SimMotor("x"), SimMotor("y"), SimMotor("z")
    file_writer = soft_signal_rw(str, NAME, name="eiger_odin_file_writer_id")
    RE = RunEngine(call_returns_result=True)
    callback = ZocaloCallback("do_fgs", connection=transport, results=zocalo,
                              start_info_generator_factory=lambda: start_infos_from_omega_map([0, 90]))
    RE.subscribe(callback)  # type: ignore[no-untyped-call]
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

    outcome = RE(grid_scan_and_move())
    assert isinstance(outcome, RunEngineResult)  # call_returns_result=True
    centres, counts, best = outcome.plan_result
    print(f"{len(centres)} crystal(s); the best (max count {counts[0]:.0f}) at "
          f"{', '.join(f'{v:.3f}' for v in centres[0])} boxes")
    print(f"moved to x {best[0]:.4f} mm, y {best[1]:.4f} mm, z {best[2]:.4f} mm")


if __name__ == "__main__":
    sys.exit(main())
