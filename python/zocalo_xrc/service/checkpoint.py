"""Checkpoints: an open scan's state as a message on the service's own queue.

A service that held every image of an open scan unacked until its result
could hold no more than AMQP's 65,535 unacked messages, and every restart
handed the images back, each return counting against the queue's delivery
limit. Instead, now and then, the service publishes what it has of a scan
(each grid's first message, which images are in and their counts) to the
queue it consumes, and acks the images that checkpoint covers, in one
transaction. A restarted service takes the checkpoint like any message and
resumes from it.

Checkpoints are snapshots, merged by union: an image's count is the same in
every checkpoint that has it, so any number of them, old or new, in any
order, with or without the images themselves, rebuild the same scan. When
a scan finishes while a checkpoint of it may still wait in the queue, a
*tombstone* (a checkpoint with an ``outcome``) goes in the same
transaction as the result: it is behind that checkpoint in the queue, and
tells whoever takes the checkpoint that the scan is over.

No I/O here: bytes in, bytes out.
"""

from __future__ import annotations

import base64
import json
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from .assembly import Group, MessageRejected, PiaMessage

#: How every checkpoint body begins (it is recognised by this, on any transport).
MARK = b'{"zocalo-xrc-checkpoint": 1'


def is_checkpoint(body: bytes) -> bool:
    return body.startswith(MARK)


@dataclass(frozen=True)
class GridState:
    first: PiaMessage  # the grid's first message: its recipe, step and gridinfo
    seen: np.ndarray  # bool, one per image
    counts: np.ndarray  # int64, one per image seen, in image order
    newest_seen_at: float | None


@dataclass(frozen=True)
class Checkpoint:
    group: tuple[int, ...]
    grids: tuple[GridState, ...]
    outcome: str | None  # a tombstone's: "result" or "abort"

    def describe(self) -> str:
        kind = f"tombstone ({self.outcome})" if self.outcome else "checkpoint"
        return f"a {kind} of DCID {', '.join(map(str, self.group))}"


def encode(group: Group, firsts: dict[int, bytes]) -> bytes:
    """A checkpoint of ``group``; ``firsts`` holds each grid's first message body."""
    grids = []
    for dcid in group.dcids:
        grid = group.grids.get(dcid)
        if grid is None:
            continue
        grids.append({
            "first": firsts[dcid].decode(),
            "seen": _pack(np.packbits(grid.seen, bitorder="little").tobytes()),
            "counts": _pack(grid.counts[grid.seen].astype("<i8").tobytes()),
            "newest-seen-at": grid.newest_seen_at,
        })
    return _body({"group": list(group.dcids), "grids": grids})


def tombstone(dcids: tuple[int, ...], outcome: str) -> bytes:
    """The message that says a scan is over (``outcome``: result or abort)."""
    return _body({"group": list(dcids), "outcome": outcome})


def parse(body: bytes) -> Checkpoint:
    """The checkpoint in ``body``; :class:`MessageRejected` says what is wrong."""
    try:
        message = json.loads(body)
        group = tuple(int(d) for d in message["group"])
        outcome = message.get("outcome")
        grids = []
        for g in message.get("grids", []):
            first = PiaMessage.parse(g["first"].encode())
            seen = np.unpackbits(np.frombuffer(_unpack(g["seen"]), np.uint8), bitorder="little").astype(bool)
            counts = np.frombuffer(_unpack(g["counts"]), "<i8").astype(np.int64)
            t = g.get("newest-seen-at")
            grids.append(GridState(first, seen, counts, None if t is None else float(t)))
    except MessageRejected:
        raise
    except Exception as e:  # ours, so never expected to be bad: say what broke
        raise MessageRejected(f"an unreadable checkpoint ({type(e).__name__}: {str(e)[:80]})") from None
    for state in grids:
        if state.first.group_dcids != group:
            raise MessageRejected(f"a checkpoint of DCID {', '.join(map(str, group))} holds a grid of another "
                                  f"group ({', '.join(map(str, state.first.group_dcids))})")
    return Checkpoint(group, tuple(grids), None if outcome is None else str(outcome))


def _body(fields: dict[str, Any]) -> bytes:
    return MARK + b", " + json.dumps(fields).encode()[1:]


def _pack(data: bytes) -> str:
    return base64.b64encode(zlib.compress(data, 1)).decode()


def _unpack(text: str) -> bytes:
    return zlib.decompress(base64.b64decode(text, validate=True))
