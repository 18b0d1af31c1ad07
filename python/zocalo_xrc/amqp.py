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
        key = (settings.host, settings.port, settings.username, settings.vhost, settings.tls)
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
            except _CONNECTION_ERRORS + (px.AMQPChannelError,) as e:
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
        self._pub = self._conn.channel()
        self._pub.confirm_delivery()
        self._sub = self._conn.channel()
        with self._lock:
            self.generation += 1
            subscriptions = list(self._subscriptions)
        for subscription in subscriptions:
            subscription.start(self._sub, self._conn)

    def _loop(self) -> None:
        assert self._conn is not None
        while not self._closing:
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
        conn = self._conn
        if conn is not None:
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
        properties = pika.BasicProperties(delivery_mode=2, headers=dict(headers))

        def send() -> None:
            try:
                self._pub.basic_publish(exchange, routing_key, body, properties, mandatory=True)
            except px.UnroutableError:
                raise UnroutableError(
                    f"unroutable: no queue for exchange {exchange!r} routing key {routing_key!r}"
                ) from None
            except px.NackError:
                raise PublishRefusedError(f"the broker refused the message for {exchange!r} {routing_key!r}") from None
            except px.ChannelClosedByBroker as e:
                self._pub = self._conn.channel()  # type: ignore[union-attr]
                self._pub.confirm_delivery()
                raise TransportError(f"publish to {exchange!r} {routing_key!r} refused: {e.reply_code} {e.reply_text}") from None

        if self.on_io_thread():
            future: Future[None] = Future()
            try:
                send()
                future.set_result(None)
            except TransportError as e:
                future.set_exception(e)
            return future
        return self._submit(send)

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

    def delete_queue(self, name: str) -> None:
        self._admin(lambda ch: ch.queue_delete(name))

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._stop.set()
        self._wake()
        if not self.on_io_thread():
            self._thread.join(timeout=10)


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
