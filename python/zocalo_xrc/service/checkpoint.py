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
order, with or without the images themselves, rebuild the same scan.

Every finished scan leaves a *tombstone* (a checkpoint with an
``outcome``), published with its result: it is behind any checkpoint of the
scan in the queue, and tells whoever takes that checkpoint, or a repeat of
the scan's images, that the scan is over. A scan rebuilt from messages the
broker hands out again may have finished before; it is centred only once a
*barrier* (a checkpoint naming a nonce) it sends to the queue has come
back: a tombstone of it would have come first.

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
    outcome: str | None = None  # a tombstone's: "result" or "abort"
    runs: dict[int, Any] | None = None  # a tombstone's: the recipe ID of each grid's run
    finished_at: float | None = None  # a tombstone's: when (wall clock)
    barrier: str | None = None  # a barrier's nonce
    maybe_finished: bool = False  # rebuilt from messages handed out again: it may have finished before

    def describe(self) -> str:
        kind = f"tombstone ({self.outcome})" if self.outcome else "barrier" if self.barrier else "checkpoint"
        return f"a {kind} of DCID {', '.join(map(str, self.group))}"


def encode(group: Group, firsts: dict[int, bytes], maybe_finished: bool = False) -> bytes:
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
    return _body({"group": list(group.dcids), "grids": grids, **({"maybe-finished": True} if maybe_finished else {})})


def tombstone(dcids: tuple[int, ...], outcome: str, runs: dict[int, Any] | None, finished_at: float) -> bytes:
    """The message that says a scan is over (``outcome``: result or abort)."""
    return _body({"group": list(dcids), "outcome": outcome, "finished-at": finished_at,
                  **({} if runs is None else {"runs": [[d, r] for d, r in runs.items()]})})


def barrier(dcids: tuple[int, ...], nonce: str) -> bytes:
    """The message a rebuilt scan waits for before it is centred."""
    return _body({"group": list(dcids), "barrier": nonce})


def parse(body: bytes) -> Checkpoint:
    """The checkpoint in ``body``; :class:`MessageRejected` says what is wrong."""
    try:
        message = json.loads(body)
        group = tuple(int(d) for d in message["group"])
        outcome = message.get("outcome")
        runs = {int(d): r for d, r in message["runs"]} if "runs" in message else None
        finished_at = None if message.get("finished-at") is None else float(message["finished-at"])
        nonce = message.get("barrier")
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
    return Checkpoint(group, tuple(grids), None if outcome is None else str(outcome), runs, finished_at,
                      None if nonce is None else str(nonce), bool(message.get("maybe-finished")))


def _body(fields: dict[str, Any]) -> bytes:
    return MARK + b", " + json.dumps(fields).encode()[1:]


def _pack(data: bytes) -> str:
    return base64.b64encode(zlib.compress(data, 1)).decode()


def _unpack(text: str) -> bytes:
    return zlib.decompress(base64.b64decode(text, validate=True))
