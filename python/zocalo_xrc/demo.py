"""``zocalo-xrc demo``: trigger Zocalo for a 3D grid scan and wait for its results.

A plan tells Zocalo a 3D grid scan has started and ended, then waits for the
X-ray centring results of that collection. Zocalo's side (spot finding and
the centring service) is played in this process by :class:`SimulatedZocalo`:
it centres the scan's recorded spot counts with this library's core and
publishes the result to ``xrc.<beamline>`` on the ``results`` exchange, as
Diamond's service does. If it cannot (grids that disagree, say), the demo
says so at once instead of waiting for a result that will never come.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from concurrent.futures import Future
from typing import Any, TextIO

from ._native import XrcResults
from .centring import GridScan, centre_3d_scans
from .messages import build_result_message
from .messaging import Delivery, QueueSpec, Transport, TransportError
from .client import PROCESSING_QUEUE, Connection, ZocaloResults, ZocaloStartInfo, ZocaloTrigger

log = logging.getLogger("zocalo_xrc.demo")


class ZocaloFailed(RuntimeError):
    """Zocalo's side could not process the collection."""


class BrokerInUseError(TransportError):
    """The broker already has a Zocalo of its own: the demo will not compete with it."""


class SimulatedZocalo:
    """Zocalo's part of the demo: once every grid of the group has ended,
    centre the recorded counts and publish the result. A failure is set on
    :attr:`failure` (and logged) instead of being lost on the I/O thread."""

    def __init__(self, transport: Transport, scans: list[GridScan], dcgid: int, beamline: str,
                 sample_id: int | None = None) -> None:
        self.transport, self.scans, self.dcgid, self.beamline, self.sample_id = transport, scans, dcgid, beamline, sample_id
        self.ended: set[int] = set()
        self.failure: Future[None] = Future()
        transport.declare_queue(PROCESSING_QUEUE)
        listening = transport.consumer_count(PROCESSING_QUEUE)
        if listening:
            raise BrokerInUseError(
                f"{PROCESSING_QUEUE} already has {listening} consumer(s) on this broker: a real Zocalo may be "
                "listening, and the simulated one would take its messages; use a broker of your own or in-process"
            )
        self.subscription = transport.subscribe(QueueSpec(PROCESSING_QUEUE), self.on_message)

    def on_message(self, delivery: Delivery) -> None:
        delivery.ack()
        try:
            parameters = json.loads(delivery.body)["parameters"]
            if parameters["event"] != "end":
                return
            self.ended.add(parameters["ispyb_dcid"])
            if self.ended >= {s.dcid for s in self.scans}:  # once per start..end of the group
                last = max(self.ended)
                self.ended.clear()
                results = centre_3d_scans(*self.scans, sample_id=self.sample_id)
                body = build_result_message(results, dcid=last, dcgid=self.dcgid, beamline=self.beamline)
                self.transport.publish("results", f"xrc.{self.beamline}", body, {"workflows-recipe": True})
        except Exception as e:  # Zocalo's side failed: tell the waiting plan
            log.info("simulated Zocalo could not process the collection: %s", e)
            if not self.failure.done():
                self.failure.set_exception(ZocaloFailed(f"Zocalo could not process the collection: {e}"))

    def close(self) -> None:
        self.subscription.cancel()


class Progress:
    """What the demo is doing, on a terminal (one line, rewritten) or a log
    file (a line every few seconds)."""

    def __init__(self, stream: TextIO = sys.stderr, every_s: float = 5.0) -> None:
        self.stream, self.every_s = stream, every_s
        self.tty = stream.isatty()
        self._last = -every_s
        self._open = False

    def waiting(self, what: str, elapsed: float, timeout: float) -> None:
        line = f"waiting for {what}: {elapsed:.0f} s of {timeout:g} s"
        if self.tty:
            self.stream.write("\r" + line)
            self._open = True
        elif elapsed - self._last >= self.every_s:
            self.stream.write(line + "\n")
            self._last = elapsed
        self.stream.flush()

    def done(self) -> None:
        if self._open:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._open = False


class Demo:
    """One run of the demo on a 3D case: ``broker`` is ``"in-process"``, an
    ``amqp://`` URL or a zocalo environment name (see :func:`zocalo.resolve`);
    a bad one is an error here, before anything is sent."""

    def __init__(self, case: dict[str, Any], scans: list[GridScan], broker: Connection = "in-process", *,
                 beamline: str = "i03", dcgid: int = 1, name: str = "demo") -> None:
        self.case, self.scans, self.beamline, self.dcgid, self.name = case, scans, beamline, dcgid, name
        self.trigger = ZocaloTrigger(broker)
        self.broker = self.trigger.broker

    def run(self, timeout_s: float = 30.0, progress: Progress | None = None) -> XrcResults:
        """Trigger, wait; the results, or :class:`ZocaloFailed`,
        :class:`NoResultsFromZocaloError` or a :class:`TransportError`."""
        self.trigger.timeout_s = timeout_s
        transport = self.trigger.transport
        transport.wait_connected(timeout_s)
        zocalo_side = SimulatedZocalo(transport, self.scans, self.dcgid, self.beamline, self.case.get("sample_id"))
        try:
            with ZocaloResults(transport, beamline=self.beamline, timeout_s=timeout_s) as zocalo:
                zocalo.subscribe()
                xy, xz = self.scans
                frames = xy.grid.image_count
                self.trigger.run_start(
                    ZocaloStartInfo(xy.dcid, self.name, 0, frames, 0),
                    ZocaloStartInfo(xz.dcid, self.name, frames, xz.grid.image_count, 1),
                )
                t0 = time.perf_counter()
                self.trigger.run_end(xy.dcid, xz.dcid)
                results = asyncio.run(self._wait(zocalo, zocalo_side, timeout_s, progress))
                log.info("results %.1f ms after the end of the scan", (time.perf_counter() - t0) * 1e3)
                return results
        finally:
            zocalo_side.close()

    async def _wait(self, zocalo: ZocaloResults, zocalo_side: SimulatedZocalo, timeout_s: float,
                    progress: Progress | None) -> XrcResults:
        """The results, or Zocalo's failure as soon as it is known."""
        xy, xz = self.scans
        results = asyncio.ensure_future(zocalo.trigger_async(dcids=[xy.dcid, xz.dcid], dcgid=self.dcgid))
        failed = asyncio.wrap_future(zocalo_side.failure)
        start = time.monotonic()
        try:
            while True:
                done, _ = await asyncio.wait({results, failed}, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
                if failed in done:
                    failed.result()  # raises ZocaloFailed
                if results in done:
                    return results.result()
                if progress is not None:
                    progress.waiting(f"Zocalo's results for DCIDs {xy.dcid}, {xz.dcid}", time.monotonic() - start, timeout_s)
        finally:
            for f in (results, failed):
                f.cancel()
            if progress is not None:
                progress.done()
