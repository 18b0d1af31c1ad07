"""The client on a bad day, on a real broker: outages (a proxy that drops
connections, answers nothing, or closes its port), deadlines, withdrawn
triggers, results handed over once, consumption that never stalls."""

import asyncio
import logging
import queue
import threading
import time

import pytest

import zocalo_xrc as zx
from proxy import Proxy
from zocalo_xrc.messaging.rabbitmq import AmqpTransport
from zocalo_xrc.messaging import QueueSpec
from zocalo_xrc.messages import message_id_for
from test_transport import eventually
from test_zocalo import ROW, publish_result

MARGIN_S = 1.5  # what a deadline may be overrun by


def settings(url):
    return zx.ConnectionSettings.from_url(url)


@pytest.fixture
def proxy(rabbit):
    if rabbit.close_all_connections is None:
        pytest.skip("external broker")
    p = Proxy(settings(rabbit.url).port)
    yield p
    p.close()


@pytest.fixture
def direct(rabbit):
    """A connection that does not go through the proxy."""
    t = AmqpTransport(settings(rabbit.url), connection_name="test, direct")
    yield t
    t.close()


@pytest.fixture
def through(proxy):
    """A connection through the proxy, connected, quick to give up on a silent
    handshake and to retry."""
    t = AmqpTransport(settings(proxy.url), connection_name="test, through the proxy", connect_timeout=None,
                      handshake_timeout=1.0, max_backoff=0.5)
    assert t.connected.wait(15)
    yield t
    t.close()


@pytest.fixture
def processing(direct):
    """processing_recipe, empty, read without the proxy."""
    direct.delete_queue("processing_recipe")
    direct.declare_queue("processing_recipe")
    got = queue.Queue()
    sub = direct.subscribe(QueueSpec("processing_recipe"), got.put)
    yield got
    sub.cancel()


def outage(proxy, through, mode="black_hole", seconds=0.0):
    """Cut the proxied connection, keep the broker away ``seconds``, bring it back."""
    getattr(proxy, mode)()
    assert eventually(lambda: not through.connected.is_set())
    time.sleep(seconds)
    proxy.forward()
    assert through.connected.wait(20)


def test_a_broker_that_comes_back_slowly_never_kills_the_connection(proxy, through, direct, processing, unique, caplog):
    """Handshakes that time out, again and again, then the broker is back:
    the I/O thread lives, consuming resumes, publishing works."""
    name = f"xrc.{unique}"
    with caplog.at_level(logging.WARNING):
        zocalo = zx.ZocaloResults(through, beamline=unique, timeout_s=20)
        zocalo.subscribe()
        outage(proxy, through, "black_hole", seconds=3.5)  # 1 s handshakes: several attempts fail
        assert through._thread.is_alive()
        publish_result(direct, name, [ROW], dcid=11)
        assert list(zocalo.trigger(dcids=11)) == [ROW]
        zx.ZocaloTrigger(through).run_end(11)
        m = processing.get(timeout=10)
        assert b'"ispyb_dcid": 11' in m.body
        m.ack()
    zocalo.close()
    attempts = [r.getMessage() for r in caplog.records if r.name == "zocalo_xrc.messaging.rabbitmq" and "cannot connect" in r.getMessage()]
    assert len(attempts) >= 2 and all("no AMQP handshake came within 1 s" in m for m in attempts)
    assert not [r for r in caplog.records if r.name.startswith("pika") and r.levelno >= logging.ERROR]
    direct.delete_queue(name)
    direct.delete_queue(f"dlq.{name}")


@pytest.mark.parametrize("mode, words", [("black_hole", "no AMQP handshake"), ("refuse", "connection refused")])
def test_every_call_keeps_its_deadline_when_the_broker_is_down(proxy, through, processing, unique, mode, words):
    getattr(proxy, mode)()
    assert eventually(lambda: not through.connected.is_set())
    time.sleep(1.5)  # an attempt or two, so that the transport knows why
    trigger = zx.ZocaloTrigger(through, timeout_s=1.5)
    t0 = time.monotonic()
    with pytest.raises(zx.TriggerTimeoutError) as e:
        trigger.run_end(71, 72)
    assert time.monotonic() - t0 < 1.5 + MARGIN_S
    assert "end of DCID 71, 72 within 1.5 s" in str(e.value) and words in str(e.value)
    assert "2 message(s) withdrawn, never to be sent" in str(e.value)

    zocalo = zx.ZocaloResults(through, beamline=unique)
    t0 = time.monotonic()
    with pytest.raises(zx.NoResultsFromZocaloError) as e2:
        zocalo.trigger(dcids=5, timeout_s=1.5)
    assert time.monotonic() - t0 < 1.5 + MARGIN_S
    assert "not connected to" in str(e2.value) and words in str(e2.value)

    # the broker comes back: what the caller was told failed never arrives
    proxy.forward()
    assert through.connected.wait(20)
    zx.ZocaloTrigger(through).run_end(73)
    m = processing.get(timeout=10)
    assert b'"ispyb_dcid": 73' in m.body
    m.ack()
    with pytest.raises(queue.Empty):
        processing.get(timeout=2)
    zocalo.close()


def test_the_same_trigger_has_the_same_message_id(through, processing):
    trigger = zx.ZocaloTrigger(through)
    trigger.run_end(74)
    trigger.run_end(74)
    a, b = processing.get(timeout=10), processing.get(timeout=10)
    assert a.message_id == b.message_id == message_id_for(a.body)
    assert zx.ZocaloTrigger(through).run_end(75) is None
    c = processing.get(timeout=10)
    assert c.message_id != a.message_id
    for m in (a, b, c):
        m.ack()


def test_a_message_handed_over_when_the_connection_drops_is_reported_as_maybe_sent(proxy, through, processing):
    """Unconfirmed because the connection went: the error says it may have
    arrived, and names its message_id, which a retry repeats."""
    trigger = zx.ZocaloTrigger(through, timeout_s=5)
    proxy_drop = threading.Timer(0.0, proxy.black_hole)
    for attempt in range(20):  # until the drop falls between publish and confirm
        proxy.forward()
        assert through.connected.wait(20)
        proxy_drop = threading.Timer(0.0005 * attempt, proxy.black_hole)
        proxy_drop.start()
        try:
            trigger.run_end(76)
        except zx.TransportError as e:
            if "may or may not have arrived" in str(e) or "may still arrive" in str(e):
                assert message_id_for(b'{"recipes": ["mimas"], "parameters": {"event": "end", "ispyb_dcid": 76}}') in str(e)
                break
        proxy_drop.join()
    else:
        pytest.skip("the drop never fell between a publish and its confirm")
    proxy_drop.join()
    proxy.forward()


def test_async_faces_never_block_the_event_loop(proxy, unique):
    """Connection set-up included: the first use of a broker that takes TCP
    and says nothing."""
    proxy.black_hole()
    trigger = zx.ZocaloTrigger(proxy.url, timeout_s=1.5)
    zocalo = zx.ZocaloResults(proxy.url, beamline=unique, timeout_s=1.5)

    async def plan():
        loop = asyncio.get_running_loop()
        gaps, running = [], True

        async def ticker():
            last = loop.time()
            while running:
                await asyncio.sleep(0.02)
                gaps.append(loop.time() - last)
                last = loop.time()

        task = asyncio.create_task(ticker())
        with pytest.raises(zx.TriggerTimeoutError):
            await trigger.run_start_async(zx.ZocaloStartInfo(1, "f", 0, 10, 0))
        with pytest.raises(zx.NoResultsFromZocaloError):
            await zocalo.trigger_async(dcids=1)
        running = False
        await task
        return max(gaps)

    try:
        assert asyncio.run(plan()) < 0.5
    finally:
        zocalo.close()
        trigger.transport.close()


def test_a_result_goes_to_a_caller_once_across_an_outage(proxy, through, direct, unique):
    name = f"xrc.{unique}"
    zocalo = zx.ZocaloResults(through, beamline=unique, timeout_s=10)
    zocalo.subscribe()
    publish_result(direct, name, [ROW], dcid=81)
    assert eventually(lambda: len(zocalo._held) == 1)  # held, unacked, when the connection goes
    outage(proxy, through)
    assert list(zocalo.trigger(dcids=81)) == [ROW]
    with pytest.raises(zx.NoResultsFromZocaloError):
        zocalo.trigger(dcids=81, timeout_s=1.5)
    # handed over, and the connection goes before the ack may have reached the broker
    publish_result(direct, name, [ROW], dcid=82)
    assert list(zocalo.trigger(dcids=82)) == [ROW]
    outage(proxy, through)
    with pytest.raises(zx.NoResultsFromZocaloError):
        zocalo.trigger(dcids=82, timeout_s=1.5)
    zocalo.close()
    assert direct.message_count(name) == 0
    direct.delete_queue(name)
    direct.delete_queue(f"dlq.{name}")


def test_foreign_results_never_stall_consumption(transport, unique):
    name = f"xrc.{unique}"
    zocalo = zx.ZocaloResults(transport, beamline=unique, prefetch=4, timeout_s=10)
    zocalo.subscribe()
    for i in range(10):  # nobody waits for these
        publish_result(transport, name, [ROW], dcid=1000 + i)
    publish_result(transport, name, [ROW], dcid=2000)
    assert eventually(lambda: transport.message_count(name) == 0)  # all taken: none stuck behind a full window
    assert list(zocalo.trigger(dcids=2000)) == [ROW]
    assert eventually(lambda: transport.message_count(f"dlq.{name}") == 10)
    zocalo.close()
    transport.delete_queue(name)
    transport.delete_queue(f"dlq.{name}")


def test_two_receivers_of_one_durable_queue_in_a_process_are_refused(transport, unique):
    first = zx.ZocaloResults(transport, beamline=unique)
    first.subscribe()
    second = zx.ZocaloResults(transport, beamline=unique)
    with pytest.raises(zx.QueueInUseError, match="private_queue=True"):
        second.subscribe()
    with pytest.raises(zx.QueueInUseError):
        second.trigger(dcids=1, timeout_s=1)
    own = zx.ZocaloResults(transport, beamline=unique, private_queue=True)
    own.subscribe()  # a queue of its own: no conflict
    first.close()
    second.subscribe()  # free again
    for r in (second, own):
        r.close()
    transport.delete_queue(f"xrc.{unique}")
    transport.delete_queue(f"dlq.xrc.{unique}")


def test_an_outage_logs_one_warning_per_attempt(proxy, caplog):
    proxy.refuse()
    with caplog.at_level(logging.WARNING):
        t = AmqpTransport(settings(proxy.url), connect_timeout=None, max_backoff=0.3)
        time.sleep(1.5)
        t.close()
    ours = [r for r in caplog.records if r.name == "zocalo_xrc.messaging.rabbitmq"]
    assert len(ours) >= 3
    assert all(r.levelno == logging.WARNING and "connection refused" in r.getMessage() and not r.exc_info for r in ours)
    assert [r for r in caplog.records if r.name != "zocalo_xrc.messaging.rabbitmq"] == []


def test_an_unresolvable_host_is_one_warning_too(caplog):
    with caplog.at_level(logging.WARNING):
        t = AmqpTransport(settings("amqp://guest:guest@no-such-broker.invalid/"), connect_timeout=None, max_backoff=0.3)
        time.sleep(1.0)
        t.close()
    ours = [r.getMessage() for r in caplog.records if r.name == "zocalo_xrc.messaging.rabbitmq"]
    assert ours and all("cannot resolve the host name" in m for m in ours)
    assert [r for r in caplog.records if r.name != "zocalo_xrc.messaging.rabbitmq"] == []


def test_a_shared_failure_is_reported_to_each_caller_once(monkeypatch):
    """One error object failing several queued messages: each caller's
    message says its own story once."""
    from concurrent.futures import Future

    error = zx.TransportError("cannot connect to amqp://guest@h:5672/%2F: ACCESS_REFUSED")
    trigger = zx.ZocaloTrigger("in-process")
    for _ in range(2):
        sent = []
        for _ in range(2):
            f = Future()
            f.set_running_or_notify_cancel()
            f.set_exception(error)
            sent.append((f, "id"))
        pending = Future()
        sent.append((pending, "zocalo-xrc-pending"))
        with pytest.raises(zx.TransportError) as e:
            trigger._settle(sent, "end of DCID 1")
        assert str(e.value).count("withdrawn") == 1 and e.value is not error
    assert str(error) == "cannot connect to amqp://guest@h:5672/%2F: ACCESS_REFUSED"


def test_a_failed_ack_never_strands_the_caller(monkeypatch, unique):
    """The result is handed over first; an ack that fails only means a
    redelivery, recognised when it comes."""
    from zocalo_xrc.messaging.inprocess import InProcessBroker, _InProcessDelivery

    broker = InProcessBroker()
    transport = zx.InProcessTransport(broker)

    def broken_ack(self):
        raise zx.ConnectionLostError("the connection went as the ack left")

    monkeypatch.setattr(_InProcessDelivery, "ack", broken_ack)
    zocalo = zx.ZocaloResults(transport, beamline=unique, timeout_s=10)
    zocalo.subscribe()
    publish_result(transport, f"xrc.{unique}", [ROW], dcid=91)
    assert list(zocalo.trigger(dcids=91)) == [ROW]
    zocalo.close()
    transport.close()
    broker.close()


class _Redelivery(zx.messaging.Delivery):
    """A message as the broker hands it out again after a lost ack."""

    def __init__(self, body):
        self.body, self.headers, self.message_id = body, {"workflows-recipe": True}, None
        self.exchange, self.routing_key, self.redelivered = "results", "xrc.test", True
        self.settled = []

    def ack(self):
        self.settled.append("ack")

    def reject(self, requeue=False):
        self.settled.append(("reject", requeue))


def test_a_result_that_comes_again_is_not_handed_over_again(unique):
    zocalo = zx.ZocaloResults("in-process", beamline=unique, timeout_s=10)
    zocalo.subscribe()
    body = zx.build_result_message(zx.XrcResults([ROW]), dcid=95)
    zocalo.transport.publish("results", f"xrc.{unique}", body, {"workflows-recipe": True}).result(5)
    assert list(zocalo.trigger(dcids=95)) == [ROW]
    again = _Redelivery(body)
    zocalo._on_delivery(again)  # as the I/O thread would, after a reconnect
    assert again.settled == ["ack"]
    with pytest.raises(zx.NoResultsFromZocaloError):
        zocalo.trigger(dcids=95, timeout_s=0.5)
    assert eventually(lambda: zocalo._waiter is None)  # the timed-out caller has gone
    again = _Redelivery(body)
    again.redelivered = False  # the same result sent twice (a service killed between its send and its acks)
    zocalo._on_delivery(again)
    assert again.settled == ["ack"] and zocalo._held == []
    zocalo.close()
