"""RabbitMQ through one long-lived connection, owned by one I/O thread.

Any thread (and asyncio, through futures) may use an :class:`AmqpTransport`:
work is handed to the I/O thread, which alone touches pika, and nothing a
caller does waits for the connection except through a future it can give up
on. Every publish is ``mandatory``, persistent and confirmed by the broker.

The I/O thread never dies while the transport is open: every failure of a
connection attempt, of whatever kind (refused, a handshake that never comes,
a wrong password, a broker going away), leads to another attempt with
back-off, one WARNING line each, and consumers are restarted on the new
connection; the broker hands their unacked messages out again. Work handed
over meanwhile waits for the connection, and is withdrawn, never sent, if
its caller gives up first.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import queue
import socket
import ssl
import threading
import time
from collections import deque
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Callable, Mapping, Sequence

import pika
import pika.exceptions as px
from pika.adapters.utils import connection_workflow as cw

from .config import ConnectionSettings
from .base import (
    Callback,
    ConnectionLostError,
    Delivery,
    Outgoing,
    PublishRefusedError,
    QueueSpec,
    Subscription,
    Transport,
    TransportError,
    UnroutableError,
    new_message_id,
    shard_exchange,
    shard_queue,
)

log = logging.getLogger(__name__)

#: Diamond's RabbitMQ policies (python-zocalo's snapshot of its configuration,
#: ``contrib/rabbitmq-configuration.yaml``), given here as the arguments of the
#: queues this transport declares: ``redelivery``, a delivery limit of 5 on
#: every queue; ``ttl``, on every ``^xrc.*`` queue, a message TTL of 60 s too
#: (a result nobody took within a minute is stale: it expires, to ``dlq.<queue>``).
DELIVERY_LIMIT = 5
XRC_MESSAGE_TTL_MS = 60_000


def policy_arguments(queue: str) -> dict[str, Any]:
    """The queue arguments Diamond's policies give the queue named ``queue``."""
    arguments: dict[str, Any] = {"x-delivery-limit": DELIVERY_LIMIT}
    if queue.startswith("xrc"):  # the ttl policy's pattern, ^xrc.*
        arguments["x-message-ttl"] = XRC_MESSAGE_TTL_MS
    return arguments


_CONNECTION_ERRORS = (px.AMQPConnectionError, px.ConnectionClosed, px.ConnectionWrongStateError, OSError)
_REFUSED_CREDENTIALS = (px.ProbableAuthenticationError, px.AuthenticationError, px.ProbableAccessDeniedError)


class _PikaLogFilter(logging.Filter):
    """pika logs each failed connection attempt as several ERROR records with
    tracebacks (and an expected 404 of a queue check as a WARNING); the
    transport says what matters in one WARNING line of its own. pika's
    records stay visible at DEBUG (of ``zocalo_xrc.messaging.rabbitmq``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING or log.isEnabledFor(logging.DEBUG)


def _quiet_pika() -> None:
    """A filter on every pika logger (a logger's filters see only its own records)."""
    for name in [n for n in logging.root.manager.loggerDict if n == "pika" or n.startswith("pika.")]:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _PikaLogFilter) for f in logger.filters):
            logger.addFilter(_PikaLogFilter())


_quiet_pika()


def describe_error(e: BaseException, handshake_timeout: float | None = None) -> str:
    """What went wrong with a connection, in words (no password is ever in
    what pika says, but callers scrub anyway)."""
    if isinstance(e, _REFUSED_CREDENTIALS):
        return "ACCESS_REFUSED: the broker refused the user name or password (or the vhost)"
    if isinstance(e, (px.ConnectionClosed, px.ChannelClosed)):
        return f"{e.reply_code} {e.reply_text}"
    if isinstance(e, px.IncompatibleProtocolError):
        return "the server closed the connection during the AMQP handshake (not RabbitMQ, or the wrong port?)"
    if isinstance(e, px.StreamLostError):
        return "the other side closed the connection"
    if isinstance(e, cw.AMQPConnectorStackTimeout):
        within = f" within {handshake_timeout:g} s" if handshake_timeout else ""
        return f"the port accepted the connection but no AMQP handshake came{within}"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused (is RabbitMQ running there?)"
    if isinstance(e, socket.gaierror):
        return f"cannot resolve the host name ({e.strerror})"
    if isinstance(e, (socket.timeout, TimeoutError)):
        return "no answer: the TCP connection timed out"
    inner = [a for a in getattr(e, "args", ()) if isinstance(a, BaseException)]
    inner += getattr(e, "exceptions", None) or []
    inner += [x for x in (getattr(e, "exception", None),) if isinstance(x, BaseException)]
    if inner:
        return describe_error(inner[-1], handshake_timeout)
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


class AmqpTransport(Transport):
    """A RabbitMQ connection. Prefer :meth:`shared`: one per process, broker
    and credentials.

    ``connect_timeout``: wait that long for the first connection and raise
    :class:`TransportError` if it fails (the transport is then closed);
    ``None`` returns at once and keeps trying in the background."""

    _shared: dict[tuple[Any, ...], AmqpTransport] = {}
    _shared_lock = threading.Lock()

    @classmethod
    def shared(cls, settings: ConnectionSettings) -> AmqpTransport:
        """The process's connection to this broker, made on first use; never blocks."""
        # the password too: a wrong one must not ride on a connection made with the right one
        key = (settings.host, settings.port, settings.username, settings.password, settings.vhost, settings.tls)
        with cls._shared_lock:
            transport = cls._shared.get(key)
            if transport is None or transport._closing:
                transport = cls._shared[key] = cls(settings, connect_timeout=None)
            return transport

    @classmethod
    def close_shared(cls) -> None:
        """Close every connection :meth:`shared` made (before their broker
        goes, say, so that none keeps trying to reach it); the next
        :meth:`shared` makes a new one."""
        with cls._shared_lock:
            transports, cls._shared = list(cls._shared.values()), {}
        for transport in transports:
            transport.close()

    def __init__(
        self,
        settings: ConnectionSettings,
        *,
        connection_name: str = "zocalo-xrc",
        connect_timeout: float | None = 10.0,
        handshake_timeout: float = 10.0,
        max_backoff: float = 5.0,
    ) -> None:
        self.settings = settings
        self._name = connection_name
        self._handshake_timeout = handshake_timeout
        self._max_backoff = max_backoff
        self._commands: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any], bool]] = queue.SimpleQueue()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_seq = itertools.count()
        self._lock = threading.Lock()
        self._subscriptions: list[_AmqpSubscription] = []
        self._conn: pika.BlockingConnection | None = None
        self._pub: _ConfirmingPublisher | None = None
        self._sub: Any = None
        self.generation = 0
        self.connected = threading.Event()
        self.last_error: str | None = None
        self._credentials_refused = False
        self._closing = False
        self._wake_pending = False
        self._stop = threading.Event()
        self._give_up_first = connect_timeout is not None
        self._first: Future[None] = Future()
        self._thread = threading.Thread(target=self._run, name=f"{connection_name} AMQP I/O", daemon=True)
        self._thread.start()
        if connect_timeout is None:
            return
        try:
            self._first.result(timeout=connect_timeout)
        except FutureTimeout:
            self.close()
            raise TransportError(f"cannot connect to {settings.url()}: no answer within {connect_timeout} s") from None
        except TransportError:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"AmqpTransport({self.settings.url()!r})"

    @property
    def endpoint(self) -> Any:
        return ("amqp", self.settings.host, self.settings.port, self.settings.vhost)

    @property
    def credentials_refused(self) -> bool:
        """The last attempt was refused its user name or password (or vhost): waiting will not help."""
        return self._credentials_refused

    def trouble(self) -> str | None:
        if self.connected.is_set():
            return None
        return f"not connected to {self.settings.url()}: {self.last_error or 'connecting'}"

    def wait_connected(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.connected.wait(min(0.1, max(0.0, deadline - time.monotonic()))):
            if self._credentials_refused or self._closing or time.monotonic() >= deadline:
                raise TransportError(f"cannot connect to {self.settings.url()}: {self.last_error or 'no answer yet (the first attempt is still waiting for the broker)'}"
                                     f"{'' if self._credentials_refused else f' (gave up after {timeout:g} s)'}")

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
            stack_timeout=self._handshake_timeout,
            client_properties={"connection_name": self._name},
            ssl_options=pika.SSLOptions(ssl.create_default_context(), s.host) if s.tls else None,
        )

    def _run(self) -> None:
        backoff = 0.1
        while not self._closing:
            try:
                self._connect()
            except Exception as e:  # any failure of an attempt: another one, with back-off
                reason = self._describe(e)
                self._forget_connection()
                self.last_error = reason
                if self._give_up_first and not self._first.done():
                    self._first.set_exception(TransportError(f"cannot connect to {self.settings.url()}: {reason}"))
                    break
                self._credentials_refused = isinstance(e, _REFUSED_CREDENTIALS)
                if self._credentials_refused:  # waiting will not help whoever waits now
                    self._fail_queued(TransportError(f"cannot connect to {self.settings.url()}: {reason}"))
                if self._closing:
                    break
                log.warning("cannot connect to %s (%s); trying again in %.1f s", self.settings.url(), reason, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self._max_backoff)
                continue
            if self.generation > 1 or self.last_error is not None:
                log.warning("connected to %s again", self.settings.url())
            self.last_error, self._credentials_refused = None, False
            self.connected.set()
            if not self._first.done():
                self._first.set_result(None)
            backoff = 0.1
            try:
                self._loop()
            except Exception as e:
                reason = self._describe(e)
                self.connected.clear()
                self._forget_connection()
                if self._closing:
                    break
                self.last_error = reason
                log.warning("connection to %s lost (%s); reconnecting in %.1f s", self.settings.url(), reason, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self._max_backoff)
        self.connected.clear()
        self._shutdown()

    def _connect(self) -> None:
        self._conn = pika.BlockingConnection(self._parameters())
        self._pub = _ConfirmingPublisher(self._conn)
        self._sub = self._conn.channel()
        with self._lock:
            self.generation += 1
            subscriptions = list(self._subscriptions)
        for subscription in subscriptions:
            subscription.start()

    def _loop(self) -> None:
        assert self._conn is not None and self._pub is not None
        while not self._closing:
            if self._pub.closed:
                self._pub = _ConfirmingPublisher(self._conn)
            with self._lock:
                subscriptions = list(self._subscriptions)
            if not self._sub.is_open:
                log.warning("the consuming channel on %s was closed; reopening it", self.settings.url())
                self._sub = self._conn.channel()
                for subscription in subscriptions:
                    subscription.start()
            for subscription in subscriptions:
                if subscription.atomic and subscription.channel is not None and not subscription.channel.is_open:
                    log.warning("the channel of atomic consumer %s was closed; reopening it", subscription.spec.name)
                    subscription.start()
            self._drain()
            self._run_timers()
            with self._lock:
                wait = min(1.0, max(0.0, self._timers[0][0] - time.monotonic())) if self._timers else 1.0
            self._conn.process_data_events(time_limit=wait)

    def _drain(self) -> None:
        self._wake_pending = False  # before reading: later commands wake us again
        while True:
            try:
                fn, future, settles_itself = self._commands.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue  # its caller gave up: withdrawn, never done
            try:
                result = fn()
            except _CONNECTION_ERRORS as e:
                if not future.done():
                    future.set_exception(ConnectionLostError(f"connection lost: {self._describe(e)}"))
                raise
            except Exception as e:  # reported to whoever asked
                if not future.done():
                    future.set_exception(e)
            else:
                if not settles_itself:
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
        self.connected.clear()
        if self._pub is not None:
            self._pub.fail_all()
        with self._lock:
            subscriptions = list(self._subscriptions)
        for subscription in subscriptions:
            subscription.fail_commits("the connection was lost")
        conn, self._conn, self._pub, self._sub = self._conn, None, None, None
        if conn is not None and conn.is_open:
            try:
                conn.close()
            except Exception:
                pass

    def _fail_queued(self, error: Exception) -> None:
        """Fail everything waiting for a connection (it is withdrawn, never done)."""
        while True:
            try:
                _, future, _ = self._commands.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                future.set_exception(error)

    def _shutdown(self) -> None:
        self._forget_connection()
        self._fail_queued(TransportError("the connection is closed"))

    def _describe(self, e: BaseException) -> str:
        text = describe_error(e, self._handshake_timeout)
        secret = self.settings.password.reveal()
        return text.replace(secret, "********") if secret else text

    # ---- handing work to the I/O thread --------------------------------------

    def on_io_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def _submit(self, fn: Callable[[], Any], future: Future[Any] | None = None, settles_itself: bool = False) -> Future[Any]:
        """Queue ``fn`` for the I/O thread; its result (or error) goes to
        ``future``, unless ``fn`` settles the future itself later. Cancelling
        the future before the I/O thread takes it withdraws ``fn``."""
        future = Future() if future is None else future
        if self._closing:
            future.set_exception(TransportError("the connection is closed"))
            return future
        self._commands.put((fn, future, settles_itself))
        self._wake()
        if self._closing and not self._thread.is_alive():  # closed meanwhile: nobody will take it
            self._fail_queued(TransportError("the connection is closed"))
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
        future = self._submit(fn)
        try:
            return future.result(timeout=timeout)
        except FutureTimeout:
            future.cancel()
            raise TransportError(f"{self.trouble() or 'the broker did not answer'} (gave up after {timeout} s)") from None

    # ---- Transport -------------------------------------------------------------

    def publish(self, exchange: str, routing_key: str, body: bytes, headers: Mapping[str, Any],
                message_id: str | None = None) -> Future[None]:
        future: Future[None] = Future()
        mid = message_id or new_message_id()

        def send() -> None:
            assert self._pub is not None
            self._pub.publish(exchange, routing_key, body, headers, mid, future)

        if self.on_io_thread() and self._pub is not None and not self._closing:
            if future.set_running_or_notify_cancel():
                send()
            return future
        return self._submit(send, future, settles_itself=True)

    def subscribe(self, queue: QueueSpec, callback: Callback, *, prefetch: int = 32,
                  wait: float | None = 30.0, atomic: bool = False) -> Subscription:
        subscription = _AmqpSubscription(self, queue, callback, prefetch, atomic)
        with self._lock:
            self._subscriptions.append(subscription)
        self._submit(subscription.start)
        if wait is not None:
            try:
                subscription.ready.result(timeout=wait)
            except FutureTimeout:
                subscription.cancel()
                raise TransportError(f"cannot consume {queue.name or 'a private queue'}: "
                                     f"{self.trouble() or 'no answer'} (gave up after {wait} s)") from None
        return subscription

    def call_soon(self, fn: Callable[[], None]) -> None:
        self.call_later(0.0, fn)

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        with self._lock:
            heapq.heappush(self._timers, (time.monotonic() + delay, next(self._timer_seq), fn))
        # on the I/O thread too: from inside pika's own callbacks (commit-ok, an atomic consumer's
        # delivery) process_data_events would otherwise block until its time limit
        self._wake()

    def _admin(self, work: Callable[[Any], Any]) -> Any:
        """Run ``work(channel)`` on a channel of its own, so that an error closes
        only that channel."""
        return self._call(lambda: self._on_admin_channel(work))

    def _on_admin_channel(self, work: Callable[[Any], Any]) -> Any:
        assert self._conn is not None
        channel = self._conn.channel()
        try:
            return work(channel)
        finally:
            if channel.is_open:
                channel.close()

    def _declare_results_queue(self, ch: Any, name: str, exchange: str, routing_key: str) -> None:
        ch.exchange_declare(exchange, exchange_type="topic", durable=True)
        if not self._exists(name):  # one there already is left as it is (its arguments may be older ones)
            ch.queue_declare(f"dlq.{name}", durable=True, arguments={"x-queue-type": "quorum"})
            ch.queue_declare(name, durable=True, arguments={
                "x-queue-type": "quorum",
                **policy_arguments(name),
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": f"dlq.{name}",
            })
        ch.queue_bind(name, exchange, routing_key=routing_key)

    def declare_results_queue(self, name: str, *, exchange: str = "results", routing_key: str | None = None) -> None:
        self._admin(lambda ch: self._declare_results_queue(ch, name, exchange, routing_key or name))

    def declare_queue(self, name: str) -> None:
        self._admin(lambda ch: ch.queue_declare(name, durable=True))

    def declare_broadcast(self, name: str) -> None:
        self._admin(lambda ch: ch.exchange_declare(name, exchange_type="fanout", durable=True))

    @staticmethod
    def _declare_work_queue(ch: Any, name: str, dead_letters: str, shared: bool = False) -> None:
        ch.queue_declare(f"dlq.{dead_letters}", durable=True, arguments={"x-queue-type": "quorum"})
        ch.queue_declare(name, durable=True, arguments={
            "x-queue-type": "quorum",
            "x-single-active-consumer": not shared,
            **policy_arguments(name),
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": f"dlq.{dead_letters}",
        })

    def declare_work_queue(self, name: str, *, shared: bool = False) -> None:
        self._admin(lambda ch: self._declare_work_queue(ch, name, name, shared))

    def declare_shards(self, name: str, count: int) -> None:
        def declare(ch: Any) -> None:
            try:
                ch.exchange_declare(shard_exchange(name), exchange_type="x-consistent-hash", durable=True)
            except px.ChannelClosedByBroker as e:
                if e.reply_code == 503:  # COMMAND_INVALID: an exchange type the broker does not know
                    raise TransportError(
                        f"{self.settings.url()} has no consistent-hash exchange; enable its plugin there: "
                        "rabbitmq-plugins enable rabbitmq_consistent_hash_exchange") from None
                raise
            for k in range(count):
                self._declare_work_queue(ch, shard_queue(name, k), name)
                ch.queue_bind(shard_queue(name, k), shard_exchange(name), routing_key="1")  # weight 1

        self._admin(declare)

    def _exists(self, name: str) -> bool:
        """On the I/O thread: whether ``name`` exists (a channel of its own)."""

        def check(ch: Any) -> bool:
            try:
                ch.queue_declare(name, passive=True)
                return True
            except px.ChannelClosedByBroker as e:
                if e.reply_code == 404:
                    return False
                raise

        return bool(self._on_admin_channel(check))

    def queue_exists(self, name: str) -> bool:
        return bool(self._call(lambda: self._exists(name)))

    def message_count(self, name: str) -> int:
        return int(self._admin(lambda ch: ch.queue_declare(name, passive=True).method.message_count))

    def consumer_count(self, name: str) -> int:
        return int(self._admin(lambda ch: ch.queue_declare(name, passive=True).method.consumer_count))

    def delete_queue(self, name: str) -> None:
        self._admin(lambda ch: ch.queue_delete(name))

    def purge_queue(self, name: str) -> int:
        return int(self._admin(lambda ch: ch.queue_purge(name).method.message_count))

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._stop.set()
        self._wake_pending = False
        self._wake()
        if not self.on_io_thread():
            self._thread.join(timeout=2)  # a connection attempt in progress may take longer: it is a daemon


class _ConfirmingPublisher:
    """Publisher confirms without waiting: many messages may be in flight, and
    each one's future is settled by the broker's ack, nack or return.

    pika's BlockingChannel can only wait for one confirm at a time, so this
    drives the asynchronous channel inside it (``_impl``), whose callbacks run
    while the I/O thread pumps ``process_data_events``. A ``basic.return``
    names no delivery tag, only the message: returns come in the order of
    publishing, so the oldest message in flight with that ``message_id`` is
    the one returned."""

    def __init__(self, conn: pika.BlockingConnection) -> None:
        self._blocking = conn.channel()
        self._channel = _async_channel(self._blocking)
        self._pending: dict[int, tuple[Future[None], str, str, str]] = {}
        self._by_id: dict[str, deque[int]] = {}
        self._returned: dict[int, str] = {}
        self._seq = 0
        self.closed = False
        self._channel.add_on_return_callback(self._on_return)
        self._channel.add_on_close_callback(self._on_close)
        _select_confirms(conn, self._channel, self._on_confirm)

    def publish(self, exchange: str, routing_key: str, body: bytes, headers: Mapping[str, Any], message_id: str,
                future: Future[None]) -> None:
        if self.closed:
            future.set_exception(ConnectionLostError(f"the publishing channel is closed; message {message_id} was not sent"))
            return
        properties = pika.BasicProperties(delivery_mode=2, headers=dict(headers), message_id=message_id)
        try:
            self._channel.basic_publish(exchange, routing_key, body, properties, mandatory=True)
        except _CONNECTION_ERRORS:
            raise
        except Exception as e:  # not sent (it could not be encoded): no delivery tag was used
            future.set_exception(TransportError(f"cannot publish message {message_id}: {e}"))
            return
        self._seq += 1  # the broker numbers what was sent, so count only that
        self._pending[self._seq] = (future, exchange, routing_key, message_id)
        self._by_id.setdefault(message_id, deque()).append(self._seq)

    def _on_return(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        tags = self._by_id.get(properties.message_id or "")
        tag = next((t for t in tags or () if t not in self._returned), None)  # the oldest not yet returned
        if tag is not None:
            self._returned[tag] = f"{method.reply_code} {method.reply_text}"

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        tags = [t for t in self._pending if t <= method.delivery_tag] if method.multiple else [method.delivery_tag]
        refused = isinstance(method, pika.spec.Basic.Nack)
        for tag in tags:
            entry = self._pending.pop(tag, None)
            if entry is None:
                continue
            future, exchange, routing_key, message_id = entry
            in_flight = self._by_id.get(message_id)
            if in_flight is not None:
                in_flight.remove(tag)
                if not in_flight:
                    del self._by_id[message_id]
            returned = self._returned.pop(tag, None)
            if future.done():
                continue
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
        self.fail_all(f"the broker closed the publishing channel ({text})")

    def fail_all(self, why: str = "the connection was lost") -> None:
        """Every message in flight: unconfirmed, perhaps delivered, perhaps not."""
        pending, self._pending, self._by_id = self._pending, {}, {}
        for future, _, _, message_id in pending.values():
            if not future.done():
                future.set_exception(ConnectionLostError(
                    f"{why} before the broker confirmed message {message_id}: it may or may not have arrived"
                ))


class _AmqpSubscription(Subscription):
    """A consumer. Plain ones share the transport's consuming channel; an
    atomic one has a channel of its own in confirm mode, where a commit
    publishes, waits for the broker to confirm every message, and only then
    acks. Not a transaction: RabbitMQ does not make one atomic across
    queues (a client killed between ``tx.commit`` and its answer can have
    its acks applied and some publishes to quorum queues dropped: 3.10,
    measured), while a confirmed message is in its queue. A client killed
    after the confirms and before the acks has published and acked
    nothing: its deliveries come again, so a consumer makes a repeat
    harmless. Commits on one subscription go one at a time, and its other
    acks and rejects wait for the commit in flight. An atomic one's
    callback is called as its frames are read (no event queue between, for
    speed), so it must not wait on the broker itself; it hands such work
    to futures."""

    def __init__(self, transport: AmqpTransport, spec: QueueSpec, callback: Callback, prefetch: int,
                 atomic: bool = False) -> None:
        self.transport, self.spec, self.callback, self.prefetch, self.atomic = transport, spec, callback, prefetch, atomic
        self.channel: Any = None
        self.tag: str | None = None
        self.outstanding: set[int] = set()
        self.arrived: deque[int] = deque()  # delivery tags in order of arrival (ascending), settled ones left behind
        self.cancelled = False
        self.epoch = 0  # one per start: delivery tags restart on each channel
        self.ready: Future[None] = Future()
        # atomic only: the commit waiting for its confirms (one at a time), what it acks, what came back of it
        self.commits: deque[_Commit] = deque()
        self.published = 0  # publishes on this channel: the broker's confirms number them
        # acks and rejects wait for the commit in flight (a multiple ack must not run ahead of its confirms)
        self.deferred: deque[Callable[[], None]] = deque()

    def start(self) -> None:
        """(Re)start consuming on the transport's consuming channel (a channel
        of its own if atomic): on the I/O thread only, at each connection.
        Declarations and checks go on a channel of their own, so that a
        missing queue closes only that one."""
        if self.cancelled:
            return
        t = self.transport
        if self.tag is not None and self.channel is not None and self.channel.is_open and (
                self.atomic or self.channel is t._sub):
            return  # started already on this channel (subscribed while connecting)
        try:
            name = self.spec.name
            if self.spec.private:
                name = t._on_admin_channel(lambda ch: self._private_queue(ch))
            elif name is not None and not t._exists(name):
                if not self.spec.declare:
                    raise TransportError(f"NOT_FOUND - no queue {name!r} on {t.settings.url()}")
                t._on_admin_channel(lambda ch: t._declare_results_queue(
                    ch, name, self.spec.exchange or "results", self.spec.routing_key or name))
            self.fail_commits("the channel was replaced")
            if self.atomic:
                assert t._conn is not None
                channel = t._conn.channel()
                inner = _async_channel(channel)
                _select_confirms(t._conn, inner, self._on_confirm)
                self.published = 0
                inner.add_on_return_callback(self._on_return)
                inner.add_on_close_callback(lambda _ch, reason: self.fail_commits(f"the channel closed ({reason})"))
            else:
                channel = t._sub
            self.channel, self.outstanding, self.arrived, self.tag = channel, set(), deque(), None
            self.epoch += 1
            self.channel.basic_qos(prefetch_count=self.prefetch)
            if self.atomic:  # its own channel: deliveries straight from the frames, no queue of events between
                self.tag = self.channel._impl.basic_consume(name, self._on_message, auto_ack=False)
            else:
                self.tag = self.channel.basic_consume(name, self._on_message, auto_ack=False)
            if self.cancelled:  # cancelled while starting
                self.channel._impl.basic_cancel(self.tag) if self.atomic else self.channel.basic_cancel(self.tag)
        except _CONNECTION_ERRORS:
            raise  # the connection is going: the next one starts this again
        except Exception as e:
            error = e if isinstance(e, TransportError) else TransportError(f"cannot consume: {t._describe(e)}")
            if not self.ready.done():
                self.ready.set_exception(error)
                with t._lock:
                    if self in t._subscriptions:
                        t._subscriptions.remove(self)
            else:
                log.error("cannot consume %s again after reconnecting: %s", self.spec.name, error)
            return
        if not self.ready.done():
            self.ready.set_result(None)

    def _private_queue(self, ch: Any) -> str:
        name: str = ch.queue_declare("", exclusive=True, auto_delete=True).method.queue
        ch.exchange_declare(self.spec.exchange, exchange_type="topic", durable=True)
        ch.queue_bind(name, self.spec.exchange, routing_key=self.spec.routing_key)
        return name

    def _on_message(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        if self.cancelled:  # in flight as the consumer was cancelled: back to the queue, for whoever consumes next
            if not self.atomic:  # its channel stays open: hand it back now
                channel.basic_reject(method.delivery_tag, requeue=True)
            # an atomic one's channel is closing, which hands it back with the rest, once: rejected here, it came
            # straight back to this consumer (still the queue's single active one) and hit the delivery limit
            return
        delivery = _AmqpDelivery(self, self.epoch, method, properties, body)
        self.outstanding.add(method.delivery_tag)
        self.arrived.append(method.delivery_tag)
        try:
            self.callback(delivery)
        except Exception:
            log.exception("consumer of %s raised; the message is rejected, not requeued", self.spec.name or "private queue")
            delivery.reject(requeue=False)

    def live(self, epoch: int, tag: int) -> bool:
        return not self.cancelled and epoch == self.epoch and tag in self.outstanding

    def settle(self, epoch: int, tag: int, requeue: bool | None) -> None:
        def run() -> None:
            if epoch != self.epoch or tag not in self.outstanding or not self.channel.is_open:
                log.debug("delivery %s is from a lost channel: the broker delivers it again", tag)
                return
            self.outstanding.discard(tag)
            # the asynchronous channel: a frame queued, not a flush of the socket per message
            if requeue is None:
                self.channel._impl.basic_ack(tag)
            else:
                self.channel._impl.basic_reject(tag, requeue=requeue)

        self._on_channel(run)

    def _on_channel(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the I/O thread, after the commit in flight if any."""
        def now_or_after_commit() -> None:
            if self.commits or self.deferred:
                self.deferred.append(fn)
            else:
                fn()

        if self.transport.on_io_thread():
            now_or_after_commit()
        else:
            self.transport._submit(now_or_after_commit)

    def _run_deferred(self) -> None:
        while self.deferred and not self.commits:
            self.deferred.popleft()()

    def commit(self, messages: Sequence[Outgoing], acks: Sequence[Delivery]) -> Future[list[Outgoing]]:
        if not self.atomic:
            return super().commit(messages, acks)
        future: Future[list[Outgoing]] = Future()
        self._on_channel(lambda: self._commit(messages, acks, future))
        return future

    def _oldest(self) -> int | None:
        """The oldest delivery tag still held (a multiple ack must stop below it)."""
        while self.arrived and self.arrived[0] not in self.outstanding:
            self.arrived.popleft()
        return self.arrived[0] if self.arrived else None

    def _commit(self, messages: Sequence[Outgoing], acks: Sequence[Delivery], future: Future[list[Outgoing]]) -> None:
        """On the I/O thread: publish; once the broker has confirmed all of
        it (at once if nothing is published), ack."""
        channel = self.channel
        if channel is None or not channel.is_open:
            future.set_exception(ConnectionLostError("the subscription's channel is closed; nothing was committed"))
            return
        epoch = self.epoch
        tags = {d._tag for d in acks if type(d) is _AmqpDelivery and d._subscription is self and d._epoch == epoch}
        if len(tags) != len(acks) and not all(isinstance(d, _AmqpDelivery) and d._subscription is self for d in acks):
            future.set_exception(TransportError("commit: every delivery to ack must come from this subscription"))
            return
        if len(tags) != len(acks) or not tags <= self.outstanding:
            future.set_exception(ConnectionLostError(
                "some deliveries are from a lost channel (the broker delivers them again); nothing was committed"))
            return
        commit = _Commit(future, messages, tags)
        for m in messages:
            properties = pika.BasicProperties(delivery_mode=2, headers=dict(m.headers),
                                              message_id=m.message_id or new_message_id())
            channel._impl.basic_publish(m.exchange, m.routing_key, m.body, properties, mandatory=True)
            self.published += 1
            commit.unconfirmed.add(self.published)
        self.commits.append(commit)
        if not commit.unconfirmed:
            self._confirmed(commit)

    def _ack(self, tags: set[int]) -> None:
        """Ack ``tags``: one frame for the longest run of tags that allows it."""
        self.outstanding -= tags
        keep = self._oldest()  # a multiple ack stops below it
        if keep is None:
            self.channel._impl.basic_ack(max(tags), multiple=True)
            return
        below = [t for t in tags if t < keep]
        if below:
            self.channel._impl.basic_ack(max(below), multiple=True)
        for t in sorted(t for t in tags if t > keep):
            self.channel._impl.basic_ack(t)

    def _on_return(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        """A mandatory message no queue took: returned before its confirm, so
        it belongs to the commit waiting."""
        for commit in self.commits:
            match = next((m for m in commit.messages if (m.message_id is None or m.message_id == properties.message_id)
                          and m.body == body and m not in commit.returned), None)
            if match is not None:
                commit.returned.append(match)
                return

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        if not self.commits:
            return
        commit = self.commits[0]
        if method.multiple:
            commit.unconfirmed = {t for t in commit.unconfirmed if t > method.delivery_tag}
        else:
            commit.unconfirmed.discard(method.delivery_tag)
        if isinstance(method, pika.spec.Basic.Nack):
            commit.refused = True
        if not commit.unconfirmed:
            self._confirmed(commit)

    def _confirmed(self, commit: _Commit) -> None:
        """Every message of ``commit`` is confirmed (or refused): ack, or, if
        the broker refused one, close the channel so that the deliveries come
        again."""
        self.commits.popleft()
        if commit.refused:
            if not commit.future.done():
                commit.future.set_exception(PublishRefusedError(
                    "the broker refused a message of a commit; nothing was acked (the deliveries come again)"))
            self.channel._impl.close()  # not the blocking close: this runs inside pika's dispatch
            return
        if commit.tags:
            self._ack(commit.tags)
        if not commit.future.done():
            commit.future.set_result(commit.returned)
        self._run_deferred()

    def fail_commits(self, why: str) -> None:
        """The channel went with a commit unconfirmed: its messages may have
        been published or not; its acks were not sent (the deliveries come again)."""
        commits, self.commits = self.commits, deque()
        for commit in commits:
            if not commit.future.done():
                commit.future.set_exception(ConnectionLostError(
                    f"{why} before the broker confirmed a commit: its messages may have been published, "
                    "its deliveries were not acked"))
        self._run_deferred()  # each finds its channel gone and says so

    def cancel(self) -> None:
        """Stop consuming. Never waits long: with no connection there is no
        consumer on the broker to cancel (its messages are back in the queue)."""
        if self.cancelled:
            return
        self.cancelled = True
        t = self.transport
        with t._lock:
            if self in t._subscriptions:
                t._subscriptions.remove(self)

        def run() -> None:
            if self.channel is None or not self.channel.is_open or self.tag is None:
                return
            if self.atomic:  # closing the channel returns what is unacked, uncommitted work included
                def close() -> None:
                    if self.channel.is_open:
                        self.channel.close()  # cancels the consumer first
                self._on_channel(close)
                return
            for tag in sorted(self.outstanding):
                self.channel.basic_reject(tag, requeue=True)
            self.outstanding.clear()
            self.channel.basic_cancel(self.tag)

        if t._closing or not t.connected.is_set():
            return
        if t.on_io_thread():
            run()
        else:
            t._submit(run)  # not waited for: a lost connection cancels it anyway


class _Commit:
    """A commit in flight: its future, what it publishes (with what came
    back), the delivery tags it acks once the broker has confirmed the rest."""

    def __init__(self, future: Future[list[Outgoing]], messages: Sequence[Outgoing], tags: set[int]) -> None:
        self.future, self.messages, self.tags = future, messages, tags
        self.unconfirmed: set[int] = set()
        self.returned: list[Outgoing] = []
        self.refused = False


def _async_channel(channel: pika.adapters.blocking_connection.BlockingChannel) -> Any:
    """The asynchronous channel inside pika's BlockingChannel (pika keeps it
    as ``_impl``): confirms without waiting, returns and consuming straight
    from the frames go through it (see :class:`_ConfirmingPublisher`)."""
    return getattr(channel, "_impl")


def _select_confirms(conn: pika.BlockingConnection, channel: Any, on_confirm: Callable[[Any], None]) -> None:
    """Put the asynchronous ``channel`` in confirm mode, ``on_confirm`` taking
    each ack and nack, and wait for the broker's Confirm.SelectOk."""
    ready: list[bool] = []
    channel.confirm_delivery(ack_nack_callback=on_confirm, callback=lambda _: ready.append(True))
    deadline = time.monotonic() + 10
    while not ready:
        if time.monotonic() > deadline:
            raise px.AMQPConnectionError("no Confirm.SelectOk from the broker")
        conn.process_data_events(time_limit=0.1)


class _AmqpDelivery(Delivery):
    def __init__(self, subscription: _AmqpSubscription, epoch: int, method: Any, properties: Any, body: bytes) -> None:
        self._subscription, self._epoch, self._tag = subscription, epoch, method.delivery_tag
        self.body = body
        self.headers = properties.headers or {}
        self.message_id = properties.message_id
        self.exchange, self.routing_key, self.redelivered = method.exchange, method.routing_key, method.redelivered

    @property
    def live(self) -> bool:
        return self._subscription.live(self._epoch, self._tag)

    @property
    def session(self) -> Any:
        return (id(self._subscription), self._epoch)

    def ack(self) -> None:
        self._subscription.settle(self._epoch, self._tag, None)

    def reject(self, requeue: bool = False) -> None:
        self._subscription.settle(self._epoch, self._tag, requeue)

