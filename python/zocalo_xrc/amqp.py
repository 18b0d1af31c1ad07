"""RabbitMQ through one long-lived connection, owned by one I/O thread.

Any thread (and asyncio, through futures) may use an :class:`AmqpTransport`:
work is handed to the I/O thread, which alone touches pika. Every publish
is ``mandatory``, persistent and confirmed by the broker. When the connection
drops, the I/O thread says so in the log, reconnects with back-off and
restarts the consumers; the broker hands their unacked messages out again.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import queue
import ssl
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Mapping

import pika
import pika.exceptions as px

from .config import ConnectionSettings
from .transport import (
    Callback,
    ConnectionLostError,
    Delivery,
    PublishRefusedError,
    QueueSpec,
    Subscription,
    Transport,
    TransportError,
    UnroutableError,
)

log = logging.getLogger("zocalo_xrc.amqp")

_CONNECTION_ERRORS = (px.AMQPConnectionError, px.ConnectionClosed, px.ConnectionWrongStateError, OSError)


class AmqpTransport(Transport):
    """A RabbitMQ connection. Prefer :meth:`shared`: one per process and broker."""

    _shared: dict[tuple, AmqpTransport] = {}
    _shared_lock = threading.Lock()

    @classmethod
    def shared(cls, settings: ConnectionSettings) -> AmqpTransport:
        """The process's connection to this broker, made on first use."""
        # the password too: a wrong one must not ride on a connection made with the right one
        key = (settings.host, settings.port, settings.username, settings.password, settings.vhost, settings.tls)
        with cls._shared_lock:
            transport = cls._shared.get(key)
            if transport is None or transport._closing:
                transport = cls._shared[key] = cls(settings)
            return transport

    def __init__(
        self,
        settings: ConnectionSettings,
        *,
        connection_name: str = "zocalo-xrc",
        connect_timeout: float = 10.0,
        max_backoff: float = 5.0,
    ) -> None:
        self.settings = settings
        self._name = connection_name
        self._max_backoff = max_backoff
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_seq = itertools.count()
        self._lock = threading.Lock()
        self._subscriptions: list[_AmqpSubscription] = []
        self._conn: pika.BlockingConnection | None = None
        self._pub: Any = None
        self._sub: Any = None
        self.generation = 0
        self._closing = False
        self._wake_pending = False
        self._stop = threading.Event()
        self._first: Future[None] = Future()
        self._thread = threading.Thread(target=self._run, name=f"{connection_name} AMQP I/O", daemon=True)
        self._thread.start()
        try:
            self._first.result(timeout=connect_timeout)
        except TimeoutError:
            self.close()
            raise TransportError(f"cannot connect to {settings.url()}: no answer within {connect_timeout} s") from None
        except TransportError:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"AmqpTransport({self.settings.url()!r})"

    # ---- the I/O thread ----------------------------------------------------

    def _parameters(self) -> pika.ConnectionParameters:
        s = self.settings
        return pika.ConnectionParameters(
            host=s.host,
            port=s.port,
            virtual_host=s.vhost,
            credentials=pika.PlainCredentials(s.username, s.password.reveal()),
            heartbeat=30,
            blocked_connection_timeout=30,
            connection_attempts=1,
            socket_timeout=5,
            client_properties={"connection_name": self._name},
            ssl_options=pika.SSLOptions(ssl.create_default_context(), s.host) if s.tls else None,
        )

    def _run(self) -> None:
        backoff = 0.1
        while not self._closing:
            try:
                self._connect()
                if not self._first.done():
                    self._first.set_result(None)
                elif backoff > 0.1 or self.generation > 1:
                    log.warning("reconnected to %s", self.settings.url())
                backoff = 0.1
                self._loop()
            except Exception as e:  # any failure of a connection: try again (the thread never dies)
                reason = self._describe(e)
                self._forget_connection()
                if not self._first.done():
                    self._first.set_exception(TransportError(f"cannot connect to {self.settings.url()}: {reason}"))
                    return
                if self._closing:
                    break
                log.warning("connection to %s lost (%s); reconnecting in %.1f s", self.settings.url(), reason, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self._max_backoff)
        self._shutdown()

    def _connect(self) -> None:
        self._conn = pika.BlockingConnection(self._parameters())
        self._pub = _ConfirmingPublisher(self._conn)
        self._sub = self._conn.channel()
        with self._lock:
            self.generation += 1
            subscriptions = list(self._subscriptions)
        for subscription in subscriptions:
            subscription.start(self._sub, self._conn)

    def _loop(self) -> None:
        assert self._conn is not None
        while not self._closing:
            if self._pub.closed:
                self._pub = _ConfirmingPublisher(self._conn)
            if not self._sub.is_open:
                log.warning("the consuming channel on %s was closed; reopening it", self.settings.url())
                self._sub = self._conn.channel()
                with self._lock:
                    subscriptions = list(self._subscriptions)
                for subscription in subscriptions:
                    subscription.start(self._sub, self._conn)
            self._drain()
            self._run_timers()
            with self._lock:
                wait = min(1.0, max(0.0, self._timers[0][0] - time.monotonic())) if self._timers else 1.0
            self._conn.process_data_events(time_limit=wait)

    def _drain(self) -> None:
        self._wake_pending = False  # before reading: later commands wake us again
        while True:
            try:
                fn, future = self._commands.get_nowait()
            except queue.Empty:
                return
            if future is not None and not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn()
            except _CONNECTION_ERRORS as e:
                if future is not None:
                    future.set_exception(ConnectionLostError(f"connection lost: {self._describe(e)}"))
                raise
            except Exception as e:  # reported to whoever asked
                if future is not None:
                    future.set_exception(e)
                else:
                    log.exception("zocalo-xrc AMQP: a task on the I/O thread raised")
            else:
                if future is not None:
                    future.set_result(result)

    def _run_timers(self) -> None:
        now = time.monotonic()
        while True:
            with self._lock:
                if not self._timers or self._timers[0][0] > now:
                    return
                _, _, fn = heapq.heappop(self._timers)
            try:
                fn()
            except Exception:
                log.exception("zocalo-xrc AMQP: a timer on the I/O thread raised")

    def _forget_connection(self) -> None:
        if self._pub is not None:
            self._pub.fail_all(ConnectionLostError("the connection was lost before the broker confirmed the message"))
        conn, self._conn, self._pub, self._sub = self._conn, None, None, None
        if conn is not None and conn.is_open:
            try:
                conn.close()
            except Exception:
                pass

    def _shutdown(self) -> None:
        self._forget_connection()
        while True:  # nobody will run what is still queued
            try:
                _, future = self._commands.get_nowait()
            except queue.Empty:
                break
            if future is not None and future.set_running_or_notify_cancel():
                future.set_exception(TransportError("the connection is closed"))

    def _describe(self, e: BaseException) -> str:
        if isinstance(e, (px.ConnectionClosed, px.ChannelClosed)):
            text = f"{e.reply_code} {e.reply_text}"
        else:
            text = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        secret = self.settings.password.reveal()
        return text.replace(secret, "********") if secret else text

    # ---- handing work to the I/O thread --------------------------------------

    def on_io_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def _submit(self, fn: Callable[[], Any]) -> Future:
        future: Future = Future()
        if self._closing:
            future.set_exception(TransportError("the connection is closed"))
            return future
        self._commands.put((fn, future))
        self._wake()
        return future

    def _wake(self) -> None:
        """Make the I/O thread drain the command queue. One wake-up is enough
        for any number of commands (and each costs a GIL hand-over)."""
        conn = self._conn
        if conn is not None and not self._wake_pending:
            self._wake_pending = True
            try:
                conn.add_callback_threadsafe(lambda: None)
            except Exception:
                pass  # reconnecting: the loop drains the queue once connected

    def _call(self, fn: Callable[[], Any], timeout: float = 30.0) -> Any:
        if self.on_io_thread():
            return fn()
        return self._submit(fn).result(timeout=timeout)

    # ---- Transport -------------------------------------------------------------

    def publish(self, exchange: str, routing_key: str, body: bytes, headers: Mapping[str, Any]) -> Future[None]:
        future: Future[None] = Future()

        def send() -> None:
            if future.set_running_or_notify_cancel():
                self._pub.publish(exchange, routing_key, body, headers, future)

        if self._closing:
            future.set_exception(TransportError("the connection is closed"))
        elif self.on_io_thread() and self._pub is not None:
            send()
        else:
            self._commands.put((send, None))
            self._wake()
        return future

    def subscribe(self, queue: QueueSpec, callback: Callback, *, prefetch: int = 32) -> Subscription:
        if not queue.private and queue.name is not None and not self.queue_exists(queue.name):
            raise TransportError(f"NOT_FOUND - no queue {queue.name!r} on {self.settings.url()}")
        subscription = _AmqpSubscription(self, queue, callback, prefetch)

        def start() -> None:
            with self._lock:
                self._subscriptions.append(subscription)
            subscription.start(self._sub, self._conn)

        self._call(start)
        return subscription

    def call_soon(self, fn: Callable[[], None]) -> None:
        self.call_later(0.0, fn)

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        with self._lock:
            heapq.heappush(self._timers, (time.monotonic() + delay, next(self._timer_seq), fn))
        if not self.on_io_thread():
            self._wake()

    def _admin(self, work: Callable[[Any], Any]) -> Any:
        """Run ``work(channel)`` on a channel of its own, so that an error closes
        only that channel."""

        def run() -> Any:
            channel = self._conn.channel()  # type: ignore[union-attr]
            try:
                return work(channel)
            finally:
                if channel.is_open:
                    channel.close()

        return self._call(run)

    def declare_results_queue(self, name: str, *, exchange: str = "results", routing_key: str | None = None) -> None:
        def declare(ch: Any) -> None:
            ch.exchange_declare(exchange, exchange_type="topic", durable=True)
            ch.queue_declare(f"dlq.{name}", durable=True, arguments={"x-queue-type": "quorum"})
            ch.queue_declare(name, durable=True, arguments={
                "x-queue-type": "quorum",
                "x-delivery-limit": 5,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": f"dlq.{name}",
            })
            ch.queue_bind(name, exchange, routing_key=routing_key or name)

        self._admin(declare)

    def declare_queue(self, name: str) -> None:
        self._admin(lambda ch: ch.queue_declare(name, durable=True))

    def queue_exists(self, name: str) -> bool:
        def check(ch: Any) -> bool:
            try:
                ch.queue_declare(name, passive=True)
                return True
            except px.ChannelClosedByBroker as e:
                if e.reply_code == 404:
                    return False
                raise

        return self._admin(check)

    def message_count(self, name: str) -> int:
        return self._admin(lambda ch: ch.queue_declare(name, passive=True).method.message_count)

    def consumer_count(self, name: str) -> int:
        return self._admin(lambda ch: ch.queue_declare(name, passive=True).method.consumer_count)

    def delete_queue(self, name: str) -> None:
        self._admin(lambda ch: ch.queue_delete(name))

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._stop.set()
        self._wake_pending = False
        self._wake()
        if not self.on_io_thread():
            self._thread.join(timeout=10)


class _ConfirmingPublisher:
    """Publisher confirms without waiting: many messages may be in flight, and
    each one's future is settled by the broker's ack, nack or return.

    pika's BlockingChannel can only wait for one confirm at a time, so this
    drives the asynchronous channel inside it (``_impl``), whose callbacks run
    while the I/O thread pumps ``process_data_events``. A ``basic.return``
    names no delivery tag, so each message carries its tag as ``message_id``."""

    def __init__(self, conn: pika.BlockingConnection) -> None:
        self._blocking = conn.channel()
        self._channel = self._blocking._impl
        self._pending: dict[int, tuple[Future[None], str, str]] = {}
        self._returned: dict[int, str] = {}
        self._seq = 0
        self.closed = False
        ready: list[bool] = []
        self._channel.add_on_return_callback(self._on_return)
        self._channel.add_on_close_callback(self._on_close)
        self._channel.confirm_delivery(ack_nack_callback=self._on_confirm, callback=lambda _: ready.append(True))
        deadline = time.monotonic() + 10
        while not ready:
            if time.monotonic() > deadline:
                raise px.AMQPConnectionError("no Confirm.SelectOk from the broker")
            conn.process_data_events(time_limit=0.1)

    def publish(self, exchange: str, routing_key: str, body: bytes, headers: Mapping[str, Any], future: Future[None]) -> None:
        if self.closed:
            future.set_exception(ConnectionLostError("the publishing channel is closed"))
            return
        self._seq += 1
        self._pending[self._seq] = (future, exchange, routing_key)
        properties = pika.BasicProperties(delivery_mode=2, headers=dict(headers), message_id=f"zocalo-xrc-{self._seq}")
        self._channel.basic_publish(exchange, routing_key, body, properties, mandatory=True)

    def _on_return(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        tag = (properties.message_id or "").rpartition("-")[2]
        if tag.isdigit():
            self._returned[int(tag)] = f"{method.reply_code} {method.reply_text}"

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        tags = [t for t in self._pending if t <= method.delivery_tag] if method.multiple else [method.delivery_tag]
        refused = isinstance(method, pika.spec.Basic.Nack)
        for tag in tags:
            entry = self._pending.pop(tag, None)
            if entry is None:
                continue
            future, exchange, routing_key = entry
            returned = self._returned.pop(tag, None)
            if returned is not None:
                future.set_exception(UnroutableError(
                    f"unroutable: no queue for exchange {exchange!r} routing key {routing_key!r} ({returned})"
                ))
            elif refused:
                future.set_exception(PublishRefusedError(f"the broker refused the message for {exchange!r} {routing_key!r}"))
            else:
                future.set_result(None)

    def _on_close(self, channel: Any, reason: Exception) -> None:
        self.closed = True
        text = f"{reason.reply_code} {reason.reply_text}" if isinstance(reason, px.ChannelClosed) else str(reason)
        self.fail_all(TransportError(f"the broker closed the publishing channel: {text}"))

    def fail_all(self, error: Exception) -> None:
        pending, self._pending = self._pending, {}
        for future, _, _ in pending.values():
            if not future.done():
                future.set_exception(error)


class _AmqpSubscription(Subscription):
    def __init__(self, transport: AmqpTransport, spec: QueueSpec, callback: Callback, prefetch: int) -> None:
        self.transport, self.spec, self.callback, self.prefetch = transport, spec, callback, prefetch
        self.channel: Any = None
        self.tag: str | None = None
        self.outstanding: set[int] = set()
        self.cancelled = False

    def start(self, channel: Any, conn: pika.BlockingConnection) -> None:
        """(Re)start consuming on ``channel``: on the I/O thread only."""
        self.channel, self.outstanding = channel, set()
        name = self.spec.name
        if self.spec.private:
            name = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
            channel.queue_bind(name, self.spec.exchange, routing_key=self.spec.routing_key)
        channel.basic_qos(prefetch_count=self.prefetch)
        self.tag = channel.basic_consume(name, self._on_message, auto_ack=False)

    def _on_message(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        delivery = _AmqpDelivery(self, self.transport.generation, method, properties, body)
        self.outstanding.add(method.delivery_tag)
        try:
            self.callback(delivery)
        except Exception:
            log.exception("consumer of %s raised; the message is rejected, not requeued", self.spec.name or "private queue")
            delivery.reject(requeue=False)

    def settle(self, generation: int, tag: int, requeue: bool | None) -> None:
        def run() -> None:
            if generation != self.transport.generation or tag not in self.outstanding:
                log.debug("delivery %s is from a lost connection: the broker delivers it again", tag)
                return
            self.outstanding.discard(tag)
            if requeue is None:
                self.channel.basic_ack(tag)
            else:
                self.channel.basic_reject(tag, requeue=requeue)

        if self.transport.on_io_thread():
            run()
        else:
            self.transport._submit(run)

    def cancel(self) -> None:
        def run() -> None:
            with self.transport._lock:
                if self in self.transport._subscriptions:
                    self.transport._subscriptions.remove(self)
            if self.channel is not None and self.channel.is_open and self.tag is not None:
                for tag in sorted(self.outstanding):
                    self.channel.basic_reject(tag, requeue=True)
                self.outstanding.clear()
                self.channel.basic_cancel(self.tag)

        if not self.cancelled:
            self.cancelled = True
            if not self.transport._closing:  # a closed connection consumes nothing
                self.transport._call(run)


class _AmqpDelivery(Delivery):
    def __init__(self, subscription: _AmqpSubscription, generation: int, method: Any, properties: Any, body: bytes) -> None:
        self._subscription, self._generation, self._tag = subscription, generation, method.delivery_tag
        self.body = body
        self.headers = properties.headers or {}
        self.exchange, self.routing_key, self.redelivered = method.exchange, method.routing_key, method.redelivered

    def ack(self) -> None:
        self._subscription.settle(self._generation, self._tag, None)

    def reject(self, requeue: bool = False) -> None:
        self._subscription.settle(self._generation, self._tag, requeue)
