"""Per-image analysis (PIA) messages for the X-ray centring service benches,
exactly as a real ``workflows`` RecipeWrapper sends them.

The recipe is the one of ``xrc-service.md`` §6 (PIA -> XRC -> results):
step 1 is GPU PIA, step 2 the X-ray centring service, step 3 the results
queue ``xrc.<beamline>`` on the topic exchange ``results``, step 4 the abort
queue. Each grid of a 3D scan is a recipe instance of its own (its own
environment ``ID``), and ``dcg_dcids`` names the other grid; a 2D scan has
``dcg_dcids: []`` and ``experiment_type: "Mesh"``.

The bodies and headers are not built by hand: a ``RecipeWrapper`` at step 1
sends each payload to its output through a transport that records what
``workflows`` hands it (a ``PikaTransport`` whose ``_send`` records instead
of publishing, so the JSON is ``PikaTransport``'s own). The benches then
publish those bodies and headers themselves.

Counts come from synthetic crystals (Gaussian blobs over a faint background),
so the centring has something to find: two crystals in 3D, one in 2D.
"""

from __future__ import annotations

import itertools
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import workflows.recipe
from workflows.transport.pika_transport import PikaTransport

#: The grids of §6: 60 x 30 boxes of 20 µm, snaked, horizontal.
GRIDINFO_3D = {"steps_x": 60.0, "steps_y": 30.0, "dx_mm": 0.02, "dy_mm": 0.02,
               "micronsPerPixelX": 1.25, "micronsPerPixelY": 1.25,
               "snapshot_offsetXPixel": 350.0, "snapshot_offsetYPixel": 200.0,
               "snaked": 1, "orientation": "horizontal"}
GRIDINFO_2D = {**GRIDINFO_3D, "steps_x": 20.0, "steps_y": 10.0}

#: The two crystals of the 3D scan, in grid boxes (x, y, z), widths (x, y, z)
#: and peak spot count; the first is the bigger and brighter one.
CRYSTALS_3D = [((21.0, 12.0, 9.0), (3.0, 2.5, 2.5), 120.0), ((44.0, 21.0, 20.0), (2.0, 1.5, 1.5), 70.0)]
#: The crystal of the 2D scan: (x, y), widths, peak.
CRYSTAL_2D = ((12.0, 4.0), (2.0, 1.5), 90.0)

SAMPLE_ID = 5000000
BASE_DCID = 16085800


class RecordingTransport(PikaTransport):
    """A ``PikaTransport`` that records each message ``workflows`` sends
    (already serialised by ``PikaTransport``) instead of publishing it."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[Message] = []

    def _send(self, destination, message, headers=None, delay=None, expiration=None, transaction=None,
              exchange=None, **kwargs):
        assert delay is None and expiration is None and transaction is None
        self.sent.append(Message(exchange or "", str(destination), message.encode(), dict(headers or {})))


@dataclass(frozen=True)
class Message:
    """One message as workflows would publish it: exchange, routing key, body, headers."""

    exchange: str
    routing_key: str
    body: bytes
    headers: dict[str, Any]


@dataclass
class Scan:
    """One scan's PIA messages (in the order the images were taken) and what
    the centring must find in them."""

    kind: str  # "3d" or "2d"
    dcids: tuple[int, ...]  # ascending: xy first for 3D
    dcgid: int
    messages: list[Message]
    counts: list[list[int]]  # per grid, in acquisition order
    gridinfo: dict[str, Any]
    crystals: list[tuple[float, ...]] = field(default_factory=list)  # expected centres of mass, in boxes

    @property
    def last(self) -> Message:
        return self.messages[-1]


def recipe(dcid: int, others: list[int], dcgid: int, *, queue: str, beamline: str, gridinfo: dict[str, Any],
           message_index: int = 0, abort_queue: str = "xrc.abort") -> dict[str, Any]:
    """The recipe of §6 for one grid: ``queue`` is where the centring
    service listens, results go to ``xrc.<beamline>`` on ``results``."""
    n = int(gridinfo["steps_x"] * gridinfo["steps_y"])
    return {
        "1": {"service": "GPU Gridscan", "queue": "per_image_analysis.gpu",
              "parameters": {"filename": "ins_10_31", "start_frame_index": str(message_index * n),
                             "number_of_frames": str(n), "dcid": str(dcid), "message_index": str(message_index),
                             "dcgid": str(dcgid)},
              "output": [2]},
        "2": {"service": "DLS X-Ray Centering", "queue": queue, "gridinfo": dict(gridinfo),
              "parameters": {"dcid": str(dcid), "dcg_dcids": list(others),
                             "experiment_type": "Mesh3D" if others else "Mesh",
                             "beamline": beamline, "sample_id": SAMPLE_ID},
              "output": {"success": 3, "abort": 4}},
        "3": {"service": "Send XRC results to GDA", "queue": f"xrc.{beamline}", "exchange": "results",
              "parameters": {"dcid": str(dcid), "dcgid": str(dcgid), "gpu": True}},
        "4": {"service": "XRC abort", "queue": abort_queue},
        "start": [[1, []]],
    }


def acquisition_order(grid: np.ndarray, gridinfo: dict[str, Any]) -> list[int]:
    """``A[x][y]`` -> counts in the order the images were taken
    (xrc-algorithm.md §1; horizontal or vertical, snaked or not)."""
    nx, ny = grid.shape
    out = []
    if gridinfo["orientation"] == "horizontal":
        for y in range(ny):
            xs = range(nx - 1, -1, -1) if gridinfo["snaked"] and y % 2 else range(nx)
            out += [int(grid[x, y]) for x in xs]
    else:
        for x in range(nx):
            ys = range(ny - 1, -1, -1) if gridinfo["snaked"] and x % 2 else range(ny)
            out += [int(grid[x, y]) for y in ys]
    return out


def _blob(shape: tuple[int, ...], centre, width, peak) -> np.ndarray:
    idx = np.indices(shape, dtype=float)
    return peak * np.exp(-0.5 * sum(((i - c) / w) ** 2 for i, c, w in zip(idx, centre, width)))


def crystal_3d(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Spot counts of the two grids (``xy[x,y]``, ``xz[x,z]``) seen through CRYSTALS_3D."""
    rng = np.random.default_rng(seed)
    nx, ny = int(GRIDINFO_3D["steps_x"]), int(GRIDINFO_3D["steps_y"])
    xy = sum(_blob((nx, ny), (c[0], c[1]), (w[0], w[1]), p) for c, w, p in CRYSTALS_3D)
    xz = sum(_blob((nx, ny), (c[0], c[2]), (w[0], w[2]), p) for c, w, p in CRYSTALS_3D)
    xy = np.round(xy + rng.poisson(0.3, xy.shape)).astype(np.int64)
    xz = np.round(xz + rng.poisson(0.3, xz.shape)).astype(np.int64)
    return xy, xz


def crystal_2d(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (int(GRIDINFO_2D["steps_x"]), int(GRIDINFO_2D["steps_y"]))
    (c, w, p) = CRYSTAL_2D
    return np.round(_blob(shape, c, w, p) + rng.poisson(0.3, shape)).astype(np.int64)


def _grid_messages(rw_transport: RecordingTransport, dcid: int, others: list[int], dcgid: int, counts: list[int],
                   *, queue: str, beamline: str, gridinfo: dict[str, Any], message_index: int,
                   abort_queue: str) -> list[Message]:
    """Every image of one grid, sent by a RecipeWrapper at step 1 (GPU PIA)
    of the grid's own recipe instance."""
    message = {"recipe": recipe(dcid, others, dcgid, queue=queue, beamline=beamline, gridinfo=gridinfo,
                                message_index=message_index, abort_queue=abort_queue),
               "recipe-pointer": 1, "recipe-path": [], "environment": {"ID": str(uuid.uuid4())}, "payload": {}}
    rw = workflows.recipe.RecipeWrapper(message=message, transport=rw_transport)
    start = len(rw_transport.sent)
    path = f"/dls/{beamline}/data/2025/cm40607-1/xraycentring/ins_10_31_{message_index + 1}.nxs"
    for number in _pia_order(len(counts), seed=dcid):
        spots = counts[number - 1]
        rw.send({"file": path, "file-number": number, "file-seen-at": time.time(), "n_spots_total": spots,
                 "num_strong_pixels": spots * 7 + number % 5})
    return rw_transport.sent[start:]


def _pia_order(n: int, seed: int, window: int = 8) -> list[int]:
    """Image numbers in the order GPU PIA's worker pool finishes them: out of
    order within a few images (shuffled in windows of ``window``)."""
    rng = np.random.default_rng(seed)
    numbers = list(range(1, n + 1))
    for k in range(0, n, window):
        numbers[k:k + window] = rng.permutation(numbers[k:k + window]).tolist()
    return numbers


def scan_3d(offset: int, *, queue: str, beamline: str, abort_queue: str = "xrc.abort") -> Scan:
    """A 3D scan of two 60 x 30 grids (DCIDs 16085800 + offset and + 3),
    both grids' messages in the order PIA sends them (xy first, then xz)."""
    xy_dcid, xz_dcid = BASE_DCID + offset, BASE_DCID + offset + 3
    dcgid = (BASE_DCID + offset) // 10
    xy, xz = crystal_3d()
    counts = [acquisition_order(xy, GRIDINFO_3D), acquisition_order(xz, GRIDINFO_3D)]
    t = RecordingTransport()
    messages = _grid_messages(t, xy_dcid, [xz_dcid], dcgid, counts[0], queue=queue, beamline=beamline,
                              gridinfo=GRIDINFO_3D, message_index=0, abort_queue=abort_queue)
    messages += _grid_messages(t, xz_dcid, [xy_dcid], dcgid, counts[1], queue=queue, beamline=beamline,
                               gridinfo=GRIDINFO_3D, message_index=1, abort_queue=abort_queue)
    return Scan("3d", (xy_dcid, xz_dcid), dcgid, messages, counts, GRIDINFO_3D,
                [tuple(c[k] + 0.5 for k in range(3)) for c, _, _ in CRYSTALS_3D])


def scan_2d(offset: int, *, queue: str, beamline: str, abort_queue: str = "xrc.abort") -> Scan:
    """A 2D scan of one 20 x 10 grid (DCID 16085800 + offset)."""
    dcid = BASE_DCID + offset
    counts = [acquisition_order(crystal_2d(), GRIDINFO_2D)]
    t = RecordingTransport()
    messages = _grid_messages(t, dcid, [], dcid // 10, counts[0], queue=queue, beamline=beamline,
                              gridinfo=GRIDINFO_2D, message_index=0, abort_queue=abort_queue)
    return Scan("2d", (dcid,), dcid // 10, messages, counts, GRIDINFO_2D,
                [(CRYSTAL_2D[0][0] + 0.5, CRYSTAL_2D[0][1] + 0.5)])


class Offsets:
    """DCID offsets unique within a bench session (a group of 10 DCIDs each),
    so that no two rounds, workloads or contenders ever share a DCID."""

    _next = itertools.count(1)

    @classmethod
    def take(cls) -> int:
        return 10 * next(cls._next)
