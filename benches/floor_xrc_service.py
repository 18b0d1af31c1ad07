"""The floor of the X-ray centring service bench: what any service on this
broker must at least do, and nothing more.

Plain pika (a ``SelectConnection``: callbacks straight from the I/O loop, no
thread or event queue between), one channel in transaction mode, prefetch
65535 as the service's. For each per-image message it reads the body once
(``json.loads``, the cheapest correct way: it must know the message's DCID,
the other DCIDs of its group and each grid's image count) and counts. On the
last image of a group it publishes a dummy result (a recipe envelope naming
the group's lower DCID, no results) to the ``results`` exchange, routing key
``xrc.<beamline>``, acks every message of the group, and commits, one
transaction. No centring, no validation, no duplicate detection (the bench
sends no duplicates)::

    python -m floor_xrc_service --broker amqp://guest:guest@127.0.0.1:5672/%2F --queue reduce.xray_centering

SIGTERM stops it (unacked messages go back to the queue).
"""

from __future__ import annotations

import argparse
import bisect
import json
import signal
import sys
from collections import deque
from typing import Any

import pika
from pika.adapters.select_connection import SelectConnection

RESULT_PROPERTIES = pika.BasicProperties(delivery_mode=2, headers={"workflows-recipe": True})
#: the dummy results by kind (a 2D payload has exactly one result, with every field)
DUMMY = {"3d": b"[]", "2d": (b'[{"centre_of_mass":[0.5,0.5],"max_voxel":[0,0],"max_count":0.0,"n_voxels":0,'
                             b'"total_count":0.0,"steps":[1,1],"box_size_px":[1.0,1.0],"snapshot_offset":[0.0,0.0],'
                             b'"centre_x":0.0,"centre_y":0.0,"centre_x_box":0.5,"centre_y_box":0.5,"status":"ok",'
                             b'"message":"a dummy","best_image":1,"reflections_in_best_image":0,"best_region":[]}]')}


class Group:
    """One group's messages so far: delivery tags, grids seen, images still to come."""

    __slots__ = ("dcids", "seen", "left", "tags", "routing_key", "kind")

    def __init__(self, dcids: tuple[int, ...], routing_key: str) -> None:
        self.dcids, self.routing_key = dcids, routing_key
        self.kind = "3d" if len(dcids) > 1 else "2d"
        self.seen: set[int] = set()
        self.left = 0
        self.tags: list[int] = []


class Floor:
    def __init__(self, url: str, queue: str) -> None:
        self.queue = queue
        self.groups: dict[tuple[int, ...], Group] = {}
        self.channel: Any = None
        self.committing = False
        self.waiting: deque[Group] = deque()  # complete while a commit was in flight
        self.connection = SelectConnection(pika.URLParameters(url), on_open_callback=self.on_open,
                                           on_open_error_callback=self.on_fail, on_close_callback=self.on_fail)

    def on_fail(self, _connection: Any, error: Any) -> None:
        print(f"floor: the connection is closed ({error})", flush=True)
        self.connection.ioloop.stop()

    def on_open(self, connection: Any) -> None:
        connection.channel(on_open_callback=self.on_channel)

    def on_channel(self, channel: Any) -> None:
        self.channel = channel
        channel.tx_select(lambda _: channel.basic_qos(prefetch_count=65535, callback=lambda _: self.consume()))

    def consume(self) -> None:
        self.channel.basic_consume(self.queue, self.on_message, auto_ack=False)
        print(f"X-ray centring floor consuming {self.queue}", flush=True)

    def on_message(self, _channel: Any, method: Any, _properties: Any, body: bytes) -> None:
        message = json.loads(body)
        step = message["recipe"][str(message["recipe-pointer"])]
        parameters = step["parameters"]
        dcid = int(parameters["dcid"])
        key = tuple(sorted({dcid, *(int(d) for d in parameters.get("dcg_dcids") or [])}))
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = Group(key, f"xrc.{parameters['beamline']}")
        if dcid not in group.seen:
            group.seen.add(dcid)
            gridinfo = step["gridinfo"]
            group.left += int(gridinfo["steps_x"]) * int(gridinfo["steps_y"])
        group.tags.append(method.delivery_tag)
        group.left -= 1
        if group.left == 0 and len(group.seen) == len(key):
            del self.groups[key]
            if self.committing:
                self.waiting.append(group)
            else:
                self.commit(group)

    def commit(self, group: Group) -> None:
        """The dummy result and the group's acks, one transaction: one multiple
        ack for the tags below every other open group's first, one each above."""
        channel = self.channel
        body = (b'{"payload": {"results": %s, "status": "success", "type": "%s"}, "recipe": {"3": {"parameters": '
                b'{"dcid": "%d"}}}, "recipe-path": [2], "recipe-pointer": 3}'
                % (DUMMY[group.kind], group.kind.encode(), group.dcids[0]))
        channel.basic_publish("results", group.routing_key, body, RESULT_PROPERTIES)
        keep = min((g.tags[0] for g in self.groups.values() if g.tags), default=None)
        tags = group.tags  # ascending: in the order of delivery
        k = len(tags) if keep is None else bisect.bisect_left(tags, keep)
        if k:
            channel.basic_ack(tags[k - 1], multiple=True)
        for t in tags[k:]:
            channel.basic_ack(t)
        self.committing = True
        channel.tx_commit(self.on_commit_ok)

    def on_commit_ok(self, _frame: Any) -> None:
        self.committing = False
        if self.waiting:
            self.commit(self.waiting.popleft())

    def stop(self) -> None:
        self.connection.ioloop.add_callback_threadsafe(self.connection.close)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", required=True, help="amqp://user:password@host:port/vhost")
    parser.add_argument("--queue", required=True, help="the queue of per-image messages")
    args = parser.parse_args(argv)
    floor = Floor(args.broker, args.queue)
    signal.signal(signal.SIGTERM, lambda *_: floor.stop())
    floor.connection.ioloop.start()
    return 0


if __name__ == "__main__":
    sys.exit(main())
