"""Diamond's broker policies on the queues this project declares (python-zocalo's
snapshot of Diamond's RabbitMQ configuration): every queue a delivery limit of
5, every ``xrc.*`` queue also a message TTL of 60 s, so that results nobody
takes do not pile up on a shared broker; and a receiver that meets old
results says so in one line, not one per result."""

import json
import logging
import uuid

import pytest

import zocalo_xrc as zx
from zocalo_xrc.messaging import rabbitmq as amqp
from test_transport import eventually
from test_zocalo import ROW, publish_result, results_for, results_queue  # noqa: F401 (a fixture)


def queue_arguments(rabbit, vhost="/"):
    """What the broker holds of each queue's arguments (rabbitmqctl)."""
    rows = json.loads(rabbit.ctl("list_queues", "-p", vhost, "name", "arguments", "--formatter", "json", "--quiet"))
    return {row["name"]: {key: value for key, _type, value in row["arguments"]} for row in rows}


@pytest.fixture
def amqp_transport(rabbit):
    t = amqp.AmqpTransport(zx.ConnectionSettings.from_url(rabbit.url))
    yield t
    t.close()


def test_an_xrc_queue_has_diamonds_ttl_and_a_work_queue_its_delivery_limit(rabbit, amqp_transport, unique):
    amqp_transport.declare_results_queue(f"xrc.{unique}")
    amqp_transport.declare_work_queue(f"reduce.{unique}")
    held = queue_arguments(rabbit)
    assert held[f"xrc.{unique}"]["x-message-ttl"] == 60_000
    assert held[f"xrc.{unique}"]["x-delivery-limit"] == 5
    assert held[f"reduce.{unique}"]["x-delivery-limit"] == 5
    assert "x-message-ttl" not in held[f"reduce.{unique}"]


def test_a_queue_there_already_is_left_as_it_is(rabbit, amqp_transport, unique):
    """An xrc.* queue an older declaration made without the TTL: declaring it
    again is not a PRECONDITION_FAILED, and it still receives results."""
    name = f"xrc.{unique}"
    amqp_transport.declare_queue(name)  # a plain durable queue, no arguments
    amqp_transport.declare_results_queue(name)
    publish_result(amqp_transport, name, [ROW], dcid=1)
    assert eventually(lambda: amqp_transport.message_count(name) == 1)
    assert "x-message-ttl" not in queue_arguments(rabbit)[name]


def test_a_result_nobody_takes_expires_to_the_dead_letter_queue(amqp_transport, unique, monkeypatch):
    """The TTL is the broker's doing: with a second's TTL (not Diamond's
    minute), a result waits a second, then goes to dlq.<queue>."""
    monkeypatch.setattr(amqp, "XRC_MESSAGE_TTL_MS", 1000)
    name = f"xrc.{unique}"
    amqp_transport.declare_results_queue(name)
    publish_result(amqp_transport, name, [ROW], dcid=1)
    assert amqp_transport.message_count(name) == 1
    assert eventually(lambda: amqp_transport.message_count(name) == 0, timeout=15)
    assert amqp_transport.message_count(f"dlq.{name}") == 1


def test_the_local_zocalo_declares_diamonds_policies(rabbit):
    from zocalo_xrc.local import LocalZocalo

    vhost = f"ttl-{uuid.uuid4().hex[:8]}"
    with LocalZocalo(broker=rabbit.vhost(vhost)):
        held = queue_arguments(rabbit, vhost)
    for name in ("xrc.i03", "xrc.abort"):
        assert held[name]["x-message-ttl"] == 60_000 and held[name]["x-delivery-limit"] == 5, name
    for name in ("processing_recipe", "reduce.xray_centering", "per_image_analysis"):
        assert held[name]["x-delivery-limit"] == 5 and "x-message-ttl" not in held[name], name


def test_old_results_are_one_info_line_not_one_warning_each(transport, results_queue, caplog):
    for dcid in range(1, 6):
        publish_result(transport, results_queue, [ROW], dcid=dcid)  # left by earlier runs
    receiver = results_for(transport, results_queue, timeout_s=10)
    try:
        receiver.subscribe()
        assert eventually(lambda: transport.message_count(results_queue) == 0)  # all five held by the receiver
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="zocalo_xrc"):
            publish_result(transport, results_queue, [ROW], dcid=99)
            assert receiver.trigger(dcids=99)
            # the I/O thread says it once the held results are gone through, the trigger may return first
            assert eventually(lambda: any("stale results" in r.getMessage() for r in caplog.records))
    finally:
        receiver.close()
    summaries = stale_summaries(caplog, debug_lines=5)
    assert summaries == [f"5 stale results on {results_queue} rejected (to dlq.{results_queue}): none of them for "
                         "DCID 99"], summaries


def test_results_settled_at_staging_are_one_info_line(transport, results_queue, caplog):
    for dcid in range(1, 4):
        publish_result(transport, results_queue, [ROW], dcid=dcid)
    receiver = results_for(transport, results_queue, timeout_s=10)
    try:
        with caplog.at_level(logging.DEBUG, logger="zocalo_xrc"):
            assert receiver.settle_waiting() == 3
            assert eventually(lambda: transport.message_count(results_queue) == 0)
            publish_result(transport, results_queue, [ROW], dcid=99)
            assert receiver.trigger(dcids=99)
    finally:
        receiver.close()
    summaries = stale_summaries(caplog, debug_lines=3)
    assert summaries == [f"3 stale results on {results_queue} settled: they were waiting before this receiver was "
                         "staged"], summaries


def stale_summaries(caplog, *, debug_lines: int) -> list[str]:
    """The client's INFO lines about stale results, once it is checked that
    each stale result was one DEBUG line and that nothing was a warning."""
    mine = [r for r in caplog.records if r.name.startswith("zocalo_xrc.client")]
    assert [r.levelname for r in mine if "stale" in r.getMessage()].count("DEBUG") == debug_lines
    assert not [r for r in mine if r.levelno >= logging.WARNING]
    return [r.getMessage() for r in mine if r.levelno >= logging.INFO and "stale" in r.getMessage()]
