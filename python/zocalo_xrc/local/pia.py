"""Simulated per-image analysis (PIA): spot counts for every frame of a grid scan.

A recipe's first step names the collection (``dcid``, ``dcg_dcids``) and
where its data is (``image_directory``/``image_template``: here a scan file,
:mod:`zocalo_xrc.local.scan`, standing in for the detector's file). The
service works out which grid of the scan the collection is (grids in DCID
order), and sends one message per frame to the step's output, as Diamond's
spot finders do: ``file-number`` (1-based), ``n_spots_total``,
``file-seen-at``, and the fields each spot finder adds.

* **GPU** (``per_image_analysis.gpu``, started at the collection's ``start``)
  follows the detector: frame ``i`` of a grid whose first frame is
  ``start_frame_index`` in the file is written at ``(start_frame_index + i) /
  frame_rate`` after the start, and a pool of workers finishes frames a
  little out of order.
* **CPU** (``per_image_analysis``, started at ``end``) reads frames already
  written, at the same rate, also out of order.

The step's message is acked when every frame has been sent: a service that
stops half-way leaves it to be played again (the centring service takes
duplicates).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import workflows.recipe
from workflows.services.common_service import CommonService

from . import logbook
from .mimas import given
from .scan import Scan, ScanFileError
from .settings import Settings

#: how many frames apart two frames may be finished out of order
WORKERS = 8
#: how many grids one service plays at the same time
STEPS_AT_ONCE = 64


@dataclass
class GridProgress:
    """How far per-image analysis has got with one grid."""

    dcid: int
    frames: int
    sent: int = 0
    last_seen_at: float | None = None
    done: threading.Event = field(default_factory=threading.Event)


class StepError(ValueError):
    """A per-image analysis step that cannot be played; says why."""


@dataclass(frozen=True)
class Frames:
    """One grid's frames, ready to play: file numbers with their spot counts
    and when each is finished, in seconds from the start."""

    dcid: int
    path: Path
    numbers: np.ndarray
    counts: np.ndarray
    due_s: np.ndarray

    @classmethod
    def for_step(cls, parameters: Mapping[str, Any], *, rate: float, follow_detector: bool) -> Frames:
        try:
            dcid = int(given(parameters.get("dcid")))
        except (TypeError, ValueError):
            raise StepError(f"dcid: expected a DCID, got {parameters.get('dcid')!r:.40}") from None
        others = given(parameters.get("dcg_dcids")) or []
        if not isinstance(others, list):
            raise StepError(f"dcg_dcids: expected a list of DCIDs, got {others!r:.60}")
        directory, template = given(parameters.get("image_directory")), given(parameters.get("image_template"))
        if not directory or not template:
            raise StepError(f"DCID {dcid}: ISPyB gave no image directory/template (ISPyB does not hold the DCID, "
                            "or the dispatcher's ISPyB filter is off)")
        path = Path(directory) / template
        try:
            scan = Scan.load(path)
        except OSError as e:
            raise StepError(f"DCID {dcid}: cannot read the data {path}: {e.strerror or e}") from None
        except ScanFileError as e:
            raise StepError(f"DCID {dcid}: {e}") from None
        group = sorted({dcid, *(int(d) for d in others)})
        k = group.index(dcid)
        if k >= len(scan.grids):
            raise StepError(f"DCID {dcid} is grid {k + 1} of its group, but {path} has {len(scan.grids)} grid(s)")
        counts = scan.counts(k)
        numbers = np.arange(1, len(counts) + 1)
        if scan.lost_frames:
            numbers, counts = numbers[:-scan.lost_frames], counts[:-scan.lost_frames]
        first = 0
        if follow_detector:
            try:
                first = int(given(parameters.get("start_frame_index")) or 0)
            except (TypeError, ValueError):
                raise StepError(f"start_frame_index: expected a frame number, "
                                f"got {parameters.get('start_frame_index')!r:.40}") from None
        rng = np.random.default_rng(dcid)
        written = (first + numbers) / rate  # frame n is on disk once written
        due = written + rng.uniform(0, WORKERS / rate, len(numbers))  # a pool of workers finishes in any order
        order = np.argsort(due, kind="stable")
        return cls(dcid, path, numbers[order], counts[order], due[order])


class PerImageAnalysis(CommonService):
    """Simulated CPU per-image analysis, on ``per_image_analysis``."""

    _service_name = "Per-image analysis, simulated (zocalo-xrc)"
    _logger_name = "zocalo_xrc.local.pia"
    queue = "per_image_analysis"
    follows_detector = False

    def initializing(self) -> None:
        self.settings = Settings.of(self.config)
        self.progress: dict[int, GridProgress] = {}
        self._stopping = threading.Event()
        self.journal = logbook.attach(self)
        # a step is held (unacked) while its frames play: take many at once, as a pool of workers does
        workflows.recipe.wrap_subscribe(self._transport, self.queue, self.on_step, acknowledgement=True,
                                        prefetch_count=STEPS_AT_ONCE, log_extender=self.extend_log)

    def in_shutdown(self) -> None:
        if hasattr(self, "_stopping"):
            self._stopping.set()
        logbook.detach(self)

    def on_step(self, rw: workflows.recipe.RecipeWrapper, header: Mapping[str, Any], message: Any) -> None:
        try:
            frames = Frames.for_step(rw.recipe_step.get("parameters") or {}, rate=self.settings.frame_rate,
                                     follow_detector=self.follows_detector)
        except StepError as e:
            self.log.error("per-image analysis cannot run: %s; dead-lettering the step", e)
            self._transport.nack(header, requeue=False)  # it would fail the same way again
            return
        progress = self.progress[frames.dcid] = GridProgress(frames.dcid, len(frames.numbers))
        threading.Thread(target=self._play, args=(rw, header, frames, progress), daemon=True,
                         name=f"per-image analysis of DCID {frames.dcid}").start()

    def payload(self, path: Path, number: int, spots: int, seen_at: float) -> dict[str, Any]:
        return {"file": str(path), "file-number": number, "file-pattern-index": number, "file-seen-at": seen_at,
                "n_spots_total": spots, "n_spots_no_ice": spots, "n_spots_4A": spots // 2,
                "total_intensity": 25.0 * spots, "estimated_d_min": 2.1 if spots else None}

    def _play(self, rw: workflows.recipe.RecipeWrapper, header: Mapping[str, Any], frames: Frames,
              progress: GridProgress) -> None:
        start = time.monotonic()
        self.log.info("per-image analysis of DCID %d: %d frame(s) from %s", frames.dcid, len(frames.numbers),
                      frames.path)
        try:
            for number, spots, due in zip(frames.numbers.tolist(), frames.counts.tolist(), frames.due_s.tolist()):
                wait = start + due - time.monotonic()
                if wait > 0 and self._stopping.wait(wait):
                    return  # the step stays unacked: it is played again by the next service
                if self._stopping.is_set():
                    return
                seen_at = time.time()
                rw.send(self.payload(frames.path, number, spots, seen_at))
                progress.sent += 1
                progress.last_seen_at = seen_at
            rw.transport.ack(header)
            self.log.info("per-image analysis of DCID %d: done, %d frame(s) in %.2f s", frames.dcid,
                          progress.sent, time.monotonic() - start)
        except Exception:
            self.log.exception("per-image analysis of DCID %d stopped after %d frame(s)", frames.dcid,
                               progress.sent)
        finally:
            progress.done.set()


class PerImageAnalysisGPU(PerImageAnalysis):
    """Simulated GPU per-image analysis, on ``per_image_analysis.gpu``: follows the detector."""

    _service_name = "Per-image analysis, GPU, simulated (zocalo-xrc)"
    queue = "per_image_analysis.gpu"
    follows_detector = True

    def payload(self, path: Path, number: int, spots: int, seen_at: float) -> dict[str, Any]:
        return {"file": str(path), "file-number": number, "file-seen-at": seen_at, "n_spots_total": spots,
                "num_strong_pixels": 7 * spots}
