"""A bench's service process with timestamps on the way from a group's last
image to its commit's answer, for ``profile_service.py``::

    python -m timed_service OUT.jsonl -m zocalo_xrc service --queue Q --broker URL
    python -m timed_service OUT.jsonl -m floor_xrc_service --queue Q --broker URL

It wraps pika's I/O points (the poller's wake-up, a socket read, a delivery,
``tx.commit``, the socket write that sends it, ``tx.commit-ok``) and, for
zocalo-xrc, the service's steps (parse, assembly, centring, payload,
envelope, commit), then runs the module as ``python -m`` would. Nothing of
the service is changed but the clock reads. Each commit writes one JSON line
to ``OUT.jsonl``: the group's lower DCID, its messages since the previous
commit (count, first delivery, time inside deliveries) and each step's
``[start, end]`` in ``time.perf_counter`` seconds, which on Linux is
CLOCK_MONOTONIC, the same clock as the bench's.
"""

from __future__ import annotations

import gc
import json
import re
import runpy
import sys
from time import perf_counter as now
from typing import Any, Callable

import pika.channel
from pika.adapters import select_connection
from pika.adapters.utils import io_services_utils

DCID = re.compile(rb'"dcid": "?(\d+)')


class Timeline:
    """What happened since the last commit (``current``: the steps of the
    commit to come), and the commits awaiting their answer. A step belongs to
    the record that was current when it started."""

    def __init__(self, path: str) -> None:
        self.out = open(path, "a", buffering=1)
        self.wake = self.read = 0.0
        self.current: dict[str, Any] = self.fresh()
        self.sent: list[dict[str, Any]] = []  # committed, the commit not yet written to the socket

    @staticmethod
    def fresh() -> dict[str, Any]:
        return {"messages": 0, "inside deliveries": 0.0}

    def delivered(self, record: dict[str, Any], t0: float, t1: float) -> None:
        if not record["messages"]:
            record["first delivery"] = [t0, t0]
        record["messages"] += 1
        record["inside deliveries"] += t1 - t0
        record["last delivery"] = [t0, t1]
        record["its wake-up"] = [self.wake, self.wake]
        record["its read"] = [self.read, self.read]

    def commit(self, dcid: int | None, t: float) -> dict[str, Any]:
        record, self.current = self.current, self.fresh()
        record["dcid"], record["tx.commit called"] = dcid, [t, t]
        self.sent.append(record)
        return record

    def collected(self, phase: str, info: dict[str, int]) -> None:
        """gc's callback: each collection of the cyclic garbage collector, by generation."""
        if phase == "start":
            self.gc_start = now()
        else:
            t1 = now()
            self.current.setdefault("gc", []).append([self.gc_start, t1, info["generation"]])
            for record in self.sent:  # between tx.commit called and written
                record.setdefault("gc before written", []).append([self.gc_start, t1, info["generation"]])

    def written(self, t: float) -> None:
        for record in self.sent:
            record["tx.commit written"] = [t, t]
        self.sent = []

    def answered(self, record: dict[str, Any], t0: float, t1: float) -> None:
        record["tx.commit-ok"] = [t0, t1]
        self.out.write(json.dumps(record) + "\n")


def timed(owner: Any, name: str, label: str, timeline: Timeline) -> None:
    """``owner.name`` records its start and end as step ``label``."""
    original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
    unwrap = isinstance(original, classmethod)
    fn: Callable[..., Any] = original.__func__ if unwrap else original

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        record, t0 = timeline.current, now()
        try:
            return fn(*args, **kwargs)
        finally:
            record[label] = [t0, now()]

    setattr(owner, name, classmethod(wrapper) if unwrap else wrapper)


def install(timeline: Timeline) -> None:
    gc.callbacks.append(timeline.collected)
    poller = select_connection._PollerBase
    dispatch = poller._dispatch_fd_events

    def wake(self: Any, fd_event_map: Any) -> None:
        timeline.wake = now()
        dispatch(self, fd_event_map)

    poller._dispatch_fd_events = wake

    transport = io_services_utils._AsyncTransportBase
    consume, produce = transport._consume, transport._produce

    def read(self: Any) -> None:
        timeline.read = now()
        consume(self)

    def write(self: Any) -> None:
        pending = bool(timeline.sent)
        produce(self)
        if pending:
            timeline.written(now())

    transport._consume, transport._produce = read, write

    channel = pika.channel.Channel
    on_deliver, tx_commit, basic_publish, basic_ack = (channel._on_deliver, channel.tx_commit, channel.basic_publish,
                                                       channel.basic_ack)
    published: dict[int, int | None] = {}

    def deliver(self: Any, method_frame: Any, header_frame: Any, body: bytes) -> None:
        record, t0 = timeline.current, now()
        on_deliver(self, method_frame, header_frame, body)
        timeline.delivered(record, t0, now())

    def publish(self: Any, exchange: str, routing_key: str, body: bytes, *args: Any, **kwargs: Any) -> None:
        record, t0 = timeline.current, now()
        found = DCID.search(body) if exchange == "results" or routing_key.startswith("xrc.") else None
        basic_publish(self, exchange, routing_key, body, *args, **kwargs)
        if found:
            published[id(self)] = int(found.group(1))
            record["result published"] = [t0, now()]

    def ack(self: Any, *args: Any, **kwargs: Any) -> None:
        record, t0 = timeline.current, now()
        basic_ack(self, *args, **kwargs)
        record["acks"] = [record.get("acks", [t0])[0], now()]

    def commit(self: Any, callback: Any = None) -> None:
        record = timeline.commit(published.pop(id(self), None), now())

        def answered(frame: Any) -> None:
            t0 = now()
            if callback is not None:
                callback(frame)
            timeline.answered(record, t0, now())

        tx_commit(self, answered)

    channel._on_deliver, channel.tx_commit, channel.basic_publish, channel.basic_ack = deliver, commit, publish, ack


def install_zocalo_xrc(timeline: Timeline) -> None:
    from zocalo_xrc.messaging import rabbitmq
    from zocalo_xrc.service import assembly, recipe, runner

    timed(runner.XrcService, "on_message", "on_message", timeline)
    timed(assembly.PiaMessage, "parse", "PiaMessage.parse", timeline)
    timed(assembly.Assembly, "add", "Assembly.add", timeline)
    timed(runner.XrcService, "_complete", "_complete", timeline)
    for name in ("centre", "_payload", "_write_2d_files", "message_id_for"):
        timed(recipe if name == "message_id_for" else runner, name, name, timeline)
    timed(recipe.Envelope, "send", "Envelope.send", timeline)
    timed(rabbitmq._AmqpSubscription, "commit", "Subscription.commit", timeline)
    timed(rabbitmq._AmqpSubscription, "_commit", "_commit (frames)", timeline)


def main() -> None:
    path, flag, module, *rest = sys.argv[1:]
    assert flag == "-m", "usage: python -m timed_service OUT.jsonl -m MODULE ARGS..."
    timeline = Timeline(path)
    install(timeline)
    if module == "zocalo_xrc":
        install_zocalo_xrc(timeline)
    sys.argv = [module, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
