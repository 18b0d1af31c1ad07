"""Messaging transports: what the Zocalo faces need from a broker.

Two implementations share these semantics:
:class:`~zocalo_xrc.messaging.rabbitmq.AmqpTransport` (RabbitMQ, through one
long-lived connection) and
:class:`~zocalo_xrc.messaging.inprocess.InProcessTransport` (a broker inside
this process, for demos and quick tests):

* ``publish`` goes through an exchange (``""`` is the default exchange, routing
  key = queue name) with ``mandatory`` set and a ``message_id`` (the caller's,
  so that a message sent twice can be recognised); the returned future
  resolves once the broker has taken the message, and fails with
  :class:`UnroutableError` when no queue would receive it. Cancelling the
  future before the message has left withdraws it: it is never sent.
* ``subscribe`` delivers each message to a callback on the transport's own
  thread; every :class:`Delivery` must be acked or rejected, and what is left
  unacked when a consumer goes away is delivered again, marked ``redelivered``.
* an *atomic* subscription (``subscribe(..., atomic=True)``) can also
  :meth:`~Subscription.commit`: publish some messages and, once the broker
  has them all, ack some deliveries. A consumer that dies before the broker
  has them may have published some of them (never acked anything); one
  that dies after, before the acks, has published them all and acked
  nothing. So what a commit acks is never lost, and the deliveries of a
  commit cut short come again: the consumer makes a repeat harmless (the
  service: a tombstone and a barrier, :mod:`zocalo_xrc.service.runner`).
  Not an AMQP transaction: RabbitMQ does not make one atomic across
  queues (a client killed between ``tx.commit`` and its answer can have its
  acks applied and some of its publishes dropped: 3.10, measured).
"""

from __future__ import annotations

import logging
import uuid
from abc import ABC, abstractmethod
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

log = logging.getLogger(__name__)


class TransportError(RuntimeError):
    """The broker could not do what was asked."""


class UnroutableError(TransportError):
    """No queue would receive the message (a missing queue, a binding-less key)."""


class PublishRefusedError(TransportError):
    """The broker refused the message (a negative publisher confirm)."""


class ConnectionLostError(TransportError):
    """The connection went away before the broker confirmed the message."""


class QueueInUseError(TransportError):
    """Another consumer in this process already takes this queue's messages."""


@dataclass
class QueueSpec:
    """A queue to consume: a named one that must exist, or (``name=None``) a
    private, server-named queue bound to ``exchange`` with ``routing_key``,
    made again whenever the connection is. With ``declare``, a named queue
    that is missing is declared as a results queue (see
    :meth:`Transport.declare_results_queue`, bound to ``exchange`` with
    ``routing_key``)."""

    name: str | None
    exchange: str = ""
    routing_key: str = ""
    declare: bool = False

    @property
    def private(self) -> bool:
        return self.name is None


@dataclass(frozen=True)
class Outgoing:
    """One message to publish: through ``exchange`` (``""`` is the default
    one, where the routing key is a queue's name), persistent, mandatory."""

    exchange: str
    routing_key: str
    body: bytes
    headers: Mapping[str, Any] = field(default_factory=dict)
    message_id: str | None = None

    def describe(self) -> str:
        return f"queue {self.routing_key!r}" if not self.exchange else \
            f"exchange {self.exchange!r} routing key {self.routing_key!r}"


class Delivery(ABC):
    """One message handed to a consumer."""

    body: bytes
    headers: Mapping[str, Any]
    exchange: str
    routing_key: str
    redelivered: bool
    message_id: str | None

    @property
    def live(self) -> bool:
        """Whether acking still means something: False once the consumer or
        its connection is gone (the broker then delivers the message again)."""
        return True

    @property
    def session(self) -> Any:
        """Changes when the broker may have handed this consumer's unacked
        messages out again (a new channel after a lost one): a consumer whose
        state rests on unacked messages starts afresh when it changes."""
        return None

    @abstractmethod
    def ack(self) -> None:
        """The message is dealt with: the broker forgets it."""

    @abstractmethod
    def reject(self, requeue: bool = False) -> None:
        """The message cannot be dealt with. Without requeue it is dead-lettered
        (if the queue says where) or dropped; it never comes back in a loop."""


Callback = Callable[[Delivery], None]


class Subscription(ABC):
    #: Done once consuming has started; failed (``TransportError``) if it cannot.
    ready: Future[None]

    @abstractmethod
    def cancel(self) -> None:
        """Stop consuming; unacked messages go back to the queue."""

    def commit(self, messages: Sequence[Outgoing], acks: Sequence[Delivery]) -> Future[list[Outgoing]]:
        """Publish ``messages`` and, once the broker has taken them all, ack
        ``acks`` (deliveries of this subscription); see the module text.
        Only for a subscription made with ``atomic=True``. Resolves, once
        acked, with the messages no queue took (returned: the acks stand all
        the same); fails with :class:`ConnectionLostError` if the connection
        went first (the messages may have been published, the deliveries come
        again)."""
        raise TransportError("commit needs a subscription made with atomic=True")


class Transport(ABC):
    """A connection to a broker (see the module text for the semantics)."""

    @abstractmethod
    def publish(self, exchange: str, routing_key: str, body: bytes, headers: Mapping[str, Any],
                message_id: str | None = None) -> Future[None]:
        """Publish persistently with ``mandatory``; resolves when the broker has it.
        ``message_id`` defaults to a new unique one."""

    @abstractmethod
    def subscribe(self, queue: QueueSpec, callback: Callback, *, prefetch: int = 32,
                  wait: float | None = 30.0, atomic: bool = False) -> Subscription:
        """Consume ``queue``, calling ``callback`` on the transport's thread.
        Waits up to ``wait`` seconds for consuming to start (raising what
        stops it); with ``wait=None`` returns at once, and
        :attr:`Subscription.ready` tells. ``atomic``: the subscription can
        :meth:`~Subscription.commit` (on RabbitMQ, a channel of its own in
        transaction mode)."""

    @property
    def endpoint(self) -> Any:
        """What identifies the broker and virtual host this transport reaches."""
        return id(self)

    def trouble(self) -> str | None:
        """Why the broker cannot be reached just now, or None."""
        return None

    def wait_connected(self, timeout: float) -> None:
        """Return once connected to the broker; :class:`TransportError` (saying
        why) if that takes longer than ``timeout`` or cannot happen."""

    @abstractmethod
    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the transport's thread, soon."""

    @abstractmethod
    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the transport's thread after ``delay`` seconds."""

    @abstractmethod
    def declare_results_queue(self, name: str, *, exchange: str = "results", routing_key: str | None = None) -> None:
        """Declare a results queue the way Diamond's deployment does: a durable
        quorum queue with a delivery limit of 5 (and, named ``xrc.*``, a
        message TTL of 60 s, Diamond's policies) that dead-letters to
        ``dlq.<name>``, bound to the topic exchange ``exchange`` with
        ``routing_key`` (default: the queue's name). A queue there already is
        left as it is, bound."""

    @abstractmethod
    def declare_work_queue(self, name: str, *, shared: bool = False) -> None:
        """Declare a service's input queue the way Diamond's deployment does:
        a durable quorum queue with a single active consumer (several
        services may consume it; one at a time receives, the next takes over
        when it goes), a delivery limit of 5, dead-lettering to ``dlq.<name>``.
        ``shared``: workers share it instead (every consumer receives, as
        per-image analysis workers on any number of machines do)."""

    @abstractmethod
    def declare_shards(self, name: str, count: int) -> None:
        """Declare ``count`` shards of the work queue ``name``: the exchange
        ``name.shards`` (RabbitMQ's consistent-hash exchange: one routing key
        always reaches the same shard) and the queues ``name.shard.0`` ...,
        each declared like a work queue (single active consumer, delivery
        limit 5, dead-lettering to ``dlq.<name>``) and bound with weight 1."""

    @abstractmethod
    def declare_queue(self, name: str) -> None:
        """Declare a plain durable queue (``processing_recipe``, say)."""

    @abstractmethod
    def declare_broadcast(self, name: str) -> None:
        """Declare a durable fanout exchange for broadcasts, as Zocalo's
        deployment has ``command`` and ``transient.status`` (every workflows
        frontend listens to the first and reports on the second)."""

    @abstractmethod
    def queue_exists(self, name: str) -> bool: ...

    @abstractmethod
    def message_count(self, name: str) -> int:
        """How many messages wait in ``name``, not counting unacked ones."""

    @abstractmethod
    def consumer_count(self, name: str) -> int:
        """How many consumers ``name`` has."""

    @abstractmethod
    def delete_queue(self, name: str) -> None: ...

    @abstractmethod
    def purge_queue(self, name: str) -> int:
        """Drop the messages waiting in ``name`` (not those a consumer
        holds unacked); how many were dropped."""

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def shard_queue(name: str, k: int) -> str:
    """The name of shard ``k`` of work queue ``name``."""
    return f"{name}.shard.{k}"


def shard_exchange(name: str) -> str:
    """The consistent-hash exchange in front of the shards of ``name``."""
    return f"{name}.shards"


def new_message_id() -> str:
    return f"zocalo-xrc-{uuid.uuid4().hex}"
