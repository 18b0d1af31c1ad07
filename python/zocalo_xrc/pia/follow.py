"""Spot finding on a detector's file as it is written, as FFS reads the Eiger's.

``FileFollower(path, frames)`` opens an Eiger/Odin master file (or any file
:func:`~zocalo_xrc.pia.images.open_images` reads), waits for the frames it
is asked for to be written (the file is opened again each time it has read
what is there: a file written without SWMR is read as the writer last left
it), runs the spot finder over them in parallel and yields each frame's
spots with when it was first seen. Frames that do not come within
``timeout_s`` of the last one that did (FFS: 30 s) are given up: ``missing``
names them. A file that stays unreadable (missing, not HDF5, truncated,
frames of another shape) that long raises :class:`ImagesError` naming it;
``timeout_s=0`` takes the file as it is (the data is all written).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from .finder import BATCH_PER_THREAD, SpotFinder, Spots
from .images import Images, ImagesError, open_images
from .resolution import Geometry

#: FFS's default wait for a frame (``SPOTFINDER_TIMEOUT``), seconds.
TIMEOUT_S = 30.0
#: How often the files' sizes and times are looked at while frames are awaited, seconds.
POLL_S = 0.002
#: The file is opened again after this long even when nothing seems to have changed, seconds.
REOPEN_S = 0.25


@dataclass(frozen=True, slots=True)
class Found:
    """One frame's spots: its index in the file (0-based) and when it was seen (epoch s)."""

    index: int
    spots: Optional[Spots]  # None when only watching for frames
    seen_at: float


class FileFollower:
    """The spots of ``frames`` (indices into the file) of the images at
    ``path``, frame by frame as they are written. ``finder``: the spot finder
    for the detector's images (from its mask and trusted maximum), None to
    only watch for the frames (each then comes with no spots);
    ``stopping``: set to give up between batches (``stopped`` is then True)."""

    def __init__(
        self,
        path: Path,
        frames: range,
        *,
        finder: Optional[Callable[[Images], SpotFinder]],
        timeout_s: float = TIMEOUT_S,
        poll_s: float = POLL_S,
        threads: int = 0,
        stopping: Optional[threading.Event] = None,
    ) -> None:
        if frames.step != 1:
            raise ValueError(f"frames {frames}: consecutive frames are followed")
        if not timeout_s >= 0:
            raise ValueError(f"timeout_s must be >= 0 seconds, not {timeout_s!r}")
        self.path = path
        self.frames = frames
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.threads = threads
        self._finder = finder
        self._stopping = stopping if stopping is not None else threading.Event()
        #: the frames (indices into the file) that never came; set when iteration ends
        self.missing: list[int] = []
        self.stopped = False
        #: the detector's geometry (None when its file has none); set once the file is open
        self.geometry: Optional[Geometry] = None
        self._spot_finder: Optional[SpotFinder] = None
        self._detector: Optional[Images] = None

    def __iter__(self) -> Iterator[Found]:
        for found in self.batches():
            yield from found

    def batches(self) -> Generator[list[Found], None, None]:
        """The frames in batches, in order, as they are found. With a finder
        the next batch is searched (in a thread of its own, the search in the
        core's threads) while the caller handles this one: a caller that
        sends each frame's message leaves no core idle meanwhile. With no
        finder a batch is every frame written since the last batch (the
        first: every frame there is); the next is not looked for until this
        one is taken, so a caller can act on what is there before waiting."""
        if self._finder is None:
            yield from self._batches(threading.Event())
            return
        ahead: queue.Queue[Union[list[Found], BaseException, None]] = queue.Queue(maxsize=1)
        abandoned = threading.Event()

        def search() -> None:
            def hand(item: Union[list[Found], BaseException, None]) -> bool:
                while not abandoned.is_set():
                    try:
                        ahead.put(item, timeout=0.05)
                        return True
                    except queue.Full:
                        pass
                return False

            try:
                for found in self._batches(abandoned):
                    if not hand(found):
                        return
                hand(None)
            except BaseException as e:  # handed to the caller, raised there
                hand(e)

        searcher = threading.Thread(target=search, name=f"spot finding in {self.path.name}", daemon=True)
        searcher.start()
        try:
            while True:
                item = ahead.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            abandoned.set()
            searcher.join()

    def _batches(self, gone: threading.Event) -> Generator[list[Found], None, None]:
        """The batches, until every frame is found, the timeout, ``stopping`` or ``gone`` (the caller left)."""
        threads = self.threads or len(os.sched_getaffinity(0))
        batch = BATCH_PER_THREAD * threads if self._finder else len(self.frames)
        frames, done = self.frames, 0  # frames[:done] are found
        last_progress = time.monotonic()
        while done < len(frames):
            if self._stopping.is_set():
                self.stopped = True
                return
            error: Optional[ImagesError] = None
            before, opened_at = _signature(self.path), time.monotonic()  # a write after this is seen
            try:
                with open_images(self.path, detector=self._detector) as images:
                    self._detector = images  # its mask, trusted maximum and geometry: read once
                    seen_at = time.time()
                    if self._spot_finder is None and self._finder is not None:
                        self._spot_finder = self._finder(images)
                    self.geometry = images.geometry
                    while done < len(frames) and frames[done] < len(images) and not self._stopping.is_set():
                        if gone.is_set():
                            return
                        chunk = [i for i in frames[done:done + batch] if i < len(images)]
                        if self._finder and threads < len(chunk) < len(frames) - done:
                            # a whole number of frames for each thread (the rest, with the
                            # frames written meanwhile, next): no thread waits at the end
                            chunk = chunk[:len(chunk) - len(chunk) % threads]
                        found = [Found(index, spots, seen_at) for index, spots in zip(chunk, self._find(images, chunk))]
                        yield found
                        done += len(chunk)
                        last_progress = time.monotonic()
            except ImagesError as e:
                error = e  # maybe the writer is half-way through a frame: look again
            if done == len(frames) or self._stopping.is_set():
                continue
            while True:  # opening the files again costs: only once something changed, or now and then
                if time.monotonic() - last_progress >= self.timeout_s:
                    if error is not None:
                        raise error
                    self.missing = list(frames[done:])
                    return
                if self._stopping.wait(self.poll_s):
                    break
                if gone.is_set():
                    return
                if time.monotonic() - opened_at >= REOPEN_S or _signature(self.path) != before:
                    break

    def _find(self, images: Images, chunk: list[int]) -> list[Optional[Spots]]:
        if self._spot_finder is None:
            return [None] * len(chunk)
        # frames of the Images, so that the core reads and decodes their chunks as it searches them
        return list(self._spot_finder.find_many(images, self.threads, frames=range(chunk[0], chunk[-1] + 1)))


def _signature(path: Path) -> tuple[tuple[str, int, int], ...]:
    """Names, sizes and modification times of the file and the files beside
    it named like it (an Eiger's ``<name>_master.h5`` and ``<name>_data_N.h5``):
    what changes as a detector writes."""
    stem = path.stem.removesuffix("_master")
    found = []
    try:
        with os.scandir(path.parent) as entries:
            for entry in entries:
                if entry.name.startswith(stem):
                    stat = entry.stat()
                    found.append((entry.name, stat.st_size, stat.st_mtime_ns))
    except OSError:
        pass  # a file that comes and goes: open_images says what is wrong
    return tuple(sorted(found))
