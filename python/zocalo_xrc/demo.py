"""``zocalo-xrc demo``: one grid scan through a local Zocalo, from trigger to result.

The demo starts a local Zocalo (:mod:`zocalo_xrc.local`: zocalo's dispatcher,
Mimas, simulated per-image analysis, this project's X-ray centring service,
ISPyB), registers the scan in ISPyB, and then does what a beamline does:
it triggers Zocalo exactly as dodal does (a ``start`` per grid, then an
``end`` per grid once the detector is done), waits for the results with
:class:`~zocalo_xrc.client.ZocaloResults`, and reports the best crystal and
how long the result took after the last frame.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Union

from ._native import XrcResults
from ._progress import Progress
from .client import Source, ZocaloResults, ZocaloResults2D, ZocaloTrigger
from .local.ispyb import RegisteredScan
from .messaging import ConnectionSettings
from .local.scan import Scan
from .local.settings import Settings
from .local.zocalo import LocalZocalo

Results = Union[XrcResults, tuple[Any, ...]]


@dataclass
class Outcome:
    """One source's result for the scan, and when it came."""

    source: Source
    results: Results
    arrived_at: float  # unix time
    after_last_frame_s: float | None  # of this source's per-image analysis
    after_end_s: float


class Demo:
    """One run of the demo: ``broker`` None (in-process), an amqp:// URL or
    :class:`~zocalo_xrc.messaging.ConnectionSettings`;
    ``ispyb_url`` None (SQLite in the local Zocalo's state directory) or a
    SQLAlchemy URL."""

    def __init__(self, scan: Scan, *, broker: str | ConnectionSettings | None = None, ispyb_url: str | None = None,
                 settings: Settings = Settings(), state: str | None = None, name: str = "demo",
                 detector: str | tuple[int, int] | None = None) -> None:
        self.scan, self.name, self.settings = scan, name, settings
        #: the simulated detector's size ("1M".."16M", or (height, width)); None: the scan file's counts are played
        self.detector_size = detector
        #: spots the model put on the frames, and those per-image analysis found, by source (with a detector)
        self.spots_drawn: int | None = None
        self.spots_found: dict[Source, int] = {}
        self.local = LocalZocalo(broker=broker, ispyb_url=ispyb_url, state=state, settings=settings)
        self.registered: RegisteredScan | None = None
        self.last_frame_at: dict[Source, float] = {}

    @property
    def sources(self) -> list[Source]:
        return [s for s in (Source.GPU, Source.CPU) if s.value in self.settings.pia]

    def run(self, timeout_s: float = 60.0, progress: Progress | None = None,
            announce: Callable[[str], None] = lambda line: None) -> list[Outcome]:
        """Register, trigger, play, wait: each source's results, or
        :class:`~zocalo_xrc.client.NoResultsFromZocaloError` /
        :class:`TransportError`."""
        with self.local:
            detector = None
            if self.detector_size is None:
                self.registered = scan = self.local.add_scan(self.scan, name=self.name)
            else:
                scan, detector = self.local.add_detector_scan(self.scan, name=self.name, size=self.detector_size)
                self.registered = scan
                self.spots_drawn = int(detector.spots[:detector.frames].sum())
            kind = "3D" if len(self.scan.grids) == 2 else "2D"
            announce(f"registered a {kind} grid scan in ISPyB: DCG {scan.dcgid}, {self.scan.describe_grids(scan.dcids)}")
            transport = self.local.transport()
            receiver = ZocaloResults if len(self.scan.grids) == 2 else ZocaloResults2D
            receivers = {s: receiver(transport, beamline=self.scan.beamline, private_queue=True, source=s,
                                     timeout_s=timeout_s) for s in self.sources}
            for r in receivers.values():
                r.subscribe()
            arrivals = {s: self._wait(r, scan, timeout_s) for s, r in receivers.items()}
            trigger = ZocaloTrigger(transport, timeout_s=10.0)
            trigger.run_start(*self.scan.start_infos(scan.dcids, self.name))
            announce(f"sent start for {self.scan.each_grid} to processing_recipe (recipe mimas), as dodal does")
            writing = None if detector is None else detector.start()
            self._play(Source.GPU, scan, progress, timeout_s)
            if writing is not None and detector is not None:
                writing.join()
                if detector.last_written_at is not None:
                    self.last_frame_at = {s: detector.last_written_at for s in self.sources}
            trigger.run_end(*scan.dcids)
            ended = time.time()
            announce(f"sent end for {self.scan.each_grid}")
            if Source.CPU in arrivals:
                self._play(Source.CPU, scan, progress, timeout_s)
            outcomes = []
            for source, arrival in arrivals.items():
                results, arrived_at = arrival.result()
                self.spots_found[source] = self._spots_found(source, scan)
                last = self.last_frame_at.get(source)
                outcomes.append(Outcome(source, results, arrived_at, None if last is None else arrived_at - last,
                                        arrived_at - ended))
            for r in receivers.values():
                r.close()
            return outcomes

    def _wait(self, receiver: Any, scan: RegisteredScan, timeout_s: float) -> Future[tuple[Results, float]]:
        """Wait in a thread, so that the result's arrival time is its own."""
        future: Future[tuple[Results, float]] = Future()

        def wait() -> None:
            try:
                results = receiver.trigger(dcids=scan.dcids, dcgid=scan.dcgid)
                future.set_result((results, time.time()))
            except BaseException as e:
                future.set_exception(e)

        threading.Thread(target=wait, daemon=True, name=f"demo: {receiver.source.value} results").start()
        return future

    def _spots_found(self, source: Source, scan: RegisteredScan) -> int:
        """The spots per-image analysis of ``source`` found, over the scan's images (once its result is in)."""
        services = [s for s in self.local.per_image_analysis() if s.follows_detector == (source is Source.GPU)]
        return sum(g.spots for s in services for d in scan.dcids if (g := s.progress.get(d)) is not None)

    def _play(self, source: Source, scan: RegisteredScan, progress: Progress | None, timeout_s: float) -> None:
        """Follow per-image analysis of ``source`` until every frame is sent."""
        services = [s for s in self.local.per_image_analysis() if s.follows_detector == (source is Source.GPU)]
        if not services:  # not run here: the detector's time passes all the same
            if source is Source.GPU:
                time.sleep(sum(g.image_count for g in self.scan.grids) / self.settings.frame_rate)
            return
        service = services[0]
        what = f"{source.value.upper()} per-image analysis"
        start = time.monotonic()
        total = sum(g.image_count for g in self.scan.grids)
        while True:
            grids = [service.progress.get(d) for d in scan.dcids]
            sent = sum(g.results for g in grids if g is not None)
            finished = all(g is not None and g.finished for g in grids)
            elapsed = time.monotonic() - start
            if progress is not None:
                progress.bar(what, sent, total, elapsed, finished=finished)
            if finished:
                break
            if elapsed > timeout_s:
                raise TimeoutError(f"{what}: only {sent} of {total} frames in {timeout_s:g} s")
            time.sleep(0.1)
        if progress is not None:
            progress.done()
        seen = [g.last_seen_at for g in grids if g is not None and g.last_seen_at is not None]
        if seen:
            self.last_frame_at[source] = max(seen)

