"""A 3D grid scan's X-ray centring in a Bluesky plan shaped like Hyperion's:
stage the results device, run the grid scan (the callback triggers Zocalo),
read the best crystal, convert it to mm and move the sample there.

    python examples/gridscan_plan.py                    # everything in this process
    python examples/gridscan_plan.py --broker amqp://user:pass@host/vhost

Zocalo's side: the project's X-ray centring service, fed by a simulated
per-image analysis that replays the recorded spot counts of
``examples/scan3d.json`` once both grids have ended (a real beamline's
Zocalo does that part). Needs ``pip install 'zocalo-xrc[bluesky]' h5py``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import bluesky.plan_stubs as bps
from bluesky.run_engine import RunEngine
from ophyd_async.core import soft_signal_rw
from ophyd_async.plan_stubs import ensure_connected
from ophyd_async.sim import SimMotor

import zocalo_xrc as zx
from zocalo_xrc.bluesky import ZOCALO_HW_READ, ZocaloCallback, ZocaloResults, start_infos_from_omega_map
from zocalo_xrc.client import connect
from zocalo_xrc.messaging import Delivery, QueueSpec, Transport
from zocalo_xrc.service import XrcService

CASE = json.loads((Path(__file__).parent / "scan3d.json").read_text())
BEAMLINE, WORK_QUEUE, DCGID = "example", "reduce.xray_centering.gpu", 4242


def pia_messages(grid: dict[str, Any], other: int) -> list[bytes]:
    """Every image of a grid as GPU PIA's recipe step sends it to the centring step."""
    recipe = {
        "1": {"service": "GPU Gridscan", "queue": "per_image_analysis.gpu", "output": [2]},
        "2": {"service": "DLS X-Ray Centering", "queue": WORK_QUEUE, "gridinfo": grid["gridinfo"],
              "parameters": {"dcid": str(grid["dcid"]), "dcg_dcids": [other], "experiment_type": "Mesh3D",
                             "beamline": BEAMLINE, "sample_id": CASE["sample_id"]},
              "output": {"success": 3, "abort": 4}},
        "3": {"service": "Send XRC results to GDA", "queue": f"xrc.{BEAMLINE}", "exchange": "results",
              "parameters": {"dcid": str(grid["dcid"]), "dcgid": str(DCGID), "gpu": True}},
        "4": {"service": "XRC abort", "queue": f"xrc.{BEAMLINE}.abort"},
        "start": [[1, []]],
    }
    return [json.dumps({"environment": {"ID": f"example-{grid['dcid']}"}, "recipe": recipe, "recipe-path": [1],
                        "recipe-pointer": 2, "payload": {"file-number": k, "n_spots_total": n}}).encode()
            for k, n in enumerate(grid["counts"], 1)]


class SimulatedPia:
    """Per-image analysis, simulated: once every grid has ended, each image's
    recorded spot count goes to the centring service."""

    def __init__(self, transport: Transport) -> None:
        a, b = CASE["grids"]
        self.transport, self.ended, self.dcids = transport, set[int](), {a["dcid"], b["dcid"]}
        self.messages = pia_messages(a, b["dcid"]) + pia_messages(b, a["dcid"])
        transport.subscribe(QueueSpec("processing_recipe"), self.on_message)

    def on_message(self, delivery: Delivery) -> None:
        parameters = json.loads(delivery.body)["parameters"]
        delivery.ack()
        if parameters["event"] == "end":
            self.ended.add(int(parameters["ispyb_dcid"]))
            if self.ended == self.dcids:
                for body in self.messages:
                    self.transport.publish("", WORK_QUEUE, body, {"workflows-recipe": True})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", default="in-process", help="in-process (default), an amqp:// URL or a zocalo "
                                                               "environment of $ZOCALO_CONFIG")
    args = parser.parse_args()
    transport = connect(args.broker)
    transport.declare_queue("processing_recipe")
    transport.declare_work_queue(WORK_QUEUE)
    transport.declare_results_queue(f"xrc.{BEAMLINE}")
    transport.declare_queue(f"xrc.{BEAMLINE}.abort")
    service = XrcService(transport, WORK_QUEUE).start()
    SimulatedPia(transport)

    xy, xz = (zx.GridInfo.from_ispyb(g["gridinfo"]) for g in CASE["grids"])
    geometry = zx.GridGeometry(x_start_mm=-1.2, x_step_mm=xy.dx_mm, x_steps=xy.steps_x, y_start_mm=0.35,
                               y_step_mm=xy.dy_mm, y_steps=xy.steps_y, z_start_mm=0.1, z_step_mm=xz.dy_mm,
                               z_steps=xz.steps_y)
    zocalo = ZocaloResults(name="zocalo", channel=f"xrc.{BEAMLINE}", results_source="GPU", timeout_s=30,
                           connection=transport)
    x, y, z = SimMotor("x"), SimMotor("y"), SimMotor("z")
    file_writer = soft_signal_rw(str, "example_1", name="eiger_odin_file_writer_id")
    RE = RunEngine(call_returns_result=True)
    RE.subscribe(ZocaloCallback("do_fgs", connection=transport, results=zocalo,
                                start_info_generator_factory=lambda: start_infos_from_omega_map([0, 90])))
    a, b = CASE["grids"]
    md = {"subplan_name": "do_fgs",  # what Hyperion's ISPyB callback puts in the grid scan's start document
          "omega_to_scan_spec": {"0": xy.steps_x * xy.steps_y, "90": xz.steps_x * xz.steps_y},
          "grid_plane_to_id_map": {"0": a["dcid"], "90": b["dcid"]}}

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
    service.stop()
    transport.close()


if __name__ == "__main__":
    main()
