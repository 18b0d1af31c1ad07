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
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from numpy.typing import NDArray

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
        """The frames in batches, in order, as they are found. With no
        finder a batch is every frame written since the last batch (the
        first: every frame there is); the next is not looked for until this
        one is taken, so a caller can act on what is there before waiting."""
        batch = BATCH_PER_THREAD * (self.threads or len(os.sched_getaffinity(0))) if self._finder else len(self.frames)
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
                        chunk = [i for i in frames[done:done + batch] if i < len(images)]
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
                if time.monotonic() - opened_at >= REOPEN_S or _signature(self.path) != before:
                    break

    def _find(self, images: Images, chunk: list[int]) -> list[Optional[Spots]]:
        if self._spot_finder is None:
            return [None] * len(chunk)
        # as Images, so that the core decodes the raw chunks in parallel as it searches them
        return list(self._spot_finder.find_many(_Frames(images, chunk), self.threads))


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


class _Frames(Images):
    """Some frames of open images, as ``Images`` (what ``find_many`` decodes
    in the core). Images has no window of its own yet: this one takes only
    what ``find_many`` reads (length, shape, dtype, frames, raw chunks, errors)."""

    def __init__(self, images: Images, frames: list[int]) -> None:  # noqa: super().__init__ would open nothing
        self.path, self.shape, self.dtype = images.path, images.shape, images.dtype
        self._mask = lambda: images.mask  # read only if asked for (the finder has it)
        self.trusted_max, self.geometry = images.trusted_max, images.geometry
        self._images, self._frames = images, frames

    def __len__(self) -> int:
        return len(self._frames)

    def __getitem__(self, index: int) -> NDArray[Any]:
        return self._images[self._frames[index]]

    def bslz4_chunk(self, index: int) -> Optional[bytes]:
        return self._images.bslz4_chunk(self._frames[index])

    def corrupt(self, index: int, reason: str) -> ImagesError:
        return self._images.corrupt(self._frames[index], reason)
