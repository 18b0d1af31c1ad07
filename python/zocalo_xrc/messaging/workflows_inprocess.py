"""A ``workflows`` transport on the in-process broker, so that unmodified
workflows and zocalo services (zocalo's Dispatcher, ``wrap_subscribe``,
``RecipeWrapper``, this project's ``XRayCentering``) run in this process as
they do on RabbitMQ through workflows' ``PikaTransport``.

What it does is what ``PikaTransport`` does on a RabbitMQ deployment,
checked against a real broker:

* messages are JSON bytes with a headers table, so this project's own
  :class:`~zocalo_xrc.messaging.inprocess.InProcessTransport` reads what this
  transport sends and the other way round;
* a callback's header dict holds the message's headers and ``consumer_tag``,
  ``delivery_mode``, ``exchange``, ``message-id`` (the delivery tag, counted
  per subscription from 1), ``redelivered``, ``routing_key``, ``subscription``;
* a send nothing routes is dropped, not raised (``PikaTransport`` publishes
  ``mandatory`` without publisher confirms, so the broker's return goes
  unheard); it is logged here as a warning;
* ``nack`` requeues unless given ``requeue=False`` (pika's default), which
  dead-letters when the queue says where. A message requeued more than
  ``delivery_limit`` times is dead-lettered instead, as Diamond's quorum
  queues do (``x-delivery-count`` counts the requeues);
* ``delay`` holds a message back that many seconds, then delivers it to the
  queue named by the destination (RabbitMQ's ``delayed`` exchange);
  ``expiration`` drops (or dead-letters) a message not consumed in time;
* in a transaction, sends, acks and nacks happen together at commit, all at
  once (no consumer sees a part), or not at all at abort: the acks are
  undone and the deliveries are held again, still to be acked;
* one transaction at a time per subscription (its channel on RabbitMQ) and
  one on the shared channel; acking a delivery of a subscription that has a
  transaction open must name it ("Transaction state mismatch", as pika).

Where RabbitMQ would close the channel and with it ``PikaTransport``'s
connection (a queue or exchange that does not exist, an unknown delivery
tag, a second transaction on one channel), this transport raises at once and
stays connected. Queues and exchanges belong to whoever runs the deployment
(:meth:`InProcessBroker.declare_queue`, ``declare_exchange``, ``bind``).
"""

from __future__ import annotations

import copy
import datetime
import itertools
import json
import logging
import threading
import time
import uuid
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any, Mapping

import workflows
from workflows.transport import middleware as workflows_middleware
from workflows.transport.common_transport import CommonTransport, MessageCallback, json_serializer

from .base import Delivery, QueueSpec, Subscription, TransportError, UnroutableError
from .timers import Timers
from .inprocess import InProcessBroker, InProcessTransport, embedded_broker

log = logging.getLogger(__name__)

#: Delayed messages of every transport here, on one thread.
_DELAYED = Timers("in-process workflows: delayed messages")

#: How often a message may be requeued by ``nack`` before it is dead-lettered
#: (Diamond's quorum queues have a delivery limit of 5).
DELIVERY_LIMIT = 5

_UNLIMITED = 1 << 30  # AMQP's prefetch 0, and auto-ack: no limit
_EXPIRING = "workflows-expiring-"  # the message id of a message with an expiration, then "<id>@<deadline>"


@dataclass(frozen=True)
class _Send:
    """One message to publish."""

    exchange: str
    routing_key: str
    body: bytes
    headers: dict[str, Any]
    delay: float | None = None
    expiration: float | None = None
    mandatory: bool = True  # unroutable: a warning (sends) or nothing (broadcasts)

    def describe(self) -> str:
        return f"queue {self.routing_key!r}" if not self.exchange else \
            f"exchange {self.exchange!r} routing key {self.routing_key!r}"


@dataclass(eq=False)
class _Subscription:
    """One workflows subscription: a consumer on the broker (a channel of its own on RabbitMQ)."""

    id: int
    queue: str
    manual_ack: bool
    temporary: bool  # its queue goes with it
    consumer: Subscription | None = None
    tags: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    unacked: dict[int, Delivery] = field(default_factory=dict)
    cancelled: bool = False


@dataclass(eq=False)
class _Transaction:
    id: int
    channel: int | None  # a subscription's id, or None: the shared channel
    sends: list[_Send] = field(default_factory=list)
    settles: list[tuple[_Subscription, int, Delivery, bool | None]] = field(default_factory=list)


class InProcessWorkflowsTransport(CommonTransport):
    """A workflows transport to an :class:`InProcessBroker` (by default the
    process's :func:`~zocalo_xrc.messaging.inprocess.embedded_broker`).

    One transport per service, as with ``PikaTransport``: a workflows service
    sets its own callback interceptor on its transport. Callbacks arrive on
    the broker's thread; everything else may be called from any thread."""

    def __init__(self, broker: InProcessBroker | None = None, *, delivery_limit: int | None = DELIVERY_LIMIT,
                 middleware: list[type[workflows_middleware.BaseTransportMiddleware]] | None = None) -> None:
        super().__init__(middleware=middleware)
        # CommonTransport keeps its subscription and transaction tables on the
        # class, shared by every transport of the process, while each numbers
        # its subscriptions from 1: two services in one process would take each
        # other's callbacks. Each transport here has tables of its own.
        setattr(self, "_CommonTransport__subscriptions", {})
        setattr(self, "_CommonTransport__transactions", set())
        self.broker = broker or embedded_broker()
        self.delivery_limit = delivery_limit
        self._connection = InProcessTransport(self.broker)
        self._lock = threading.RLock()
        self._connected = False
        self._subscriptions: dict[int, _Subscription] = {}
        self._transactions: dict[int, _Transaction] = {}
        self._channel_transaction: dict[int | None, int] = {}  # channel (subscription id or None) -> transaction

    def __repr__(self) -> str:
        return f"InProcessWorkflowsTransport({'connected' if self._connected else 'not connected'}, " \
               f"{len(self._subscriptions)} subscription(s))"

    # connection
    def connect(self) -> bool:
        """Connect (again, after :meth:`disconnect`); nothing to wait for."""
        with self._lock:
            self._connected = True
        return True

    def is_connected(self) -> bool:
        return self._connected

    def disconnect(self) -> None:
        """As a closed connection: every subscription ends (its unacked
        messages go back to their queues, marked redelivered) and open
        transactions are lost. Delayed messages still arrive."""
        with self._lock:
            self._connected = False
            subscriptions = list(self._subscriptions.values())
            self._subscriptions.clear()
            self._transactions.clear()
            self._channel_transaction.clear()
            for s in subscriptions:
                s.cancelled = True
                s.unacked.clear()
        for s in subscriptions:
            self._end(s)

    def _require_connected(self) -> None:
        if not self._connected:
            raise workflows.Disconnected("the in-process workflows transport is not connected (call connect())")

    # subscriptions
    def _subscribe(self, sub_id: int, channel: str, callback: MessageCallback, *, acknowledgement: bool = False,
                   prefetch_count: int = 1, reconnectable: bool = False, **kwargs: Any) -> None:
        """Consume the queue ``channel``, which must exist. With
        ``acknowledgement`` each message must be acked or nacked, and at most
        ``prefetch_count`` are held unacked (0: no limit); without, each is
        acked as it is handed over."""
        if acknowledgement and reconnectable:
            raise ValueError("Acknowledgements can't be reliably used on reconnectable connections")
        if not channel:
            raise NotImplementedError("a subscription needs a queue name (anonymous ones are not implemented, "
                                      "as in PikaTransport)")
        self._consume(_Subscription(sub_id, str(channel), manual_ack=acknowledgement, temporary=False),
                      QueueSpec(str(channel)), prefetch_count)

    def _subscribe_temporary(self, sub_id: int, channel_hint: str | None, callback: MessageCallback, *,
                             acknowledgement: bool = False, **kwargs: Any) -> str:
        """Declare a queue of this subscription's own, named from the hint
        (``transient.<hint>.<uuid>``) or by the broker, consume it, and
        delete it at unsubscribe; its name is returned."""
        self._require_connected()
        if channel_hint:
            name = channel_hint if channel_hint.startswith("transient.") else f"transient.{channel_hint}"
            queue = self.broker.declare_queue(f"{name}.{uuid.uuid4()}")
        else:
            queue = self.broker.new_private_queue(id(self))
        try:
            self._consume(_Subscription(sub_id, queue, manual_ack=acknowledgement, temporary=True),
                          QueueSpec(queue), 0)
        except BaseException:
            self.broker.delete_queue(queue)
            raise
        return queue

    def _subscribe_broadcast(self, sub_id: int, channel: str, callback: MessageCallback, *,
                             reconnectable: bool = False, **kwargs: Any) -> None:
        """Receive everything published to the exchange ``channel`` (which
        must exist, ``transient.status`` say) through a private queue."""
        self._require_connected()
        if not self.broker.exchange_exists(channel):
            raise workflows.Disconnected(f"NOT_FOUND - no exchange {channel!r} on the in-process broker "
                                         "(declare it with InProcessBroker.declare_exchange)")
        self._consume(_Subscription(sub_id, f"broadcast {channel}", manual_ack=False, temporary=False),
                      QueueSpec(None, exchange=channel, routing_key="#"), 0)

    def _consume(self, subscription: _Subscription, queue: QueueSpec, prefetch_count: int) -> None:
        self._require_connected()
        with self._lock:
            if subscription.id in self._subscriptions:
                raise KeyError(f"Subscription request {subscription.id} rejected due to existing subscription")
            self._subscriptions[subscription.id] = subscription  # before consuming: deliveries may come at once
        prefetch = prefetch_count if subscription.manual_ack and prefetch_count > 0 else _UNLIMITED
        try:
            subscription.consumer = self._connection.subscribe(
                queue, lambda d: self._on_delivery(subscription, d), prefetch=prefetch, wait=None)
        except TransportError as e:
            with self._lock:
                self._subscriptions.pop(subscription.id, None)
            raise workflows.Disconnected(f"NOT_FOUND - no queue {subscription.queue!r} on the in-process broker "
                                         "(declare it with InProcessBroker.declare_queue)") from e

    def _unsubscribe(self, sub_id: int, **kwargs: Any) -> None:
        """Stop consuming: unacked messages go back to the queue (redelivered),
        a transaction open on the subscription is lost."""
        with self._lock:
            subscription = self._subscriptions.pop(sub_id, None)
            if subscription is None:
                raise KeyError(f"No subscription with ID {sub_id} to unsubscribe from")
            subscription.cancelled = True
            subscription.unacked.clear()
            transaction = self._channel_transaction.pop(sub_id, None)
            if transaction is not None:
                self._transactions.pop(transaction, None)
        self._end(subscription)

    def _end(self, subscription: _Subscription) -> None:
        if subscription.consumer is not None:
            subscription.consumer.cancel()
        if subscription.temporary:
            self.broker.delete_queue(subscription.queue)

    def _on_delivery(self, subscription: _Subscription, delivery: Delivery) -> None:
        """On the broker's thread: hand one message to the subscription's callback."""
        if not delivery.live:
            return  # the consumer went meanwhile; the broker has the message back
        if _expired(delivery):  # RabbitMQ dead-letters an expired message, if the queue says where
            _dead_letter(delivery, subscription.queue, "expired")
            return
        with self._lock:
            if subscription.cancelled:
                return
            tag = next(subscription.tags)
            if subscription.manual_ack:
                subscription.unacked[tag] = delivery
        if not subscription.manual_ack:
            delivery.ack()
        header: dict[str, Any] = copy.deepcopy(dict(delivery.headers))
        header.update({
            "consumer_tag": str(subscription.id),
            "delivery_mode": 2,
            "exchange": delivery.exchange,
            "message-id": tag,
            "redelivered": delivery.redelivered,
            "routing_key": delivery.routing_key,
            "subscription": subscription.id,
        })
        self.subscription_callback(subscription.id)(header, delivery.body)

    # acknowledgements
    def _ack(self, message_id: Any, subscription_id: int, *, multiple: bool = False, **kwargs: Any) -> None:
        """Ack the delivery tagged ``message_id`` (with ``multiple``, every
        one up to it), now or, with ``transaction=``, at its commit."""
        self._settle("ACK", message_id, subscription_id, None, multiple, kwargs.get("transaction"))

    def _nack(self, message_id: Any, subscription_id: int, *, multiple: bool = False, requeue: bool = True,
              **kwargs: Any) -> None:
        """Reject the delivery tagged ``message_id``: requeued (pika's
        default; dead-lettered past the delivery limit) or, with
        ``requeue=False``, dead-lettered if the queue says where."""
        self._settle("NACK", message_id, subscription_id, requeue, multiple, kwargs.get("transaction"))

    def _settle(self, what: str, tag: Any, subscription_id: int, requeue: bool | None, multiple: bool,
                transaction: int | None) -> None:
        with self._lock:
            subscription = self._subscriptions.get(subscription_id)
            if subscription is None:
                raise KeyError(f"Could not find subscription {subscription_id} to {what}")
            open_transaction = self._channel_transaction.get(subscription_id)
            if transaction != open_transaction:
                raise workflows.Error("Transaction state mismatch. Call assumes transaction "
                                      f"{transaction}, channel has transaction {open_transaction}")
            if multiple:
                tags = sorted(t for t in subscription.unacked if t <= tag)
            elif tag in subscription.unacked:
                tags = [tag]
            else:
                raise workflows.Error(f"{what} of unknown delivery tag {tag!r} on subscription {subscription_id} "
                                      "(settled already, or never held unacked); RabbitMQ would close the channel "
                                      "(PRECONDITION_FAILED)")
            settles = [(subscription, t, subscription.unacked.pop(t), requeue) for t in tags]
            if transaction is not None:
                self._transactions[transaction].settles.extend(settles)
                return
        for subscription, _, delivery, how in settles:
            self._apply(subscription, delivery, how)

    def _apply(self, subscription: _Subscription, delivery: Delivery, requeue: bool | None) -> None:
        if requeue is None:
            delivery.ack()
        elif not requeue:
            _dead_letter(delivery, subscription.queue, "rejected")
        elif self.delivery_limit is None or not isinstance(delivery.headers, MutableMapping):
            delivery.reject(requeue=True)
        else:
            # the count goes with the message: its headers are the broker's own copy
            count = int(delivery.headers.get("x-delivery-count", 0)) + 1
            if count > self.delivery_limit:
                log.warning("a message from %s was requeued as often as its delivery limit (%d): dead-lettered",
                            subscription.queue, self.delivery_limit)
                _dead_letter(delivery, subscription.queue, "delivery_limit")
            else:
                delivery.headers["x-delivery-count"] = count
                delivery.reject(requeue=True)

    # sending
    def _send(self, destination: Any, message: Any, headers: Mapping[str, Any] | None = None,
              delay: float | None = None, expiration: float | None = None, transaction: int | None = None,
              exchange: str | None = None, **kwargs: Any) -> None:
        """Send to the queue ``destination`` (the default exchange), or
        through ``exchange`` with ``destination`` as the routing key.
        ``delay`` seconds: delivered then, to the queue ``destination``.
        ``expiration`` seconds: dropped (or dead-lettered) if not consumed by then."""
        table = copy.deepcopy(dict(headers or {}))
        if delay:
            table["x-delay"] = int(1000 * delay)
            exchange = ""  # RabbitMQ's "delayed" exchange routes to the queue of that name
        self._out(_Send(exchange or "", str(destination), _as_bytes(message), table, delay or None,
                        expiration or None), transaction)

    def _broadcast(self, destination: Any, message: Any, headers: Mapping[str, Any] | None = None,
                   delay: float | None = None, expiration: float | None = None, transaction: int | None = None,
                   **kwargs: Any) -> None:
        """Publish to the exchange ``destination`` (every subscriber's queue
        receives it; with none, it is dropped)."""
        if delay:
            raise ValueError("a broadcast cannot be delayed (nor with PikaTransport)")
        self._out(_Send(str(destination), "", _as_bytes(message), copy.deepcopy(dict(headers or {})),
                        expiration=expiration, mandatory=False), transaction)

    def broadcast_status(self, status: dict[str, Any]) -> None:
        """Broadcast transient status information to all listeners (``transient.status``)."""
        missing_fields = {"host", "workflows", "status"} - status.keys()
        if missing_fields:
            raise ValueError(f"Missing required field(s) for status broadcast: {', '.join(sorted(missing_fields))}")
        self._broadcast("transient.status", json.dumps(status), expiration=15)

    def _out(self, send: _Send, transaction: int | None) -> None:
        self._require_connected()
        if transaction:
            if not self.broker.exchange_exists(send.exchange):
                raise workflows.Error(f"cannot send to {send.describe()}: NOT_FOUND - no exchange {send.exchange!r} "
                                      "on the in-process broker")
            with self._lock:
                t = self._transactions.get(transaction)
                if t is None:
                    raise KeyError(f"Could not find transaction {transaction} to send in")
                t.sends.append(send)
        elif send.delay:
            self._later(send)
        else:
            self._publish(send)

    def _publish(self, send: _Send) -> None:
        message_id = None
        if send.expiration is not None:
            message_id = f"{_EXPIRING}{uuid.uuid4().hex}@{time.monotonic() + send.expiration!r}"
        try:
            self.broker.publish(send.exchange, send.routing_key, send.body, send.headers, message_id)
        except UnroutableError:
            if send.mandatory:  # RabbitMQ returns it; PikaTransport, without publisher confirms, never hears
                log.warning("no queue took a message for %s: dropped", send.describe())
            else:
                log.debug("a broadcast to %r had no subscriber: dropped", send.exchange)
        except TransportError as e:
            raise workflows.Error(f"cannot send to {send.describe()}: {e}") from e

    def _later(self, send: _Send) -> None:
        def publish() -> None:
            try:
                self._publish(send)
            except Exception:
                log.exception("a delayed message for %s could not be delivered", send.describe())

        _DELAYED.call_later(send.delay or 0, publish)

    # transactions
    def _transaction_begin(self, transaction_id: int, *, subscription_id: int | None = None, **kwargs: Any) -> None:
        """Open a transaction on the subscription's channel (its acks and
        nacks must then name it), or on the shared channel."""
        self._require_connected()
        with self._lock:
            if subscription_id and subscription_id not in self._subscriptions:
                raise KeyError(f"Could not find subscription {subscription_id} to begin transaction")
            channel = subscription_id or None
            if channel in self._channel_transaction:
                where = f"subscription {channel}" if channel else "the shared channel"
                raise KeyError(f"{where} is already running transaction {self._channel_transaction[channel]}, "
                               f"so can't start transaction {transaction_id}")
            self._channel_transaction[channel] = transaction_id
            self._transactions[transaction_id] = _Transaction(transaction_id, channel)

    def _transaction_abort(self, transaction_id: int, **kwargs: Any) -> None:
        """Forget the transaction's sends; its acks and nacks are undone: the
        deliveries are held again, to be settled later."""
        with self._lock:
            t = self._take_transaction(transaction_id, "roll back")
            for subscription, tag, delivery, _ in t.settles:
                if not subscription.cancelled:
                    subscription.unacked[tag] = delivery

    def _transaction_commit(self, transaction_id: int, **kwargs: Any) -> None:
        """Publish the transaction's sends and settle its deliveries in one
        step: no consumer of the broker sees a part of it. Delayed sends
        start their delay now."""
        with self._lock:
            t = self._take_transaction(transaction_id, "commit")
        later = [s for s in t.sends if s.delay]
        # InProcessBroker.commit acks but cannot reject, so hold the broker still
        # over the whole of it: its checks, publishes and settles are one step
        with self.broker.atomically():
            gone = [d for _, _, d, _ in t.settles if not d.live]
            if gone:
                with self._lock:
                    for subscription, tag, delivery, _ in t.settles:
                        if delivery.live and not subscription.cancelled:
                            subscription.unacked[tag] = delivery
                raise workflows.Disconnected(f"transaction {transaction_id}: {len(gone)} of its deliveries went back "
                                             "to their queue (the consumer went); nothing was committed")
            for send in t.sends:
                if not send.delay:
                    self._publish(send)
            for subscription, _, delivery, requeue in t.settles:
                self._apply(subscription, delivery, requeue)
        for send in later:
            self._later(send)

    def _take_transaction(self, transaction_id: int, what: str) -> _Transaction:
        t = self._transactions.pop(transaction_id, None)
        if t is None:
            raise KeyError(f"Could not find transaction {transaction_id} to {what}")
        del self._channel_transaction[t.channel]
        return t

    # bodies: JSON text, as PikaTransport
    @staticmethod
    def _mangle_for_sending(message: Any) -> str:
        return json.dumps(message, default=json_serializer)

    @staticmethod
    def _mangle_for_receiving(message: Any) -> Any:
        try:
            return json.loads(message)
        except (TypeError, ValueError):
            return message


def _as_bytes(message: Any) -> bytes:
    if isinstance(message, str):
        return message.encode()
    if isinstance(message, (bytes, bytearray, memoryview)):
        return bytes(message)
    raise TypeError(f"a message body must be str or bytes (send() serialises objects; raw_send() does not), "
                    f"not {type(message).__name__}")


def _dead_letter(delivery: Delivery, queue: str, reason: str) -> None:
    """Reject without requeueing: the broker dead-letters the message if its
    queue says where (else drops it), with the headers RabbitMQ adds."""
    headers = delivery.headers
    if isinstance(headers, MutableMapping):  # the broker's own copy, which goes with the message
        deaths: list[dict[str, Any]] = [dict(d) for d in headers.get("x-death", []) if isinstance(d, Mapping)]
        same: dict[str, Any] | None = next(
            (d for d in deaths if (d.get("queue"), d.get("reason")) == (queue, reason)), None)
        if same is None:
            same = {"count": 0, "reason": reason, "queue": queue, "exchange": delivery.exchange,
                    "routing-keys": [delivery.routing_key]}
        else:
            deaths.remove(same)
        same["count"] = int(same["count"]) + 1
        same["time"] = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
        headers["x-death"] = [same, *deaths]
        headers.setdefault("x-first-death-exchange", delivery.exchange)
        headers.setdefault("x-first-death-queue", queue)
        headers.setdefault("x-first-death-reason", reason)
    delivery.reject(requeue=False)


def _expired(delivery: Delivery) -> bool:
    mid = delivery.message_id
    if not mid or not mid.startswith(_EXPIRING) or "x-death" in delivery.headers:
        return False  # RabbitMQ drops the expiration of a message it dead-letters
    try:
        return time.monotonic() > float(mid.rpartition("@")[2])
    except ValueError:
        return False
