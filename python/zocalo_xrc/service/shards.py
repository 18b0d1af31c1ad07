"""Several service instances sharing the work by group, with RabbitMQ's own
means and no single point of failure.

The spot finders send to the work queue as they always do (``Q``, Diamond's
quorum queue with a single active consumer). Around it::

    Q ──(router: the active instance)──> Q.shards (consistent-hash exchange,
        routing key = the group's DCIDs) ──> Q.shard.0 … Q.shard.N-1
        (quorum, single active consumer, dead-lettering to dlq.Q)

* The router moves each message to the shard of its group: it forwards a
  batch (with the original's ``message_id``) and acks the originals once
  the broker has confirmed every forward (:meth:`Subscription.commit`). A
  router killed in between has acked nothing: the next router forwards
  those messages again. In an open scan a repeated image counts once; a
  finished scan's tombstone, held by its shard for a minute, or the memory
  of the instance that finished it, settles its repeats (see
  :mod:`.runner`). It decides nothing else: a message it cannot read goes
  to some shard, whose service dead-letters it with the reason.
* Every instance consumes every shard; the broker makes one of them the
  single active consumer of each, so all of a scan's images reach the one
  instance that holds the scan. Instance ``K`` subscribes to shard ``K``
  first and to the others only after a standby delay: instances started
  together each take a shard of their own. When one goes, each of its
  shards (and the router, if it was routing) passes to a standby, which
  rebuilds the open scans from the redelivered messages.

The number of shards is fixed per deployment: the exchange keeps every
queue ever bound to it.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future

from ..messaging import Delivery, Outgoing, Transport
from ..messaging.base import shard_exchange, shard_queue
from .assembly import GroupRejected, MessageRejected, PiaMessage
from .recipe import Envelope, EnvelopeError
from .metrics import ServiceMetrics
from .runner import IDLE_S, AtomicConsumer, XrcService, keep_returned, named_group

log = logging.getLogger(__name__)

#: How long an instance waits before standing by on the shards of others.
STANDBY_S = 2.0

#: At most this many messages move per transaction.
BATCH = 4096


def group_key(body: bytes) -> str:
    """The routing key of a message's group: its DCIDs, ascending, joined by
    dots; ``""`` for a message with no readable group."""
    try:
        return ".".join(map(str, PiaMessage.parse(body).group_dcids))
    except GroupRejected:
        return ".".join(named_group(Envelope.parse(body)))
    except (EnvelopeError, MessageRejected):
        return ""


class GroupRouter(AtomicConsumer):
    """Moves the messages of work queue ``queue`` to the shard of their group."""

    def __init__(self, transport: Transport, queue: str, *, prefetch: int = 65535) -> None:
        super().__init__(transport, queue, prefetch)
        self.pending: list[tuple[Outgoing, Delivery]] = []
        self.moving = False
        self.routed = 0

    def on_message(self, delivery: Delivery) -> None:
        forward = Outgoing(shard_exchange(self.queue), group_key(delivery.body), delivery.body, delivery.headers,
                           delivery.message_id)
        self.pending.append((forward, delivery))
        if not self.moving:  # what arrives meanwhile goes with the next transaction
            self.moving = True
            self.transport.call_soon(self._move)

    def _move(self) -> None:
        batch, self.pending = self.pending[:BATCH], self.pending[BATCH:]
        if not batch or self.subscription is None:
            self.moving = False
            return
        future = self.subscription.commit([m for m, _ in batch], [d for _, d in batch])

        def done(f: Future[list[Outgoing]]) -> None:
            error = f.exception()
            if error is not None:  # not acked (perhaps forwarded): they come again, to be forwarded again
                log.warning("moving %d message(s) of %s to their shards: %s", len(batch), self.queue, error)
            else:
                self.routed += len(batch)
                for m in f.result():
                    keep_returned(self.transport, self.queue, m, f"a message for group {m.routing_key or '?'}")
            self._move()

        future.add_done_callback(lambda f: self.transport.call_soon(lambda: done(f)))


class ShardedService:
    """One instance of the service over ``shards`` shards of ``queue`` (see
    the module text); ``instance`` is this one's number (0, 1, ...), or None
    to stand by on every shard at once."""

    def __init__(self, transport: Transport, queue: str, shards: int, *, instance: int | None = None,
                 standby_s: float = STANDBY_S, idle_s: float = IDLE_S, prefetch: int = 65535,
                 metrics: ServiceMetrics | None = None) -> None:
        if shards < 1:
            raise ValueError(f"shards: expected at least 1, got {shards}")
        self.transport, self.queue, self.shards, self.instance, self.standby_s = \
            transport, queue, shards, instance, standby_s
        self.router = GroupRouter(transport, queue, prefetch=prefetch)
        self.services = [XrcService(transport, shard_queue(queue, k), idle_s=idle_s, prefetch=prefetch,
                                    dead_letters=queue, metrics=metrics) for k in range(shards)]
        self._standby: threading.Timer | None = None

    @property
    def home(self) -> int | None:
        return None if self.instance is None else self.instance % self.shards

    def start(self, wait: float | None = 30.0) -> ShardedService:
        self.transport.declare_shards(self.queue, self.shards)
        if self.home is not None:
            self.services[self.home].start(wait)
        others = [s for k, s in enumerate(self.services) if k != self.home]
        if self.home is None:
            for s in others:
                s.start(wait)
        elif others:
            self._standby = threading.Timer(self.standby_s, lambda: [s.start(wait=None) for s in others])
            self._standby.daemon = True
            self._standby.start()
        self.router.start(wait)
        return self

    def stop(self) -> None:
        if self._standby is not None:
            self._standby.cancel()
        self.router.stop()
        for s in self.services:
            s.stop()

    @property
    def completed(self) -> int:
        return sum(s.completed for s in self.services)

    @property
    def rejected(self) -> int:
        return sum(s.rejected for s in self.services)

    @property
    def open(self) -> dict[tuple[int, ...], object]:
        return {k: v for s in self.services for k, v in s.open.items()}
