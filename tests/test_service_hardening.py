"""The service at any size and under any message (issue 17, items 1-7):
scans past AMQP's 65,535 unacked messages, restarts without end, messages
that once escaped as exceptions, rejected first messages, thousands of open
scans on one timer, late duplicates, outputs that lead nowhere."""

import json
import logging
import os
import queue
import signal
import threading
import time
import tracemalloc

import numpy as np
import pytest

import zocalo_xrc as zx
from test_service import CASE_2D, HEADERS, bodies, publish, scan
from test_service_assembly import direct_3d
from test_service_processes import each_result_once, start_service, stop, STARTED  # noqa: F401
from test_service_processes import no_service_outlives_its_test, rabbitmq  # noqa: F401 (fixtures)
from test_transport import eventually
from zocalo_xrc.messaging import QueueSpec
from zocalo_xrc.service.runner import XrcService


@pytest.fixture
def work(transport, unique):
    """The service's queue (quorum, delivery limit 5, dead-lettering to dlq.),
    the results and abort queues; cleaned up after."""
    q = f"reduce.xray_centering.{unique}"
    transport.declare_results_queue(q, exchange="pia", routing_key=q)
    transport.declare_results_queue(f"xrc.{unique}")
    transport.declare_queue(f"abort.{unique}")
    yield q
    for name in (q, f"dlq.{q}", f"xrc.{unique}", f"dlq.xrc.{unique}", f"abort.{unique}"):
        transport.delete_queue(name)


def taken(transport, name, n, timeout=60):
    """The ``n`` messages on ``name`` (and no more), acked."""
    got = queue.Queue()
    sub = transport.subscribe(QueueSpec(name), got.put, prefetch=max(2, n + 1))
    try:
        out = [got.get(timeout=timeout) for _ in range(n)]
        time.sleep(0.3)
        assert got.empty(), f"more than {n} message(s) on {name}"
        for d in out:
            d.ack()
        return out
    finally:
        sub.cancel()


def big_2d(unique, dcid, steps_x=300, steps_y=220, seed=1):
    """A 2D grid of ``steps_x * steps_y`` images with one crystal, and its messages."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:steps_y, 0:steps_x]
    counts = (200 * np.exp(-((x - 120) ** 2 + (y - 80) ** 2) / 200) + rng.poisson(0.3, x.shape)).astype(int)
    gridinfo = {**CASE_2D["gridinfo"], "steps_x": float(steps_x), "steps_y": float(steps_y), "snaked": 0}
    grid = {"dcid": dcid, "gridinfo": gridinfo, "counts": counts.ravel().tolist()}
    return grid, bodies(grid, [], unique)


def test_a_scan_of_more_than_65535_images_completes(transport, work, unique):
    """66,000 images in one scan: held unacked they would stop the broker at
    65,535; checkpointed, the scan completes with the core's answer."""
    grid, messages = big_2d(unique, 9_100_000)
    service = XrcService(transport, work, idle_s=120).start()
    try:
        publish(transport, work, messages)
        [result] = taken(transport, f"xrc.{unique}", 1, timeout=120)
        want = zx.centre_2d(grid["counts"], zx.GridInfo.from_ispyb(grid["gridinfo"]))
        assert json.loads(result.body)["payload"]["results"] == [want.to_dict()]
        assert service.checkpoints >= 1 and service.completed == 1 and service.rejected == 0
        assert eventually(lambda: transport.message_count(work) == 0 and service.held == 0)
        assert transport.message_count(f"dlq.{work}") == 0
    finally:
        service.stop()


def test_open_scans_adding_up_past_65535_images_all_complete(rabbit, unique):
    """150 open 3D scans of 440 images, 66,000 in all, every scan's last
    image held back until all the others are in: every scan completes."""
    from zocalo_xrc.messaging.rabbitmq import AmqpTransport

    t = AmqpTransport(zx.ConnectionSettings.from_url(rabbit.url))
    q = f"reduce.xray_centering.{unique}"
    t.declare_results_queue(q, exchange="pia", routing_key=q)
    t.declare_results_queue(f"xrc.{unique}")
    service = XrcService(t, q, idle_s=120).start()
    try:
        scans = [scan(unique, shift=10 * k) for k in range(150)]
        publish(t, q, [m for _, _, messages in scans for m in messages[:-1]])
        publish(t, q, [messages[-1] for _, _, messages in scans])
        results = taken(t, f"xrc.{unique}", len(scans), timeout=120)
        got = sorted(zx.parse_result_message(r.body).dcid for r in results)
        assert got == sorted(a["dcid"] for a, _, _ in scans)
        assert all(zx.parse_result_message(r.body).results == direct_3d() for r in results)
        assert service.checkpoints >= 1 and service.rejected == 0
    finally:
        service.stop()
        for name in (q, f"dlq.{q}", f"xrc.{unique}", f"dlq.xrc.{unique}"):
            t.delete_queue(name)
        t.close()


def test_a_commit_acks_its_batch_in_one_frame_after_scans_have_finished(rabbit, unique):
    """Finished scans leave their tombstones in the queue for a minute, held
    by the service. Held one by one, each would sit below every later batch
    of acks, which would then go one frame per image (the broker settles
    each as slowly as a publish: a checkpoint of 32,767 images took 1.1 s,
    and a result waiting behind it as long). Held as one record, republished
    by every commit that acks, each commit acks in one frame: four scans in
    a row, checkpointed every 100 images, take a frame per commit (and one
    per checkpoint that comes back after its scan's result)."""
    from zocalo_xrc.messaging.rabbitmq import AmqpTransport

    t = AmqpTransport(zx.ConnectionSettings.from_url(rabbit.url))
    q = f"reduce.xray_centering.{unique}"
    t.declare_results_queue(q, exchange="pia", routing_key=q)
    t.declare_results_queue(f"xrc.{unique}")
    service = XrcService(t, q, idle_s=120, checkpoint_images=100).start()
    channel = service.subscription.channel._impl
    frames = []
    basic_ack = channel.basic_ack

    def counted(tag, multiple=False):
        frames.append(tag)
        basic_ack(tag, multiple=multiple)

    channel.basic_ack = counted
    try:
        for k in range(4):
            publish(t, q, scan(unique, shift=10 * k)[2])
            [result] = taken(t, f"xrc.{unique}", 1)
            assert zx.parse_result_message(result.body).results == direct_3d()
        assert eventually(lambda: t.message_count(q) == 0 and service.held == 0)
        commits = service.checkpoints + service.completed
        assert service.completed == 4 and service.checkpoints >= 4 * 4
        # one frame a commit, and one for each checkpoint that comes back after its scan is over
        assert len(frames) <= commits + service.checkpoints, f"{len(frames)} ack frames for {commits} commits"
        assert len(service.records_held) <= 2 and len(service.tombstones) == 4
    finally:
        service.stop()
        for name in (q, f"dlq.{q}", f"xrc.{unique}", f"dlq.xrc.{unique}"):
            t.delete_queue(name)
        t.close()


def test_twenty_restarts_during_one_open_scan_lose_nothing(rabbit, rabbitmq, unique):
    """The service killed (kill -9 and SIGTERM in turn) 20 times while a scan
    is open, on a queue with Diamond's delivery limit of 5: the scan's
    images are never dead-lettered, and its one result comes."""
    t, q = rabbitmq
    results = f"xrc.{unique}"
    t.declare_results_queue(results)
    a, b, messages = scan(unique)
    service = start_service(rabbit.url, q)
    publish(t, q, messages[:300])
    for k in range(20):
        assert eventually(lambda: t.message_count(q) == 0, timeout=30)  # all delivered to the service
        time.sleep(0.3)  # the service has taken them in (and checkpointed what came again)
        service.send_signal(signal.SIGKILL if k % 2 == 0 else signal.SIGTERM)
        service.wait(30)
        service = start_service(rabbit.url, q)
    publish(t, q, messages[300:])
    [message] = each_result_once(t, results, 1)
    assert message.results == direct_3d()
    assert t.message_count(f"dlq.{q}") == 0
    assert "1 result(s) sent, 0 message(s) dead-lettered; 0 open scan(s)" in stop(service)


def _bad_bodies(unique):
    """Messages that once escaped the service as exceptions, or were taken
    wrongly, each with what the log must say."""
    a, b, messages = scan(unique, shift=500)
    good = json.loads(messages[0])
    out = []

    def variant(edit, words):
        m = json.loads(json.dumps(good))
        edit(m)
        out.append((json.dumps(m).encode(), words))

    variant(lambda m: m["recipe"]["2"]["parameters"].update(dcid="²"), "expected a DCID")
    variant(lambda m: m["recipe"]["2"]["parameters"].update(dcid="١٢٣"), "expected a DCID")
    variant(lambda m: m["recipe"]["2"]["gridinfo"].update(steps_x=2.0 ** 31 - 1, steps_y=2.0 ** 31 - 1),
            "the service takes grids of up to")
    variant(lambda m: m["recipe"]["2"].update(output={"success": 42, "abort": 4}), "names step 42")
    variant(lambda m: m["recipe"]["2"].update(output="three"), "names step 'three'")
    out.append((b"[" * 200_000 + b"]" * 200_000, "nested too deeply"))
    deep = json.loads(json.dumps(good))
    deep["payload"]["deep"] = "@"
    out.append((json.dumps(deep).encode().replace(b'"@"', b"[" * 200_000 + b"]" * 200_000), "nested too deeply"))
    twice = messages[0].replace(b'"file-number": 1,', b'"file-number": 1, "file-number": 2,')
    assert twice != messages[0]
    out.append((twice, "'file-number' is given twice"))
    return out


def test_whatever_a_message_holds_it_is_dead_lettered_once_with_its_reason(transport, work, unique, caplog):
    """Each bad message dead-lettered once, with its reason, counted; nothing
    left open by it; the innocent open scan beside them completes."""
    bad = _bad_bodies(unique)
    a, b, messages = scan(unique)
    service = XrcService(transport, work, idle_s=60).start()
    results = zx.ZocaloResults(transport, beamline=unique, timeout_s=30, source=zx.Source.GPU)
    results.subscribe()
    try:
        with caplog.at_level(logging.ERROR, logger="zocalo_xrc.service.runner"):
            publish(transport, work, messages[:200])
            publish(transport, work, [body for body, _ in bad])
            assert eventually(lambda: service.rejected == len(bad), timeout=30), service.rejected
            assert set(service.assembly.groups) == {(a["dcid"], b["dcid"])}  # the rejected left nothing behind
            publish(transport, work, messages[200:])
            assert results.trigger(dcids=a["dcid"]) == direct_3d().sorted(by="max_count")
        assert len(taken(transport, f"dlq.{work}", len(bad))) == len(bad)
        lines = [r.getMessage() for r in caplog.records if "dead-lettering" in r.getMessage()]
        assert len(lines) == len(bad)
        for (_, words), line in zip(bad, lines):
            assert words in line, line
        assert not any(r.exc_info for r in caplog.records)
        assert service.assembly.groups == {}
    finally:
        results.close()
        service.stop()


def test_rejected_first_messages_change_nothing(transport, work, unique):
    """5,000 first messages that are rejected (an image out of range) name
    the DCID of a later real scan, each with a group of its own: none of
    them is kept, and the real scan completes."""
    a, b, messages = scan(unique)
    first = json.loads(messages[0])
    bad = []
    for k in range(5000):
        first["recipe"]["2"]["parameters"]["dcg_dcids"] = [90_000_000 + k]
        first["payload"]["file-number"] = 10 ** 6
        bad.append(json.dumps(first).encode())
    service = XrcService(transport, work, idle_s=60).start()
    results = zx.ZocaloResults(transport, beamline=unique, timeout_s=30, source=zx.Source.GPU)
    results.subscribe()
    try:
        publish(transport, work, bad)
        assert eventually(lambda: service.rejected == len(bad), timeout=60)
        assert service.assembly.groups == {} and service.open == {}
        publish(transport, work, messages)
        assert results.trigger(dcids=a["dcid"]) == direct_3d().sorted(by="max_count")
        assert service.rejected == len(bad)
    finally:
        results.close()
        service.stop()


def test_ten_thousand_open_scans_on_one_timer():
    """10,000 open scans: no thread more than one, and the memory each costs
    (stated in the README) stays small."""
    from zocalo_xrc.messaging.inprocess import InProcessBroker

    broker = InProcessBroker()
    t = zx.InProcessTransport(broker)
    t.declare_work_queue("w")
    service = XrcService(t, "w", idle_s=600).start()
    grid = {"dcid": 0, "gridinfo": CASE_2D["gridinfo"], "counts": CASE_2D["counts"]}
    try:
        publish(t, "w", bodies({**grid, "dcid": 1}, [], "i03")[:1])
        assert eventually(lambda: len(service.open) == 1)
        threads = threading.active_count()
        first = bodies({**grid, "dcid": 1}, [], "i03")[0]
        messages = [first.replace(b'"dcid": "1"', f'"dcid": "{k}"'.encode()) for k in range(2, 10_002)]
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for m in messages:
            t.publish("", "w", m, HEADERS)
        assert eventually(lambda: len(service.open) == 10_001, timeout=120)
        per_scan = (tracemalloc.get_traced_memory()[0] - before) / 10_000
        tracemalloc.stop()
        assert threading.active_count() <= threads + 1, threading.enumerate()
        print(f"memory per open scan of {len(grid['counts'])} images: {per_scan / 1024:.1f} KiB")
        assert per_scan < 40 * 1024
    finally:
        service.stop()
        t.close()
        broker.close()


def test_a_late_duplicate_after_the_result_is_acked_and_nothing_more(transport, work, unique, caplog):
    """A duplicate image after the result: acked, logged, no abort after the
    idle time, nothing dead-lettered."""
    a, b, messages = scan(unique)
    service = XrcService(transport, work, idle_s=1).start()
    try:
        publish(transport, work, messages)
        assert len(taken(transport, f"xrc.{unique}", 1)) == 1
        with caplog.at_level(logging.INFO, logger="zocalo_xrc.service.runner"):
            publish(transport, work, messages[7:8])
            assert eventually(lambda: transport.message_count(work) == 0)
            time.sleep(2.5)  # past the idle time
        assert any("late duplicate" in r.getMessage() for r in caplog.records)
        assert transport.message_count(f"abort.{unique}") == 0
        assert transport.message_count(f"dlq.{work}") == 0
        assert service.open == {} and service.completed == 1
    finally:
        service.stop()


def test_checkpoints_resume_a_scan_across_a_stop(transport, work, unique):
    """Checkpoints every 50 images: a service stopped mid-scan hands over
    checkpoints and the images since; the next resumes and sends one result;
    a checkpoint still queued when the scan ends is settled by its
    tombstone, not reopened (no abort after the idle time)."""
    a, b, messages = scan(unique)
    first = XrcService(transport, work, idle_s=1, checkpoint_images=50).start()
    publish(transport, work, messages[:300])
    assert eventually(lambda: first.checkpoints >= 5 and transport.message_count(work) == 0)
    first.stop()
    second = XrcService(transport, work, idle_s=1, checkpoint_images=50).start()
    try:
        publish(transport, work, messages[300:])
        [result] = taken(transport, f"xrc.{unique}", 1)
        assert zx.parse_result_message(result.body).results == direct_3d()
        time.sleep(2)
        assert transport.message_count(f"abort.{unique}") == 0
        assert transport.message_count(f"dlq.{work}") == 0
        assert eventually(lambda: transport.message_count(work) == 0 and second.open == {})
    finally:
        second.stop()


def test_bad_messages_under_a_zocalo_frontend_never_stop_the_service(zocalo_env, unique):
    """Under ``zocalo.service``, the messages that once killed the service
    (and with it the open scan beside them) are dead-lettered; the service
    process stays, and the open 3D scan completes."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from test_service_workflows import QUEUE

    t, env, config = zocalo_env
    t.declare_results_queue(f"xrc.{unique}")
    t.declare_queue(f"abort.{unique}")
    a, b, messages = scan(unique)
    messages = [m.replace(f'"queue": "reduce.xray_centering"'.encode(), f'"queue": "{QUEUE}"'.encode())
                for m in messages]
    bad = _bad_bodies(unique)
    zocalo_service = shutil.which("zocalo.service") or str(Path(sys.executable).parent / "zocalo.service")
    service = subprocess.Popen([zocalo_service, "-s", "XRayCentering", "-e", "xrc-test"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    results = zx.ZocaloResults(t, beamline=unique, timeout_s=60, source=zx.Source.GPU)
    try:
        assert eventually(lambda: t.consumer_count(QUEUE) == 1, timeout=60), "the service never consumed its queue"
        children = set(subprocess.run(["pgrep", "-P", str(service.pid)], capture_output=True, text=True).stdout.split())
        results.subscribe()
        publish(t, QUEUE, messages[:200])
        publish(t, QUEUE, [body for body, _ in bad])
        publish(t, QUEUE, messages[200:])
        assert results.trigger(dcids=a["dcid"]) == direct_3d().sorted(by="max_count")
        assert eventually(lambda: t.message_count(f"dlq.{QUEUE}") == len(bad), timeout=30)
        now = set(subprocess.run(["pgrep", "-P", str(service.pid)], capture_output=True, text=True).stdout.split())
        assert now == children, "the service process was restarted"
    finally:
        results.close()
        service.send_signal(signal.SIGTERM)
        try:
            out, _ = service.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            service.kill()
            out, _ = service.communicate()
    assert "Unhandled service exception" not in out, out
    assert out.count("dead-lettering a message") == len(bad), out


from test_service_workflows import zocalo_env  # noqa: E402,F401 (fixture)


def test_a_new_run_of_a_finished_scan_is_centred_again(transport, work, unique):
    """The same collections analysed again (a new recipe run, another recipe
    ID, as when ``end`` is sent again): not late duplicates, a new result."""
    a, b, messages = scan(unique)
    service = XrcService(transport, work, idle_s=60).start()
    try:
        publish(transport, work, messages)
        assert len(taken(transport, f"xrc.{unique}", 1)) == 1
        again = [m.replace(b'"ID": "env-', b'"ID": "again-env-') for m in messages]
        assert again != messages
        publish(transport, work, again)
        [result] = taken(transport, f"xrc.{unique}", 1)
        assert zx.parse_result_message(result.body).results == direct_3d()
        assert service.completed == 2 and service.rejected == 0
    finally:
        service.stop()


def test_a_record_of_finished_scans_reads_back_and_so_does_a_lone_tombstone():
    """The record round-trips; a lone tombstone, as earlier versions wrote
    it, reads as a record of one; a broken one is refused with the reason."""
    from zocalo_xrc.service.assembly import MessageRejected
    from zocalo_xrc.service.checkpoint import Tombstone, parse, record

    stones = [Tombstone((7, 8), "result", {7: "a", 8: "a"}, 1.7e9), Tombstone((9,), "abort", None, 1.7e9 + 1)]
    taken = parse(record(t.encode() for t in stones))
    assert taken.group == () and taken.tombstones == tuple(stones)
    assert taken.describe() == "a record of 2 finished scan(s)"
    lone = parse(b'{"zocalo-xrc-checkpoint": 1, "group": [9], "outcome": "abort", "finished-at": 1700000001.0}')
    assert lone.tombstones == (stones[1],)
    with pytest.raises(MessageRejected, match="unreadable checkpoint"):
        parse(b'{"zocalo-xrc-checkpoint": 1, "tombstones": [{"group": ["x"], "outcome": "result"}]}')
