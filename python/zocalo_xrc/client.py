"""Zocalo from Bluesky: ask it to process a collection, receive its X-ray
centring results (``docs/wire-format.md`` §1 and §3).

:class:`ZocaloTrigger` publishes ``start``/``end`` to ``processing_recipe`` and
returns once the broker has confirmed them. :class:`ZocaloResults` consumes the
results queue and hands the caller the results *of the collection it names*:
others are logged and rejected (never requeued), malformed ones too, and
results that arrive before anyone asks are held, unacked, until someone does.
Both have a blocking face for callbacks and plain code and an ``async`` face
that never blocks an event loop.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import enum
import hashlib
import getpass
import itertools
import json
import logging
import os
import socket
import threading
import time
import weakref
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Generic, Iterable, Literal, NamedTuple, Protocol, Self, TypeVar, Union

from ._native import XrcResults
from ._results import GridScan2DResult
from .messaging.config import ConfigurationError, ConnectionSettings, default_environment, looks_like_url
from .messages import ResultMessage, ResultPayloadError, is_recipe_envelope, message_id_for, parse_result_message
from .messaging import Delivery, InProcessTransport, QueueInUseError, QueueSpec, Subscription, Transport, TransportError

if TYPE_CHECKING:
    from ._native import SortKey

log = logging.getLogger(__name__)

T = TypeVar("T")
Connection = Union[Transport, ConnectionSettings, str, None]
R = TypeVar("R", XrcResults, tuple[GridScan2DResult, ...])

PROCESSING_QUEUE = "processing_recipe"
RECIPE = "mimas"


class NoResultsFromZocaloError(TimeoutError):
    """No answer from Zocalo in time. (An answer of no crystal is an empty
    result set, not this.)"""


class TriggerTimeoutError(TransportError, TimeoutError):
    """The broker did not confirm a trigger in time. What had not left was
    withdrawn; the message says what may still arrive."""


IN_PROCESS = "in-process"


def resolve(connection: Connection) -> Transport | ConnectionSettings:
    """Where ``connection`` leads, read now so that a bad configuration is an
    error at construction (the connection itself is made on first use):

    * a :class:`Transport` as it is; :class:`ConnectionSettings` as they are;
    * ``"in-process"``: the embedded in-process broker, only when asked for;
    * an ``amqp://`` or ``amqps://`` URL;
    * a zocalo environment name, read from the YAML file ``$ZOCALO_CONFIG``;
    * ``None``: the default environment (:func:`default_environment`).

    There is no silent fallback: without ``$ZOCALO_CONFIG`` an environment is
    a :class:`ConfigurationError`, never the in-process broker."""
    if isinstance(connection, (Transport, ConnectionSettings)):
        return connection
    if connection is None:
        connection = default_environment()
    if not isinstance(connection, str):
        raise TypeError(
            f"connection: expected a zocalo environment name, an amqp:// URL, {IN_PROCESS!r}, "
            f"ConnectionSettings or a Transport, got {type(connection).__name__}"
        )
    if connection == IN_PROCESS:
        return InProcessTransport()
    if not connection:
        raise ConfigurationError("connection: an empty string names no broker (leave it out for the default environment)")
    try:
        if looks_like_url(connection):
            return ConnectionSettings.from_url(connection)
        return ConnectionSettings.from_zocalo_config(connection)
    except ConfigurationError:
        del connection  # a URL's password: not even in a traceback's locals
        raise


def connect(connection: Connection | ConnectionSettings) -> Transport:
    """A transport for ``connection`` (see :func:`resolve`): settings give the
    process's shared RabbitMQ connection to that broker."""
    from .messaging.rabbitmq import AmqpTransport

    where = resolve(connection)
    return AmqpTransport.shared(where) if isinstance(where, ConnectionSettings) else where


#: How long a result being handed over (``running``) may still take: it is
#: being set on the I/O thread at that moment.
_GRACE_S = 5.0


def wait_for(future: Future[T], timeout: float, on_timeout: Callable[[], Exception]) -> T:
    """Block until ``future`` is done, at most ``timeout`` seconds. On timeout,
    cancel it if it has not started; if it has, its result is being set at
    this moment and is returned."""
    try:
        return future.result(timeout=timeout)
    except FutureTimeout:
        if future.cancel():
            raise on_timeout() from None
        try:
            return future.result(timeout=_GRACE_S)
        except FutureTimeout:
            raise on_timeout() from None


async def wait_for_async(future: Future[T], timeout: float, on_timeout: Callable[[], Exception]) -> T:
    """:func:`wait_for` for asyncio: the event loop is never blocked."""
    if not await _done_async([future], timeout, first_error=False):
        if future.cancel():
            raise on_timeout() from None
        if not await _done_async([future], _GRACE_S, first_error=False):
            raise on_timeout()
    return future.result(timeout=0)


async def _done_async(futures: list[Future[Any]], timeout: float, *, first_error: bool) -> bool:
    """Wait without blocking the event loop until every future is done (or,
    with ``first_error``, one has failed); False at ``timeout``. Cancelling the
    waiting task cancels the futures that have not started."""
    loop = asyncio.get_running_loop()
    event = asyncio.Event()

    def finished() -> bool:
        return all(f.done() for f in futures) or (
            first_error and any(f.done() and not f.cancelled() and f.exception() is not None for f in futures))

    def check(_: Future[Any]) -> None:
        if finished():
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass

    for f in futures:
        f.add_done_callback(check)
    if finished():
        return True
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except asyncio.TimeoutError:
        return finished()
    except asyncio.CancelledError:
        for f in futures:
            f.cancel()
        raise
    return True




def zocalo_headers() -> dict[str, str]:
    """Who is asking: ``ZOCALO_GO_USER`` / ``ZOCALO_GO_HOSTNAME`` override the
    login and host names (which a container may not be able to read). As in
    dodal, an empty user is not taken, an empty host is."""
    user = os.environ.get("ZOCALO_GO_USER")
    if not user:
        try:
            user = getpass.getuser()
        except Exception:
            user = "unknown"
    host = os.environ.get("ZOCALO_GO_HOSTNAME")
    return {"zocalo.go.user": user, "zocalo.go.host": socket.gethostname() if host is None else host}


@dataclass
class ZocaloStartInfo:
    """One grid's part of a detector file.

    ``message_index`` is 0 for the xy grid and 1 for the xz grid; the second
    grid's ``start_frame_index`` is the first grid's frame count. Mutable, as
    dodal's is: mx-bluesky's callback sets ``filename`` once it knows it."""

    ispyb_dcid: int
    filename: str | None
    start_frame_index: int
    number_of_frames: int
    message_index: int


class StartInfo(Protocol):
    """Anything shaped like a start info: ours, or dodal's ``ZocaloStartInfo``."""

    @property
    def ispyb_dcid(self) -> int: ...
    @property
    def filename(self) -> str | None: ...
    @property
    def start_frame_index(self) -> int: ...
    @property
    def number_of_frames(self) -> int: ...
    @property
    def message_index(self) -> int: ...


#: The start message's parameters, in the order dodal sends them.
START_FIELDS = ("ispyb_dcid", "filename", "start_frame_index", "number_of_frames", "message_index")


class _UsesBroker:
    """Where both faces connect: resolved at construction (a bad configuration
    fails there), connected on first use (see :func:`resolve`)."""

    def __init__(self, connection: Connection) -> None:
        try:
            self._where = resolve(connection)
        except ConfigurationError:
            del connection  # a URL's password: not even in a traceback's locals
            raise
        self._transport: Transport | None = None

    @property
    def transport(self) -> Transport:
        if self._transport is None:
            self._transport = connect(self._where)
        return self._transport

    @property
    def broker(self) -> str:
        """Where messages go, for people: the in-process broker, or RabbitMQ's
        URL without the password."""
        where = self._where
        if isinstance(where, ConnectionSettings):
            return f"RabbitMQ at {where.url()}"
        return "the in-process broker" if isinstance(where, InProcessTransport) else repr(where)

    def __repr__(self) -> str:
        """Where it talks to (never a password) and what it waits for."""
        try:
            return f"<{type(self).__name__}: {self._describe()}>"
        except AttributeError:  # half made (its __init__ raised), as a traceback's locals show it
            return f"<{type(self).__name__}: not made>"

    def _describe(self) -> str:
        raise NotImplementedError


class ZocaloTrigger(_UsesBroker):
    """Sends ``start`` and ``end`` for a data collection to Zocalo."""

    def __init__(
        self,
        connection: Connection = None,
        *,
        timeout_s: float = 10.0,
        recipe: str = RECIPE,
    ) -> None:
        try:
            super().__init__(connection)
        except ConfigurationError:
            del connection  # a URL's password: not even in a traceback's locals
            raise
        self._headers: dict[str, str] | None = None
        self.timeout_s, self.recipe = timeout_s, recipe

    def _describe(self) -> str:
        return (f"start/end of recipe {self.recipe!r} to {PROCESSING_QUEUE} on {self.broker}, "
                f"each confirmed by the broker within {self.timeout_s} s")

    def _send(self, messages: list[dict[str, Any]], what: str) -> list[tuple[Future[None], str]]:
        """Publish every message at once; each one's confirm future and id.
        (Bodies are made first, so that the publishes follow each other closely
        enough to share one wake-up of the I/O thread.)"""
        log.info("Zocalo %s", what)
        if self._headers is None:
            self._headers = zocalo_headers()
        bodies = [json.dumps({"recipes": [self.recipe], "parameters": m}).encode() for m in messages]
        transport = self.transport
        return [(transport.publish("", PROCESSING_QUEUE, body, self._headers, mid), mid)
                for body, mid in ((body, message_id_for(body)) for body in bodies)]

    def _settle(self, sent: list[tuple[Future[None], str]], what: str) -> None:
        """After the wait: return if the broker confirmed every message, else
        withdraw what has not left (it is never sent) and raise, saying which
        messages may still arrive."""
        withdrawn = [mid for f, mid in sent if f.cancel()]  # first: no future changes state after this
        in_flight = [mid for f, mid in sent if not f.done()]
        failed = [e for f, _ in sent if f.done() and not f.cancelled() and (e := f.exception()) is not None]
        if not failed and not withdrawn and not in_flight:
            return
        fates = []
        if withdrawn:
            fates.append(f"{len(withdrawn)} message(s) withdrawn, never to be sent")
        if in_flight:
            fates.append(f"{len(in_flight)} handed to the broker unconfirmed, which may still arrive: a retry sends "
                         f"it again with the same message_id ({', '.join(in_flight)})")
        if failed:
            error = failed[0]
            if not fates:
                raise error
            raise type(error)(f"{error}; of the others, {'; '.join(fates)}") from error
        trouble = self.transport.trouble()
        raise TriggerTimeoutError(f"the broker did not confirm {what} within {self.timeout_s} s"
                                  f"{f' ({trouble})' if trouble else ''}: {'; '.join(fates)}")

    def _deliver(self, messages: list[dict[str, Any]], what: str) -> None:
        sent = self._send(messages, what)
        concurrent.futures.wait([f for f, _ in sent], timeout=self.timeout_s, return_when=concurrent.futures.FIRST_EXCEPTION)
        self._settle(sent, what)

    async def _deliver_async(self, messages: list[dict[str, Any]], what: str) -> None:
        sent = self._send(messages, what)
        await _done_async([f for f, _ in sent], self.timeout_s, first_error=True)
        self._settle(sent, what)

    @staticmethod
    def _starts(infos: tuple[StartInfo, ...]) -> tuple[list[dict[str, Any]], str]:
        ids = ", ".join(str(i.ispyb_dcid) for i in infos)
        return [{**{f: getattr(i, f) for f in START_FIELDS}, "event": "start"} for i in infos], f"start of DCID {ids}"

    @staticmethod
    def _ends(dcids: tuple[int, ...]) -> tuple[list[dict[str, Any]], str]:
        return [{"event": "end", "ispyb_dcid": d} for d in dcids], f"end of DCID {', '.join(map(str, dcids))}"

    def run_start(self, info: StartInfo, *more: StartInfo) -> None:
        """Tell Zocalo a collection has started (give both grids of a 3D scan
        at once to have their messages in flight together). Returns once the
        broker has confirmed every message; after ``timeout_s`` raises
        :class:`TriggerTimeoutError`, having withdrawn what was not sent and
        saying what may still arrive (the same message always has the same
        ``message_id``, so a duplicate can be recognised)."""
        self._deliver(*self._starts((info, *more)))

    def run_end(self, dcid: int, *more: int) -> None:
        """Tell Zocalo a collection's data is written: process it."""
        self._deliver(*self._ends((dcid, *more)))

    async def run_start_async(self, info: StartInfo, *more: StartInfo) -> None:
        """:meth:`run_start` without blocking the event loop, connecting included."""
        await self._deliver_async(*self._starts((info, *more)))

    async def run_end_async(self, dcid: int, *more: int) -> None:
        """:meth:`run_end` without blocking the event loop, connecting included."""
        await self._deliver_async(*self._ends((dcid, *more)))


class Source(enum.Enum):
    """Which spot finder's results to use."""

    CPU = "cpu"
    GPU = "gpu"
    EITHER = "either"  # the first to arrive


@dataclass(frozen=True)
class SourceComparison(Generic[R]):
    """CPU and GPU results of one collection side by side."""

    cpu: R | None
    gpu: R | None
    agree: bool | None  # None when one of them did not come
    detail: str


def _best_results_agree(a: XrcResults | tuple[GridScan2DResult, ...], b: XrcResults | tuple[GridScan2DResult, ...]) -> tuple[bool, str]:
    if len(a) == 0 or len(b) == 0:
        same = len(a) == len(b)
        return same, "both found no crystal" if same else f"one found {max(len(a), len(b))} crystal(s), the other none"
    x, y = a[0], b[0]
    if isinstance(x, GridScan2DResult) or isinstance(y, GridScan2DResult):
        same = x == y
    else:
        same = (
            x.max_voxel == y.max_voxel
            and x.bounding_box == y.bounding_box
            and all(abs(p - q) <= 1e-5 for p, q in zip(x.centre_of_mass, y.centre_of_mass))
        )
    return same, "best results agree" if same else f"best results differ: CPU {x} / GPU {y}"



class _Arrival(NamedTuple):
    """A result held or offered: its place in the order of arrival, unacked."""

    seq: int
    delivery: Delivery
    message: ResultMessage
    keys: tuple[str, ...]  # see _keys: the same result delivered again has the same keys


#: How many results a receiver remembers having dealt with (two keys each).
REMEMBERED = 4096


def _keys(delivery: Delivery) -> tuple[str, ...]:
    """What makes a result the same one again: its body's digest (a
    redelivery, or a service that sent it twice) and its ``message_id`` (a
    sender's id for one message, as :func:`message_id_for` makes them)."""
    digest = f"sha256:{hashlib.sha256(delivery.body).hexdigest()}"
    return (digest, f"id:{delivery.message_id}") if delivery.message_id else (digest,)


#: Which receiver consumes which durable queue, per broker, in this process.
_CONSUMING: dict[tuple[Any, str], weakref.ref[Any]] = {}
_CONSUMING_LOCK = threading.Lock()


def _claim_queue(transport: Transport, queue: str, receiver: Any) -> None:
    """Refuse a second consumer of one durable results queue in a process:
    each would take, and dead-letter, the results the other waits for."""
    key = (transport.endpoint, queue)
    with _CONSUMING_LOCK:
        holder = _CONSUMING.get(key)
        other = holder() if holder is not None else None
        if other is not None and other is not receiver:
            raise QueueInUseError(
                f"{queue} is already consumed by another {type(other).__name__} in this process: two would take "
                f"each other's results. Share that one, or give this one private_queue=True (a queue of its own "
                f"that sees every result)"
            )
        _CONSUMING[key] = weakref.ref(receiver)


def _release_queue(transport: Transport, queue: str, receiver: Any) -> None:
    key = (transport.endpoint, queue)
    with _CONSUMING_LOCK:
        holder = _CONSUMING.get(key)
        if holder is not None and holder() in (receiver, None):
            del _CONSUMING[key]


class _Waiter(Generic[R]):
    """One caller waiting for one collection's results (I/O thread state)."""

    def __init__(self, dcids: frozenset[int], dcgid: int | None) -> None:
        self.dcids, self.dcgid = dcids, dcgid  # neither: the next collection's, whichever it is
        self.future: Future[tuple[R, ResultMessage, SourceComparison[R] | None]] = Future()
        self.received: dict[Source, _Arrival] = {}
        self.handed: list[_Arrival] = []  # handed over, unacked until the caller has taken them
        self.order: list[Source] = []
        self.timer_set = False

    def matches(self, m: ResultMessage) -> bool:
        if not self.dcids and self.dcgid is None:
            return True
        matched = False
        if self.dcgid is not None and m.dcgid is not None:
            if m.dcgid != self.dcgid:
                return False
            matched = True
        if self.dcids and m.dcid is not None:
            if m.dcid not in self.dcids:
                return False
            matched = True
        return matched

    def describe(self) -> str:
        parts = [f"DCID {', '.join(map(str, sorted(self.dcids)))}"] if self.dcids else []
        if self.dcgid is not None:
            parts.append(f"DCGID {self.dcgid}")
        return " / ".join(parts) or "the next collection"


class _Receiver(_UsesBroker, Generic[R]):
    """Receives X-ray centring results for the collections a caller names.

    It subscribes on the first :meth:`trigger` (or :meth:`subscribe`) to the
    results queue ``xrc.<beamline>`` (Diamond's durable queue on the
    ``results`` exchange, declared as Diamond declares it where it is
    missing), or with ``private_queue=True`` to a queue of its own bound to
    that exchange, which sees every result without taking any from other
    consumers."""

    #: The wire ``type`` of the results this receiver hands over.
    result_type: ClassVar[Literal["2d", "3d"]]

    def __init__(
        self,
        connection: Connection = None,
        *,
        beamline: str = "i03",
        queue: str | None = None,
        private_queue: bool = False,
        sort_key: SortKey = "max_count",
        timeout_s: float = 180.0,
        source: Source = Source.CPU,
        compare_sources: bool = False,
        compare_wait_s: float = 10.0,
        prefetch: int = 32,
    ) -> None:
        if prefetch < 2:
            raise ValueError(f"prefetch must be at least 2 (one result to hold while waiting, one to take), got {prefetch}")
        if sort_key not in ("max_count", "total_count", "n_voxels"):
            raise ValueError(f"sort_key must be max_count, total_count or n_voxels, got {sort_key!r}")
        try:
            super().__init__(connection)
        except ConfigurationError:
            del connection  # a URL's password: not even in a traceback's locals
            raise
        self.routing_key = f"xrc.{beamline}"
        self.queue = queue or self.routing_key
        self.private_queue, self.sort_key, self.timeout_s = private_queue, sort_key, timeout_s
        self.source, self.compare_sources, self.compare_wait_s = Source(source), compare_sources, compare_wait_s
        self.prefetch = prefetch
        self.last_message: ResultMessage | None = None
        self.last_comparison: SourceComparison[R] | None = None
        self._subscription: Subscription | None = None
        self._lock = threading.Lock()
        self._asking: _Waiter[R] | None = None  # the caller's, while a trigger waits (one at a time)
        # Shared with the I/O thread, under _state: who waits, and what came early.
        self._state = threading.Lock()
        self._held: list[_Arrival] = []  # in order of arrival
        self._arrivals = itertools.count()
        # The keys (_keys) of the results dealt with, handed over or settled: one
        # that comes again is acked, never handed over.
        self._dealt_with: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._waiter: _Waiter[R] | None = None
        self._releasing = 0  # callers that have finished, whose waiters the I/O thread has still to release
        self._stale = 0  # how many of the first deliveries were waiting before settle_waiting()
        self._stale_settled = 0  # of those, how many are settled (one INFO line once they all are)

    def _describe(self) -> str:
        asking = self._asking
        queue = f"a private queue bound to {self.routing_key!r}" if self.private_queue else f"queue {self.queue!r}"
        waits = (f"waiting for the results of {asking.describe()}" if asking
                 else f"idle (a trigger waits up to {self.timeout_s} s)")
        return f"{self.result_type} results from {queue} on {self.broker}, {waits}"

    def subscribe(self, *, timeout_s: float | None = 10.0) -> None:
        """Start consuming results (the first trigger does it if nothing did):
        declares ``xrc.<beamline>`` where it is missing, as Diamond's
        deployment does. Waits up to ``timeout_s`` for consuming to start
        (``None``: returns at once, consuming starts when it can) and raises
        :class:`TransportError` if it cannot; the subscription stays, and
        starts once the broker can be reached."""
        subscription = self._subscribe()
        if timeout_s is None:
            return
        done, _ = concurrent.futures.wait([subscription.ready], timeout=timeout_s)
        if not done:
            raise TransportError(f"cannot consume {self._what_queue()} within {timeout_s} s: "
                                 f"{self.transport.trouble() or 'no answer from the broker'}")
        subscription.ready.result()

    def settle_waiting(self, *, timeout_s: float = 10.0) -> int:
        """Results that wait for this receiver now are stale (a plan stages the
        device before its collection starts): ack them, and consume from here
        on. Subscribed already, those are the ones held; else the ones ready
        in the queue, counted before consuming starts (the queue hands them
        out first). Returns how many will be settled. All of it within
        ``timeout_s``, or :class:`TransportError` saying why not (the broker
        cannot be reached, say)."""
        with self._lock:
            subscribed = self._subscription is not None
        if subscribed:
            with self._state:
                stale, self._held = self._held, []
            for arrival in stale:
                self._settle_stale(arrival.delivery, arrival.message, arrival.keys)
            self._log_stale(len(stale), "settled: they were waiting before this receiver was staged")
            return len(stale)
        deadline = time.monotonic() + timeout_s
        waiting = 0
        if not self.private_queue:
            waiting = self._admin(f"count the results waiting in {self.queue}", timeout_s, self._waiting_in_queue)
        with self._state:
            self._stale, self._stale_settled = waiting, 0
        self.subscribe(timeout_s=max(0.0, deadline - time.monotonic()))
        return waiting

    def _waiting_in_queue(self) -> int:
        transport = self.transport
        return transport.message_count(self.queue) if transport.queue_exists(self.queue) else 0

    def _admin(self, what: str, timeout: float, work: Callable[[], T]) -> T:
        """``work`` (calls that wait for the broker) on the I/O thread, within
        ``timeout``: withdrawn if it has not started by then (a broker that
        cannot be reached), whatever the transport's own time limit."""
        future: Future[T] = Future()

        def run() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(work())
                except Exception as e:
                    future.set_exception(e)

        self.transport.call_soon(run)

        def error() -> Exception:
            return TransportError(f"cannot {what} within {timeout:g} s: "
                                  f"{self.transport.trouble() or 'no answer from the broker'}")

        return wait_for(future, timeout, error)

    def _settle_stale(self, delivery: Delivery, message: ResultMessage | None, keys: tuple[str, ...]) -> None:
        """Ack a result that waited before staging, and remember it (a copy
        of it that comes later is stale too)."""
        what = f"DCID {message.dcid} / DCGID {message.dcgid}" if message is not None else "a message"
        log.debug("settling a stale result on %s (%s): it was waiting before this receiver was staged", self.queue, what)
        self._remember(keys)
        delivery.ack()

    def _log_stale(self, count: int, what: str) -> None:
        """One INFO line for ``count`` stale results dealt with at once (each
        one is a DEBUG line)."""
        if count:
            log.info("%d stale result%s on %s %s", count, "" if count == 1 else "s", self.queue, what)

    def _remember(self, keys: Iterable[str]) -> None:
        with self._state:
            for key in keys:
                self._dealt_with[key] = None
                self._dealt_with.move_to_end(key)
            while len(self._dealt_with) > 2 * REMEMBERED:
                self._dealt_with.popitem(last=False)

    def _forget(self, keys: Iterable[str]) -> None:
        with self._state:
            for key in keys:
                self._dealt_with.pop(key, None)

    def _seen(self, keys: Iterable[str]) -> bool:
        with self._state:
            return any(key in self._dealt_with for key in keys)

    def _what_queue(self) -> str:
        return "a private results queue" if self.private_queue else self.queue

    def _subscribe(self) -> Subscription:
        """The subscription, made if there is none (it never waits)."""
        with self._lock:
            if self._subscription is not None:
                return self._subscription
            transport = self.transport
            if self.private_queue:
                spec = QueueSpec(None, "results", self.routing_key)
            else:
                _claim_queue(transport, self.queue, self)
                spec = QueueSpec(self.queue, "results", self.routing_key, declare=True)
            try:
                subscription = self._subscription = transport.subscribe(spec, self._on_delivery, prefetch=self.prefetch,
                                                                        wait=None)
            except Exception:
                _release_queue(transport, self.queue, self)
                raise
        subscription.ready.add_done_callback(lambda f: self._subscribed(subscription, f))
        return subscription

    def _subscribed(self, subscription: Subscription, ready: Future[None]) -> None:
        error = ready.exception() if not ready.cancelled() else TransportError("cancelled")
        if error is None:
            log.info("consuming %s", self._what_queue())
            return
        log.error("cannot consume %s: %s", self._what_queue(), error)
        with self._lock:  # a later trigger tries again
            if self._subscription is subscription:
                self._subscription = None
                if not self.private_queue:
                    _release_queue(self.transport, self.queue, self)
        with self._state:
            waiter = self._waiter
        if waiter is not None:
            self.transport.call_soon(lambda: self._fail(waiter, error))

    def close(self) -> None:
        """Stop consuming; what was held unacked goes back to the queue."""
        with self._lock:
            subscription, self._subscription = self._subscription, None
            if subscription is not None and not self.private_queue:
                _release_queue(self.transport, self.queue, self)
        if subscription is not None:
            subscription.cancel()

    def __enter__(self: Self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the caller's side -------------------------------------------------------

    def _begin(self, dcids: int | Iterable[int] | None, dcgid: int | None, any_collection: bool) -> _Waiter[R]:
        ids = frozenset([dcids] if isinstance(dcids, int) else (dcids or ()))
        if not ids and dcgid is None and not any_collection:
            raise ValueError("trigger: name the collection, with dcids= and/or dcgid= (or any_collection=True)")
        if (ids or dcgid is not None) and any_collection:
            raise ValueError("trigger: any_collection=True names no collection; leave out dcids= and dcgid=")
        subscription = self._subscribe()
        waiter: _Waiter[R] = _Waiter(ids, dcgid)
        with self._lock:
            if self._asking is not None:
                raise RuntimeError("ZocaloResults is already waiting for results; one trigger at a time")
            self._asking = waiter
        # With nothing held, install here: waiting then costs no hand-over to
        # the I/O thread. Results that came early are the I/O thread's to take,
        # in order, before anything newer.
        with self._state:  # else an earlier waiter's release comes first
            installed = self._waiter is None and not self._held and not self._releasing
            if installed:
                self._waiter = waiter
        if not installed:
            self.transport.call_soon(lambda: self._install(waiter))
        ready = subscription.ready
        if ready.done() and (ready.cancelled() or ready.exception() is not None):  # failed before we waited
            self._subscribed(subscription, ready)
        return waiter

    def _finish(self, outcome: tuple[R, ResultMessage, SourceComparison[R] | None]) -> R:
        results, message, comparison = outcome
        self.last_message, self.last_comparison = message, comparison
        return results

    def _give_up(self, waiter: _Waiter[R], timeout: float) -> Callable[[], Exception]:
        def error() -> Exception:
            trouble = self.transport.trouble()
            return NoResultsFromZocaloError(f"no X-ray centring results for {waiter.describe()} within {timeout} s"
                                            f"{f' ({trouble})' if trouble else ''}")

        return error

    def _end(self, waiter: _Waiter[R], taken: bool) -> None:
        """The caller is done waiting: with the results (``taken``; they are
        acked now), or without (gave up, cancelled, interrupted): then nothing
        is handed to it any more, and what it had been handed stays unacked,
        held for the next trigger."""
        if taken:
            for arrival in waiter.handed:  # here, not on the I/O thread: before a close() that follows
                try:
                    arrival.delivery.ack()
                except Exception as e:  # a lost ack only means a redelivery, which is recognised
                    log.warning("could not ack a result for %s (%s); it will be recognised if it comes again",
                                waiter.describe(), e)
        else:
            waiter.future.cancel()  # fails if a result is being handed over: its release puts it back
            with self._state:
                self._releasing += 1
            self.transport.call_soon(lambda: self._release(waiter))
        with self._lock:
            self._asking = None

    def trigger(self, dcids: int | Iterable[int] | None = None, dcgid: int | None = None, *,
                timeout_s: float | None = None, any_collection: bool = False) -> R:
        """Wait for the results of the collection with these DCIDs and/or this
        DCGID; sorted by ``sort_key``, largest first. An empty ``XrcResults``
        means no crystal; :class:`NoResultsFromZocaloError` means no answer.
        ``any_collection=True``: the first result that came since subscribing
        (:meth:`subscribe`, :meth:`settle_waiting`) or the last trigger, for
        whatever collection, as dodal's device takes it when a plan does not
        know its DCIDs."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        waiter = self._begin(dcids, dcgid, any_collection)
        taken = False
        try:
            outcome = wait_for(waiter.future, timeout, self._give_up(waiter, timeout))
            taken = True
            return self._finish(outcome)
        finally:
            self._end(waiter, taken)

    async def trigger_async(
        self, dcids: int | Iterable[int] | None = None, dcgid: int | None = None, *, timeout_s: float | None = None,
        any_collection: bool = False,
    ) -> R:
        """:meth:`trigger` for asyncio: the event loop keeps running meanwhile.
        Cancelling the task stops the wait at once; a result that was being
        handed over stays for the next trigger."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        waiter = self._begin(dcids, dcgid, any_collection)
        taken = False
        try:
            outcome = await wait_for_async(waiter.future, timeout, self._give_up(waiter, timeout))
            taken = True
            return self._finish(outcome)
        finally:
            self._end(waiter, taken)

    # ---- the I/O thread's side ---------------------------------------------------

    def _on_delivery(self, delivery: Delivery) -> None:
        with self._state:
            stale = self._stale > 0
            if stale:
                self._stale -= 1
                self._stale_settled += 1
            settled = self._stale_settled if stale and self._stale == 0 else 0
        if stale:
            self._settle_stale(delivery, None, _keys(delivery))
            self._log_stale(settled, "settled: they were waiting before this receiver was staged")
            return
        if not is_recipe_envelope(delivery.headers):
            log.error("rejecting a message on %s: not a recipe envelope (no workflows-recipe header)", self.queue)
            delivery.reject(requeue=False)
            return
        try:
            message = parse_result_message(delivery.body)
        except ResultPayloadError as e:
            log.error("rejecting a malformed result on %s: %s", self.queue, e)
            delivery.reject(requeue=False)
            return
        if message.dcid is None and message.dcgid is None:
            log.error("rejecting a result on %s: not a recipe envelope naming a collection", self.queue)
            delivery.reject(requeue=False)
            return
        keys = _keys(delivery)
        if self._seen(keys):  # redelivered after a reconnect, or sent twice by a service
            log.info("a result for DCID %s / DCGID %s came again (%s); it was dealt with already: acked, not handed "
                     "over", message.dcid, message.dcgid, "redelivered" if delivery.redelivered else "sent again")
            delivery.ack()
            return
        arrival = _Arrival(next(self._arrivals), delivery, message, keys)
        with self._state:
            waiter = self._waiter
            if waiter is None:
                self._held = [a for a in self._held if a.delivery.live]  # the broker has the others again
                self._held.append(arrival)
                evicted = self._held[: max(0, len(self._held) - (self.prefetch - 1))]
                del self._held[: len(evicted)]
        if waiter is None:
            for old in evicted:  # holding them all would stop consumption: the broker sends no more
                self._discard(old, f"nobody asked for it, and holding more than {self.prefetch - 1} results "
                                   "would stop consuming")
            return
        if waiter.matches(message):
            self._offer(waiter, arrival)
        else:
            self._discard(arrival, f"not for {waiter.describe()}")

    def _put_back(self, arrivals: Iterable[_Arrival]) -> None:
        """Hold these again (still unacked), in order of arrival."""
        with self._state:
            self._held.extend(arrivals)
            self._held.sort(key=lambda a: a.seq)

    def _discard(self, arrival: _Arrival, why: str, level: int = logging.WARNING) -> None:
        message = arrival.message
        log.log(level, "rejecting a result for DCID %s / DCGID %s (%s)", message.dcid, message.dcgid, why)
        self._remember(arrival.keys)
        arrival.delivery.reject(requeue=False)

    def _install(self, waiter: _Waiter[R]) -> None:
        """On the I/O thread: take what came early, in order, then wait."""
        if waiter.future.done():
            return
        with self._state:
            self._waiter = waiter
        stale = 0
        while True:
            # One at a time, leaving the rest in _held: a caller that starts
            # its next trigger meanwhile sees them there, and waits its turn.
            with self._state:
                if self._waiter is not waiter or not self._held:
                    break  # done already, or nothing more came early
                arrival = self._held.pop(0)
            if not arrival.delivery.live:
                continue  # from a lost connection or consumer: the broker delivers it again
            if waiter.matches(arrival.message):
                self._offer(waiter, arrival)
            else:
                self._discard(arrival, f"stale: waiting for {waiter.describe()}", logging.DEBUG)
                stale += 1
        self._log_stale(stale, f"rejected (to dlq.{self.queue}): none of them for {waiter.describe()}")

    def _release(self, waiter: _Waiter[R]) -> None:
        """On the I/O thread, once the caller has given up: hold again
        (unacked) what it had received or been handed, forgetting the latter
        was handed over."""
        with self._state:
            if self._waiter is waiter:
                self._waiter = None
            self._releasing -= 1
        handed: list[_Arrival] = waiter.handed
        waiter.handed = []
        for arrival in handed:
            self._forget(arrival.keys)
        if handed:
            log.info("the caller waiting for %s gave up as its results came: they stay for the next trigger",
                     waiter.describe())
        self._put_back([*waiter.received.values(), *handed])  # nobody took them: still unacked
        waiter.received.clear()

    def _offer(self, waiter: _Waiter[R], arrival: _Arrival) -> None:
        message = arrival.message
        if self._seen(arrival.keys):  # a second copy, held since before the first was dealt with
            log.info("a result for DCID %s / DCGID %s came twice; dealt with once", message.dcid, message.dcgid)
            arrival.delivery.ack()
            return
        source = _source(message)
        wanted = self.source in (source, Source.EITHER)
        if not wanted and not self.compare_sources:
            log.info("ignoring the %s result for %s", source.name, waiter.describe())
            self._remember(arrival.keys)
            arrival.delivery.ack()
            return
        if message.type != self.result_type:
            what = (f"Zocalo sent {message.type} results for {waiter.describe()}; "
                    f"{type(self).__name__} takes {self.result_type} results")
            log.error("rejecting a result: %s", what)
            self._remember(arrival.keys)
            arrival.delivery.reject(requeue=False)
            self._fail(waiter, ResultPayloadError(what))
            return
        if source in waiter.received:
            self._discard(arrival, f"a second {source.name} result")
            return
        waiter.received[source] = arrival
        waiter.order.append(source)
        primary = self._primary(waiter)
        if primary is None:
            return
        if not self.compare_sources or len(waiter.received) == 2:
            self._complete(waiter)
        elif not waiter.timer_set:
            waiter.timer_set = True
            self.transport.call_later(self.compare_wait_s, lambda: self._complete(waiter))

    def _primary(self, waiter: _Waiter[R]) -> Source | None:
        if self.source is Source.EITHER:
            return waiter.order[0] if waiter.order else None
        return self.source if self.source in waiter.received else None

    def _sorted(self, message: ResultMessage) -> R:
        """The message's results as this receiver hands them over."""
        raise NotImplementedError

    def _fail(self, waiter: _Waiter[R], error: BaseException) -> None:
        """Tell the caller at once; what it had received stays unacked, held."""
        if self._waiter is not waiter or not waiter.future.set_running_or_notify_cancel():
            return
        with self._state:
            self._waiter = None
        self._put_back(waiter.received.values())
        waiter.received.clear()
        waiter.future.set_exception(error)

    def _complete(self, waiter: _Waiter[R]) -> None:
        if self._waiter is not waiter or not waiter.future.set_running_or_notify_cancel():
            return  # the caller gave up: _release keeps the messages
        primary = self._primary(waiter)
        received = list(waiter.received.values())
        waiter.received.clear()
        with self._state:
            self._waiter = None
        try:
            assert primary is not None
            message = next(a for a in received if _source(a.message) is primary).message
            got = {_source(a.message): self._sorted(a.message) for a in received}  # each sorted once
            comparison = self._compare(waiter, got, _source(message)) if self.compare_sources else None
        except Exception as e:  # never leave the caller's future running
            waiter.future.set_exception(e)
            return
        for arrival in received:
            self._remember(arrival.keys)
        waiter.handed = received  # acked once the caller has them (_release)
        log.info("X-ray centring results for %s: %d result(s)", waiter.describe(), len(message.results))
        waiter.future.set_result((got[_source(message)], message, comparison))

    def _compare(self, waiter: _Waiter[R], got: dict[Source, R], primary: Source) -> SourceComparison[R]:
        if len(got) == 2:
            agree, detail = _best_results_agree(got[Source.CPU], got[Source.GPU])
            (log.info if agree else log.warning)("CPU and GPU results for %s: %s", waiter.describe(), detail)
        else:
            agree, detail = None, f"only {primary.name} results came within {self.compare_wait_s} s"
            log.warning("%s: %s", waiter.describe(), detail)
        return SourceComparison(got.get(Source.CPU), got.get(Source.GPU), agree, detail)


def _source(message: ResultMessage) -> Source:
    return Source.GPU if message.gpu else Source.CPU


class ZocaloResults(_Receiver[XrcResults]):
    """Receives the 3D X-ray centring results (``"type": "3d"``) of the
    collections a caller names, as :class:`XrcResults` sorted by ``sort_key``,
    largest first. A 2D result for the collection is an error at once
    (:class:`ResultPayloadError`); use :class:`ZocaloResults2D` for 2D scans.

    ``connection``: a zocalo environment name (default: ``bluesky``, or
    ``dev_bluesky`` with ``DODAL_TEST_MODE=true``), an ``amqp://`` URL,
    ``"in-process"``, :class:`ConnectionSettings` or a :class:`Transport`."""

    result_type = "3d"

    def _sorted(self, message: ResultMessage) -> XrcResults:
        results = message.results
        assert isinstance(results, XrcResults)
        return results.sorted(by=self.sort_key)


class ZocaloResults2D(_Receiver[tuple[GridScan2DResult, ...]]):
    """Receives 2D X-ray centring results (``"type": "2d"``): a tuple of one
    :class:`GridScan2DResult` per message. Otherwise as :class:`ZocaloResults`."""

    result_type = "2d"

    def _sorted(self, message: ResultMessage) -> tuple[GridScan2DResult, ...]:
        results = message.results
        assert isinstance(results, tuple)
        return results
