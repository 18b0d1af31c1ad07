"""Per-image analysis (PIA): spot counts for every frame of a grid scan.

A recipe's first step names the collection (``dcid``, ``dcg_dcids``) and
where its data is (``image_directory``/``image_template``, from ISPyB). The
service sends one message per frame to the step's output, as Diamond's spot
finders do: ``file``, ``file-number`` (1-based within the grid),
``file-seen-at``, ``n_spots_total`` and the fields each spot finder adds.
The data is either

* the **detector's file** (an Eiger/Odin master file): the spot finder
  (:mod:`zocalo_xrc.pia`) runs over the step's frames (``start_frame_index``
  and ``number_of_frames`` from the beamline's start message, else ISPyB's
  start image number and number of images), in parallel; or
* a **scan file** (``.json``, :mod:`zocalo_xrc.local.scan`) standing in for
  the detector: its recorded or modelled counts are played at the frame rate.

* **GPU** (``per_image_analysis.gpu``, started at the collection's ``start``,
  as FFS): follows the detector. A detector file is read as it is written,
  waiting up to ``frame_timeout_s`` (FFS: 30 s) for each next frame; frames
  that never come are named in the log and the step ends. It sends
  ``num_strong_pixels`` and ``n_spots_total`` (no resolution filter unless
  the step gives ``d_min``/``d_max``). A scan file's frame ``i`` of a grid
  whose first frame is ``start_frame_index`` is due ``(start_frame_index +
  i) / frame_rate`` after the start, finished a little out of order.
* **CPU** (``per_image_analysis``, started at ``end``, as Diamond's CPU
  PIA): reads the frames written, and sends ``n_spots_total`` (spots with
  ``d`` <= 40 Å), ``n_spots_no_ice``, ``n_spots_4A`` and ``total_intensity``.
  For a detector's file, as Diamond's: a file watcher (``filewatcher``)
  sends a message per frame written to the workers sharing
  ``per_image_analysis``, each answering one image in a transaction with
  its ack.

A step's message is acked when every frame has been sent (or named as
never come): a service that stops half-way leaves it to be run again (the
centring service takes duplicates). The file watcher is exactly once
instead: a message of it waits for a frame not yet sent (up to the frame
timeout since the last), then in one transaction sends every frame written
by then, acks itself and, unless the step is done, checkpoints how far it
got (``filewatcher-status``) to its own queue, for whichever watcher takes
it next. A step that cannot run (no DCID, data missing, not HDF5,
truncated, frames of the wrong size) is one log line and dead-lettered: it
would fail the same way again.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import workflows.recipe
from workflows.services.common_service import CommonService

from . import logbook
from .mimas import given
from .scan import Scan, ScanFileError
from .settings import Settings

if TYPE_CHECKING:  # the spot finder is imported only for a detector's file
    from ..pia.finder import SpotFinder, Spots
    from ..pia.images import Images
    from ..pia.resolution import Geometry

#: how many frames apart two frames may be finished out of order
WORKERS = 8
#: how many grids one service plays at the same time
STEPS_AT_ONCE = 64
#: frames named at most when some never come
NAMED = 20
#: files whose detector (mask, geometry) and spot finder a worker keeps for the next image
FILES_KEPT = 8
#: how long a worker waits before reading again a file that failed to read (it may be being written), seconds
REREAD_S = 0.02
#: the file watcher's queue (the CPU service watches files too: one process, both of Diamond's CPU roles)
WATCHER_QUEUE = "filewatcher"


@dataclass
class GridProgress:
    """How far per-image analysis has got with one grid."""

    dcid: int
    frames: int
    sent: int = 0
    spots: int = 0  # n_spots_total over the frames sent
    #: a file watcher's grid: ``sent`` counts the images handed to the workers, ``answered`` those that
    #: workers of this service answered
    watched: bool = False
    answered: int = 0

    @property
    def results(self) -> int:
        """Images whose results are sent (by this service's workers, for a watched grid)."""
        return self.answered if self.watched else self.sent

    @property
    def finished(self) -> bool:
        """Every frame's results sent (or the step ended with frames that never came)."""
        return self.done.is_set() and (not self.watched or self.answered >= self.sent)
    last_seen_at: float | None = None
    last_sent_at: float | None = None  # time.time() once the last message so far is sent
    done: threading.Event = field(default_factory=threading.Event)


class StepError(ValueError):
    """A per-image analysis step that cannot be played; says why."""


def _whole(parameters: Mapping[str, Any], key: str, what: str) -> int | None:
    value = given(parameters.get(key))
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise StepError(f"{key}: expected {what}, got {parameters.get(key)!r:.40}") from None


def _limit(parameters: Mapping[str, Any], key: str) -> float | None:
    value = given(parameters.get(key))
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise StepError(f"{key}: expected a resolution in Å, got {parameters.get(key)!r:.40}") from None


@dataclass(frozen=True)
class Step:
    """What one per-image analysis step is asked: the collection, which grid
    of its group it is, where its data is and which of the data's frames are its."""

    dcid: int
    grid: int  # 0: the group's first DCID (xy), 1: the second (xz)
    path: Path
    parameters: Mapping[str, Any]

    @classmethod
    def of(cls, parameters: Mapping[str, Any]) -> Step:
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
        try:
            group = sorted({dcid, *(int(d) for d in others)})
        except (TypeError, ValueError):
            raise StepError(f"dcg_dcids: expected a list of DCIDs, got {others!r:.60}") from None
        return cls(dcid, group.index(dcid), Path(directory) / template, parameters)

    @property
    def is_scan_file(self) -> bool:
        """The data is a scan file standing in for the detector's."""
        return self.path.suffix == ".json"

    @property
    def start_frame_index(self) -> int | None:
        """Where the grid starts in the file (0-based), as the beamline said at start."""
        return _whole(self.parameters, "start_frame_index", "a frame number")

    def frames(self) -> range:
        """The grid's frames in the detector's file (0-based): as the
        beamline said at start, else as ISPyB has them."""
        first = self.start_frame_index
        if first is None:
            number = _whole(self.parameters, "start_image_number", "an image number")
            first = 0 if number is None else number - 1
        count = _whole(self.parameters, "number_of_frames", "a number of frames")
        if count is None:
            count = _whole(self.parameters, "number_of_images", "a number of images")
        if count is None:
            raise StepError(f"DCID {self.dcid}: how many frames? The step has neither number_of_frames "
                            "nor ISPyB's number of images")
        if first < 0 or count < 1:
            raise StepError(f"DCID {self.dcid}: frames {first} .. {first + count - 1} of {self.path.name}: "
                            "expected a first frame >= 0 and at least one frame")
        return range(first, first + count)


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
    def for_step(cls, step: Step, *, rate: float, follow_detector: bool) -> Frames:
        dcid, path, k = step.dcid, step.path, step.grid
        try:
            scan = Scan.load(path)
        except OSError as e:
            raise StepError(f"DCID {dcid}: cannot read the data {path}: {e.strerror or e}") from None
        except ScanFileError as e:
            raise StepError(f"DCID {dcid}: {e}") from None
        if k >= len(scan.grids):
            raise StepError(f"DCID {dcid} is grid {k + 1} of its group, but {path} has {len(scan.grids)} grid(s)")
        counts = scan.counts(k)
        numbers = np.arange(1, len(counts) + 1)
        if scan.lost_frames:
            numbers, counts = numbers[:-scan.lost_frames], counts[:-scan.lost_frames]
        first = (step.start_frame_index or 0) if follow_detector else 0
        rng = np.random.default_rng(dcid)
        written = (first + numbers) / rate  # frame n is on disk once written
        due = written + rng.uniform(0, WORKERS / rate, len(numbers))  # a pool of workers finishes in any order
        order = np.argsort(due, kind="stable")
        return cls(dcid, path, numbers[order], counts[order], due[order])


@dataclass(frozen=True)
class WatchStatus:
    """How far a file watcher step has got, kept in its checkpoint message
    (as Diamond's file watcher keeps ``filewatcher-status``): the number of
    the step's frames sent (in order), since when it has waited for the next
    and when it started (epoch s)."""

    sent: int
    waiting_since: float
    started_at: float

    KEY = "filewatcher-status"

    @classmethod
    def of(cls, message: Any, frames: int) -> WatchStatus:
        """The status a watcher message carries; a fresh one for the step's first message."""
        status = message.get(cls.KEY) if isinstance(message, Mapping) else None
        if status is None:
            now = time.time()
            return cls(0, now, now)
        try:
            got = cls(int(status["sent"]), float(status["waiting-since"]), float(status["started-at"]))
        except (KeyError, TypeError, ValueError):
            raise StepError(f"{cls.KEY}: expected sent, waiting-since and started-at, got {status!r:.80}") from None
        if not 0 < got.sent < frames:
            raise StepError(f"{cls.KEY}: {got.sent} frame(s) sent of a step of {frames}")
        return got

    def message(self) -> dict[str, Any]:
        return {self.KEY: {"sent": self.sent, "waiting-since": self.waiting_since, "started-at": self.started_at}}


def _keep_recent(cache: dict[Path, Any], path: Path, value: Any) -> None:
    """``cache[path] = value``, forgetting the oldest beyond the files of the last few scans."""
    cache[path] = value
    while len(cache) > FILES_KEPT:
        del cache[next(iter(cache))]


def named(numbers: list[int]) -> str:
    """Image numbers, briefly: the first few, then how many more."""
    more = len(numbers) - NAMED
    return ", ".join(map(str, numbers[:NAMED])) + (f" and {more} more" if more > 0 else "")


class PerImageAnalysis(CommonService):
    """CPU per-image analysis, on ``per_image_analysis``."""

    _service_name = "Per-image analysis (zocalo-xrc)"
    _logger_name = "zocalo_xrc.local.pia"
    queue = "per_image_analysis"
    kind = "CPU"
    follows_detector = False

    def initializing(self) -> None:
        self.settings = Settings.of(self.config)
        self.progress: dict[int, GridProgress] = {}
        self._stopping = threading.Event()
        #: one transaction at a time: workflows' transport numbers them without a lock; and a message
        #: held in a thread is settled only while none is open on its channel (pika: a state mismatch)
        self._transacting = threading.Lock()
        self.journal = logbook.attach(self)
        # a step is held (unacked) while its frames play: take many at once, as a pool of workers does
        workflows.recipe.wrap_subscribe(self._transport, self.queue, self.on_step, acknowledgement=True,
                                        prefetch_count=STEPS_AT_ONCE, log_extender=self.extend_log)
        #: the detector (mask, geometry) and spot finder of a file, for the images workers answer: made once
        self._files: dict[Path, tuple[Images, SpotFinder]] = {}
        if not self.follows_detector:
            workflows.recipe.wrap_subscribe(self._transport, WATCHER_QUEUE, self.on_watch, acknowledgement=True,
                                            prefetch_count=STEPS_AT_ONCE, log_extender=self.extend_log)

    def in_shutdown(self) -> None:
        if hasattr(self, "_stopping"):
            self._stopping.set()
        logbook.detach(self)

    def on_step(self, rw: workflows.recipe.RecipeWrapper, header: Mapping[str, Any], message: Any) -> None:
        if isinstance(message, Mapping) and "hdf5-index" in message:  # one image, from a file watcher
            self.answer(rw, header, message)
            return
        try:
            step = Step.of(rw.recipe_step.get("parameters") or {})
            if step.is_scan_file:
                frames = Frames.for_step(step, rate=self.settings.frame_rate, follow_detector=self.follows_detector)
                count, messages = len(frames.numbers), self._played(frames)
            else:
                wanted = step.frames()
                count, messages = len(wanted), self._analysed(step, wanted)
        except StepError as e:
            self._dead_letter(rw, header, e)
            return
        progress = self.progress[step.dcid] = GridProgress(step.dcid, count)
        self.log.info("per-image analysis of DCID %d: %d frame(s) from %s", step.dcid, count, step.path)
        threading.Thread(target=self._run, args=(rw, header, step, messages, progress), daemon=True,
                         name=f"per-image analysis of DCID {step.dcid}").start()

    def _dead_letter(self, rw: workflows.recipe.RecipeWrapper, header: Mapping[str, Any], error: StepError) -> None:
        self.log.error("%s per-image analysis cannot run: %s; dead-lettering the step", self.kind, error)
        with self._transacting:  # not while a transaction is open on the channel
            rw.transport.nack(header, requeue=False)  # it would fail the same way again

    def _run(self, rw: workflows.recipe.RecipeWrapper, header: Mapping[str, Any], step: Step,
             messages: Iterator[dict[str, Any]], progress: GridProgress) -> None:
        """Send each image's message as it comes; ack the step once all are sent."""
        start = time.monotonic()
        try:
            for payload in messages:
                rw.send(payload)  # type: ignore[no-untyped-call]
                progress.sent += 1
                progress.spots += payload.get("n_spots_total", 0)
                progress.last_seen_at = payload["file-seen-at"]
                progress.last_sent_at = time.time()
            if self._stopping.is_set():
                return  # the step stays unacked: it is run again by the next service
            with self._transacting:  # not while a transaction is open on the channel
                rw.transport.ack(header)
            self.log.info("per-image analysis of DCID %d: done, %d frame(s) in %.2f s", step.dcid,
                          progress.sent, time.monotonic() - start)
        except StepError as e:
            self._dead_letter(rw, header, e)
        except Exception:
            self.log.exception("per-image analysis of DCID %d stopped after %d frame(s)", step.dcid,
                               progress.sent)
        finally:
            progress.done.set()

    # ---- a scan file's counts, played at the frame rate ----

    def _played(self, frames: Frames) -> Iterator[dict[str, Any]]:
        start = time.monotonic()
        for number, spots, due in zip(frames.numbers.tolist(), frames.counts.tolist(), frames.due_s.tolist()):
            wait = start + due - time.monotonic()
            if (wait > 0 and self._stopping.wait(wait)) or self._stopping.is_set():
                return
            yield self.payload(frames.path, number, spots, time.time())

    def payload(self, path: Path, number: int, spots: int, seen_at: float) -> dict[str, Any]:
        return {"file": str(path), "file-number": number, "file-pattern-index": number, "file-seen-at": seen_at,
                "n_spots_total": spots, "n_spots_no_ice": spots, "n_spots_4A": spots // 2,
                "total_intensity": 25.0 * spots, "estimated_d_min": 2.1 if spots else None}

    # ---- the detector's file, through the spot finder ----

    def _analysed(self, step: Step, wanted: range) -> Iterator[dict[str, Any]]:
        """Each frame's message as it is found."""
        from ..pia.follow import FileFollower
        from ..pia.images import ImagesError

        follower = FileFollower(step.path, wanted, finder=self.spot_finder, stopping=self._stopping,
                                timeout_s=self.settings.frame_timeout_s if self.follows_detector else 0.0)
        path = str(step.path)
        try:
            for found in follower:
                assert found.spots is not None
                yield {"file": path, "file-number": found.index - wanted.start + 1, "file-seen-at": found.seen_at,
                       **self.results(step.dcid, step.path, found.spots, follower.geometry, step.parameters)}
        except ImagesError as e:
            raise StepError(f"DCID {step.dcid}: {e}") from None
        if follower.missing:
            self._never_came(step, wanted, follower.missing, follower.timeout_s)

    def _never_came(self, step: Step, wanted: range, missing: list[int], timeout_s: float) -> None:
        numbers = [i - wanted.start + 1 for i in missing]
        waited = f"after {timeout_s:g} s" if timeout_s else "at end"
        self.log.warning("%s per-image analysis of DCID %d: %d frame(s) never came (%s): images %s of %s; "
                         "ending the step", self.kind, step.dcid, len(numbers), waited, named(numbers), step.path)

    def spot_finder(self, images: Images) -> SpotFinder:
        """Diamond's CPU PIA runs DIALS's dispersion with its defaults."""
        return images.spot_finder()

    def results(self, dcid: int, path: Path, spots: Spots, geometry: Geometry | None,
                parameters: Mapping[str, Any]) -> dict[str, Any]:
        """What Diamond's CPU PIA reports of one image's spots."""
        from ..pia.resolution import image_stats

        if geometry is None:
            raise StepError(f"DCID {dcid}: {path} has no detector geometry (beam centre, distance, "
                            "pixel size, wavelength): the resolution of its spots is unknown")
        stats = image_stats(spots.centroid[:, 0], spots.centroid[:, 1], spots.intensity, geometry)
        return {"n_spots_total": stats.n_spots_total, "n_spots_no_ice": stats.n_spots_no_ice,
                "n_spots_4A": stats.n_spots_4A, "total_intensity": stats.total_intensity}

    # ---- as Diamond's CPU path: a file watcher, and workers answering an image each ----

    def on_watch(self, rw: workflows.recipe.RecipeWrapper, header: Mapping[str, Any], message: Any) -> None:
        """A file watcher step, or its checkpoint: the images written since, to the workers."""
        try:
            step = Step.of(rw.recipe_step.get("parameters") or {})
            wanted = step.frames()
            status = WatchStatus.of(message, len(wanted))
        except StepError as e:
            self._dead_letter(rw, header, e)
            return
        progress = self.progress.get(step.dcid)
        if progress is None or status.sent == 0:  # a new step here (or its first message again)
            progress = self.progress[step.dcid] = GridProgress(step.dcid, len(wanted), watched=True)
            if status.sent == 0:
                self.log.info("file watcher of DCID %d: %d frame(s) from %s", step.dcid, len(wanted), step.path)
        progress.sent = status.sent
        threading.Thread(target=self._watch, args=(rw, header, step, wanted, status, progress), daemon=True,
                         name=f"file watcher of DCID {step.dcid}").start()

    def _watch(self, rw: workflows.recipe.RecipeWrapper, header: Mapping[str, Any], step: Step, wanted: range,
               status: WatchStatus, progress: GridProgress) -> None:
        """Wait for a frame not yet sent (or the frame timeout), then in one
        transaction send every frame written by then, ack the message and,
        unless the step is done, checkpoint how far it got: a watcher killed
        at any point has sent each image once, or not yet."""
        from ..pia.follow import FileFollower
        from ..pia.images import ImagesError

        timeout_s = self.settings.frame_timeout_s
        follower = FileFollower(step.path, wanted[status.sent:], finder=None, stopping=self._stopping,
                                timeout_s=max(0.0, timeout_s - (time.time() - status.waiting_since)))
        try:
            try:
                with contextlib.closing(follower.batches()) as batches:
                    written = next(batches, [])
            except ImagesError as e:
                raise StepError(f"DCID {step.dcid}: {e}") from None
            if follower.stopped:
                return  # the message stays unacked: it is run again by the next service
            path, now = str(step.path), time.time()
            images = [{"hdf5": path, "hdf5-index": f.index, "file": path, "file-number": f.index - wanted.start + 1,
                       "file-seen-at": f.seen_at} for f in written]
            sent = status.sent + len(images)
            ended = sent == len(wanted) or not images  # every frame sent, or the rest never came
            with self._transacting:
                txn = rw.transport.transaction_begin(subscription_id=header["subscription"])
                rw.transport.ack(header, transaction=txn)
                for image in images:
                    rw.send(image, transaction=txn)  # type: ignore[no-untyped-call]
                if not ended:
                    rw.checkpoint(WatchStatus(sent, now, status.started_at).message(),  # type: ignore[no-untyped-call]
                                  transaction=txn)
                rw.transport.transaction_commit(txn)
            progress.sent = sent
            if images:
                progress.last_seen_at, progress.last_sent_at = written[-1].seen_at, time.time()
            if follower.missing:
                self._never_came(step, wanted, follower.missing, timeout_s)
            if ended:
                self.log.info("file watcher of DCID %d: done, %d frame(s) handed to the workers in %.2f s", step.dcid,
                              sent, time.time() - status.started_at)
                progress.done.set()
        except StepError as e:
            self._dead_letter(rw, header, e)
            progress.done.set()
        except Exception:
            self.log.exception("file watcher of DCID %d stopped after %d frame(s)", step.dcid, progress.sent)

    def answer(self, rw: workflows.recipe.RecipeWrapper, header: Mapping[str, Any], image: Mapping[str, Any]) -> None:
        """One image from the file watcher: its results and the input's ``file*``
        keys, sent in one transaction with the input's ack."""
        dcid = _whole(rw.recipe_step.get("parameters") or {}, "dcid", "a DCID") or 0
        try:
            try:
                path, index = Path(str(image["hdf5"])), int(image["hdf5-index"])
            except (KeyError, TypeError, ValueError):
                raise StepError(f"DCID {dcid}: an image message without hdf5 and hdf5-index: {image!r:.80}") from None
            payload = self._image_results(dcid, path, index)
        except StepError as e:
            self._dead_letter(rw, header, e)
            return
        if payload is None:
            return  # stopping: the image stays unacked, for the next worker
        payload.update({k: v for k, v in image.items() if k.startswith("file")})
        with self._transacting:
            txn = rw.transport.transaction_begin(subscription_id=header["subscription"])
            rw.transport.ack(header, transaction=txn)
            rw.send(payload, transaction=txn)  # type: ignore[no-untyped-call]
            rw.transport.transaction_commit(txn)
        watched = self.progress.get(dcid)  # the file watcher here: the images answered go on its progress
        if watched is not None:
            watched.spots += payload["n_spots_total"]
            watched.answered += 1

    def _image_results(self, dcid: int, path: Path, index: int) -> dict[str, Any] | None:
        """One frame's results (None if stopping first). The detector may
        still be writing the file (the watcher follows it): a read that fails,
        as one half-way through a write does, is tried again until the frame
        timeout."""
        from ..pia.images import ImagesError, open_images

        deadline = time.monotonic() + self.settings.frame_timeout_s
        while True:
            try:
                known = self._files.get(path)
                with open_images(path, detector=known[0] if known else None) as images:
                    if known is None:
                        known = (images, self.spot_finder(images))
                        _keep_recent(self._files, path, known)
                    if not 0 <= index < len(images):
                        raise StepError(f"DCID {dcid}: {path} has {len(images)} frame(s), no frame {index}")
                    finder = known[1]
                    # as a frame of the file: decoded in the core, in bands of rows on every core
                    (spots,) = finder.find_many(images, frames=range(index, index + 1))
                    return self.results(dcid, path, spots, images.geometry, {})
            except ImagesError as e:
                if time.monotonic() >= deadline:
                    raise StepError(f"DCID {dcid}: {e}") from None
            if self._stopping.wait(REREAD_S):
                return None


class PerImageAnalysisGPU(PerImageAnalysis):
    """GPU per-image analysis, on ``per_image_analysis.gpu``, as FFS: follows the detector."""

    _service_name = "Per-image analysis, GPU (zocalo-xrc)"
    queue = "per_image_analysis.gpu"
    kind = "GPU"
    follows_detector = True

    def payload(self, path: Path, number: int, spots: int, seen_at: float) -> dict[str, Any]:
        return {"file": str(path), "file-number": number, "file-seen-at": seen_at, "n_spots_total": spots,
                "num_strong_pixels": 7 * spots}

    def spot_finder(self, images: Images) -> SpotFinder:
        """FFS: DIALS's dispersion with a minimum of 3 valid pixels in a box, spots of any size."""
        return images.spot_finder(min_local=3, max_spot_size=None)

    def results(self, dcid: int, path: Path, spots: Spots, geometry: Geometry | None,
                parameters: Mapping[str, Any]) -> dict[str, Any]:
        """FFS's: spots (within ``d_min``/``d_max`` when the step gives them) and strong pixels."""
        n = len(spots)
        d_min, d_max = _limit(parameters, "d_min"), _limit(parameters, "d_max")
        if d_min is not None or d_max is not None:
            from ..pia.resolution import image_stats

            if geometry is None:
                raise StepError(f"DCID {dcid}: a resolution limit, but {path} has no detector geometry")
            n = image_stats(spots.centroid[:, 0], spots.centroid[:, 1], spots.intensity, geometry,
                            d_min=d_min, d_max=d_max, filter_ice=False).n_spots_total
        return {"n_spots_total": n, "num_strong_pixels": spots.n_strong_pixels}
