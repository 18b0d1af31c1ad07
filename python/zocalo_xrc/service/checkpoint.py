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

Every finished scan leaves a *tombstone* (its DCIDs and ``outcome``),
published with its result: it is behind any checkpoint of the scan in the
queue, and tells whoever takes that checkpoint, or a repeat of the scan's
images, that the scan is over. Tombstones travel together, in a *record*
of the recently finished scans: each commit that acks publishes the
record anew and acks the copies held, so that one copy at most sits below
the acks (one ``basic.ack`` frame acks a whole batch; a copy held per scan
would split it into one frame per image, each costing the broker as much
as a publish). A scan rebuilt from messages the broker hands out again may
have finished before; it is centred only once a *barrier* (a checkpoint
naming a nonce) it sends to the queue has come back: a tombstone of it
would have come first.

No I/O here: bytes in, bytes out.
"""

from __future__ import annotations

import base64
import json
import zlib
from dataclasses import dataclass
from typing import Any, Iterable

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
class Tombstone:
    """A finished scan: how it ended, each grid's run (recipe ID), when (wall clock)."""

    group: tuple[int, ...]
    outcome: str  # "result" or "abort"
    runs: dict[int, Any] | None
    finished_at: float

    def describe(self) -> str:
        return f"a tombstone ({self.outcome}) of DCID {', '.join(map(str, self.group))}"

    def encode(self) -> bytes:
        """Its JSON object, as a record holds it (:func:`record`)."""
        return json.dumps({"group": list(self.group), "outcome": self.outcome, "finished-at": self.finished_at,
                           **({} if self.runs is None else {"runs": [[d, r] for d, r in self.runs.items()]})}).encode()


@dataclass(frozen=True)
class Checkpoint:
    group: tuple[int, ...]  # () for a record of tombstones
    grids: tuple[GridState, ...]
    tombstones: tuple[Tombstone, ...] = ()  # a record's
    barrier: str | None = None  # a barrier's nonce
    maybe_finished: bool = False  # rebuilt from messages handed out again: it may have finished before

    def describe(self) -> str:
        if not self.group:
            return f"a record of {len(self.tombstones)} finished scan(s)"
        return f"a {'barrier' if self.barrier else 'checkpoint'} of DCID {', '.join(map(str, self.group))}"


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


def record(tombstones: Iterable[bytes]) -> bytes:
    """The message that says these scans are over: their :meth:`Tombstone.encode`."""
    return MARK + b', "tombstones": [' + b", ".join(tombstones) + b"]}"


def barrier(dcids: tuple[int, ...], nonce: str) -> bytes:
    """The message a rebuilt scan waits for before it is centred."""
    return _body({"group": list(dcids), "barrier": nonce})


def parse(body: bytes) -> Checkpoint:
    """The checkpoint in ``body``; :class:`MessageRejected` says what is wrong."""
    try:
        message = json.loads(body)
        if "tombstones" in message:
            return Checkpoint((), (), tuple(_tombstone(t) for t in message["tombstones"]))
        if "outcome" in message:  # one tombstone alone, as a service before records wrote it
            return Checkpoint((), (), (_tombstone(message),))
        group = tuple(int(d) for d in message["group"])
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
    return Checkpoint(group, tuple(grids), (), None if nonce is None else str(nonce), bool(message.get("maybe-finished")))


def _tombstone(fields: dict[str, Any]) -> Tombstone:
    runs = {int(d): r for d, r in fields["runs"]} if "runs" in fields else None
    return Tombstone(tuple(int(d) for d in fields["group"]), str(fields["outcome"]), runs,
                     float(fields.get("finished-at") or 0.0))


def _body(fields: dict[str, Any]) -> bytes:
    return MARK + b", " + json.dumps(fields).encode()[1:]


def _pack(data: bytes) -> str:
    return base64.b64encode(zlib.compress(data, 1)).decode()


def _unpack(text: str) -> bytes:
    return zlib.decompress(base64.b64decode(text, validate=True))
