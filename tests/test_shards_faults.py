"""Sharded instances (``--shards 3``) under kill -9 while the CPU is busy:
the routing instance killed while it is moving the stream into the shards
(and, in another run, the new router killed too). Every scan gets exactly
one result, counted on the results queue itself, and nothing is left
behind in the work queue, the shards or the dead-letter queue.

RabbitMQ does not make a transaction atomic across queues (its "Broker
Semantics" page says so): a client killed between ``tx.commit`` and
``tx.commit-ok`` can leave the acks of its deliveries applied and some of
its publishes to quorum queues dropped. A router that moves messages by
forward-and-ack in one transaction loses them that way now and then (the
scans stay open in the shards); one that forwards, waits for the confirms
and then acks forwards whole scans twice (a second result) in about a
third of these runs. Exactly once needs a record of finished scans that
outlives an instance (issue 17, items 8 and 9): until then this test
stays, not strict, as the measure."""

import multiprocessing
import os
import signal
import time

import pytest

from test_service import HEADERS, scan
from test_service_assembly import direct_3d
from test_service_processes import each_result_once, rabbitmq, sharing_instances, stop  # noqa: F401 (fixture)
from test_service_processes import no_service_outlives_its_test  # noqa: F401 (autouse fixture)

#: How many times each scenario runs here; the many-times runs are done by hand (ZOCALO_XRC_SHARD_RUNS=30).
RUNS = int(os.environ.get("ZOCALO_XRC_SHARD_RUNS", "1"))


def _spin(stop):
    while not stop.is_set():
        for _ in range(100_000):
            pass


@pytest.fixture
def busy_cpu():
    """A busy loop on each core beside the services, for the whole test."""
    stop = multiprocessing.Event()
    spinners = [multiprocessing.Process(target=_spin, args=(stop,), daemon=True) for _ in range(os.cpu_count() or 2)]
    for p in spinners:
        p.start()
    yield
    stop.set()
    for p in spinners:
        p.join(10)
        if p.is_alive():
            p.kill()


def shard_queues(q):
    return [f"{q}.shard.{k}" for k in range(3)]


@pytest.mark.xfail(strict=False, reason="issue 17 item 8: a kill -9 mid-commit is not atomic on RabbitMQ")
@pytest.mark.parametrize("run", range(RUNS))
@pytest.mark.parametrize("routers_killed", [1, 2], ids=["router-killed", "router-then-new-router-killed"])
def test_routers_killed_while_moving_under_load_every_scan_once(rabbit, rabbitmq, unique, busy_cpu,  # noqa: F811
                                                                routers_killed, run):
    """Three instances; the scans come in one burst, faster than the router
    moves them (it moves what has come in big transactions), and the
    router is killed while it moves, then (in the second scenario) the new
    router too."""
    t, q = rabbitmq
    # instance 0 routes; when it goes, instance 1 (the next to subscribe) does
    results, services = sharing_instances(rabbit, t, q, unique, standby_s=2.5)
    scans = [scan(unique, shift=10 * k) for k in range(15)]
    sent = [t.publish("", q, m, HEADERS) for _, _, messages in scans for m in messages]
    for k in range(routers_killed):
        time.sleep(1.0)  # it is moving what came: big transactions by now
        os.kill(services[k].pid, signal.SIGKILL)
        services[k].wait(10)
    for f in sent:
        f.result(60)
    messages = each_result_once(t, results, len(scans))
    assert sorted(m.dcid for m in messages) == sorted(a["dcid"] for a, _, _ in scans)
    assert all(m.results == direct_3d() for m in messages)
    left = {name: t.message_count(name) for name in [q, f"dlq.{q}", *shard_queues(q)]}
    survivors = [stop(p) for p in services[routers_killed:]]  # what they held unacked goes back to the queues
    left_after = {name: t.message_count(name) for name in left}
    assert left == left_after == dict.fromkeys(left, 0), (left_after, survivors)
    for name in shard_queues(q):
        t.delete_queue(name)
