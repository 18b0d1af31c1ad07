"""Messaging on a real RabbitMQ broker, ours and the usual way side by side.

(1) A result published -> typed, sorted results in the waiting caller, against
    a ``workflows.recipe.wrap_subscribe`` consumer. Goal: p50 at least 2.5x lower.
(2) Triggering a 2-grid scan (two starts, two ends, each confirmed) against a
    fresh connection per message, as the code Diamond runs today does.
    Goal: at least 10x faster.
"""

import itertools
import queue
import uuid

import pika
import pytest
import workflows.recipe
from workflows.transport.pika_transport import PikaTransport

import zocalo_xrc as zx
from bench_result_messages import from_dicts
from zocalo_xrc.messaging.rabbitmq import AmqpTransport

ROUNDS = 300
ROWS = [
    zx.XrcResult((2.2071, 1.4175, 13.3172), (2, 1, 13), 702.0, 12, 5832.0, 123456, ((1, 0, 12), (4, 3, 15))),
    zx.XrcResult((7.5, 3.25, 4.0), (7, 3, 4), 950.0, 3, 2100.0, 123456, ((7, 3, 3), (8, 4, 5))),
    zx.XrcResult((11.5, 1.5, 2.5), (11, 1, 2), 40.0, 1, 40.0, 123456, ((11, 1, 2), (12, 2, 3))),
]


@pytest.fixture(scope="module")
def settings(rabbit):
    return zx.ConnectionSettings.from_url(rabbit.url)


@pytest.fixture(scope="module")
def amqp(settings):
    t = AmqpTransport(settings, connection_name="bench")
    yield t
    t.close()


@pytest.fixture(scope="module")
def publisher(settings):
    """One plain pika channel that publishes every result, for both contenders."""
    conn = pika.BlockingConnection(pika.URLParameters(settings.url().replace("amqp://guest@", "amqp://guest:guest@")))
    yield conn.channel()
    conn.close()


def workflows_transport(settings):
    t = PikaTransport()
    t.config = {"--rabbit-host": settings.host, "--rabbit-port": settings.port, "--rabbit-user": settings.username,
                "--rabbit-pass": settings.password.reveal(), "--rabbit-vhost": settings.vhost}
    return t


QUEUE_KINDS = {
    "quorum queue (Diamond's)": "quorum",
    "classic queue": "classic",
}


@pytest.fixture(scope="module", params=list(QUEUE_KINDS))
def queue_kind(request):
    return request.param


def results_queue(amqp, publisher, kind="quorum queue (Diamond's)"):
    """A results queue on the results exchange. Diamond's is a quorum queue,
    which delivers a persistent message only once its Raft log entry is
    written (about 1 ms here): the same floor for every consumer. A classic
    queue shows what the consumers themselves cost."""
    name = f"xrc.bench-{uuid.uuid4().hex[:8]}"
    amqp.declare_results_queue(name)
    if QUEUE_KINDS[kind] == "classic":
        amqp.delete_queue(name)
        publisher.queue_declare(name, durable=True)
        publisher.queue_bind(name, "results", routing_key=name)
    return name


class Rounds:
    """Each round publishes the result of a new collection."""

    def __init__(self, publisher, queue_name):
        self.publisher, self.queue = publisher, queue_name
        self.dcids = itertools.count(1)
        self.properties = pika.BasicProperties(delivery_mode=2, headers={"workflows-recipe": True})

    def setup(self):
        dcid = next(self.dcids)
        body = zx.build_result_message(zx.XrcResults(ROWS), dcid=dcid, dcgid=dcid, environment_id="bench")
        return (body, dcid), {}

    def publish(self, body):
        self.publisher.basic_publish("results", self.queue, body, self.properties)


def test_result_latency_zocalo_xrc(record, amqp, publisher, queue_kind):
    rounds = Rounds(publisher, results_queue(amqp, publisher, queue_kind))
    zocalo = zx.ZocaloResults(amqp, queue=rounds.queue, timeout_s=10)
    zocalo.subscribe()

    def receive(body, dcid):
        rounds.publish(body)
        return zocalo.trigger(dcids=dcid)

    results = record("result latency", queue_kind, "zocalo-xrc", receive, rounds=ROUNDS, setup=rounds.setup)
    assert list(results) == sorted(ROWS, key=lambda r: r.max_count, reverse=True)
    zocalo.close()


def test_result_latency_workflows(record, amqp, publisher, settings, queue_kind):
    rounds = Rounds(publisher, results_queue(amqp, publisher, queue_kind))
    transport = workflows_transport(settings)
    transport.connect()
    got = queue.Queue()

    def on_result(rw, header, message):
        transport.ack(header)
        results = sorted(from_dicts(message["results"]), key=lambda r: r.max_count, reverse=True)
        got.put((int(rw.recipe_step["parameters"]["dcid"]), results))

    workflows.recipe.wrap_subscribe(transport, rounds.queue, on_result, acknowledgement=True,
                                    allow_non_recipe_messages=False)

    def receive(body, dcid):
        rounds.publish(body)
        while True:
            got_dcid, results = got.get(timeout=10)
            if got_dcid == dcid:
                return results

    results = record("result latency", queue_kind, "workflows wrap_subscribe", receive, rounds=ROUNDS,
                     setup=rounds.setup)
    assert results == sorted(ROWS, key=lambda r: r.max_count, reverse=True)
    transport.disconnect()


START_XY = zx.ZocaloStartInfo(16085800, "ins_10_31", 0, 1140, 0)
START_XZ = zx.ZocaloStartInfo(16085801, "ins_10_31", 1140, 1140, 1)


def test_trigger_scan_zocalo_xrc(record, amqp):
    amqp.declare_queue("processing_recipe")
    trigger = zx.ZocaloTrigger(amqp)

    def scan():
        trigger.run_start(START_XY, START_XZ)  # both grids' starts in flight together
        trigger.run_end(START_XY.ispyb_dcid, START_XZ.ispyb_dcid)

    record("trigger a 2-grid scan", "4 confirmed messages", "zocalo-xrc", scan)


def test_trigger_scan_zocalo_xrc_one_at_a_time(record, amqp):
    """The same four messages, each call waiting for its own confirm."""
    amqp.declare_queue("processing_recipe")
    trigger = zx.ZocaloTrigger(amqp)

    def scan():
        trigger.run_start(START_XY)
        trigger.run_start(START_XZ)
        trigger.run_end(START_XY.ispyb_dcid)
        trigger.run_end(START_XZ.ispyb_dcid)

    record("trigger a 2-grid scan", "4 confirmed messages", "zocalo-xrc, one message per call", scan)
    amqp.delete_queue("processing_recipe")


def test_trigger_scan_fresh_connection_per_message(record, amqp, settings):
    amqp.declare_queue("processing_recipe")
    headers = zx.client.zocalo_headers()

    def send(parameters):
        transport = workflows_transport(settings)
        transport.connect()
        try:
            transport.send("processing_recipe", {"recipes": ["mimas"], "parameters": parameters}, headers=headers)
        finally:
            transport.disconnect()

    def scan():
        send({**START_XY.__dict__, "event": "start"})
        send({**START_XZ.__dict__, "event": "start"})
        send({"event": "end", "ispyb_dcid": START_XY.ispyb_dcid})
        send({"event": "end", "ispyb_dcid": START_XZ.ispyb_dcid})

    record("trigger a 2-grid scan", "4 confirmed messages", "fresh connection per message", scan, rounds=30)
    assert amqp.message_count("processing_recipe") >= 4
    amqp.delete_queue("processing_recipe")
