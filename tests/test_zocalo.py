"""ZocaloTrigger and ZocaloResults, on the in-process broker and on RabbitMQ;
wire compatibility with the real workflows package and faults on RabbitMQ."""

import asyncio
import dataclasses
import json
import queue
import threading
import time

import pytest
import workflows.recipe
from workflows.transport.pika_transport import PikaTransport

import zocalo_xrc as zx
from zocalo_xrc.messaging import QueueSpec
from test_transport import eventually

ROW = zx.XrcResult((2.2071, 1.4175, 13.3172), (2, 1, 13), 702.0, 12, 5832.0, 123456, ((1, 0, 12), (4, 3, 15)))
WEAK = zx.XrcResult((5.5, 5.5, 5.5), (5, 5, 5), 900.0, 1, 900.0, 123456, ((5, 5, 5), (6, 6, 6)))
RECIPE_HEADER = {"workflows-recipe": True}


@pytest.fixture
def processing(transport):
    """processing_recipe, empty, for this test."""
    transport.declare_queue("processing_recipe")
    got = queue.Queue()
    sub = transport.subscribe(QueueSpec("processing_recipe"), got.put)
    while True:  # drain anything an earlier test left
        try:
            got.get(timeout=0.2).ack()
        except queue.Empty:
            break
    yield got
    sub.cancel()


@pytest.fixture
def results_queue(transport, unique):
    name = f"xrc.{unique}"
    transport.declare_results_queue(name)
    yield name
    transport.delete_queue(name)
    transport.delete_queue(f"dlq.{name}")


def publish_result(transport, routing_key, rows, dcid, dcgid=None, gpu=False, headers=RECIPE_HEADER):
    body = zx.build_result_message(zx.XrcResults(rows), dcid=dcid, dcgid=dcgid, gpu=gpu)
    transport.publish("results", routing_key, body, headers).result(10)


def results_for(transport, results_queue, **kwargs):
    return zx.ZocaloResults(transport, queue=results_queue, beamline=results_queue[4:], **kwargs)


# ---- ZocaloTrigger ------------------------------------------------------------

def test_trigger_messages_are_exactly_the_spec(transport, processing, monkeypatch):
    monkeypatch.setenv("ZOCALO_GO_USER", "i03-user")
    monkeypatch.setenv("ZOCALO_GO_HOSTNAME", "i03-control")
    trigger = zx.ZocaloTrigger(transport)
    trigger.run_start(zx.ZocaloStartInfo(16085800, "ins_10_31", 0, 1140, 0))
    trigger.run_end(16085800)
    start, end = processing.get(timeout=10), processing.get(timeout=10)
    assert start.body == json.dumps({"recipes": ["mimas"], "parameters": {
        "ispyb_dcid": 16085800, "filename": "ins_10_31", "start_frame_index": 0, "number_of_frames": 1140,
        "message_index": 0, "event": "start"}}).encode()
    assert end.body == b'{"recipes": ["mimas"], "parameters": {"event": "end", "ispyb_dcid": 16085800}}'
    for m in (start, end):
        assert m.headers == {"zocalo.go.user": "i03-user", "zocalo.go.host": "i03-control"}
        m.ack()


def test_trigger_async(transport, processing):
    trigger = zx.ZocaloTrigger(transport)

    async def scan():
        await trigger.run_start_async(zx.ZocaloStartInfo(1, "f", 0, 10, 0))
        await trigger.run_start_async(zx.ZocaloStartInfo(2, "f", 10, 10, 1))
        await asyncio.gather(trigger.run_end_async(1), trigger.run_end_async(2))

    asyncio.run(scan())
    events = [json.loads(processing.get(timeout=10).body)["parameters"] for _ in range(4)]
    assert [(e["event"], e["ispyb_dcid"]) for e in events[:2]] == [("start", 1), ("start", 2)]
    assert sorted((e["event"], e["ispyb_dcid"]) for e in events[2:]) == [("end", 1), ("end", 2)]
    assert events[1]["start_frame_index"] == 10 and events[1]["message_index"] == 1


def test_trigger_to_a_missing_queue_raises(transport):
    if transport.queue_exists("processing_recipe"):
        transport.delete_queue("processing_recipe")
    with pytest.raises(zx.UnroutableError, match="processing_recipe"):
        zx.ZocaloTrigger(transport).run_end(5)


def test_an_empty_hostname_is_sent_empty_an_empty_user_is_not(transport, processing, monkeypatch):
    """As dodal: ZOCALO_GO_HOSTNAME="" is an empty host; ZOCALO_GO_USER="" means the login name."""
    import getpass

    monkeypatch.setenv("ZOCALO_GO_HOSTNAME", "")
    monkeypatch.setenv("ZOCALO_GO_USER", "")
    zx.ZocaloTrigger(transport).run_end(3)
    m = processing.get(timeout=10)
    assert m.headers == {"zocalo.go.user": getpass.getuser(), "zocalo.go.host": ""}
    m.ack()


@dataclasses.dataclass
class DodalStartInfo:
    """dls-dodal 3.0.5's ZocaloStartInfo, field for field (a plain, mutable dataclass)."""

    ispyb_dcid: int
    filename: str | None
    start_frame_index: int
    number_of_frames: int
    message_index: int


def test_start_infos_as_mx_bluesky_and_dodal_make_them(transport, processing):
    """mx-bluesky's callback makes start infos with no filename and sets it
    once the detector's file is known; dodal's own start infos work too."""
    ours = zx.ZocaloStartInfo(11, None, 0, 100, 0)
    ours.filename = "ins_10_31"
    dodals = DodalStartInfo(12, None, 100, 100, 1)
    dodals.filename = "ins_10_31"
    zx.ZocaloTrigger(transport).run_start(ours, dodals)
    bodies = sorted((processing.get(timeout=10) for _ in range(2)), key=lambda m: json.loads(m.body)["parameters"]["ispyb_dcid"])
    for m, info in zip(bodies, (ours, dodals)):
        # byte for byte what dodal sends: asdict(info) plus the event
        assert m.body == json.dumps({"recipes": ["mimas"], "parameters": {**dataclasses.asdict(info), "event": "start"}}).encode()
        m.ack()


# ---- ZocaloResults ------------------------------------------------------------

def test_the_results_queue_exists_wherever_results_are_expected(transport, unique):
    """Subscribing declares xrc.<beamline> as Diamond's deployment does when
    it is missing, so that a result published before anyone waits is kept."""
    name = f"xrc.{unique}"
    assert not transport.queue_exists(name)
    try:
        with zx.ZocaloResults(transport, beamline=unique, timeout_s=10) as zocalo:
            zocalo.subscribe()
            assert transport.queue_exists(name) and transport.queue_exists(f"dlq.{name}")
            publish_result(transport, name, [ROW], dcid=21)
            assert list(zocalo.trigger(dcids=21)) == [ROW]
        with zx.ZocaloResults(transport, beamline=unique, timeout_s=10) as again:  # an existing queue is used as it is
            again.subscribe()
    finally:
        transport.delete_queue(name)
        transport.delete_queue(f"dlq.{name}")


def r2d(counts):
    gi = zx.GridInfo.from_ispyb({"steps_x": 5, "steps_y": 6, "dx_mm": 0.02, "dy_mm": 0.02, "micronsPerPixelX": 0.44,
                                 "micronsPerPixelY": 0.44, "snapshot_offsetXPixel": 339.273,
                                 "snapshot_offsetYPixel": 236.727, "snaked": True, "orientation": "vertical"})
    return zx.centre_2d(counts, gi, sample_id=3)


def test_2d_results(transport, results_queue):
    want = r2d([0, 0, 6, 54, 38, 0, 5, 41, 44, 5] + [0] * 20)
    with zx.ZocaloResults2D(transport, queue=results_queue, beamline=results_queue[4:], timeout_s=10) as zocalo:
        zocalo.subscribe()
        transport.publish("results", results_queue, zx.build_result_message(want, dcid=31), RECIPE_HEADER).result(10)
        assert zocalo.trigger(dcids=31) == (want,)


def test_results_of_the_other_kind_fail_at_once(transport, results_queue):
    with results_for(transport, results_queue, timeout_s=30) as zocalo:
        zocalo.subscribe()
        publish_2d = lambda dcid, gpu: transport.publish(  # noqa: E731
            "results", results_queue, zx.build_result_message(r2d([0] * 30), dcid=dcid, gpu=gpu), RECIPE_HEADER).result(10)
        publish_2d(32, False)
        t0 = time.monotonic()
        with pytest.raises(zx.ResultPayloadError, match="sent 2d results for DCID 32; ZocaloResults takes 3d results"):
            zocalo.trigger(dcids=32)
        assert time.monotonic() - t0 < 5  # not the 30 s deadline
        assert eventually(lambda: transport.message_count(f"dlq.{results_queue}") == 1)
        # a result of a source the caller does not want is ignored, whatever its kind
        publish_2d(33, True)
        publish_result(transport, results_queue, [ROW], dcid=33)
        assert list(zocalo.trigger(dcids=33)) == [ROW]


def test_a_retry_at_once_after_a_timeout_gets_what_came_meanwhile(transport, results_queue):
    """A CPU result came while the caller waited for the GPU one to compare;
    the caller gave up; a retry straight away still gets the CPU result."""
    with results_for(transport, results_queue, timeout_s=10, compare_sources=True, compare_wait_s=0.5) as zocalo:
        zocalo.subscribe()
        threading.Timer(0.05, publish_result, (transport, results_queue, [ROW], 34)).start()
        with pytest.raises(zx.NoResultsFromZocaloError):
            zocalo.trigger(dcids=34, timeout_s=0.3)  # gets the CPU result, waits for GPU, gives up
        assert list(zocalo.trigger(dcids=34, timeout_s=10)) == [ROW]
        assert zocalo.last_comparison is not None and zocalo.last_comparison.agree is None



def test_results_for_the_collection_asked_for(transport, results_queue):
    publish_result(transport, results_queue, [ROW], dcid=7, dcgid=70)  # stale: sits in the queue already
    with results_for(transport, results_queue, timeout_s=10) as zocalo:
        threading.Timer(0.3, publish_result, (transport, results_queue, [ROW], 8, 80)).start()  # foreign
        threading.Timer(0.6, publish_result, (transport, results_queue, [ROW, WEAK], 9, 90)).start()
        results = zocalo.trigger(dcids=[9, 10], dcgid=90)
        assert list(results) == [WEAK, ROW]  # sorted by max_count
        assert (zocalo.last_message.dcid, zocalo.last_message.dcgid) == (9, 90)
    assert eventually(lambda: transport.message_count(f"dlq.{results_queue}") == 2)
    assert transport.message_count(results_queue) == 0


def test_no_crystal_is_not_no_answer(transport, results_queue):
    with results_for(transport, results_queue, timeout_s=10) as zocalo:
        publish_result(transport, results_queue, [], dcid=3)
        results = zocalo.trigger(dcids=3)
        assert len(results) == 0 and zocalo.last_message.no_crystal
        t0 = time.monotonic()
        with pytest.raises(zx.NoResultsFromZocaloError, match="DCID 4 within 0.5 s"):
            zocalo.trigger(dcids=4, timeout_s=0.5)
        assert 0.45 < time.monotonic() - t0 < 3


def test_results_that_come_early_are_kept(transport, results_queue):
    with results_for(transport, results_queue, sort_key="total_count") as zocalo:
        zocalo.subscribe()
        publish_result(transport, results_queue, [WEAK, ROW], dcid=11)
        time.sleep(0.3)
        assert list(zocalo.trigger(dcids=11, timeout_s=10)) == [ROW, WEAK]


def test_malformed_results_are_rejected_and_consuming_goes_on(transport, results_queue):
    good = zx.build_result_message(zx.XrcResults([ROW]), dcid=12)
    bad = [
        (b"not json", RECIPE_HEADER),
        (good.replace(b'"max_voxel": [2, 1, 13]', b'"max_voxel": [2, 1]'), RECIPE_HEADER),
        (json.dumps({"results": [ROW.to_dict()], "status": "success", "type": "3d"}).encode(), RECIPE_HEADER),
        (good, {}),  # no workflows-recipe header
    ]
    with results_for(transport, results_queue, timeout_s=10) as zocalo:
        for body, headers in bad:
            transport.publish("results", results_queue, body, headers).result(10)
        transport.publish("results", results_queue, good, {"workflows-recipe": "True"}).result(10)
        assert list(zocalo.trigger(dcids=12)) == [ROW]
    assert eventually(lambda: transport.message_count(f"dlq.{results_queue}") == 4)


@pytest.mark.parametrize("source, want", [(zx.Source.CPU, ROW), (zx.Source.GPU, WEAK), (zx.Source.EITHER, WEAK)])
def test_source_policy(transport, results_queue, source, want):
    with results_for(transport, results_queue, source=source, timeout_s=10) as zocalo:
        zocalo.subscribe()
        publish_result(transport, results_queue, [WEAK], dcid=20, gpu=True)
        time.sleep(0.2)
        publish_result(transport, results_queue, [ROW], dcid=20, gpu=False)
        assert list(zocalo.trigger(dcids=20)) == [want]
        assert zocalo.last_comparison is None


def test_compare_sources(transport, results_queue):
    with results_for(transport, results_queue, compare_sources=True, compare_wait_s=0.5, timeout_s=10) as zocalo:
        publish_result(transport, results_queue, [ROW], dcid=30, gpu=True)
        publish_result(transport, results_queue, [ROW], dcid=30, gpu=False)
        assert list(zocalo.trigger(dcids=30)) == [ROW]
        assert zocalo.last_comparison.agree is True
        publish_result(transport, results_queue, [WEAK], dcid=31, gpu=True)
        publish_result(transport, results_queue, [ROW], dcid=31, gpu=False)
        assert list(zocalo.trigger(dcids=31)) == [ROW]  # CPU is the source used
        assert zocalo.last_comparison.agree is False and "differ" in zocalo.last_comparison.detail
        publish_result(transport, results_queue, [ROW], dcid=32, gpu=False)  # the GPU never answers
        t0 = time.monotonic()
        assert list(zocalo.trigger(dcids=32)) == [ROW]
        assert 0.4 < time.monotonic() - t0 < 5
        assert zocalo.last_comparison.agree is None


def test_trigger_async_leaves_the_event_loop_free(transport, results_queue):
    with results_for(transport, results_queue, timeout_s=10) as zocalo:
        async def plan():
            ticks = 0

            async def ticker():
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0.01)

            tick = asyncio.create_task(ticker())
            threading.Timer(0.5, publish_result, (transport, results_queue, [ROW], 40)).start()
            results = await zocalo.trigger_async(dcids=40)
            tick.cancel()
            with pytest.raises(zx.NoResultsFromZocaloError):
                await zocalo.trigger_async(dcids=41, timeout_s=0.2)
            return results, ticks

        results, ticks = asyncio.run(plan())
        assert list(results) == [ROW] and ticks > 20


def test_private_queue_leaves_the_durable_queue_alone(transport, results_queue):
    with results_for(transport, results_queue, private_queue=True, timeout_s=10) as zocalo:
        zocalo.subscribe()
        publish_result(transport, results_queue, [ROW], dcid=50)
        assert list(zocalo.trigger(dcids=50)) == [ROW]
    assert eventually(lambda: transport.message_count(results_queue) == 1)


def test_results_say_what_they_wait_for(transport, results_queue):
    with results_for(transport, results_queue, timeout_s=10) as zocalo:
        assert repr(zocalo).endswith(", idle (a trigger waits up to 10 s)>")
        got = []
        waiting = threading.Thread(target=lambda: got.append(zocalo.trigger(dcids=[62, 61], dcgid=6)))
        waiting.start()
        assert eventually(lambda: "waiting for the results of DCID 61, 62 / DCGID 6>" in repr(zocalo)), repr(zocalo)
        assert f"3d results from queue {results_queue!r} on " in repr(zocalo)
        publish_result(transport, results_queue, [ROW], dcid=61, dcgid=6)
        waiting.join(10)
        assert list(got[0]) == [ROW] and repr(zocalo).endswith(", idle (a trigger waits up to 10 s)>")


def test_one_trigger_at_a_time_and_names_required(transport, results_queue):
    zocalo = results_for(transport, results_queue)
    with pytest.raises(ValueError, match="name the collection"):
        zocalo.trigger()
    zocalo.close()


# ---- RabbitMQ only: workflows, faults -------------------------------------------

@pytest.fixture
def amqp(rabbit):
    from zocalo_xrc.messaging.rabbitmq import AmqpTransport

    t = AmqpTransport(zx.ConnectionSettings.from_url(rabbit.url))
    yield t
    t.close()


@pytest.fixture
def workflows_transport(rabbit):
    settings = zx.ConnectionSettings.from_url(rabbit.url)
    t = PikaTransport()
    t.config = {"--rabbit-host": settings.host, "--rabbit-port": settings.port, "--rabbit-user": "guest",
                "--rabbit-pass": "guest", "--rabbit-vhost": "/"}
    t.connect()
    yield t
    t.disconnect()


def test_a_workflows_service_result_reaches_zocalo_results(amqp, workflows_transport, unique):
    name = f"xrc.{unique}"
    amqp.declare_results_queue(name)
    message = {
        "recipe": {
            "start": [[1, []]],
            "1": {"service": "DLS X-Ray Centering", "queue": "reduce.xray_centering",
                  "parameters": {"dcid": "16085800"}, "output": {"success": 2}},
            "2": {"service": "Send XRC results to GDA", "queue": name, "exchange": "results",
                  "parameters": {"dcid": "16085800", "dcgid": "9"}},
        },
        "recipe-pointer": 1, "recipe-path": [], "environment": {"ID": "e7"},
        "payload": {"file-number": 1, "n_spots_total": 3},
    }
    rw = workflows.recipe.RecipeWrapper(message=message, transport=workflows_transport)
    with zx.ZocaloResults(amqp, queue=name, timeout_s=10) as zocalo:
        threading.Timer(0.3, rw.send_to, ("success", {"results": [ROW.to_dict()], "status": "success", "type": "3d"})).start()
        assert list(zocalo.trigger(dcgid=9)) == [ROW]
        assert zocalo.last_message.environment_id == "e7"


def test_a_workflows_subscriber_gets_our_trigger_messages(amqp, workflows_transport, monkeypatch):
    monkeypatch.setenv("ZOCALO_GO_USER", "gda2")
    monkeypatch.setenv("ZOCALO_GO_HOSTNAME", "ws001")
    amqp.delete_queue("processing_recipe")  # empty: nothing an earlier test left
    amqp.declare_queue("processing_recipe")
    got = queue.Queue()
    workflows_transport.subscribe("processing_recipe", lambda header, message: got.put((header, message)),
                                  acknowledgement=False)
    trigger = zx.ZocaloTrigger(amqp)
    trigger.run_start(zx.ZocaloStartInfo(16085800, "ins_10_31", 0, 1140, 0))
    trigger.run_end(16085800)
    (h1, m1), (h2, m2) = got.get(timeout=10), got.get(timeout=10)
    assert m1 == {"recipes": ["mimas"], "parameters": {"ispyb_dcid": 16085800, "filename": "ins_10_31",
                                                       "start_frame_index": 0, "number_of_frames": 1140,
                                                       "message_index": 0, "event": "start"}}
    assert m2 == {"recipes": ["mimas"], "parameters": {"event": "end", "ispyb_dcid": 16085800}}
    for h in (h1, h2):
        assert h["zocalo.go.user"] == "gda2" and h["zocalo.go.host"] == "ws001"
        assert h["delivery_mode"] == 2


def test_the_broker_drops_the_connection_mid_wait(amqp, rabbit, unique, caplog):
    name = f"xrc.{unique}"
    amqp.declare_results_queue(name)
    from zocalo_xrc.messaging.rabbitmq import AmqpTransport

    with zx.ZocaloResults(amqp, queue=name, timeout_s=30) as zocalo:
        zocalo.subscribe()

        def drop_then_publish():
            rabbit.close_all_connections()
            time.sleep(1.0)
            other = AmqpTransport(zx.ConnectionSettings.from_url(rabbit.url), connection_name="publisher")
            publish_result(other, name, [ROW], dcid=60)
            other.close()

        threading.Timer(0.5, drop_then_publish).start()
        with caplog.at_level("WARNING", logger="zocalo_xrc.messaging.rabbitmq"):
            assert list(zocalo.trigger(dcids=60)) == [ROW]
        assert any("lost" in r.message for r in caplog.records)
        # Publishing works again on the same (reconnected) transport.
        publish_result(amqp, name, [], dcid=61)
        assert len(zocalo.trigger(dcids=61)) == 0


def test_trigger_raises_when_the_broker_does_not_confirm_in_time(amqp, rabbit):
    """A broker in a memory alarm blocks publishers: no confirm, so a timeout."""
    if rabbit.close_all_connections is None:
        pytest.skip("external broker")
    amqp.declare_queue("processing_recipe")
    rabbit.ctl("set_vm_memory_high_watermark", "0")
    try:
        t0 = time.monotonic()
        with pytest.raises(zx.TransportError, match="did not confirm end of DCID 70 within 0.5 s"):
            zx.ZocaloTrigger(amqp, timeout_s=0.5).run_end(70)
        assert time.monotonic() - t0 < 3
    finally:
        rabbit.ctl("set_vm_memory_high_watermark", "0.4")
    zx.ZocaloTrigger(amqp, timeout_s=10).run_end(71)  # and once the alarm clears, it works again


def test_closing_after_the_connection_is_harmless(rabbit, unique):
    from zocalo_xrc.messaging.rabbitmq import AmqpTransport

    t = AmqpTransport(zx.ConnectionSettings.from_url(rabbit.url))
    name = f"xrc.{unique}"
    t.declare_results_queue(name)
    zocalo = zx.ZocaloResults(t, queue=name)
    zocalo.subscribe()
    t.close()
    zocalo.close()
    with pytest.raises(zx.TransportError, match="closed"):
        t.publish("", name, b"x", {}).result(5)


def test_settle_waiting_then_the_next_collection_whichever_it_is(transport, results_queue):
    """dodal's contract, for a plan that does not know its DCIDs: what waited
    before staging is stale (settled, not handed over); the next result is
    handed over whatever its collection."""
    publish_result(transport, results_queue, [ROW], dcid=1)
    publish_result(transport, results_queue, [ROW], dcid=2)
    zocalo = results_for(transport, results_queue, timeout_s=10)
    assert eventually(lambda: transport.message_count(results_queue) == 2)
    assert zocalo.settle_waiting() == 2
    publish_result(transport, results_queue, [ROW], dcid=3)
    zocalo.trigger(any_collection=True)
    assert zocalo.last_message.dcid == 3
    publish_result(transport, results_queue, [ROW], dcid=4)  # came while nobody waited: held for the next trigger
    assert eventually(lambda: transport.message_count(results_queue) == 0)
    assert zocalo.settle_waiting() == 1  # subscribed already: what is held is stale now
    with pytest.raises(zx.NoResultsFromZocaloError, match="the next collection"):
        zocalo.trigger(any_collection=True, timeout_s=0.3)
    with pytest.raises(ValueError, match="any_collection=True names no collection"):
        zocalo.trigger(dcids=5, any_collection=True)
    with pytest.raises(ValueError, match="or any_collection=True"):
        zocalo.trigger()
    zocalo.close()
    assert eventually(lambda: transport.message_count(results_queue) == 0)
