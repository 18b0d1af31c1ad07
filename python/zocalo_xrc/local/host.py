"""Workflows services in threads of this process, each on a workflows
transport of its own, as a workflows frontend runs one in a process of its
own: :class:`ServiceThread`.

A frontend hands its service two pipes: commands in (``shutdown``), and
status, log records and requests out. Here both are in-process objects. The
service's log records go to Python logging directly, where the application's
handlers and levels apply: :meth:`CommonService.initialize_logging`, which
would strip every handler of the process, set the root logger to WARNING and
send records down the pipe, is not run. And each transport gets
subscription tables of its own (:func:`isolate_transport_tables`).
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Any, Callable, cast

from workflows.services.common_service import CommonService, Commands

log = logging.getLogger(__name__)

_STARTED = {CommonService.SERVICE_STATUS_IDLE, CommonService.SERVICE_STATUS_TIMER,
            CommonService.SERVICE_STATUS_PROCESSING}


class ServiceStartError(RuntimeError):
    """A service failed in ``initializing()`` (or before)."""


class _CommandPipe:
    """The frontend-to-service pipe: the service polls and receives, the host sends."""

    def __init__(self) -> None:
        self._items: collections.deque[Any] = collections.deque()
        self._ready = threading.Condition()

    def send(self, message: Any) -> None:
        with self._ready:
            self._items.append(message)
            self._ready.notify_all()

    def poll(self, timeout: float | None = 0.0) -> bool:
        with self._ready:
            return self._ready.wait_for(lambda: bool(self._items), timeout)

    def recv(self) -> Any:
        with self._ready:
            self._ready.wait_for(lambda: bool(self._items))
            return self._items.popleft()


class _FrontendPipe:
    """The service-to-frontend pipe: each message goes straight to the host."""

    def __init__(self, receive: Callable[[Any], None]) -> None:
        self._receive = receive

    def send(self, message: Any) -> None:
        self._receive(message)


class _LogExtensions(logging.Filter):
    """Adds the fields of the service's ``extend_log`` contexts (``recipe_ID``,
    say) to what its main thread logs through the service's logger, as the
    frontend pipe would have."""

    def __init__(self, service: CommonService, thread: threading.Thread) -> None:
        super().__init__()
        self._service, self._thread = service, thread

    def filter(self, record: logging.LogRecord) -> bool:
        if record.thread == self._thread.ident:
            for name, value in getattr(self._service, "_CommonService__log_extensions", ()):
                setattr(record, name, value)
        return True


class ServiceThread:
    """One ``CommonService`` subclass running in a daemon thread of this
    process on ``transport`` (a workflows transport, not yet used by another
    service), with ``environment`` as a frontend gives it (zocalo's
    Dispatcher reads ``environment["config"]``, a zocalo configuration).

    ``start()`` returns once the service's ``initializing()`` is done, or
    raises :class:`ServiceStartError` with the reason it failed. ``stop()``
    sends the frontend's shutdown command and waits for the service to end
    (it disconnects its transport). ``error`` is the text of the exception
    that ended the service, if one did."""

    def __init__(self, service_class: type[CommonService], transport: Any, environment: dict[str, Any] | None = None,
                 name: str | None = None) -> None:
        if not (isinstance(service_class, type) and issubclass(service_class, CommonService)):
            raise TypeError(f"a workflows service is a CommonService subclass, not {service_class!r}")
        if vars(transport).get("_CommonTransport__callback_interceptor") is not None:
            raise ValueError(f"{transport!r} already serves a service: give each service a transport of its own")
        isolate_transport_tables(transport)
        self.name = name or service_class._service_name
        self.transport = transport
        self._changed = threading.Condition()
        self._status: int | None = None
        self._initialized = False
        self._finished = False
        self._error: str | None = None
        self._commands = _CommandPipe()
        self._thread = threading.Thread(target=self._run, name=f"workflows service: {self.name}", daemon=True)
        self.service: Any = cast(Any, service_class(environment={} if environment is None else environment))
        self.service.transport = transport
        # instance attributes, in front of the class's methods
        setattr(self.service, "initialize_logging", self._initialize_logging)
        setattr(self.service, "process_uncaught_exception", self._recording(self.service.process_uncaught_exception))
        self.service.connect(frontend=_FrontendPipe(self._from_service), commands=self._commands)

    def __repr__(self) -> str:
        state = "running" if self.alive else f"ended ({self._error})" if self._error else \
            "ended" if self._finished else "not started"
        return f"ServiceThread({self.name!r}, {state})"

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def error(self) -> str | None:
        """What the uncaught exception that ended the service said, or None."""
        return self._error

    @property
    def status(self) -> int | None:
        """The service's last workflows status code (``CommonService.SERVICE_STATUS_*``)."""
        return self._status

    def start(self, timeout: float = 10) -> ServiceThread:
        """Run the service; return once its ``initializing()`` is done."""
        if self._thread.ident is not None:
            raise RuntimeError(f"{self.name} was started already (a ServiceThread runs once)")
        self._thread.start()
        with self._changed:
            ready = self._changed.wait_for(lambda: self._initialized or self._finished or self._error is not None,
                                           timeout)
        if self._error is not None:
            self._thread.join(timeout)  # what it does on the way out: in_shutdown(), disconnecting
            raise ServiceStartError(f"{self.name} failed to start: {self._error}")
        if not ready:
            raise TimeoutError(f"{self.name} did not finish initializing within {timeout} s")
        return self

    def stop(self, timeout: float = 10) -> None:
        """Shut the service down (as ``zocalo.shutdown`` would) and wait for it."""
        if self._thread.ident is None or not self._thread.is_alive():
            return
        self._commands.send({"band": "command", "payload": Commands.SHUTDOWN})
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"{self.name} did not stop within {timeout} s")

    def __enter__(self) -> ServiceThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # the service's side
    def _run(self) -> None:
        try:
            self.service.start()
        except BaseException as e:  # start() handles Exception itself; this is what escaped it
            if self._error is None:
                self._error = f"{type(e).__name__}: {e}"
            log.critical("%s ended with an uncaught exception", self.name, exc_info=True)
        finally:
            self.service.log.removeFilter(self._filter)
            with self._changed:
                self._finished = True
                self._changed.notify_all()

    _filter: logging.Filter | None = None

    def _initialize_logging(self) -> None:
        """In place of CommonService.initialize_logging: the service logs
        through Python logging as it stands."""
        self.service.log = logging.getLogger(self.service._logger_name)
        self._filter = _LogExtensions(self.service, self._thread)
        self.service.log.addFilter(self._filter)

    def _recording(self, handle: Callable[[BaseException], None]) -> Callable[[BaseException], None]:
        def process_uncaught_exception(e: BaseException) -> None:
            if self._error is None:
                self._error = f"{type(e).__name__}: {e}"
            handle(e)  # logs it, with its traceback, as a critical record

        return process_uncaught_exception

    def _from_service(self, message: Any) -> None:
        """What the service sends its frontend (on the service's threads)."""
        band = message.get("band") if isinstance(message, dict) else None
        if band == "status_update":
            with self._changed:
                self._status = message["statuscode"]
                self._initialized = self._initialized or self._status in _STARTED
                self._changed.notify_all()
        elif band == "log":  # nothing sends these here (see _initialize_logging), but should something:
            record = message.get("payload")
            if isinstance(record, logging.LogRecord):
                logging.getLogger(record.name).handle(record)
        elif band == "request_termination":
            self._commands.send({"band": "command", "payload": Commands.SHUTDOWN})
        elif band == "set_name":
            self.name = str(message.get("name") or self.name)
        elif band != "liveness_check":
            log.warning("%s sent its frontend a message on no known band: %r", self.name, message)


def isolate_transport_tables(transport: Any) -> None:
    """Give ``transport`` subscription and transaction tables of its own.
    CommonTransport keeps them on the class, shared by every transport of
    the process while each numbers its subscriptions from 1: harmless with
    one service per process, but with several one PikaTransport's
    subscription 1 takes another's messages. ServiceThread does this to its
    transport; do it to any other workflows transport of the process (a
    client's PikaTransport) before it subscribes."""
    if "_CommonTransport__subscription_id" in vars(transport):
        return  # it has subscribed already: its entries are in the shared table
    for attribute, empty in (("_CommonTransport__subscriptions", dict), ("_CommonTransport__transactions", set)):
        if attribute not in vars(transport):
            setattr(transport, attribute, empty())
