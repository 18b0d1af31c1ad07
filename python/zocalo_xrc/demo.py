"""``zocalo-xrc demo``: the whole loop on one machine, no RabbitMQ needed.

A plan tells Zocalo a 3D grid scan has started and ended, then waits for the
X-ray centring results of that collection. Zocalo's side (spot finding and
the centring service) is played by :class:`ScanResponder`: it centres the
scan's recorded spot counts with this library's core and publishes the result
to ``xrc.<beamline>`` on the ``results`` exchange, as Diamond's service does.
With ``--broker`` it all goes through a real RabbitMQ.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from .centring import GridScan, centre_3d_scans
from .cli import load_case, scans_of
from .geometry import GridGeometry
from .messages import build_result_message
from .transport import Delivery, QueueSpec, Transport
from .zocalo import PROCESSING_QUEUE, ZocaloResults, ZocaloStartInfo, ZocaloTrigger, connect

log = logging.getLogger("zocalo_xrc.demo")


class ScanResponder:
    """Zocalo's part of the demo: once every grid of the group has ended,
    centre the recorded counts and publish the result."""

    def __init__(self, transport: Transport, scans: list[GridScan], dcgid: int, beamline: str, sample_id: int | None) -> None:
        self.transport, self.scans, self.dcgid, self.beamline, self.sample_id = transport, scans, dcgid, beamline, sample_id
        self.ended: set[int] = set()
        self.subscription = transport.subscribe(QueueSpec(PROCESSING_QUEUE), self.on_message)

    def on_message(self, delivery: Delivery) -> None:
        parameters = json.loads(delivery.body)["parameters"]
        delivery.ack()
        if parameters["event"] != "end":
            return
        self.ended.add(parameters["ispyb_dcid"])
        if self.ended >= {s.dcid for s in self.scans}:
            results = centre_3d_scans(*self.scans, sample_id=self.sample_id)
            body = build_result_message(results, dcid=max(self.ended), dcgid=self.dcgid, beamline=self.beamline)
            self.transport.publish("results", f"xrc.{self.beamline}", body, {"workflows-recipe": True})

    def close(self) -> None:
        self.subscription.cancel()


def run(case_path: Path, broker: str | None = None, beamline: str = "i03", dcgid: int = 1) -> tuple[Any, list[GridScan]]:
    """Run the demo on a 3D case file; return the results and the scans."""
    case = load_case(case_path)
    scans = scans_of(case)
    transport = connect(broker)
    transport.declare_queue(PROCESSING_QUEUE)
    transport.declare_results_queue(f"xrc.{beamline}")
    responder = ScanResponder(transport, scans, dcgid, beamline, case.get("sample_id"))
    trigger = ZocaloTrigger(transport)
    try:
        with ZocaloResults(transport, beamline=beamline, timeout_s=30) as zocalo:
            zocalo.subscribe()
            xy, xz = scans
            frames = xy.grid.image_count
            trigger.run_start(
                ZocaloStartInfo(xy.dcid, case_path.stem, 0, frames, 0),
                ZocaloStartInfo(xz.dcid, case_path.stem, frames, xz.grid.image_count, 1),
            )
            t0 = time.perf_counter()
            trigger.run_end(xy.dcid, xz.dcid)
            results = zocalo.trigger(dcids=[xy.dcid, xz.dcid], dcgid=dcgid)
            log.info("results %.1f ms after the end of the scan", (time.perf_counter() - t0) * 1e3)
            return results, scans
    finally:
        responder.close()


def geometry(scans: list[GridScan]) -> GridGeometry:
    """Grid positions relative to the first box (the case files hold no motor starts)."""
    xy, xz = scans
    return GridGeometry(0.0, xy.grid.dx_mm, xy.grid.steps_x, 0.0, xy.grid.dy_mm, xy.grid.steps_y,
                        0.0, xz.grid.dy_mm, xz.grid.steps_y)
