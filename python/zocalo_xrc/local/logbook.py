"""The local Zocalo's logbook: every message of a recipe run, findable by its GUID.

zocalo's Dispatcher keeps its own logbook (``zocalo.dispatcher.logbook_location``):
one file per dispatch, named by the run's GUID, with the request it got and
the recipe it started. What happens after that, it does not see. So each of
the local Zocalo's other services records the messages it receives and sends
in a *journal*: a workflows transport middleware, one JSON line per message,
one file per service process under ``<logbook>/journal/``. A run's lines are
those whose recipe environment ID (or, for a request to the dispatcher, its
``guid`` parameter) is the run's GUID; a run started on another's behalf
(Mimas asking for per-image analysis) names its parent, so a GUID's logbook
includes the runs it started.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from workflows.transport.middleware import BaseTransportMiddleware

#: zocalo configuration (storage plugin) key naming the logbook directory.
LOGBOOK_KEY = "zocalo.dispatcher.logbook_location"
PAYLOAD_CHARS = 400

log = logging.getLogger(__name__)


def logbook_location(config: Any) -> Path | None:
    """The logbook directory a zocalo configuration names, if any."""
    storage = getattr(config, "storage", None) if config is not None else None
    location = storage.get(LOGBOOK_KEY) if storage else None
    return Path(location) if location else None


class Journal(BaseTransportMiddleware):
    """Records what one service receives and sends, one JSON line each.

    The journal is a record, not the work: when its file cannot be written
    (a full disk, any OSError), the service goes on, the journal says so in
    one warning, counts the entries it could not write in :attr:`unwritten`,
    and writes again once it can. Its file only ever holds whole lines."""

    def __init__(self, directory: Path, service: str) -> None:
        super().__init__()
        self.directory = directory
        name = re.sub(r"[^A-Za-z0-9.-]+", "-", service).strip("-")
        self.path = directory / f"{name}-{os.getpid()}-{id(self):x}.jsonl"
        self.service = service
        #: Entries not written because the journal's file could not be (a counter: it only grows).
        self.unwritten = 0
        self._failing = False  # the last write failed: the next failure says nothing
        self._lock = threading.Lock()
        self._fd: int | None = None  # O_APPEND, one write per line: readers see whole lines
        self._size = 0  # the file's length after its last whole line
        self._closed = False
        self._pending: dict[Any, list[tuple[str, Any, str | None]]] = {}  # sends inside a transaction
        with self._lock:
            self._write(b"")  # open it now: an unwritable journal is said at once

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def _write(self, data: bytes) -> None:
        """Append ``data`` (whole lines), or nothing: on an OSError the file is
        cut back to its last whole line, the entry counted, the first failure
        of a run of them logged."""
        try:
            if self._fd is None:
                self.directory.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                self._size = os.fstat(self._fd).st_size
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as e:
            if self._fd is not None:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, self._size)
            self.unwritten += bool(data)
            if not self._failing:
                self._failing = True
                log.warning("%s's journal %s cannot be written (%s): the service goes on, unjournaled, and the "
                            "journal writes again when it can", self.service, self.path, e.strerror or e)
            return
        if self._failing:
            self._failing = False
            log.info("%s's journal %s writes again (%d entries not written in all)", self.service, self.path,
                     self.unwritten)
        self._size += len(data)

    def record(self, direction: str, where: str, message: Any, exchange: str | None = None) -> None:
        entry = describe(message)
        if entry is None:
            return
        entry.update(t=time.time(), service=self.service, dir=direction, queue=where)
        if exchange:
            entry["exchange"] = exchange
        line = json.dumps(entry, default=str, separators=(",", ":")) + "\n"
        with self._lock:
            if not self._closed:
                self._write(line.encode())

    # workflows middleware hooks
    def subscribe(self, call_next: Callable[..., int], channel: str, callback: Callable[..., Any], **kwargs: Any) -> int:
        def recorded(header: Mapping[str, Any], message: Any) -> None:
            self.record("in", channel, message)
            callback(header, message)

        return call_next(channel, recorded, **kwargs)

    def send(self, call_next: Callable[..., Any], destination: str, message: Any, **kwargs: Any) -> None:
        call_next(destination, message, **kwargs)
        self._sent(destination, message, **kwargs)

    def raw_send(self, call_next: Callable[..., Any], destination: str, message: Any, **kwargs: Any) -> None:
        call_next(destination, message, **kwargs)
        self._sent(destination, message, **kwargs)

    def _sent(self, destination: str, message: Any, transaction: Any = None, exchange: str | None = None,
              **_: Any) -> None:
        """A send is in the journal once it has happened: inside a
        transaction, when the transaction commits."""
        if transaction is None:
            self.record("out", destination, message, exchange)
        else:
            with self._lock:
                self._pending.setdefault(transaction, []).append((destination, message, exchange))

    def transaction_commit(self, call_next: Callable[..., Any], transaction_id: Any = None, **kwargs: Any) -> None:
        with self._lock:
            sends = self._pending.pop(transaction_id, [])
        call_next(transaction_id, **kwargs)  # a commit that fails sent nothing: nothing to record
        for destination, message, exchange in sends:
            self.record("out", destination, message, exchange)

    def transaction_abort(self, call_next: Callable[..., Any], transaction_id: Any = None, **kwargs: Any) -> None:
        with self._lock:
            self._pending.pop(transaction_id, None)
        call_next(transaction_id, **kwargs)


def attach(service: Any) -> Journal | None:
    """Give a running workflows service a journal, when its zocalo
    configuration names a logbook. Call it in ``initializing()``, before
    subscribing."""
    location = logbook_location(getattr(service, "config", None))
    if location is None or service.transport is None:
        return None
    journal = Journal(location / "journal", service._service_name)
    service.transport.add_middleware(journal)
    return journal


def detach(service: Any) -> None:
    """Close the journal :func:`attach` gave a service (at its shutdown)."""
    journal = getattr(service, "journal", None)
    if journal is not None:
        journal.close()


def describe(message: Any) -> dict[str, Any] | None:
    """The journal's view of a message: its run, its step and its payload
    (abridged). None for a message of no run (status broadcasts)."""
    if isinstance(message, (bytes, str)):
        try:
            message = json.loads(message)
        except ValueError:
            return None
    if not isinstance(message, Mapping):
        return None
    if "recipe" in message and "recipe-pointer" in message:  # a recipe envelope
        environment = message.get("environment") or {}
        recipe, pointer = message.get("recipe") or {}, message["recipe-pointer"]
        step = recipe.get(str(pointer)) or recipe.get(pointer) or {}  # a workflows Recipe keys steps by int
        parameters = step.get("parameters") or {}
        entry: dict[str, Any] = {"guid": environment.get("ID"), "step": message["recipe-pointer"],
                                 "step_service": step.get("service")}
        if "dcid" in parameters:
            entry["dcid"] = parameters["dcid"]
        entry["payload"] = _abridged(message.get("payload"))
        if not message.get("recipe-path") and parameters:  # a run's first step: what it was asked to do
            entry["parameters"] = _abridged(parameters)
        return entry if entry["guid"] else None
    parameters = message.get("parameters")
    if isinstance(parameters, Mapping) and "recipes" in message:  # a request to the dispatcher
        return {"guid": parameters.get("guid"), "parent": parameters.get("parent_guid"),
                "recipes": message.get("recipes"), "dcid": parameters.get("ispyb_dcid"),
                "payload": _abridged(dict(parameters))}
    return None


def _abridged(payload: Any) -> Any:
    text = json.dumps(payload, default=str, separators=(",", ":"))
    return payload if len(text) <= PAYLOAD_CHARS else text[:PAYLOAD_CHARS] + "..."


@dataclass
class Run:
    """One recipe run in the logbook: its dispatch and its messages."""

    guid: str
    dispatch: Path | None
    entries: list[dict[str, Any]] = field(default_factory=list)
    children: list[str] = field(default_factory=list)


class Logbook:
    """Reads a local Zocalo's logbook directory."""

    def __init__(self, location: Path | str) -> None:
        self.location = Path(location)

    def entries(self) -> Iterator[dict[str, Any]]:
        for path in sorted((self.location / "journal").glob("*.jsonl")):
            with open(path) as f:
                for line in f:
                    if line.endswith("\n"):  # a line still being written is skipped
                        yield json.loads(line)

    def dispatch_file(self, guid: str) -> Path | None:
        """zocalo's Dispatcher's own record of the run, if it wrote one."""
        clean = re.sub(r"[^a-z0-9A-Z\-]+", "", guid)
        if len(clean) < 3:
            return None
        found = sorted(self.location.glob(f"*/{clean[:2]}/{clean[2:]}"))
        return found[-1] if found else None

    def run(self, guid: str) -> list[Run]:
        """The run ``guid`` and every run it started, oldest message first
        within each; empty when the logbook knows nothing of it."""
        of_run: dict[str | None, list[dict[str, Any]]] = {}  # one pass: each run's entries, and who started whom
        children: dict[str, dict[str, None]] = {}
        for e in sorted(self.entries(), key=lambda e: e["t"]):
            of_run.setdefault(e.get("guid"), []).append(e)
            if e.get("parent") and e.get("guid"):
                children.setdefault(e["parent"], {})[e["guid"]] = None
        runs, todo = [], [guid]
        while todo:
            g = todo.pop(0)
            run = Run(g, self.dispatch_file(g), of_run.get(g, []), list(children.get(g, {})))
            if run.entries or run.dispatch:
                runs.append(run)
            todo.extend(run.children)
        return runs

    def runs(self) -> list[dict[str, Any]]:
        """Every run the journal saw: GUID, first time, DCID, first step's
        service, number of messages; oldest first."""
        seen: dict[str, dict[str, Any]] = {}
        for e in sorted(self.entries(), key=lambda e: e["t"]):
            g = e.get("guid")
            if not g:
                continue
            run = seen.setdefault(g, {"guid": g, "t": e["t"], "dcid": None, "what": None, "messages": 0,
                                      "parent": None})
            run["messages"] += 1
            run["dcid"] = run["dcid"] or e.get("dcid")
            run["parent"] = run["parent"] or e.get("parent")
            if run["what"] is None and (e.get("step_service") or e.get("recipes")):
                run["what"] = e.get("step_service") or ",".join(e.get("recipes") or [])
        return list(seen.values())


def format_run(runs: list[Run], *, every_image: bool = False) -> str:
    """A logbook readable in a terminal: per run, its dispatch record and its
    messages in time order (per-image messages summarised unless asked)."""
    lines: list[str] = []
    for run in runs:
        lines.append(f"run {run.guid}" + (f" (started {', '.join(run.children)})" if run.children else ""))
        if run.dispatch:
            lines.append(f"  dispatcher's record: {run.dispatch}")
        images: dict[tuple[str, str], list[dict[str, Any]]] = {}
        shown: list[Any] = []  # lines, or the key of a group of per-image messages, in time order
        for e in run.entries:
            payload = e.get("payload")
            if isinstance(payload, Mapping) and "file-number" in payload and not every_image:
                key = (e["service"], e["dir"])
                if key not in images:
                    shown.append(key)
                images.setdefault(key, []).append(e)
            else:
                shown.append(_line(e))
        for item in shown:
            if isinstance(item, str):
                lines.append(item)
                continue
            group = images[item]
            first, last = group[0], group[-1]
            lines.append(f"  {_clock(first['t'])}..{_clock(last['t'])} {first['service']} "
                         f"{'->' if first['dir'] == 'out' else '<-'} {first['queue']}: {len(group)} per-image "
                         f"message(s) (--every-image lists them)")
    return "\n".join(lines)


def _line(e: Mapping[str, Any]) -> str:
    where = f"{e.get('exchange')}/{e['queue']}" if e.get("exchange") else e["queue"]
    step = f" step {e['step']} ({e.get('step_service')})" if "step" in e else ""
    arrow = "->" if e["dir"] == "out" else "<-"
    said = e.get("parameters") if e.get("payload") in ([], {}, None) and "parameters" in e else e.get("payload")
    text = said if isinstance(said, str) else json.dumps(said, default=str)
    return f"  {_clock(e['t'])} {e['service']} {arrow} {where}{step}: {text}"


def _clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) + f".{int(t * 1000) % 1000:03d}"
