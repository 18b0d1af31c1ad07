"""Per-image analysis from pixels: a detector writing -> PIA messages -> the result, on RabbitMQ.

A simulated Eiger2 X 4M writes the 3D 20x10+20x10 scan of
``examples/model3d.json`` (400 frames, both grids in one file) into a local
Zocalo on RabbitMQ (services in threads of this process, GPU per-image
analysis only: it follows the file as it is written, as FFS does). The
frames are drawn and compressed (bitshuffle-LZ4) once, beforehand: an Eiger
compresses in its own hardware, and compressing a 4M frame here takes longer
than a frame lasts at 200 frames/s. Writing is then what Odin does: a chunk
written and flushed per frame.

* **paced, 200 frames/s**: each round the scan is started, 399 frames are
  written at the frame rate (and analysed as they come), then, timed: the
  last frame is written and the caller waits for the result
  (``ZocaloResults.trigger``). Where the time goes, per round: last frame
  written -> seen in the file, -> its message sent (decode, find, publish),
  -> the result in the caller (centring, publish, delivery); and whether the
  service kept up (the last message <= 15 ms after the last frame).
* **as fast as the file takes them**: the frames written back to back; how
  many frames a second GPU per-image analysis turns into messages, both
  cores (decoding and finding in the core's threads).
* **peer**: the same service with the spot finder replaced by the
  numpy/scipy reference of the tests (DIALS's rule, summed boxes and
  ``ndimage.label``), on the first frames only: it does not keep up; by how
  much is printed.

Under ``--benchmark-disable`` (as CI runs it) the frames are 160 x 192
pixels and each bench runs once, to check the result is the one the
services' own counts give.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import zocalo_xrc as zx
from dispersion_reference import find_spots, strong_pixels
from local_zocalo import running
from zocalo_xrc.client import Source
from zocalo_xrc.local import LocalZocalo, Scan, Settings
from zocalo_xrc.local.detector import SimulatedDetector

SUITE = "per-image analysis from pixels"
MODEL = Path(__file__).resolve().parent.parent / "examples" / "model3d.json"
RATE = 200.0  # frames/s, the 4M detector
ROUNDS = 15
PEER_FRAMES = 6


def enabled(request) -> bool:
    config = request.config  # as pytest-benchmark decides it: --benchmark-enable overrides addopts' disable
    return not (config.getoption("benchmark_disable") and not config.getoption("benchmark_enable"))


@pytest.fixture(scope="module")
def size(request):
    return "4M" if enabled(request) else (160, 192)


@pytest.fixture(scope="module")
def local(request):
    with running(request, "rabbitmq", Settings(pia=frozenset({"gpu"}), frame_rate=RATE)) as z:
        yield z


@pytest.fixture(scope="module")
def scan():
    return Scan.from_dict({**json.loads(MODEL.read_text()), "beamline": "pixels"})


@pytest.fixture(scope="module")
def chunks(local, scan, size):
    """Every frame of the scan, compressed once (the same frames each round: the scan's seed)."""
    _, detector = local.add_detector_scan(scan, name="encoding", size=size)
    try:
        return detector.encode()
    finally:
        detector.writer.close()
        remove(detector)


def remove(detector: SimulatedDetector) -> None:
    for path in detector.master.parent.glob(detector.master.name.removesuffix("_master.h5") + "_*"):
        path.unlink(missing_ok=True)


def gpu_service(local: LocalZocalo) -> Any:
    (service,) = [s for s in local.per_image_analysis() if s.follows_detector]
    return service


@dataclass
class Round:
    registered: Any
    detector: SimulatedDetector
    results: Any = None
    written_at: float = 0.0  # time.time() as the last frame's write began
    arrived_at: float = 0.0
    writes: dict[int, float] = field(default_factory=dict)  # frame index -> time.time() as its write began


class Rounds:
    """Per round: a scan registered and started, its frames but the last written at the rate."""

    def __init__(self, local: LocalZocalo, scan: Scan, size: Any, chunks: list[bytes], frames: int | None = None):
        self.local, self.scan, self.size, self.chunks = local, scan, size, chunks
        self.frames = len(chunks) if frames is None else frames
        self.trigger = zx.ZocaloTrigger(local.transport(), timeout_s=10)
        self.results = zx.ZocaloResults(local.transport(), beamline=scan.beamline, source=Source.GPU, timeout_s=120)
        self.results.subscribe()
        self.done: list[Round] = []
        self.n = 0

    def close(self) -> None:
        self.results.close()
        for r in self.done[-1:]:
            remove(r.detector)

    def start(self) -> Round:
        for r in self.done[-1:]:
            remove(r.detector)  # the files of the round before
        self.n += 1
        registered, detector = self.local.add_detector_scan(self.scan, name=f"round{self.n}", size=self.size)
        self.trigger.run_start(*self.scan.start_infos(registered.dcids, detector.master.name))
        return Round(registered, detector)

    def write(self, r: Round, frames: range, rate: float | None) -> None:
        start = time.monotonic()
        for k, i in enumerate(frames):
            if rate is not None:
                wait = start + k / rate - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
            r.writes[i] = time.time()
            r.detector.writer.write_chunk(self.chunks[i])

    def sent(self, r: Round) -> int:
        service = gpu_service(self.local)
        return sum(service.progress[d].sent for d in r.registered.dcids if d in service.progress)

    def paced(self):
        """Setup of a paced round: all frames but the last written, and analysed."""
        r = self.start()
        self.write(r, range(self.frames - 1), RATE)
        deadline = time.monotonic() + 60
        while self.sent(r) < self.frames - 1:
            assert time.monotonic() < deadline, f"{self.sent(r)} of {self.frames - 1} frames analysed in 60 s"
            time.sleep(0.001)
        return (r,), {}

    def last_frame(self, r: Round) -> Round:
        """The paced round's timed part: the last frame written, the result waited for."""
        return self.finish(r, range(self.frames - 1, self.frames))

    def finish(self, r: Round, frames: range) -> Round:
        """Write ``frames`` back to back, close the files and wait for the round's result."""
        r.written_at = time.time()
        self.write(r, frames, None)
        r.detector.writer.close()
        r.results = self.results.trigger(dcids=r.registered.dcids, dcgid=r.registered.dcgid)
        r.arrived_at = time.time()
        self.done.append(r)
        return r


def messages(local: LocalZocalo, r: Round) -> dict[int, list[dict[str, Any]]]:
    """What GPU per-image analysis sent for each grid of the round, with the time it was sent."""
    out: dict[int, list[dict[str, Any]]] = {d: [] for d in r.registered.dcids}
    for e in local.logbook.entries():
        if e["dir"] == "out" and e["queue"] == "reduce.xray_centering.gpu" and int(e.get("dcid") or 0) in out:
            out[int(e["dcid"])].append({**e["payload"], "sent_at": e["t"]})
    return out


def check(local: LocalZocalo, scan: Scan, r: Round, frames: int) -> dict[int, list[dict[str, Any]]]:
    """The result is the centring of the counts the service sent, one message per frame."""
    sent = messages(local, r)
    counts = []
    for k, dcid in enumerate(r.registered.dcids):
        by_number = {m["file-number"]: m["n_spots_total"] for m in sent[dcid]}
        assert sorted(by_number) == list(range(1, scan.grids[k].image_count + 1)), f"grid {k + 1}: frames missing"
        counts.append(np.array([by_number[n] for n in sorted(by_number)]))
    scans = [zx.GridScan(k + 1, counts[k], g) for k, g in enumerate(scan.grids)]
    assert r.results.to_dicts() == zx.centre_3d_scans(*scans, sample_id=scan.sample_id).to_dicts()
    assert r.results.to_dicts(), "the model's crystals were not found"
    return sent


def lags(local: LocalZocalo, scan: Scan, r: Round) -> list[float]:
    """For each frame of the round written at the rate (by index), its message sent minus its write's start."""
    sent = messages(local, r)
    firsts = np.cumsum([0] + [g.image_count for g in scan.grids])
    by_index = {int(firsts[k]) + m["file-number"] - 1: m["sent_at"] for k, dcid in enumerate(r.registered.dcids)
                for m in sent[dcid]}
    return [by_index[i] - r.writes[i] for i in sorted(r.writes) if i < firsts[-1] - 1]


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


def test_paced_last_frame_to_result(record, local, scan, size, chunks, note, request):
    """200 frames/s: the last frame written -> the result in the caller."""
    rounds = Rounds(local, scan, size, chunks)
    try:
        workload = f"3D 20x10+20x10, {size if isinstance(size, str) else 'small'} frames at {RATE:.0f}/s: " \
                   "last frame written -> result"
        last = record(SUITE, workload, "zocalo-xrc", rounds.last_frame,
                      rounds=ROUNDS if enabled(request) else 1, setup=rounds.paced)
        check(local, scan, last, rounds.frames)
        if enabled(request):
            seen, sent, lag, result = [], [], [], []
            for r in rounds.done:
                final = max((m for ms_ in messages(local, r).values() for m in ms_), key=lambda m: m["sent_at"])
                seen.append(final["file-seen-at"] - r.written_at)
                sent.append(final["sent_at"] - final["file-seen-at"])
                lag.append(final["sent_at"] - r.written_at)
                result.append(r.arrived_at - final["sent_at"])
            p50 = statistics.median
            during = [lags(local, scan, r) for r in rounds.done]
            note(f"{SUITE}, {RATE:.0f} frames/s of {size}, keeping up: each of the {len(during[0])} frames before "
                 f"the last, its message sent after its write began, p50 {ms(p50(p50(d) for d in during))}, "
                 f"the rounds' worst {ms(p50(max(d) for d in during))} (median of rounds), "
                 f"{ms(max(max(d) for d in during))} at most; p50 of the first 50 frames "
                 f"{ms(p50(p50(d[:50]) for d in during))}, of the last 50 {ms(p50(p50(d[-50:]) for d in during))}")
            note(f"{SUITE}, {RATE:.0f} frames/s of {size}, median of {len(rounds.done)} rounds: last frame written "
                 f"-> seen in the file {ms(p50(seen))} -> its message sent {ms(p50(sent))} (decode, find, publish) "
                 f"-> result in the caller {ms(p50(result))} (centre, publish, deliver); last message "
                 f"{ms(p50(lag))} after the last frame (goal <= 15 ms), worst {ms(max(lag))}")
    finally:
        rounds.close()


def throughput(local: LocalZocalo, rounds: Rounds) -> float:
    r = rounds.finish(rounds.start(), range(rounds.frames))
    sent = [m["sent_at"] for ms_ in messages(local, r).values() for m in ms_]
    return rounds.frames / (max(sent) - r.written_at)


def test_frames_per_second(local, scan, size, chunks, note, request):
    """Written back to back: frames a second turned into messages (ours), and the peer's on a few frames."""
    rounds = Rounds(local, scan, size, chunks)
    try:
        ours = [throughput(local, rounds) for _ in range(3 if enabled(request) else 1)]
        check(local, scan, rounds.done[-1], rounds.frames)
    finally:
        rounds.close()
    service = gpu_service(local)
    service.spot_finder = reference_finder  # the peer: the reference in the same service, for a few frames
    try:
        peer_rounds = Rounds(local, scan, size, chunks, frames=PEER_FRAMES)
        try:
            r = peer_rounds.start()
            peer_rounds.write(r, range(PEER_FRAMES), None)
            deadline = time.monotonic() + 300
            while peer_rounds.sent(r) < PEER_FRAMES:
                assert time.monotonic() < deadline, "the reference did not analyse its frames in 300 s"
                time.sleep(0.01)
            sent = [m["sent_at"] for ms_ in messages(local, r).values() for m in ms_]
            peer = PEER_FRAMES / (max(sent) - min(m["file-seen-at"] for ms_ in messages(local, r).values()
                                                    for m in ms_))
            r.detector.writer.close()
            peer_rounds.done.append(r)
        finally:
            peer_rounds.close()
    finally:
        del service.spot_finder
    note(f"{SUITE}, {size} frames written back to back: GPU per-image analysis {max(ours):.0f} frames/s "
         f"(goal >= 200; runs {', '.join(f'{x:.0f}' for x in ours)}); with the numpy/scipy reference as its "
         f"finder {peer:.1f} frames/s, {max(ours) / peer:.0f}x fewer ({RATE / peer:.0f}x short of {RATE:.0f}/s)")


class ReferenceFinder:
    """The tests' numpy/scipy reference, with the GPU service's (FFS's) parameters, as a spot finder."""

    def __init__(self, images: Any) -> None:
        self.mask, self.trusted_max = images.mask, images.trusted_max

    def find_many(self, images: Any, threads: int = 0, *, frames: range | None = None) -> Any:
        for k in range(len(images)) if frames is None else frames:
            image = np.asarray(images[k])
            strong = strong_pixels(image, self.mask, trusted_max=self.trusted_max, min_local=3)
            yield ReferenceSpots(find_spots(image, strong, max_spot_size=None), int(strong.sum()))


@dataclass
class ReferenceSpots:
    spots: Any
    n_strong_pixels: int

    def __len__(self) -> int:
        return len(self.spots)

    @property
    def centroid(self) -> Any:
        return self.spots.centroid

    @property
    def intensity(self) -> Any:
        return self.spots.intensity


def reference_finder(images: Any) -> ReferenceFinder:
    return ReferenceFinder(images)
