"""The broker's own share of the service's latency, measured with plain pika
on the same private RabbitMQ: what no service on this machine can go below.

* a per-image message from publish to delivery, through a quorum queue with
  a single active consumer (Diamond's work queue);
* the transaction that finishes a scan: publish the result to a quorum
  results queue and ack the scan's messages (200 for a 2D 20x10 scan, 3,600
  for a 3D 60x30+60x30 one), from ``tx.commit`` sent to its OK.
"""

from __future__ import annotations

import threading
import time
import uuid

import pika
import pytest

SUITE = "broker floor"
CONTENDER = "RabbitMQ, plain pika"


@pytest.fixture
def channel(rabbit):
    connection = pika.BlockingConnection(pika.URLParameters(rabbit.url))
    yield connection, connection.channel()
    connection.close()


def quorum(ch, name, single_active=False):
    arguments = {"x-queue-type": "quorum", **({"x-single-active-consumer": True} if single_active else {})}
    ch.queue_declare(name, durable=True, arguments=arguments)


def test_publish_to_delivery(rabbit, channel, record):
    connection, ch = channel
    name = f"floor.{uuid.uuid4().hex[:8]}"
    quorum(ch, name, single_active=True)
    arrived = threading.Event()
    stop = threading.Event()

    def consume():
        c = pika.BlockingConnection(pika.URLParameters(rabbit.url))
        cc = c.channel()
        cc.basic_consume(name, lambda ch_, method, props, body: (ch_.basic_ack(method.delivery_tag), arrived.set()))
        while not stop.is_set():
            c.process_data_events(0.05)
        c.close()

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    time.sleep(0.5)
    body = b"x" * 900  # a per-image message's size

    def one():
        arrived.clear()
        ch.basic_publish("", name, body, pika.BasicProperties(delivery_mode=2))
        assert arrived.wait(10)

    try:
        record(SUITE, "per-image message: publish -> delivered (quorum, single active consumer)", CONTENDER, one,
               rounds=200)
    finally:
        stop.set()
        consumer.join(5)
        ch.queue_delete(name)


@pytest.mark.parametrize("held", [200, 3600])
def test_commit_result_and_acks(channel, record, held):
    connection, ch = channel
    work, results = (f"floor.{uuid.uuid4().hex[:8]}" for _ in range(2))
    quorum(ch, work, single_active=True)
    quorum(ch, results)
    tx = connection.channel()
    tx.tx_select()
    tx.basic_qos(prefetch_count=65535)
    tags: list[int] = []
    tx.basic_consume(work, lambda ch_, method, props, body: tags.append(method.delivery_tag))

    def setup():
        for _ in range(held):
            ch.basic_publish("", work, b"x" * 900, pika.BasicProperties(delivery_mode=2))
        while len(tags) < held:
            connection.process_data_events(0.01)
        return (), {}

    def finish():
        tx.basic_publish("", results, b"r" * 2500, pika.BasicProperties(delivery_mode=2))
        tx.basic_ack(tags[-1], multiple=True)
        tx.tx_commit()
        tags.clear()

    try:
        record(SUITE, f"a scan's transaction: result + {held} acks, commit", CONTENDER, finish, rounds=20,
               setup=setup)
    finally:
        ch.queue_delete(work)
        ch.queue_delete(results)
