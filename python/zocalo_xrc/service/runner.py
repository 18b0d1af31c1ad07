"""The X-ray centring service on a transport: consume per-image messages,
centre each group once it is complete, send the result to the step's
``success`` output, abandon idle groups to ``abort``.

Each result once, across crashes and restarts: the result is published
with a tombstone of its scan (to the service's own queue, in the record of
recently finished scans), and the scan's messages are acked once the
broker has confirmed both (:meth:`Subscription.commit`). A service that
dies before the acks has acked nothing: the broker hands the messages to
the next one, which
rebuilds the scan and, before centring it (it was rebuilt from messages
handed out again), sends a barrier to its queue and waits for it: a
tombstone of the scan comes first if the result went, and the rebuilt scan
is settled, not sent again. A tombstone is kept in the queue for a minute
(:data:`TOMBSTONE_S`), so that a restart in that time finds it again, and
so do repeats of the scan's images (a shard router killed between its
forwards and its acks): the record that holds it is held unacked, and
each commit that acks publishes the record anew (what is still within its
minute) and acks the copies held, so that nothing held for long sits below
a batch of acks (:mod:`.checkpoint`); a service that stops hands the
record back with the rest. An open group is not held unacked for long: now and
then its state goes to the service's own queue as a checkpoint, and the
images it covers are acked once it is confirmed (module :mod:`.checkpoint`);
a restarted service resumes from it, merging checkpoints by union. The
result carries a ``message_id`` made from its content, so any repeat that
remains (see the README) is recognisable. A message that can never count is
dead-lettered at once, with the reason in the log; it never loops, and it
changes nothing.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import json
import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple, Self

from .._native import XrcResults
from .._results import GridScan2DResult
from ..messaging import Delivery, Outgoing, QueueSpec, Subscription, Transport
from ..messaging.base import new_message_id
from ..messages import is_recipe_envelope
from ..summary import format_2d
from .metrics import ServiceMetrics
from .assembly import Assembly, Fate, Group, GroupRejected, MessageRejected, PiaMessage, centre
from .checkpoint import Checkpoint, Tombstone, barrier, encode as encode_checkpoint, is_checkpoint
from .checkpoint import parse as parse_checkpoint, record as encode_record
from .recipe import Envelope, EnvelopeError

log = logging.getLogger(__name__)

#: How long a group may wait for its next image before it is abandoned.
IDLE_S = 15 * 60.0

#: A group holding this many images unacked is checkpointed ...
CHECKPOINT_IMAGES = 10_000
#: ... and so is one that has held an image this long.
CHECKPOINT_S = 5.0
#: A redelivered message (a restart) is checkpointed this soon, so that no
#: restart counts twice against the queue's delivery limit.
REFRESH_S = 0.05
#: A timer this overdue is taken as lost, and asked for again.
TICK_LATE_S = 1.0
#: How many finished groups are remembered (a late duplicate of one is acked, nothing more).
FINISHED_KEPT = 50_000
#: A tombstone is kept in the queue this long after its scan finished (wall clock) ...
TOMBSTONE_S = 60.0
#: ... and at most this many are (the oldest dropped first).
TOMBSTONES_HELD = 2_000


@dataclass
class _Open:
    """What the service holds for an open group: its unacked messages since
    its last checkpoint, each grid's first message, when it last heard of it."""

    firsts: dict[int, PiaMessage] = field(default_factory=dict)
    deliveries: list[Delivery] = field(default_factory=list)
    last_heard: float = 0.0
    held_since: float | None = None  # when the oldest of ``deliveries`` came
    refresh: bool = False  # a redelivered message is held: checkpoint it soon
    maybe_finished: bool = False  # rebuilt from messages handed out again: its result may have gone
    barrier: str | None = None  # complete, waiting for this barrier to come back before it is centred

    def envelope(self) -> Envelope:
        """The xy grid's recipe (the lowest DCID): the result's, whatever came last."""
        return self.firsts[min(self.firsts)].envelope


class Finished(NamedTuple):
    """How a group ended, and the recipe ID of each grid's run (None: any)."""

    outcome: str  # "result" or "abort"
    runs: dict[int, Any] | None


def _runs(firsts: list[PiaMessage]) -> dict[int, Any]:
    """The recipe ID (``environment.ID``) of each grid's run."""
    return {m.dcid: m.envelope.environment.get("ID") for m in firsts}


class Recent:
    """The last ``size`` keys with a value each, oldest forgotten first."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: collections.OrderedDict[Any, Any] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Any) -> Any:
        return self._items.get(key)

    def add(self, key: Any, value: Any) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def discard(self, key: Any) -> None:
        self._items.pop(key, None)

    def clear(self) -> None:
        self._items.clear()


class AtomicConsumer:
    """Consumes ``queue`` on ``transport`` through an atomic subscription
    (:meth:`Subscription.commit`), from :meth:`start` to :meth:`stop`;
    subclasses say what :meth:`on_message` does."""

    def __init__(self, transport: Transport, queue: str, prefetch: int) -> None:
        self.transport, self.queue, self.prefetch = transport, queue, prefetch
        self.subscription: Subscription | None = None

    def start(self, wait: float | None = 30.0) -> Self:
        self.subscription = self.transport.subscribe(QueueSpec(self.queue), self.on_message, prefetch=self.prefetch,
                                                     wait=wait, atomic=True)
        log.info("consuming %s", self.queue)
        return self

    def stop(self) -> None:
        """Stop consuming; what is held unacked goes back to the queue, for the next consumer."""
        if self.subscription is not None:
            self.subscription.cancel()
            self.subscription = None

    def on_message(self, delivery: Delivery) -> None:
        raise NotImplementedError


class XrcService(AtomicConsumer):
    """Consumes ``queue`` on ``transport`` (start with :meth:`start`). All its
    work happens on the transport's thread; :attr:`completed` counts results
    sent, :attr:`rejected` messages dead-lettered, :attr:`checkpoints` the
    checkpoints published. A result no queue takes is kept in
    ``dlq.<dead_letters>`` (default: ``dlq.<queue>``). With ``metrics`` (one
    :class:`~.metrics.ServiceMetrics` per process), it counts what it does
    there.

    An open group's images are acked, a batch at a time, with a checkpoint
    of it published to ``queue`` in the same transaction (module
    :mod:`.checkpoint`): when a group holds ``checkpoint_images``, when its
    oldest held image is ``checkpoint_s`` old, when all groups together hold
    half of ``prefetch``, and soon after a redelivery. So any number of
    images per scan and in all, and any number of restarts."""

    def __init__(self, transport: Transport, queue: str = "reduce.xray_centering", *, idle_s: float = IDLE_S,
                 prefetch: int = 65535, clock: Callable[[], float] = time.time, dead_letters: str | None = None,
                 metrics: ServiceMetrics | None = None, checkpoint_images: int = CHECKPOINT_IMAGES,
                 checkpoint_s: float = CHECKPOINT_S) -> None:
        super().__init__(transport, queue, prefetch)
        self.metrics = metrics
        self.idle_s, self.clock = idle_s, clock
        self.checkpoint_images, self.checkpoint_s = checkpoint_images, checkpoint_s
        self.held_budget = max(1, prefetch // 2)  # all groups' unacked images, before all are checkpointed
        self.dead_letters = dead_letters or queue  # results no queue takes go to dlq.<this>
        self.assembly = Assembly()
        self.open: dict[tuple[int, ...], _Open] = {}
        self.finished = Recent(FINISHED_KEPT)  # by group: a Finished, once committed
        self.finishing: dict[tuple[int, ...], Finished] = {}  # the same, while the commit is under way
        self.aborted_named = Recent(FINISHED_KEPT)
        self._told = Recent(1_000)  # (group, what) logged once at INFO
        self.held = 0  # unacked images and checkpoints, all groups
        # the recently finished groups, each with its tombstone encoded, oldest first: what the record says
        self.tombstones: dict[tuple[int, ...], tuple[Tombstone, bytes]] = {}
        self.records_held: list[Delivery] = []  # copies of the record taken, unacked
        self._records_sent = Recent(64)  # message IDs of the records this service published
        self.completed = 0
        self.rejected = 0
        self.checkpoints = 0
        self.session: Any = None
        # one timer for every open group: (when, what, group) in a heap, the transport asked for the earliest
        self._events: list[tuple[float, int, str, tuple[int, ...]]] = []
        self._event_seq = itertools.count()
        self._timer_at: float | None = None

    # ---- one message -------------------------------------------------------------

    def on_message(self, delivery: Delivery) -> None:
        if delivery.session != self.session:
            self._start_afresh(delivery.session)
        try:
            self._take(delivery)
        except Exception:  # a bug of ours: logged, never passed to the transport or a frontend
            log.exception("a message on %s could not be dealt with", self.queue)

    def _take(self, delivery: Delivery) -> None:
        if delivery.message_id is not None and self._records_sent.get(delivery.message_id) is not None \
                and not delivery.redelivered:
            self.records_held.append(delivery)  # a record this service sent: it knows what it holds
            return
        if is_checkpoint(delivery.body):
            return self._take_checkpoint(delivery)
        if not is_recipe_envelope(delivery.headers):
            return self._reject(delivery, "not a recipe envelope (no workflows-recipe header)")
        try:
            message = PiaMessage.parse(delivery.body)
        except (EnvelopeError, MessageRejected) as e:
            return self._reject(delivery, str(e))
        except GroupRejected as e:  # told by the message itself: abort once per group it names
            envelope = Envelope.parse(delivery.body)
            key = named_group(envelope)
            if self.aborted_named.get(key) is None:
                self.aborted_named.add(key, "abort")
                self._commit(envelope.send("abort", {}), [], "abort", None)
            return self._reject(delivery, str(e))
        except Exception as e:  # nested too deep for Python, out of memory, ...
            return self._reject(delivery, f"it cannot be read ({type(e).__name__}: {str(e)[:80]})")
        if self._settle_late(delivery, message.group_dcids, f"DCID {message.dcid} image {message.file_number}",
                             lambda: [message]):
            return
        try:
            fate, group = self.assembly.add(message)
        except MessageRejected as e:
            return self._reject(delivery, str(e))
        except GroupRejected as e:
            return self._reject_group(delivery, e.group, str(e))
        except Exception as e:  # checked before any change: nothing to undo
            return self._reject(delivery, f"it cannot be taken ({type(e).__name__}: {str(e)[:80]})")
        held = self.open.get(group.dcids) or self._open(group.dcids)
        held.firsts.setdefault(message.dcid, message)
        if fate is Fate.DUPLICATE:
            held.maybe_finished |= delivery.redelivered
            self._tell_once(group.dcids, "DCID %s: image %d again (a duplicate); it changes nothing", message.dcid,
                            message.file_number)
            held.last_heard = time.monotonic()
            delivery.ack()
            return
        self._hold(group, held, delivery)

    def _take_checkpoint(self, delivery: Delivery) -> None:
        try:
            checkpoint = parse_checkpoint(delivery.body)
        except MessageRejected as e:
            return self._reject(delivery, str(e))
        key = checkpoint.group
        if checkpoint.barrier is not None:
            return self._take_barrier(delivery, key, checkpoint.barrier)
        if not key:
            return self._take_record(delivery, checkpoint)
        if self._settle_late(delivery, key, checkpoint.describe(), lambda: [g.first for g in checkpoint.grids]):
            return
        group = None
        try:
            for state in checkpoint.grids:
                _, group = self.assembly.restore(state.first, state.seen, state.counts, state.newest_seen_at)
        except (MessageRejected, GroupRejected) as e:
            return self._reject(delivery, f"{checkpoint.describe()}: {e}")
        if group is None:
            return self._reject(delivery, f"{checkpoint.describe()} holds no grid")
        held = self.open.get(key) or self._open(key)
        for state in checkpoint.grids:
            held.firsts.setdefault(state.first.dcid, state.first)
        held.maybe_finished |= checkpoint.maybe_finished
        self._hold(group, held, delivery)

    def _take_record(self, delivery: Delivery, taken: Checkpoint) -> None:
        """Tombstones: the groups are over. Settle what was rebuilt of each,
        remember them, and hold the record (a fresh copy of it, if the
        broker hands it out again: no restart counts against the queue's
        delivery limit)."""
        for tombstone in taken.tombstones:
            self._take_tombstone(tombstone)
        self.records_held.append(delivery)
        if delivery.redelivered:
            self._commit([], [], "record of finished scans", None, record=True)
        elif not self._tombstones_kept():
            self._release_tombstones()

    def _take_tombstone(self, tombstone: Tombstone) -> None:
        key = tombstone.group
        held = self.open.get(key)
        if held is not None and tombstone.runs is not None and any(
                tombstone.runs.get(dcid, run) != run for dcid, run in _runs(list(held.firsts.values())).items()):
            log.info("%s: of an earlier run; the open scan goes on", tombstone.describe())
        else:
            self.finished.add(key, Finished(tombstone.outcome, tombstone.runs))
            group = self.assembly.groups.get(key)
            if group is not None:
                self.assembly.drop(group)
            held = self._close(key)
            if held is not None:
                log.info("%s: finished before (%s sent); settling what was rebuilt of it",
                         group.describe() if group else key, tombstone.outcome)
                if held.deliveries:
                    self._commit([], held.deliveries, "settlement", key)
        if key not in self.tombstones and tombstone.finished_at + TOMBSTONE_S > time.time():
            self._keep_tombstone(tombstone)

    def _keep_tombstone(self, tombstone: Tombstone) -> None:
        """``tombstone`` goes in the next record published, until its time is over."""
        self.tombstones.pop(tombstone.group, None)
        self.tombstones[tombstone.group] = (tombstone, tombstone.encode())
        while len(self.tombstones) > TOMBSTONES_HELD:
            del self.tombstones[next(iter(self.tombstones))]
        self._schedule(time.monotonic() + tombstone.finished_at + TOMBSTONE_S - time.time(), "tombstones", ())

    def _tombstones_kept(self) -> bool:
        """Forget the tombstones whose time is over; whether any is left."""
        now = time.time()
        while self.tombstones:
            oldest = next(iter(self.tombstones.values()))[0]
            if oldest.finished_at + TOMBSTONE_S > now:
                return True
            del self.tombstones[oldest.group]
        return False

    def _release_tombstones(self) -> None:
        """Once every tombstone's time is over, ack the copies of the record held."""
        if not self._tombstones_kept():
            held, self.records_held = self.records_held, []
            for d in held:
                d.ack()

    def _take_barrier(self, delivery: Delivery, key: tuple[int, ...], nonce: str) -> None:
        """A barrier back: no tombstone of its group came before it, so the
        group is centred now (if it still waits for this one)."""
        held, group = self.open.get(key), self.assembly.groups.get(key)
        if held is None or group is None or held.barrier != nonce:
            delivery.ack()  # settled meanwhile, or the barrier of an earlier service
            return
        held.maybe_finished, held.barrier = False, None
        held.deliveries.append(delivery)
        self.held += 1
        self._complete(group, held)

    def _hold(self, group: Group, held: _Open, delivery: Delivery) -> None:
        """Keep ``delivery`` unacked with its group; centre the group if it is
        complete, else see that it is checkpointed in time."""
        now = time.monotonic()
        held.last_heard = now
        held.deliveries.append(delivery)
        held.maybe_finished |= delivery.redelivered
        self.held += 1
        if group.complete:
            return self._complete(group, held)
        if held.held_since is None:
            held.held_since = now
            self._schedule(now + self.checkpoint_s, "checkpoint", group.dcids)
        if delivery.redelivered and not held.refresh:
            held.refresh = True
            self._schedule(now + REFRESH_S, "checkpoint", group.dcids)
        if len(held.deliveries) >= self.checkpoint_images:
            self._checkpoint([group.dcids])
        elif self.held >= self.held_budget:
            self._checkpoint(list(self.open))

    def _settle_late(self, delivery: Delivery, key: tuple[int, ...], what: str,
                     firsts: Callable[[], list[PiaMessage]]) -> bool:
        """Settle a message of a group that is finished; False for any other,
        and for one of a new run of the same collections (another recipe ID:
        analysed again, centred again)."""
        finished = self.finishing.get(key) or self.finished.get(key)
        if finished is None:
            return False
        if finished.runs is not None:
            mine = _runs(firsts())
            if any(finished.runs.get(dcid, run) != run for dcid, run in mine.items()):
                log.info("%s: a new run (recipe ID %s) of a finished scan: centred again", what,
                         ", ".join(map(str, mine.values())))
                self.finished.discard(key)
                return False
        if finished.outcome == "result":
            self._tell_once(key, "%s came after its scan's result was sent (a late duplicate): acked, nothing more",
                            what)
            delivery.ack()
        else:
            self._reject(delivery, f"its group DCID {', '.join(map(str, key))} was abandoned")
        return True

    def _tell_once(self, key: tuple[int, ...], text: str, *args: Any) -> None:
        """Log ``text`` at INFO the first time for a group, at DEBUG after (a
        restart or a repeat of a router's forwards brings thousands)."""
        told = self._told.get((key, text)) is not None
        if not told:
            self._told.add((key, text), True)
        log.log(logging.DEBUG if told else logging.INFO, text + ("" if told else " (more of its scan: at DEBUG)"), *args)

    def _open(self, key: tuple[int, ...]) -> _Open:
        held = self.open[key] = _Open()
        self._schedule(time.monotonic() + self.idle_s, "idle", key)
        if self.metrics is not None:
            self.metrics.open_scans.inc()
        return held

    def _close(self, key: tuple[int, ...]) -> _Open | None:
        held = self.open.pop(key, None)
        if held is not None:
            self.held -= len(held.deliveries)
            if self.metrics is not None:
                self.metrics.open_scans.dec()
        return held

    def _start_afresh(self, session: Any) -> None:
        """A new channel: whatever was held unacked is being delivered again,
        so open groups are rebuilt from those deliveries (and their
        checkpoints); a commit not answered may not have happened."""
        if self.open:
            log.warning("the broker is delivering again what %d open scan(s) held; rebuilding them", len(self.open))
        self.session = session
        for key in list(self.open):
            group = self.assembly.groups.get(key)
            if group is not None:
                self.assembly.drop(group)
            self._close(key)
        self.finishing.clear()
        self.tombstones.clear()  # the records are handed out again too
        self.records_held.clear()
        self.held = 0

    def _reject(self, delivery: Delivery, why: str) -> None:
        """Dead-letter a message that can never count; it never comes back."""
        self.rejected += 1
        if self.metrics is not None:
            self.metrics.rejected.inc()
        log.error("dead-lettering a message on %s: %s", self.queue, why)
        delivery.reject(requeue=False)

    def _reject_group(self, delivery: Delivery, group: Group | None, why: str) -> None:
        """A group that cannot be centred: abort it once, dead-letter its messages."""
        if group is not None and self.finished.get(group.dcids) is None:
            runs = _runs(list(self.open[group.dcids].firsts.values())) if group.dcids in self.open else None
            held = self._close(group.dcids)
            self.assembly.drop(group)
            if held is not None and held.firsts:
                self._finish(group, held, "abort", held.envelope().send("abort", {}), [])
            self.finished.add(group.dcids, Finished("abort", runs))
            for d in held.deliveries if held else []:
                self._reject(d, why)
        self._reject(delivery, why)

    # ---- checkpoints -------------------------------------------------------------------

    def _checkpoint(self, keys: list[tuple[int, ...]]) -> None:
        """Publish a checkpoint of each open group in ``keys`` that holds
        anything, and ack what it holds, all in one transaction."""
        sends: list[Outgoing] = []
        acks: list[Delivery] = []
        for key in keys:
            held, group = self.open.get(key), self.assembly.groups.get(key)
            if held is None or group is None or not held.deliveries or held.barrier is not None:
                continue
            body = encode_checkpoint(group, {d: m.body for d, m in held.firsts.items()}, held.maybe_finished)
            sends.append(Outgoing("", self.queue, body, {}, new_message_id()))
            acks.extend(held.deliveries)
            self.held -= len(held.deliveries)
            held.deliveries, held.held_since, held.refresh = [], None, False
        if not sends:
            return
        self.checkpoints += len(sends)
        if self.metrics is not None:
            self.metrics.checkpoints.inc(len(sends))
        log.debug("checkpointing %d open scan(s), acking %d message(s)", len(sends), len(acks))
        self._commit(sends, acks, "checkpoint", None)

    # ---- a complete group ---------------------------------------------------------

    def _complete(self, group: Group, held: _Open) -> None:
        if held.maybe_finished:  # its result may have gone before a restart: a tombstone would come before a barrier
            if held.barrier is None:
                held.barrier = new_message_id()
                log.info("%s is complete, rebuilt from messages handed out again; centred once no tombstone of it "
                         "came before a barrier", group.describe())
                self._commit([Outgoing("", self.queue, barrier(group.dcids, held.barrier), {}, held.barrier)], [],
                             "barrier", group.dcids)
            return
        envelope = held.envelope()
        try:
            result = centre(group)
            payload = _payload(result)
            sends = envelope.send("success", payload)
        except Exception as e:  # grids that disagree, an output to no step, out of memory for a huge answer, ...
            why = str(e) if isinstance(e, (GroupRejected, EnvelopeError)) else \
                f"{group.describe()} cannot be centred ({type(e).__name__}: {str(e)[:80]})"
            last = held.deliveries.pop()
            self.held -= 1
            return self._reject_group(last, group, why)
        if isinstance(result, GridScan2DResult):
            _write_2d_files(envelope, result)
        newest = group.newest_seen_at
        if log.isEnabledFor(logging.INFO):
            latency = f"{(self.clock() - newest) * 1e3:.0f} ms after the newest image" if newest else "no image time"
            found = len(result) if isinstance(result, XrcResults) else (1 if result.ok else 0)
            log.info("%s: %s result, %d found, %s", describe(group, envelope), payload["type"], found, latency)
        self.assembly.drop(group)
        self._close(group.dcids)

        def sent() -> None:
            self.completed += 1
            self._finished(group, "result", None if newest is None else self.clock() - newest)

        self._finish(group, held, "result", sends, held.deliveries, sent)

    def _finish(self, group: Group, held: _Open, outcome: str, sends: list[Outgoing], acks: list[Delivery],
                then: Callable[[], None] | None = None) -> None:
        """Send a group's result or abort, and its tombstone, then its acks;
        remember it once committed."""
        key = group.dcids
        runs = _runs(list(held.firsts.values()))
        # in the record from this commit on (a later commit's copy must hold it before this one's is acked)
        self._keep_tombstone(Tombstone(key, outcome, runs, time.time()))
        finished = self.finishing[key] = Finished(outcome, runs)

        def committed() -> None:
            if self.finishing.pop(key, None) is not None:
                self.finished.add(key, finished)
            (then or (lambda: self._finished(group, outcome)))()

        def failed() -> None:  # the channel is gone: what comes again says whether it finished
            self.finishing.pop(key, None)
            self.tombstones.pop(key, None)

        self._commit(sends, acks, outcome, key, committed, failed, record=True)

    def _finished(self, group: Group, outcome: str, latency_s: float | None = None) -> None:
        if self.metrics is not None:
            self.metrics.finished("3d" if len(group.dcids) > 1 else "2d", outcome, latency_s)

    def _commit(self, sends: list[Outgoing], acks: list[Delivery], what: str, key: tuple[int, ...] | None,
                then: Callable[[], None] | None = None, failed: Callable[[], None] | None = None, *,
                record: bool = False) -> None:
        """Publish ``sends`` and ack ``acks`` as one transaction; say what
        became of it once the broker has answered. With ``record``, or
        whenever it acks, the record of finished groups goes with it: a
        fresh copy, and the acks of the copies held."""
        if not sends and what in ("result", "abort"):
            log.warning("the recipe gives the %s of DCID %s nowhere to go; settling its messages", what, key)
        assert self.subscription is not None
        if record or (acks and self.records_held):
            if self._tombstones_kept():
                # each tombstone encoded once, when it was kept
                body = encode_record(encoded for _, encoded in self.tombstones.values())
                copy = Outgoing("", self.queue, body, {}, new_message_id())
                self._records_sent.add(copy.message_id, True)
                sends = [*sends, copy]
            acks = [*acks, *self.records_held]
            self.records_held = []
        future = self.subscription.commit(sends, acks)

        def done(f: Future[list[Outgoing]], _acks: list[Delivery] = acks) -> None:
            # the acks are freed here, after the broker's answer, not before the commit's frame is written
            error = f.exception()
            if error is not None:  # committed whole or not at all: if not, the messages come back
                log.warning("the %s of DCID %s: %s", what, key, error)
                if failed is not None:
                    failed()
                return
            if then is not None:
                then()
            for m in f.result():
                keep_returned(self.transport, self.dead_letters, m, f"the {what} of DCID {key}")

        future.add_done_callback(lambda f: self.transport.call_soon(lambda: done(f)))

    # ---- one timer for all open groups -----------------------------------------------

    def _schedule(self, when: float, what: str, key: tuple[int, ...]) -> None:
        heapq.heappush(self._events, (when, next(self._event_seq), what, key))
        # a timer is asked for when this is the earliest, or when the one asked for is long overdue
        # (a tick lost on its way: the heap never waits on it)
        if self._timer_at is None or when < self._timer_at or self._timer_at < time.monotonic() - TICK_LATE_S:
            self._timer_at = when
            self.transport.call_later(max(0.0, when - time.monotonic()), self._tick)

    def _tick(self) -> None:
        if self.subscription is None:
            return  # stopped: what it held goes back to the queue, and the next consumer's timers count for it
        now = time.monotonic()
        if self._timer_at is not None and self._timer_at > now + 1e-3:
            return  # an earlier timer than the one now due: that one will come
        self._timer_at = None
        try:
            due: list[tuple[int, ...]] = []
            while self._events and self._events[0][0] <= now:
                _, _, what, key = heapq.heappop(self._events)
                held = self.open.get(key)
                if what == "tombstones":
                    self._release_tombstones()
                    continue
                if held is None:  # finished since
                    continue
                if what == "idle":
                    quiet = now - held.last_heard
                    if quiet >= self.idle_s:
                        self._abandon(key, held, quiet)
                    else:
                        heapq.heappush(self._events,
                                       (held.last_heard + self.idle_s, next(self._event_seq), "idle", key))
                elif held.deliveries and (held.refresh or now - (held.held_since or now) >= self.checkpoint_s - 1e-3):
                    due.append(key)
            if due:
                self._checkpoint(due)
        except Exception:  # a bug of ours: logged; the timer goes on for the other groups
            log.exception("the service's timer on %s failed", self.queue)
        finally:
            if self._events and self._timer_at is None:
                self._timer_at = self._events[0][0]
                self.transport.call_later(max(0.0, self._timer_at - time.monotonic()), self._tick)

    def _abandon(self, key: tuple[int, ...], held: _Open, quiet: float) -> None:
        group = self.assembly.groups.get(key)
        if group is None:
            return
        envelope = held.envelope()
        log.warning("%s: abandoned after %.0f s without an image; missing: %s", describe(group, envelope), quiet,
                    group.missing())
        self._close(key)
        self.assembly.drop(group)
        # settled with the abort: abandoned, not to be tried again
        self._finish(group, held, "abort", envelope.send("abort", {}), held.deliveries)


def describe(group: Group, envelope: Envelope) -> str:
    """The group, its DCG where the recipe names one, and the recipe ID, for a log line."""
    extra = [f"DCG {envelope.dcgid}"] if envelope.dcgid is not None else []
    extra.append(f"recipe ID {envelope.environment.get('ID', '?')}")
    return f"{group.describe()} ({', '.join(extra)})"


def keep_returned(transport: Transport, queue: str, m: Outgoing, what: str) -> None:
    """``m`` came back: no queue takes it. Keep a copy in ``dlq.<queue>``
    (with where it was going) and say so."""
    log.error("%s was returned: no queue takes %s; a copy goes to dlq.%s", what, m.describe(), queue)
    headers = {**m.headers, "x-zocalo-xrc-returned-from": m.describe()}
    copy = transport.publish("", f"dlq.{queue}", m.body, headers, m.message_id)

    def lost(f: Future[None]) -> None:
        if f.exception() is not None:
            log.error("%s is lost: dlq.%s does not take it either (%s)", what, queue, f.exception())

    copy.add_done_callback(lost)


def named_group(envelope: Envelope) -> tuple[str, ...]:
    """The DCIDs a message names for its group, as written (for a group
    that cannot be one)."""
    parameters = envelope.step.get("parameters") or {}
    others = parameters.get("dcg_dcids") or []
    return tuple(sorted(str(d) for d in [parameters.get("dcid"), *(others if isinstance(others, list) else [others])]))


def _payload(result: XrcResults | GridScan2DResult) -> dict[str, Any]:
    """The result message's payload, as Diamond's service sends it."""
    if isinstance(result, XrcResults):
        return {"results": result.to_dicts(), "status": "success", "type": "3d"}
    return {"results": [result.to_dict()], "status": "success", "type": "2d"}


def _write_2d_files(envelope: Envelope, result: GridScan2DResult) -> None:
    """The 2D step's ``output`` (the result as JSON), ``log`` (readable text)
    and ``results_symlink``, where the step names them."""
    parameters = envelope.step.get("parameters", {})
    try:
        if parameters.get("output"):
            out = Path(parameters["output"])
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result.to_dict(), indent=2))
            link = parameters.get("results_symlink")
            if link:
                target = out.parent.parent / str(link)
                if not target.exists():
                    target.symlink_to(out.parent)
        if parameters.get("log"):
            path = Path(parameters["log"])
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(format_2d(result) + "\n")
    except OSError as e:
        log.error("DCID %s: cannot write the 2D result files: %s", parameters.get("dcid"), e)
