"""The service as separate processes on RabbitMQ: `kill -9` mid-scan loses
nothing and sends nothing twice; of three instances on one single-active-
consumer queue, one works, and when it is killed the next takes over."""

import os
import queue
import signal
import subprocess
import sys
import time

import pytest

import zocalo_xrc as zx
from test_service import HEADERS, scan
from test_service_assembly import direct_3d
from test_transport import eventually
from zocalo_xrc.messaging import QueueSpec
from zocalo_xrc.messaging.rabbitmq import AmqpTransport


STARTED = []


@pytest.fixture(autouse=True)
def no_service_outlives_its_test():
    yield
    while STARTED:
        p = STARTED.pop()
        if p.poll() is None:
            p.kill()
            p.wait(10)


def start_service(url, queue, *options):
    p = subprocess.Popen([sys.executable, "-m", "zocalo_xrc", "service", "--queue", queue, "--broker", url, "--declare",
                          *options],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    STARTED.append(p)
    line = p.stdout.readline()
    assert line.startswith(f"X-ray centring service consuming {queue}"), line + p.stderr.read()
    assert " on RabbitMQ at amqp://guest@127.0.0.1:" in line and "guest:guest" not in line, line
    return p


@pytest.fixture
def rabbitmq(rabbit, unique):
    if rabbit.close_all_connections is None:
        pytest.skip("external broker")
    t = AmqpTransport(zx.ConnectionSettings.from_url(rabbit.url), connection_name="test, publisher")
    q = f"reduce.xray_centering.{unique}"
    yield t, q
    for name in (q, f"dlq.{q}", f"xrc.{unique}", f"dlq.xrc.{unique}"):
        t.delete_queue(name)
    t.close()


def each_result_once(t, results, n):
    """The ``n`` result messages on queue ``results``, read off the queue
    itself (not through ZocaloResults, which would hide a second copy),
    after checking that no more come."""
    assert eventually(lambda: t.message_count(results) >= n, timeout=60)
    time.sleep(1)  # a second copy of any would be here by now
    got = queue.Queue()
    sub = t.subscribe(QueueSpec(results), got.put, prefetch=100)
    received = [got.get(timeout=10) for _ in range(n)]
    time.sleep(0.5)
    assert got.empty(), "a result was published twice"
    for d in received:
        d.ack()
    sub.cancel()
    return [zx.parse_result_message(d.body) for d in received]


def publish(t, q, messages):
    for f in [t.publish("", q, m, HEADERS) for m in messages]:
        f.result(20)


def stop(p):
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    return out


def test_kill_9_mid_scan_loses_nothing_and_sends_nothing_twice(rabbit, rabbitmq, unique):
    t, q = rabbitmq
    first = start_service(rabbit.url, q)
    zocalo = zx.ZocaloResults(t, beamline=unique, timeout_s=30, source=zx.Source.GPU)
    zocalo.subscribe()
    a, b, messages = scan(unique)
    publish(t, q, messages[:300])
    assert eventually(lambda: t.message_count(q) == 0)  # all delivered to the service, unacked
    os.kill(first.pid, signal.SIGKILL)
    first.wait(10)
    second = start_service(rabbit.url, q)
    publish(t, q, messages[300:])
    assert zocalo.trigger(dcids=a["dcid"]) == direct_3d().sorted(by="max_count")
    with pytest.raises(zx.NoResultsFromZocaloError):
        zocalo.trigger(dcids=a["dcid"], timeout_s=2)
    assert "1 result(s) sent, 0 message(s) dead-lettered; 0 open scan(s)" in stop(second)
    zocalo.close()


def test_kill_9_as_each_result_appears_every_result_exactly_once(rabbit, rabbitmq, unique):
    """The service killed the moment a result shows on the results queue, that
    is, between sending it and acking its scan's messages if those were two
    steps; restarted each time. The queue ends with exactly one message per
    scan, each correct: counted on the queue itself, not through
    ZocaloResults (which would hide a duplicate)."""
    t, q = rabbitmq
    results = f"xrc.{unique}"
    t.declare_results_queue(results)
    scans = [scan(unique, shift=10 * k) for k in range(6)]
    service = start_service(rabbit.url, q)
    for k, (_, _, messages) in enumerate(scans):  # one scan at a time: a kill per result
        publish(t, q, messages)
        assert eventually(lambda: t.message_count(results) > k, timeout=30)
        os.kill(service.pid, signal.SIGKILL)
        service.wait(10)
        service = start_service(rabbit.url, q)
    messages = each_result_once(t, results, len(scans))
    assert sorted(m.dcid for m in messages) == sorted(a["dcid"] for a, _, _ in scans)
    for m in messages:
        assert m.results == direct_3d()
    stop(service)


def test_three_instances_on_one_queue_one_killed_mid_stream(rabbit, rabbitmq, unique):
    t, q = rabbitmq
    services = [start_service(rabbit.url, q) for _ in range(3)]
    zocalo = zx.ZocaloResults(t, beamline=unique, timeout_s=60, source=zx.Source.GPU)
    zocalo.subscribe()
    scans = [scan(unique, shift=10 * k) for k in range(4)]
    stream = [m for _, _, messages in scans for m in messages]
    publish(t, q, stream[: len(stream) // 2])
    time.sleep(0.5)
    os.kill(services[0].pid, signal.SIGKILL)  # the first to consume is the single active consumer
    services[0].wait(10)
    publish(t, q, stream[len(stream) // 2:])
    got = {}
    for _ in scans:  # each scan's result reaches the caller once (a second copy would carry the same message_id)
        results = zocalo.trigger(dcids=[s[0]["dcid"] for s in scans], timeout_s=60)
        assert zocalo.last_message.dcid not in got
        got[zocalo.last_message.dcid] = results
    assert sorted(got) == sorted(s[0]["dcid"] for s in scans)
    for results in got.values():
        assert results == direct_3d().sorted(by="max_count")
    with pytest.raises(zx.NoResultsFromZocaloError):
        zocalo.trigger(dcids=[s[0]["dcid"] for s in scans], timeout_s=2)
    outs = [stop(p) for p in services[1:]]
    assert sum(int(o.split("stopped: ")[1].split(" result")[0]) for o in outs) >= 2  # the survivors took over
    zocalo.close()


def sharing_instances(rabbit, t, q, unique, standby_s=3.0):
    """The results queue, and three ``--shards 3`` instances past their
    standby delay (each stands by on the others' shards); instance 0
    consumes the work queue first, so it routes."""
    results = f"xrc.{unique}"
    t.declare_results_queue(results)
    services = [start_service(rabbit.url, q, "--shards", "3", "--instance", str(k)) for k in range(3)]
    time.sleep(standby_s)
    return results, services


def test_three_sharing_instances_one_killed_mid_stream(rabbit, rabbitmq, unique):
    """Three instances share the scans through three shards (instance K
    takes shard K); one is killed mid-stream. Every scan gets exactly one
    correct result (counted on the results queue itself), and the work was
    shared: each survivor sent results."""
    t, q = rabbitmq
    results, services = sharing_instances(rabbit, t, q, unique)
    scans = [scan(unique, shift=10 * k) for k in range(12)]
    stream = [m for _, _, messages in scans for m in messages]
    publish(t, q, stream[: len(stream) // 2])
    assert eventually(lambda: t.message_count(results) >= 2, timeout=30)
    os.kill(services[0].pid, signal.SIGKILL)
    services[0].wait(10)
    publish(t, q, stream[len(stream) // 2:])
    messages = each_result_once(t, results, len(scans))
    assert sorted(m.dcid for m in messages) == sorted(a["dcid"] for a, _, _ in scans)
    assert all(m.results == direct_3d() for m in messages)
    sent = [int(stop(p).split("stopped: ")[1].split(" result")[0]) for p in services[1:]]
    assert all(n > 0 for n in sent), sent
    for k in range(3):
        t.delete_queue(f"{q}.shard.{k}")
