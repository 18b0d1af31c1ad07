"""The X-ray centring service on a transport: consume per-image messages,
centre each group once it is complete, send the result to the step's
``success`` output, abandon idle groups to ``abort``.

Every message of an open group stays unacked until the group is finished.
Then the result is published and the group's messages are acked in one
transaction (:meth:`Subscription.commit`): a service that dies before the
broker commits has sent nothing and acked nothing, and the broker hands the
messages to the next one, which rebuilds the scan and sends the result; one
that dies after has done both. So each result is sent exactly once. The
result also carries a ``message_id`` made from its content. A message that
can never count is dead-lettered at once, with the reason in the log; it
never loops.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Self

from .._native import XrcResults
from .._results import GridScan2DResult
from ..messaging import Delivery, Outgoing, QueueSpec, Subscription, Transport
from ..messages import is_recipe_envelope
from .metrics import ServiceMetrics
from .assembly import Assembly, Fate, Group, GroupRejected, MessageRejected, PiaMessage, centre
from .recipe import Envelope, EnvelopeError

log = logging.getLogger(__name__)

#: How long a group may wait for its next image before it is abandoned.
IDLE_S = 15 * 60.0



@dataclass
class _Open:
    """What the service holds for an open group: its unacked messages, the
    envelope of each grid's first message, when it last heard of it."""

    deliveries: dict[tuple[int, int], Delivery] = field(default_factory=dict)  # by (DCID, image)
    envelopes: dict[int, Envelope] = field(default_factory=dict)
    last_heard: float = 0.0


class AtomicConsumer:
    """Consumes ``queue`` on ``transport`` through an atomic subscription
    (:meth:`Subscription.commit`), from :meth:`start` to :meth:`stop`;
    subclasses say what :meth:`on_message` does."""

    def __init__(self, transport: Transport, queue: str, prefetch: int) -> None:
        self.transport, self.queue, self.prefetch = transport, queue, prefetch
        self.subscription: Subscription | None = None

    def start(self, wait: float | None = 30.0) -> Self:
        self.subscription = self.transport.subscribe(QueueSpec(self.queue), self.on_message, prefetch=self.prefetch,
                                                     wait=wait, atomic=True)
        log.info("consuming %s", self.queue)
        return self

    def stop(self) -> None:
        """Stop consuming; what is held unacked goes back to the queue, for the next consumer."""
        if self.subscription is not None:
            self.subscription.cancel()
            self.subscription = None

    def on_message(self, delivery: Delivery) -> None:
        raise NotImplementedError


class XrcService(AtomicConsumer):
    """Consumes ``queue`` on ``transport`` (start with :meth:`start`). All its
    work happens on the transport's thread; :attr:`completed` counts results
    sent, :attr:`rejected` messages dead-lettered. A result no queue takes
    is kept in ``dlq.<dead_letters>`` (default: ``dlq.<queue>``). With
    ``metrics`` (one :class:`~.metrics.ServiceMetrics` per process), it
    counts what it does there."""

    def __init__(self, transport: Transport, queue: str = "reduce.xray_centering", *, idle_s: float = IDLE_S,
                 prefetch: int = 65535, clock: Callable[[], float] = time.time, dead_letters: str | None = None,
                 metrics: ServiceMetrics | None = None) -> None:
        super().__init__(transport, queue, prefetch)
        self.metrics = metrics
        self.idle_s, self.clock = idle_s, clock
        self.dead_letters = dead_letters or queue  # results no queue takes go to dlq.<this>
        self.assembly = Assembly()
        self.open: dict[tuple[int, ...], _Open] = {}
        self.aborted: set[tuple[int, ...]] = set()
        self.aborted_named: set[tuple[str, ...]] = set()
        self.completed = 0
        self.rejected = 0
        self.session: Any = None

    # ---- one message -------------------------------------------------------------

    def on_message(self, delivery: Delivery) -> None:
        if delivery.session != self.session:
            self._start_afresh(delivery.session)
        if not is_recipe_envelope(delivery.headers):
            return self._reject(delivery, "not a recipe envelope (no workflows-recipe header)")
        try:
            message = PiaMessage.parse(delivery.body)
        except (EnvelopeError, MessageRejected) as e:
            return self._reject(delivery, str(e))
        except GroupRejected as e:  # told by the message itself: abort once per group it names
            envelope = Envelope.parse(delivery.body)
            key = named_group(envelope)
            if key not in self.aborted_named:
                self.aborted_named.add(key)
                self._commit(envelope.send("abort", {}), [], "abort", None)
            return self._reject(delivery, str(e))
        if message.group_dcids in self.aborted:
            return self._reject(delivery, f"its group DCID {', '.join(map(str, message.group_dcids))} was abandoned")
        try:
            fate, group = self.assembly.add(message)
        except MessageRejected as e:
            return self._reject(delivery, str(e))
        except GroupRejected as e:
            return self._reject_group(delivery, e.group, str(e), message.envelope)
        held = self.open.get(group.dcids) or self._open(group.dcids)
        if message.dcid not in held.envelopes:
            held.envelopes[message.dcid] = message.envelope
        held.last_heard = time.monotonic()
        if fate is Fate.DUPLICATE:
            log.info("DCID %s: image %d again (a duplicate); it changes nothing", message.dcid, message.file_number)
            delivery.ack()
            return
        held.deliveries[(message.dcid, message.file_number)] = delivery
        if fate is Fate.COMPLETE:
            self._complete(group, held)
        elif len(held.deliveries) == 1:
            self._watch(group.dcids)

    def _open(self, key: tuple[int, ...]) -> _Open:
        held = self.open[key] = _Open()
        if self.metrics is not None:
            self.metrics.open_scans.inc()
        return held

    def _close(self, key: tuple[int, ...]) -> _Open | None:
        held = self.open.pop(key, None)
        if held is not None and self.metrics is not None:
            self.metrics.open_scans.dec()
        return held

    def _start_afresh(self, session: Any) -> None:
        """A new channel: whatever was held unacked is being delivered again,
        so open groups are rebuilt from those deliveries."""
        if self.open:
            log.warning("the broker is delivering again what %d open scan(s) held; rebuilding them", len(self.open))
        self.session = session
        for key in list(self.open):
            group = self.assembly.groups.get(key)
            if group is not None:
                self.assembly.drop(group)
            self._close(key)

    def _reject(self, delivery: Delivery, why: str) -> None:
        """Dead-letter a message that can never count; it never comes back."""
        self.rejected += 1
        if self.metrics is not None:
            self.metrics.rejected.inc()
        log.error("dead-lettering a message on %s: %s", self.queue, why)
        delivery.reject(requeue=False)

    def _reject_group(self, delivery: Delivery, group: Group | None, why: str, envelope: Envelope | None) -> None:
        """A group that cannot be centred: abort it once, dead-letter its messages."""
        if group is not None and group.dcids not in self.aborted:
            self.aborted.add(group.dcids)
            held = self._close(group.dcids)
            self.assembly.drop(group)
            if envelope is not None:
                self._commit(envelope.send("abort", {}), [], "abort", group.dcids,
                             lambda: self._finished(group, "abort"))
            for d in held.deliveries.values() if held else []:
                self._reject(d, why)
        self._reject(delivery, why)

    # ---- a complete group ---------------------------------------------------------

    def _complete(self, group: Group, held: _Open) -> None:
        try:
            result = centre(group)
        except GroupRejected as e:
            last = held.deliveries.popitem()[1]
            self._reject_group(last, group, str(e), held.envelopes.get(group.dcids[0]))
            return
        payload = _payload(result)
        envelope = held.envelopes[group.dcids[0]]  # the xy grid's recipe: the same result, whatever came last
        sends = envelope.send("success", payload)
        if isinstance(result, GridScan2DResult):
            _write_2d_files(envelope, result)
        newest = group.newest_seen_at
        latency = f"{(self.clock() - newest) * 1e3:.0f} ms after the newest image" if newest else "no image time"
        found = len(result) if isinstance(result, XrcResults) else (1 if result.ok else 0)
        log.info("%s: %s result, %d found, %s", describe(group, envelope), payload["type"], found, latency)
        self.assembly.drop(group)
        self._close(group.dcids)

        def sent() -> None:
            self.completed += 1
            self._finished(group, "result", None if newest is None else self.clock() - newest)

        self._commit(sends, list(held.deliveries.values()), "result", group.dcids, sent)

    def _finished(self, group: Group, outcome: str, latency_s: float | None = None) -> None:
        if self.metrics is not None:
            self.metrics.finished("3d" if len(group.dcids) > 1 else "2d", outcome, latency_s)

    def _commit(self, sends: list[Outgoing], acks: list[Delivery], what: str, key: tuple[int, ...] | None,
                then: Callable[[], None] | None = None) -> None:
        """Publish ``sends`` and ack ``acks`` as one transaction; say what
        became of it once the broker has answered."""
        if not sends:
            log.warning("the recipe gives the %s of DCID %s nowhere to go; settling its messages", what, key)
        assert self.subscription is not None
        future = self.subscription.commit(sends, acks)

        def done(f: Future[list[Outgoing]]) -> None:
            error = f.exception()
            if error is not None:  # committed whole or not at all: if not, the messages come back
                log.warning("the %s of DCID %s: %s", what, key, error)
                return
            if then is not None:
                then()
            for m in f.result():
                keep_returned(self.transport, self.dead_letters, m, f"the {what} of DCID {key}")

        future.add_done_callback(lambda f: self.transport.call_soon(lambda: done(f)))

    # ---- idle groups ----------------------------------------------------------------

    def _watch(self, key: tuple[int, ...]) -> None:
        self.transport.call_later(self.idle_s, lambda: self._check_idle(key))

    def _check_idle(self, key: tuple[int, ...]) -> None:
        held = self.open.get(key)
        group = self.assembly.groups.get(key)
        if held is None or group is None:  # centred, aborted or rejected since
            return
        quiet = time.monotonic() - held.last_heard
        if quiet < self.idle_s:
            self.transport.call_later(self.idle_s - quiet, lambda: self._check_idle(key))
            return
        envelope = held.envelopes[min(held.envelopes)]
        log.warning("%s: abandoned after %.0f s without an image; missing: %s", describe(group, envelope), quiet,
                    group.missing())
        self._close(key)
        self.assembly.drop(group)
        # settled with the abort: abandoned, not to be tried again
        self._commit(envelope.send("abort", {}), list(held.deliveries.values()), "abort", key,
                     lambda: self._finished(group, "abort"))


def describe(group: Group, envelope: Envelope) -> str:
    """The group, its DCG where the recipe names one, and the recipe ID, for a log line."""
    extra = [f"DCG {envelope.dcgid}"] if envelope.dcgid is not None else []
    extra.append(f"recipe ID {envelope.environment.get('ID', '?')}")
    return f"{group.describe()} ({', '.join(extra)})"


def keep_returned(transport: Transport, queue: str, m: Outgoing, what: str) -> None:
    """``m`` came back: no queue takes it. Keep a copy in ``dlq.<queue>``
    (with where it was going) and say so."""
    log.error("%s was returned: no queue takes %s; a copy goes to dlq.%s", what, m.describe(), queue)
    headers = {**m.headers, "x-zocalo-xrc-returned-from": m.describe()}
    copy = transport.publish("", f"dlq.{queue}", m.body, headers, m.message_id)

    def lost(f: Future[None]) -> None:
        if f.exception() is not None:
            log.error("%s is lost: dlq.%s does not take it either (%s)", what, queue, f.exception())

    copy.add_done_callback(lost)


def named_group(envelope: Envelope) -> tuple[str, ...]:
    """The DCIDs a message names for its group, as written (for a group
    that cannot be one)."""
    parameters = envelope.step.get("parameters") or {}
    others = parameters.get("dcg_dcids") or []
    return tuple(sorted(str(d) for d in [parameters.get("dcid"), *(others if isinstance(others, list) else [others])]))


def _payload(result: XrcResults | GridScan2DResult) -> dict[str, Any]:
    """The result message's payload, as Diamond's service sends it."""
    if isinstance(result, XrcResults):
        return {"results": result.to_dicts(), "status": "success", "type": "3d"}
    return {"results": [result.to_dict()], "status": "success", "type": "2d"}


def _write_2d_files(envelope: Envelope, result: GridScan2DResult) -> None:
    """The 2D step's ``output`` (the result as JSON), ``log`` (readable text)
    and ``results_symlink``, where the step names them."""
    from ..cli import format_2d

    parameters = envelope.step.get("parameters", {})
    try:
        if parameters.get("output"):
            out = Path(parameters["output"])
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result.to_dict(), indent=2))
            link = parameters.get("results_symlink")
            if link:
                target = out.parent.parent / str(link)
                if not target.exists():
                    target.symlink_to(out.parent)
        if parameters.get("log"):
            path = Path(parameters["log"])
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(format_2d(result) + "\n")
    except OSError as e:
        log.error("DCID %s: cannot write the 2D result files: %s", parameters.get("dcid"), e)
