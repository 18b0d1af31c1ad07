"""A broker inside this process, with RabbitMQ's semantics where the faces
use them (see :mod:`zocalo_xrc.messaging.base`): for demos and tests."""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import logging
import threading
import zlib
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from .base import (
    Callback,
    ConnectionLostError,
    Delivery,
    Outgoing,
    QueueSpec,
    Subscription,
    Transport,
    TransportError,
    UnroutableError,
    new_message_id,
    shard_exchange,
    shard_queue,
)
from .timers import Timers

log = logging.getLogger(__name__)


def topic_matches(pattern: str, key: str) -> bool:
    """AMQP topic matching: ``*`` is one word, ``#`` is zero or more."""
    words, keys = pattern.split("."), key.split(".")

    def match(i: int, j: int) -> bool:
        if i == len(words):
            return j == len(keys)
        if words[i] == "#":
            return any(match(i + 1, k) for k in range(j, len(keys) + 1))
        return j < len(keys) and words[i] in ("*", keys[j]) and match(i + 1, j + 1)

    return match(0, 0)


@dataclass
class _Message:
    body: bytes
    headers: dict[str, Any]
    exchange: str
    routing_key: str
    message_id: str | None = None
    redelivered: bool = False


@dataclass
class _Queue:
    name: str
    dead_letter_to: str | None = None
    exclusive_to: int | None = None
    single_active: bool = False  # only the oldest consumer receives
    ready: collections.deque[_Message] = field(default_factory=collections.deque)
    consumers: list[_Consumer] = field(default_factory=list)
    turn: int = 0


class InProcessBroker:
    """A broker that lives in this process: the default exchange, topic
    exchanges, queues, prefetch, acks, redelivery and dead-lettering. One
    thread of its own runs every consumer callback, as an I/O thread would."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._queues: dict[str, _Queue] = {}
        self._exchanges: dict[str, list[tuple[str, str]]] = {"": []}
        self._hashing: set[str] = set()  # consistent-hash exchanges (the others route by topic)
        self._tasks: collections.deque[Callable[[], None]] = collections.deque()
        self._names = itertools.count(1)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="zocalo-xrc in-process broker", daemon=True)
        self._thread.start()

    # administration
    def declare_queue(self, name: str, dead_letter_to: str | None = None, exclusive_to: int | None = None,
                      single_active: bool = False) -> str:
        with self._lock:
            if name not in self._queues:
                self._queues[name] = _Queue(name, dead_letter_to, exclusive_to, single_active)
            return name

    def new_private_queue(self, owner: int) -> str:
        return self.declare_queue(f"amq.gen-{next(self._names)}", exclusive_to=owner)

    def declare_exchange(self, name: str, consistent_hash: bool = False) -> None:
        with self._lock:
            self._exchanges.setdefault(name, [])
            if consistent_hash:
                self._hashing.add(name)

    def bind(self, queue: str, exchange: str, routing_key: str) -> None:
        with self._lock:
            self._exchanges.setdefault(exchange, []).append((routing_key, queue))

    def queue_exists(self, name: str) -> bool:
        with self._lock:
            return name in self._queues

    def exchange_exists(self, name: str) -> bool:
        """Whether exchange ``name`` was declared (the default exchange ``""``
        always is; exchanges are never deleted)."""
        with self._lock:
            return name in self._exchanges

    def delete_queue(self, name: str) -> None:
        with self._lock:
            self._queues.pop(name, None)
            for bindings in self._exchanges.values():
                bindings[:] = [(k, q) for k, q in bindings if q != name]

    def message_count(self, name: str) -> int:
        with self._lock:
            return len(self._queues[name].ready)

    def purge_queue(self, name: str) -> int:
        """Drop the messages waiting in ``name``; how many."""
        with self._lock:
            ready = self._queues[name].ready
            n = len(ready)
            ready.clear()
            return n

    def consumer_count(self, name: str) -> int:
        with self._lock:
            return len(self._queues[name].consumers)

    # messages
    def publish(self, exchange: str, routing_key: str, body: bytes, headers: Mapping[str, Any],
                message_id: str | None = None) -> None:
        with self._lock:
            if exchange == "":
                targets = [routing_key] if routing_key in self._queues else []
            elif exchange not in self._exchanges:
                raise TransportError(f"NOT_FOUND - no exchange {exchange!r}")
            elif exchange in self._hashing:  # one routing key, one queue (a stable hash, not a ring)
                bound = list(dict.fromkeys(q for _, q in self._exchanges[exchange]))
                targets = [bound[zlib.crc32(routing_key.encode()) % len(bound)]] if bound else []
            else:
                targets = list(dict.fromkeys(q for k, q in self._exchanges[exchange] if topic_matches(k, routing_key)))
            if not targets:
                raise UnroutableError(f"unroutable: no queue for exchange {exchange!r} routing key {routing_key!r}")
            for name in targets:
                self._queues[name].ready.append(_Message(bytes(body), dict(headers), exchange, routing_key, message_id))
            self._lock.notify_all()

    def consume(self, queue: str, consumer: _Consumer) -> None:
        with self._lock:
            if queue not in self._queues:
                raise TransportError(f"NOT_FOUND - no queue {queue!r}")
            self._queues[queue].consumers.append(consumer)
            self._lock.notify_all()

    def cancel(self, queue: str, consumer: _Consumer) -> None:
        with self._lock:
            q = self._queues.get(queue)
            if q and consumer in q.consumers:
                q.consumers.remove(consumer)
            for message in reversed(list(consumer.unacked.values())):
                message.redelivered = True
                if q is not None:
                    q.ready.appendleft(message)
            consumer.unacked.clear()
            self._lock.notify_all()

    def settle(self, consumer: _Consumer, tag: int, requeue: bool | None) -> None:
        """Ack (``requeue=None``) or reject a delivery."""
        with self._lock:
            message = consumer.unacked.pop(tag, None)
            if message is None:
                return
            q = self._queues.get(consumer.queue)
            if requeue is True and q is not None:
                message.redelivered = True
                q.ready.appendleft(message)
            elif requeue is False and q is not None and q.dead_letter_to in self._queues:
                message.redelivered = False
                self._queues[q.dead_letter_to].ready.append(message)
            self._lock.notify_all()

    def commit(self, consumer: _Consumer, messages: Sequence[Outgoing], tags: Sequence[int]) -> list[Outgoing]:
        """Publish ``messages`` and ack ``tags`` of ``consumer`` as one step (more
        than :meth:`Subscription.commit` promises: nothing can die between);
        the messages no queue took."""
        returned = []
        with self._lock:
            if any(tag not in consumer.unacked for tag in tags):
                raise ConnectionLostError("some deliveries went back to their queue (the consumer went); "
                                          "nothing was committed")
            for m in messages:
                try:
                    self.publish(m.exchange, m.routing_key, m.body, m.headers, m.message_id or new_message_id())
                except UnroutableError:
                    returned.append(m)
            for tag in tags:
                self.settle(consumer, tag, None)
        return returned

    def atomically(self) -> contextlib.AbstractContextManager[bool]:
        """Hold the broker still: inside ``with broker.atomically():`` no
        consumer is handed anything and no other thread publishes, settles or
        declares, so what the caller does there (publishes and settles, with
        checks between) every consumer sees as one step. Re-entrant: the
        broker's own methods may be called inside. Keep it short: the whole
        broker waits meanwhile."""
        return self._lock

    def call_soon(self, fn: Callable[[], None]) -> None:
        with self._lock:
            self._tasks.append(fn)
            self._lock.notify_all()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)

    def _next_work(self) -> Callable[[], None] | None:
        """Under the lock: a task, or a delivery to make, or None."""
        if self._tasks:
            return self._tasks.popleft()
        for q in self._queues.values():
            if not q.ready or not q.consumers:
                continue
            for k in range(1 if q.single_active else len(q.consumers)):
                consumer = q.consumers[0 if q.single_active else (q.turn + k) % len(q.consumers)]
                if len(consumer.unacked) < consumer.prefetch:
                    q.turn = (q.turn + k + 1) % len(q.consumers)
                    message = q.ready.popleft()
                    tag = next(consumer.tags)
                    consumer.unacked[tag] = message
                    return functools.partial(consumer.deliver, tag, message)
        return None

    def _run(self) -> None:
        while True:
            with self._lock:
                work = self._next_work()
                while work is None and not self._closed:
                    self._lock.wait()
                    work = self._next_work()
                if work is None:
                    return
            try:
                work()
            except Exception:
                log.exception("in-process broker: a callback raised")


class _Consumer:
    def __init__(self, broker: InProcessBroker, queue: str, callback: Callback, prefetch: int) -> None:
        self.broker, self.queue, self.callback, self.prefetch = broker, queue, callback, prefetch
        self.unacked: dict[int, _Message] = {}
        self.tags = itertools.count(1)

    def deliver(self, tag: int, message: _Message) -> None:
        self.callback(_InProcessDelivery(self, tag, message))


class _InProcessDelivery(Delivery):
    def __init__(self, consumer: _Consumer, tag: int, message: _Message) -> None:
        self._consumer, self._tag = consumer, tag
        self.body, self.headers, self.message_id = message.body, message.headers, message.message_id
        self.exchange, self.routing_key, self.redelivered = message.exchange, message.routing_key, message.redelivered

    @property
    def live(self) -> bool:
        return self._tag in self._consumer.unacked

    def ack(self) -> None:
        self._consumer.broker.settle(self._consumer, self._tag, None)

    def reject(self, requeue: bool = False) -> None:
        self._consumer.broker.settle(self._consumer, self._tag, requeue)


class _InProcessSubscription(Subscription):
    def __init__(self, consumer: _Consumer, private: bool, atomic: bool) -> None:
        self._consumer, self._private, self.atomic = consumer, private, atomic
        self.ready = Future()
        self.ready.set_result(None)

    def cancel(self) -> None:
        self._consumer.broker.cancel(self._consumer.queue, self._consumer)
        if self._private:
            self._consumer.broker.delete_queue(self._consumer.queue)

    def commit(self, messages: Sequence[Outgoing], acks: Sequence[Delivery]) -> Future[list[Outgoing]]:
        if not self.atomic:
            return super().commit(messages, acks)
        future: Future[list[Outgoing]] = Future()
        tags = [d._tag for d in acks if isinstance(d, _InProcessDelivery) and d._consumer is self._consumer]
        if len(tags) != len(acks):
            future.set_exception(TransportError("commit: every delivery to ack must come from this subscription"))
            return future
        try:
            future.set_result(self._consumer.broker.commit(self._consumer, messages, tags))
        except TransportError as e:
            future.set_exception(e)
        return future


class InProcessTransport(Transport):
    """A connection to an :class:`InProcessBroker` (by default, one shared by
    the whole process: :func:`embedded_broker`)."""

    _ids = itertools.count(1)

    def __init__(self, broker: InProcessBroker | None = None) -> None:
        self.broker = broker or embedded_broker()
        self._id = next(self._ids)
        self._subscriptions: list[_InProcessSubscription] = []
        self._timers = Timers(f"in-process transport {self._id}: timers")

    def __repr__(self) -> str:
        return f"InProcessTransport(connection {self._id})"

    @property
    def endpoint(self) -> Any:
        return id(self.broker)

    def publish(self, exchange: str, routing_key: str, body: bytes, headers: Mapping[str, Any],
                message_id: str | None = None) -> Future[None]:
        future: Future[None] = Future()
        try:
            self.broker.publish(exchange, routing_key, body, headers, message_id or new_message_id())
            future.set_result(None)
        except TransportError as e:
            future.set_exception(e)
        return future

    def subscribe(self, queue: QueueSpec, callback: Callback, *, prefetch: int = 32,
                  wait: float | None = 30.0, atomic: bool = False) -> Subscription:
        name = queue.name
        if queue.declare and name is not None and not self.broker.queue_exists(name):
            self.declare_results_queue(name, exchange=queue.exchange or "results", routing_key=queue.routing_key or name)
        if queue.private:
            name = self.broker.new_private_queue(self._id)
            self.broker.declare_exchange(queue.exchange)
            self.broker.bind(name, queue.exchange, queue.routing_key)
        assert name is not None
        consumer = _Consumer(self.broker, name, callback, prefetch)
        self.broker.consume(name, consumer)
        subscription = _InProcessSubscription(consumer, queue.private, atomic)
        self._subscriptions.append(subscription)
        return subscription

    def call_soon(self, fn: Callable[[], None]) -> None:
        self.broker.call_soon(fn)

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        self._timers.call_later(delay, lambda: self.broker.call_soon(fn))

    def declare_results_queue(self, name: str, *, exchange: str = "results", routing_key: str | None = None) -> None:
        dlq = self.broker.declare_queue(f"dlq.{name}")
        self.broker.declare_queue(name, dead_letter_to=dlq)
        self.broker.declare_exchange(exchange)
        self.broker.bind(name, exchange, routing_key or name)

    def declare_queue(self, name: str) -> None:
        self.broker.declare_queue(name)

    def declare_broadcast(self, name: str) -> None:
        self.broker.declare_exchange(name)

    def declare_work_queue(self, name: str, *, shared: bool = False, dead_letters: str | None = None) -> None:
        dlq = self.broker.declare_queue(f"dlq.{dead_letters or name}")
        self.broker.declare_queue(name, dead_letter_to=dlq, single_active=not shared)

    def declare_shards(self, name: str, count: int) -> None:
        self.broker.declare_exchange(shard_exchange(name), consistent_hash=True)
        for k in range(count):
            if not self.broker.queue_exists(shard_queue(name, k)):
                self.declare_work_queue(shard_queue(name, k), dead_letters=name)
                self.broker.bind(shard_queue(name, k), shard_exchange(name), "1")

    def queue_exists(self, name: str) -> bool:
        return self.broker.queue_exists(name)

    def message_count(self, name: str) -> int:
        return self.broker.message_count(name)

    def consumer_count(self, name: str) -> int:
        return self.broker.consumer_count(name)

    def delete_queue(self, name: str) -> None:
        self.broker.delete_queue(name)

    def purge_queue(self, name: str) -> int:
        return self.broker.purge_queue(name)

    def close(self) -> None:
        """Like a dropped connection: consumers go, their unacked messages return."""
        self._timers.close()
        for subscription in self._subscriptions:
            subscription.cancel()
        self._subscriptions.clear()


_EMBEDDED: InProcessBroker | None = None
_EMBEDDED_LOCK = threading.Lock()


def embedded_broker() -> InProcessBroker:
    """The process's shared in-process broker, with ``processing_recipe`` and
    the ``results`` topic exchange already there."""
    global _EMBEDDED
    with _EMBEDDED_LOCK:
        if _EMBEDDED is None:
            _EMBEDDED = InProcessBroker()
            _EMBEDDED.declare_queue("processing_recipe")
            _EMBEDDED.declare_exchange("results")
        return _EMBEDDED
