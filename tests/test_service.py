"""The X-ray centring service on a broker (in-process and RabbitMQ): per-image
messages in, results read back by ZocaloResults, bad messages dead-lettered,
bad groups aborted, idle groups abandoned, 2D files written."""

import json
import queue
import random

import pytest

import zocalo_xrc as zx
from test_service_assembly import CASE_2D, CASE_3D, direct_3d
from test_transport import eventually
from zocalo_xrc.messaging import QueueSpec
from zocalo_xrc.service.runner import XrcService

HEADERS = {"workflows-recipe": True}


def recipe(step_parameters, gridinfo, beamline):
    return {
        "1": {"service": "GPU Gridscan", "queue": "per_image_analysis.gpu", "output": [2]},
        "2": {"service": "DLS X-Ray Centering", "queue": "reduce.xray_centering", "gridinfo": gridinfo,
              "parameters": step_parameters, "output": {"success": 3, "abort": 4}},
        "3": {"service": "Send XRC results to GDA", "queue": f"xrc.{beamline}", "exchange": "results",
              "parameters": {"dcid": step_parameters["dcid"], "dcgid": "77", "gpu": True}},
        "4": {"service": "XRC abort", "queue": f"abort.{beamline}"},
        "start": [[1, []]],
    }


def bodies(grid, others, beamline, **parameters):
    """Every image of one grid, as its recipe's PIA step sends them."""
    params = {"dcid": str(grid["dcid"]), "dcg_dcids": others, "experiment_type": "Mesh3D" if others else "Mesh",
              "beamline": "i03", **parameters}
    r = recipe(params, grid["gridinfo"], beamline)
    return [json.dumps({"environment": {"ID": f"env-{grid['dcid']}"}, "payload": {"file-number": k, "n_spots_total": n,
                                                                                    "file-seen-at": 1.7e9},
                        "recipe": r, "recipe-path": [1], "recipe-pointer": 2}).encode()
            for k, n in enumerate(grid["counts"], 1)]


def scan(beamline, shift=0):
    """The two grids of the 3D example, as a scan with DCIDs of its own
    (shifted by ``shift``), and every image of both, as PIA sends them."""
    a, b = ({**g, "dcid": g["dcid"] + shift} for g in CASE_3D["grids"])
    return a, b, bodies(a, [b["dcid"]], beamline, sample_id=CASE_3D["sample_id"]) + \
        bodies(b, [a["dcid"]], beamline, sample_id=CASE_3D["sample_id"])


@pytest.fixture
def setup(transport, unique):
    """The service's queue (dead-lettering to dlq.), the results queue, the abort queue."""
    q = f"reduce.xray_centering.{unique}"
    transport.declare_results_queue(q, exchange="pia", routing_key=q)
    transport.declare_queue(f"abort.{unique}")
    service = XrcService(transport, q, idle_s=60).start()
    zocalo = zx.ZocaloResults(transport, beamline=unique, timeout_s=20, source=zx.Source.GPU)
    zocalo.subscribe()
    yield transport, q, unique, service, zocalo
    zocalo.close()
    service.stop()
    for name in (q, f"dlq.{q}", f"xrc.{unique}", f"dlq.xrc.{unique}", f"abort.{unique}"):
        transport.delete_queue(name)


def publish(transport, q, messages):
    for f in [transport.publish("", q, b, HEADERS) for b in messages]:
        f.result(20)


def abort_messages(transport, name, n, timeout=10):
    got = queue.Queue()
    sub = transport.subscribe(QueueSpec(name), got.put)
    try:
        out = [got.get(timeout=timeout) for _ in range(n)]
        for m in out:
            m.ack()
        with pytest.raises(queue.Empty):
            got.get(timeout=0.3)
        return out
    finally:
        sub.cancel()


def test_a_3d_scan_out_of_order_with_duplicates(setup):
    transport, q, unique, service, zocalo = setup
    a, b, messages = scan(unique)
    random.Random(3).shuffle(messages)
    publish(transport, q, messages[:100] + messages[:20] + messages[100:])  # 20 redelivered
    results = zocalo.trigger(dcids=[a["dcid"], b["dcid"]], dcgid=77)
    assert results == direct_3d().sorted(by="max_count")
    assert eventually(lambda: service.completed == 1)
    assert eventually(lambda: transport.message_count(q) == 0)
    assert service.assembly.groups == {} and service.rejected == 0


def test_bad_messages_are_dead_lettered_and_the_scan_completes(setup):
    transport, q, unique, service, zocalo = setup
    a, b = CASE_3D["grids"]
    good = bodies(a, [b["dcid"]], unique) + bodies(b, [a["dcid"]], unique)
    out_of_range = json.loads(good[0])
    out_of_range["payload"]["file-number"] = 10_000
    bad = [b"{not json", b"[1, 2]", json.dumps(out_of_range).encode(),
           json.dumps({**json.loads(good[1]), "payload": "not an object"}).encode()]
    publish(transport, q, bad[:2] + good[:50] + bad[2:] + good[50:])
    transport.publish("", q, good[3], {}).result(10)  # no recipe header
    assert len(zocalo.trigger(dcids=a["dcid"])) == 2
    assert eventually(lambda: transport.message_count(f"dlq.{q}") == 5)
    assert service.rejected == 5


def test_a_group_whose_grids_disagree_is_aborted_once_and_others_complete(setup):
    transport, q, unique, service, zocalo = setup
    a, b = CASE_3D["grids"]
    wrong_b = {**b, "gridinfo": {**b["gridinfo"], "steps_x": 19.0}, "counts": b["counts"][:190]}
    two_d = {"dcid": 555, "counts": CASE_2D["counts"], "gridinfo": CASE_2D["gridinfo"]}
    publish(transport, q, bodies(a, [b["dcid"]], unique)[:5] + bodies(wrong_b, [a["dcid"]], unique)[:5]
            + bodies(two_d, None, unique))
    (abort,) = abort_messages(transport, f"abort.{unique}", 1)
    assert json.loads(abort.body)["payload"] == {}
    # the 2D result was sent meanwhile: read it from the durable queue, the 3D receiver closed
    zocalo.close()
    with zx.ZocaloResults2D(transport, beamline=unique, source=zx.Source.GPU, timeout_s=20) as reader:
        (r,) = reader.trigger(dcids=555)
    assert r == zx.centre_2d(CASE_2D["counts"], zx.GridInfo.from_ispyb(CASE_2D["gridinfo"]))
    assert eventually(lambda: transport.message_count(f"dlq.{q}") == 10)


def test_an_idle_group_is_abandoned_with_what_never_came(transport, unique, caplog):
    q = f"reduce.xray_centering.{unique}"
    transport.declare_results_queue(q, exchange="pia", routing_key=q)
    transport.declare_queue(f"abort.{unique}")
    service = XrcService(transport, q, idle_s=0.5).start()
    try:
        a, b = CASE_3D["grids"]
        publish(transport, q, bodies(a, [b["dcid"]], unique)[:-2])
        (abort,) = abort_messages(transport, f"abort.{unique}", 1)
        assert json.loads(abort.body)["payload"] == {}
        assert any("images 239, 240" in r.getMessage() and f"DCID {b['dcid']}: no image at all" in r.getMessage()
                   for r in caplog.records)
        assert eventually(lambda: transport.message_count(q) == 0) and transport.message_count(f"dlq.{q}") == 0
    finally:
        service.stop()
        for name in (q, f"dlq.{q}", f"abort.{unique}"):
            transport.delete_queue(name)


def test_2d_files(transport, unique, tmp_path):
    q = f"reduce.xray_centering.{unique}"
    transport.declare_results_queue(q, exchange="pia", routing_key=q)
    transport.declare_results_queue(f"xrc.{unique}")
    service = XrcService(transport, q).start()
    try:
        grid = {"dcid": 556, "counts": CASE_2D["counts"], "gridinfo": CASE_2D["gridinfo"]}
        out, logfile = tmp_path / "xrc" / "result.json", tmp_path / "xrc" / "result.log"
        publish(transport, q, bodies(grid, None, unique, output=str(out), log=str(logfile)))
        assert eventually(lambda: service.completed == 1)
        want = zx.centre_2d(CASE_2D["counts"], zx.GridInfo.from_ispyb(CASE_2D["gridinfo"]))
        assert json.loads(out.read_text()) == want.to_dict()
        assert "status ok" in logfile.read_text()
    finally:
        service.stop()
        for name in (q, f"dlq.{q}", f"xrc.{unique}", f"dlq.xrc.{unique}"):
            transport.delete_queue(name)


def test_a_stopped_service_hands_its_scan_to_the_next(transport, unique):
    """What one service held unacked goes back to the queue when it stops; the
    next one rebuilds the scan and sends the result once."""
    q = f"reduce.xray_centering.{unique}"
    transport.declare_results_queue(q, exchange="pia", routing_key=q)
    first = XrcService(transport, q).start()
    zocalo = zx.ZocaloResults(transport, beamline=unique, timeout_s=20, source=zx.Source.GPU)
    zocalo.subscribe()
    try:
        a, b, messages = scan(unique)
        publish(transport, q, messages[:300])
        assert eventually(lambda: sum(len(h.deliveries) for h in first.open.values()) == 300)
        first.stop()
        second = XrcService(transport, q).start()
        publish(transport, q, messages[300:])
        assert zocalo.trigger(dcids=a["dcid"]) == direct_3d().sorted(by="max_count")
        with pytest.raises(zx.NoResultsFromZocaloError):
            zocalo.trigger(dcids=a["dcid"], timeout_s=1)
        second.stop()
    finally:
        zocalo.close()
        for name in (q, f"dlq.{q}", f"xrc.{unique}", f"dlq.xrc.{unique}"):
            transport.delete_queue(name)


def test_shards_share_the_scans_and_never_split_one(transport, unique):
    """The intake queue routed by group to three shards: every scan's result
    once and right, several shards at work, each scan centred whole by one,
    and a message nobody can read dead-lettered by the shard it reached."""
    from zocalo_xrc.service.shards import ShardedService

    q = f"reduce.xray_centering.{unique}"
    transport.declare_work_queue(q)
    transport.declare_results_queue(f"xrc.{unique}")
    sharded = ShardedService(transport, q, 3).start()
    zocalo = zx.ZocaloResults(transport, beamline=unique, timeout_s=30, source=zx.Source.GPU)
    zocalo.subscribe()
    try:
        scans = []
        for k in range(9):
            a, b, messages = scan(unique, shift=10 * k)
            scans.append(a["dcid"])
            random.Random(k).shuffle(messages)
            publish(transport, q, messages)
        publish(transport, q, [b"{not json"])
        got = {}
        for _ in scans:
            results = zocalo.trigger(dcids=scans)
            assert zocalo.last_message.dcid not in got
            got[zocalo.last_message.dcid] = results
        assert sorted(got) == scans
        assert all(r == direct_3d().sorted(by="max_count") for r in got.values())
        assert eventually(lambda: sharded.completed == 9 and sharded.rejected == 1)
        assert sum(s.completed > 0 for s in sharded.services) >= 2
        assert eventually(lambda: transport.message_count(f"dlq.{q}") == 1)
    finally:
        zocalo.close()
        sharded.stop()
        for name in (q, f"dlq.{q}", f"xrc.{unique}", f"dlq.xrc.{unique}") + tuple(f"{q}.shard.{k}" for k in range(3)):
            transport.delete_queue(name)


def test_the_broker_dropping_the_connection_mid_scan_costs_nothing(rabbit, unique):
    """RabbitMQ closes every connection while the service holds half a scan:
    the service reconnects, the broker delivers the held images again, the
    service starts that scan afresh from them, and the result comes once."""
    from zocalo_xrc.messaging.rabbitmq import AmqpTransport

    if rabbit.close_all_connections is None:
        pytest.skip("external broker")
    transport = AmqpTransport(zx.ConnectionSettings.from_url(rabbit.url))
    q = f"reduce.xray_centering.{unique}"
    transport.declare_work_queue(q)
    transport.declare_results_queue(f"xrc.{unique}")
    service = XrcService(transport, q).start()
    try:
        a, b, messages = scan(unique)
        publish(transport, q, messages[:300])
        assert eventually(lambda: sum(len(h.deliveries) for h in service.open.values()) == 300)
        rabbit.close_all_connections()
        assert eventually(lambda: transport.connected.is_set() and transport.generation == 2, timeout=30)
        publish(transport, q, messages[300:])
        assert eventually(lambda: service.completed == 1, timeout=30)
        assert eventually(lambda: transport.message_count(q) == 0 and transport.message_count(f"xrc.{unique}") == 1)
        got = queue.Queue()
        sub = transport.subscribe(QueueSpec(f"xrc.{unique}"), got.put)
        result = got.get(timeout=10)
        result.ack()
        sub.cancel()
        assert zx.parse_result_message(result.body).results == direct_3d()
        assert service.completed == 1 and service.rejected == 0
    finally:
        service.stop()
        for name in (q, f"dlq.{q}", f"xrc.{unique}", f"dlq.xrc.{unique}"):
            transport.delete_queue(name)
        transport.close()
