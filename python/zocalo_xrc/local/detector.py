"""A simulated detector for local scans: a scan's model as Eiger2 X frames.

``SimulatedDetector(scan, directory, name)`` is armed at creation: its
master file ``<name>_master.h5`` is there, as the Eiger's is once armed.
``write()`` then writes the scan's frames (the grids one after the other in
one file, as the beamline's start messages say) at the frame rate, each
flushed as it is written, as :class:`~zocalo_xrc.pia.simulate.EigerWriter`
does. Frame ``i`` carries as many spots (small Gaussians at random places)
as the scan's counts say for that image (a model's crystals in mm, or a
recording); the background is Poisson, falling off from the beam centre.
All of it is drawn from the scan's seed. A scan's ``lost_frames``: the
detector stops that many frames before the end of the file.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from collections.abc import Sequence
from typing import Any, Union

import numpy as np
from numpy.typing import NDArray

from .scan import Scan

#: what ``--detector`` takes: an Eiger2 X by size
SIZES = {"eiger2x-1m": "1M", "eiger2x-4m": "4M", "eiger2x-9m": "9M", "eiger2x-16m": "16M"}
#: mean background counts per pixel: flat, and extra at the beam centre
BACKGROUND = 0.05
RADIAL_BACKGROUND = 0.5
#: defects of the simulated sensor (masked hot and dead pixels)
HOT_PIXELS = 5
DEAD_PIXELS = 5
#: background frames drawn once and reused (a frame's Poisson noise over millions of pixels is the slow part)
BACKGROUNDS = 4


def detector_size(name: str) -> str:
    """The Eiger2 X size ("1M", "4M", ...) a ``--detector`` name means; else ValueError."""
    try:
        return SIZES[name.lower()]
    except KeyError:
        raise ValueError(f"detector {name!r}: expected one of {', '.join(SIZES)}") from None


class SimulatedDetector:
    """The frames of ``scan`` as an Eiger2 X (``size`` "1M" .. "16M", or
    ``(height, width)`` pixels for a small test detector) writes them in
    ``directory``, at ``frame_rate`` frames per second."""

    def __init__(self, scan: Scan, directory: Union[str, Path], name: str, *,
                 size: Union[str, tuple[int, int]] = "1M", frame_rate: float = 500.0) -> None:
        from ..pia.simulate import EigerWriter, Simulator

        if not frame_rate > 0:
            raise ValueError(f"frame rate: expected frames per second > 0, got {frame_rate!r}")
        self.scan, self.frame_rate = scan, frame_rate
        self.simulator = Simulator(size, seed=scan.seed, background=BACKGROUND, radial_background=RADIAL_BACKGROUND,
                                   n_hot=HOT_PIXELS, n_dead=DEAD_PIXELS)
        #: spots on each frame of the file, in the order written
        self.spots: NDArray[np.int64] = np.concatenate([scan.counts(k) for k in range(len(scan.grids))])
        self.frames = len(self.spots) - scan.lost_frames
        self.writer = EigerWriter(directory, name, self.simulator.shape, self.simulator.dtype,
                                  geometry=self.simulator.geometry, pixel_mask=self.simulator.pixel_mask,
                                  saturation_value=self.simulator.saturation_value,
                                  frames_per_file=max(1, self.frames))
        self.master = self.writer.master_path
        self._backgrounds: dict[int, NDArray[Any]] = {}
        self._good = self.simulator.pixel_mask == 0
        #: when the last frame was written (time.time()), once it is
        self.last_written_at: float | None = None

    def frame(self, index: int) -> NDArray[Any]:
        """Frame ``index`` of the file: the spots the scan says (Poisson
        counts of small Gaussians) on one of a few background frames."""
        sim = self.simulator
        k = index % BACKGROUNDS
        if k not in self._backgrounds:
            self._backgrounds[k] = sim.frame((), index=2**32 + k)  # indices no frame of the file has
        frame = self._backgrounds[k].copy()
        rng = np.random.default_rng([sim.seed, index, 2])
        height, width = sim.shape
        for spot in sim.random_spots(int(self.spots[index]), index):
            reach = int(np.ceil(4 * spot.sigma))
            x0, x1 = max(int(spot.x) - reach, 0), min(int(spot.x) + reach + 1, width)
            y0, y1 = max(int(spot.y) - reach, 0), min(int(spot.y) + reach + 1, height)
            ys, xs = np.mgrid[y0:y1, x0:x1] + 0.5
            mean = spot.intensity / (2 * np.pi * spot.sigma**2) * np.exp(
                -((xs - spot.x) ** 2 + (ys - spot.y) ** 2) / (2 * spot.sigma**2))
            good = self._good[y0:y1, x0:x1]
            patch = frame[y0:y1, x0:x1]
            patch[good] = np.minimum(patch[good] + rng.poisson(mean[good]), sim.saturation_value)
        return frame

    def encode(self) -> list[bytes]:
        """Every frame's compressed chunk, drawn and compressed now, for
        ``write(chunks)``: an Eiger compresses in its own hardware, and here
        compressing a 4M frame takes longer than a frame at 200 frames/s."""
        return self.writer.encode(self.frame(i) for i in range(self.frames))

    def write(self, stopping: threading.Event | None = None, chunks: Sequence[bytes] | None = None) -> int:
        """Write every frame at the frame rate (frame ``i`` not before
        ``i / frame_rate`` from now), then close the files; the frames
        written. ``chunks``: the frames as ``encode`` gave them, written as
        they are (else each is drawn and compressed as it is written)."""
        if chunks is not None and len(chunks) != self.frames:
            raise ValueError(f"{len(chunks)} chunks for {self.frames} frames")
        start = time.monotonic()
        written = 0
        try:
            for i in range(self.frames):
                frame = self.frame(i) if chunks is None else chunks[i]
                wait = start + i / self.frame_rate - time.monotonic()
                if stopping is not None and stopping.wait(max(wait, 0.0)):
                    break
                if stopping is None and wait > 0:
                    time.sleep(wait)
                if isinstance(frame, bytes):
                    self.writer.write_chunk(frame)
                else:
                    self.writer.write(frame)
                written += 1
            self.last_written_at = time.time()
        finally:
            self.writer.close()
        return written

    def start(self) -> threading.Thread:
        """Write in a thread of its own (started); join it to wait."""
        thread = threading.Thread(target=self.write, name=f"detector {self.master.name}", daemon=True)
        thread.start()
        return thread
