"""The ophyd-async results device in a real RunEngine, on the in-process
broker and on RabbitMQ, with the project's own service answering: stale
results settled at staging, the first result after staging or the expected
collection's, honest dtypes and shapes, a deadline that is an error."""

import json
import threading
import time

import bluesky.plan_stubs as bps
import numpy as np
import pytest
from bluesky.run_engine import RunEngine
from bluesky.utils import FailedStatus
from ophyd_async.plan_stubs import ensure_connected

import zocalo_xrc as zx
from test_service import publish, scan
from test_service_assembly import CASE_3D, direct_3d
from test_transport import eventually
from test_faults import MARGIN_S, direct, proxy, through  # noqa: F401 (fixtures)
from ophyd_async.core import soft_signal_rw
from ophyd_async.sim import SimMotor

from zocalo_xrc.bluesky import (
    NO_SAMPLE_ID,
    ZOCALO_HW_READ,
    NoCollectionsError,
    NoResultsFromZocaloError,
    ZocaloCallback,
    ZocaloResults,
    start_infos_from_omega_map,
)
from zocalo_xrc.messages import message_id_for
from zocalo_xrc.messaging import QueueSpec
from zocalo_xrc.service.runner import XrcService


@pytest.fixture
def RE():
    engine = RunEngine(call_returns_result=True)
    yield engine
    if engine.state != "idle":
        engine.halt()


@pytest.fixture
def loop(transport, unique):
    """The service on ``reduce.xray_centering.<unique>``, results to ``xrc.<unique>``."""
    q = f"reduce.xray_centering.{unique}"
    transport.declare_work_queue(q)
    transport.declare_results_queue(f"xrc.{unique}")
    transport.declare_queue(f"abort.{unique}")
    service = XrcService(transport, q).start()
    yield transport, q
    service.stop()
    for name in (q, f"dlq.{q}", f"xrc.{unique}", f"dlq.xrc.{unique}", f"abort.{unique}"):
        transport.delete_queue(name)


def grid_geometry():
    """Where the example scan was taken (as examples/gridscan_plan.py says)."""
    xy, xz = (zx.GridInfo.from_ispyb(g["gridinfo"]) for g in CASE_3D["grids"])
    return zx.GridGeometry(x_start_mm=-1.2, x_step_mm=xy.dx_mm, x_steps=xy.steps_x, y_start_mm=0.35,
                           y_step_mm=xy.dy_mm, y_steps=xy.steps_y, z_start_mm=0.1, z_step_mm=xz.dy_mm,
                           z_steps=xz.steps_y)


def device(transport, unique, **kwargs):
    kwargs.setdefault("timeout_s", 20)
    kwargs.setdefault("results_source", "GPU")
    return ZocaloResults(name="zocalo", channel=f"xrc.{unique}", connection=transport, **kwargs)


def test_a_plan_reads_the_result_of_its_scan(RE, loop, unique):
    transport, q = loop
    zocalo = device(transport, unique)
    RE(ensure_connected(zocalo))
    _, _, stale = scan(unique, shift=1000)
    publish(transport, q, stale)  # a scan finished before this plan: its result waits in xrc.<unique>
    assert eventually(lambda: transport.message_count(f"xrc.{unique}") == 1)
    a, _, messages = scan(unique)
    documents = []

    def plan():
        yield from bps.stage(zocalo, wait=True)  # settles the stale result at once
        publish(transport, q, messages)  # the collection runs; the service centres it
        yield from bps.open_run()
        reading = yield from bps.trigger_and_read([zocalo])
        yield from bps.close_run()
        com = yield from bps.rd(zocalo.centre_of_mass)
        yield from bps.unstage(zocalo, wait=True)
        return reading, com

    reading, com = RE(plan(), lambda name, doc: documents.append((name, doc))).plan_result
    want = direct_3d().sorted(by="max_count")
    np.testing.assert_array_equal(com, want.centre_of_mass)
    assert reading["zocalo-ispyb_dcid"]["value"] == a["dcid"] and reading["zocalo-ispyb_dcgid"]["value"] == 77
    np.testing.assert_array_equal(reading["zocalo-bounding_box"]["value"], want.bounding_box)
    np.testing.assert_array_equal(reading["zocalo-sample_id"]["value"], [CASE_3D["sample_id"]] * len(want))
    descriptor = next(doc for name, doc in documents if name == "descriptor")
    event = next(doc for name, doc in documents if name == "event")
    for key, data_key in descriptor["data_keys"].items():  # describe() says what is read
        assert data_key["shape"] == list(np.shape(event["data"][key])), key
    assert descriptor["data_keys"]["zocalo-centre_of_mass"]["dtype_numpy"] == "<f8"
    assert descriptor["data_keys"]["zocalo-max_voxel"]["dtype_numpy"] == "<i8"
    assert zocalo.receiver.last_message.dcid == a["dcid"]  # not the stale scan's
    assert eventually(lambda: transport.message_count(f"xrc.{unique}") == 0)


def test_count_reads_the_results_of_collections_that_end_after_it_stages(RE, loop, unique):
    """bluesky.plans.count([device], num=2): count stages the device (a result
    waiting from before is stale, settled), then each reading is the next
    result, here of a collection started once the run is open."""
    import bluesky.plans as bp

    transport, q = loop
    zocalo = device(transport, unique)
    _, _, stale = scan(unique, shift=1000)
    publish(transport, q, stale)
    assert eventually(lambda: transport.message_count(f"xrc.{unique}") == 1)
    scans = [scan(unique, shift=2000), scan(unique, shift=3000)]
    documents = []

    def collect(name, doc):  # the collections run once count has staged the device and opened its run
        documents.append((name, doc))
        if name in ("start", "event") and scans:
            publish(transport, q, scans.pop(0)[2])

    RE(bp.count([zocalo], num=2), collect)
    read = [doc["data"]["zocalo-ispyb_dcid"] for name, doc in documents if name == "event"]
    assert read == [CASE_3D["grids"][0]["dcid"] + 2000, CASE_3D["grids"][0]["dcid"] + 3000]
    for name, doc in documents:
        if name == "event":
            np.testing.assert_array_equal(doc["data"]["zocalo-centre_of_mass"],
                                          direct_3d().sorted(by="max_count").centre_of_mass)


def test_count_with_nothing_after_staging_says_why(RE, loop, unique):
    """Only a result from before: count's reading is NoResultsFromZocaloError
    after the device's timeout, saying the waiting one was stale."""
    import bluesky.plans as bp

    transport, q = loop
    zocalo = device(transport, unique, timeout_s=2)
    _, _, stale = scan(unique, shift=1000)
    publish(transport, q, stale)
    assert eventually(lambda: transport.message_count(f"xrc.{unique}") == 1)
    with pytest.raises(FailedStatus) as failed:
        RE(bp.count([zocalo]))
    error = failed.value.__cause__
    assert isinstance(error, NoResultsFromZocaloError)
    assert str(error) == ("no X-ray centring results for the next collection within 2 s: zocalo reads the results "
                          "of collections that end after it is staged (1 waiting when it was staged, stale, were "
                          "settled); start Zocalo after staging, as ZocaloCallback does")


def test_the_expected_collection_only(RE, loop, unique):
    """Told the collection, the device takes that result, not an earlier one
    of another collection. (A plan stages its devices: the RunEngine unstages
    them when the plan ends.)"""
    transport, q = loop
    zocalo = device(transport, unique)
    RE(ensure_connected(zocalo))
    _, _, first = scan(unique, shift=500)
    a, _, messages = scan(unique)

    def plan():
        yield from bps.stage(zocalo, wait=True)
        zocalo.expect(dcids=a["dcid"])
        publish(transport, q, first + messages)
        yield from bps.trigger(zocalo, wait=True)
        return (yield from bps.rd(zocalo.ispyb_dcid))

    assert RE(plan()).plan_result == a["dcid"]


def test_no_result_in_time_is_an_error_and_no_crystal_is_not(RE, transport, unique):
    transport.declare_results_queue(f"xrc.{unique}")
    zocalo = device(transport, unique, timeout_s=0.5)
    RE(ensure_connected(zocalo))
    body = zx.build_result_message(zx.XrcResults([]), dcid=42, dcgid=7, gpu=True, beamline=unique)

    def plan():
        yield from bps.stage(zocalo, wait=True)
        t0 = time.monotonic()
        try:
            yield from bps.trigger(zocalo, wait=True)
        except FailedStatus as e:
            failure = e
        took = time.monotonic() - t0
        transport.publish("results", f"xrc.{unique}", body, {"workflows-recipe": True}).result(10)
        yield from bps.trigger(zocalo, wait=True)
        com = yield from bps.rd(zocalo.centre_of_mass)
        dcid = yield from bps.rd(zocalo.ispyb_dcid)
        return failure, took, com, dcid

    failure, took, com, dcid = RE(plan()).plan_result
    assert isinstance(failure.args[0].exception(), NoResultsFromZocaloError) and took < 5
    assert com.shape == (0, 3) and dcid == 42  # no crystal: an empty result, not an error
    transport.delete_queue(f"xrc.{unique}")
    transport.delete_queue(f"dlq.xrc.{unique}")


def test_dodals_way_of_reading_the_rows(RE, loop, unique):
    """dodal's get_full_processing_results reads each signal with bps.rd and
    zips the rows: with honest 2-D arrays that gives whole results back."""
    transport, q = loop
    zocalo = device(transport, unique)
    RE(ensure_connected(zocalo))
    a, _, messages = scan(unique)

    def plan():
        yield from bps.stage(zocalo, wait=True)
        publish(transport, q, messages)
        yield from bps.trigger(zocalo, wait=True)
        columns = []
        for signal in (zocalo.centre_of_mass, zocalo.max_voxel, zocalo.max_count, zocalo.n_voxels,
                       zocalo.total_count, zocalo.bounding_box, zocalo.sample_id):
            columns.append((yield from bps.rd(signal, default_value=[])))
        yield from bps.unstage(zocalo, wait=True)
        return [dict(centre_of_mass=[c - 0.5 for c in com.tolist()], max_voxel=mv.tolist(), max_count=int(mc),
                     n_voxels=int(n), total_count=int(tc), bounding_box=bb.tolist(),
                     sample_id=int(s) if s != NO_SAMPLE_ID else None)
                for com, mv, mc, n, tc, bb, s in zip(*columns, strict=True)]

    rows = RE(plan()).plan_result
    want = direct_3d().sorted(by="max_count").to_dicts()
    assert [r["max_voxel"] for r in rows] == [w["max_voxel"] for w in want]
    assert [r["sample_id"] for r in rows] == [CASE_3D["sample_id"]] * len(want)
    assert json.dumps(rows)  # plain Python values


# ---- the callback, in a plan shaped like Hyperion's --------------------------------------------------


class SimulatedPia:
    """Zocalo's per-image analysis, as far as this test needs it: when every
    grid of the scan has ended, every image's spot count goes to the service
    (the project's own), as GPU PIA's recipe step sends them."""

    def __init__(self, transport, work_queue, messages, dcids):
        self.transport, self.work_queue, self.messages, self.dcids = transport, work_queue, messages, set(dcids)
        self.seen = []
        self.ended = set()
        self.subscription = transport.subscribe(QueueSpec("processing_recipe"), self.on_message)

    def on_message(self, delivery):
        parameters = json.loads(delivery.body)["parameters"]
        self.seen.append(parameters)
        delivery.ack()
        if parameters["event"] == "end":
            self.ended.add(parameters["ispyb_dcid"])
            if self.ended == self.dcids:
                for body in self.messages:
                    self.transport.publish("", self.work_queue, body, {"workflows-recipe": True})


def test_a_hyperion_shaped_plan_triggers_zocalo_reads_the_result_and_moves_there(RE, loop, unique):
    transport, q = loop
    transport.declare_queue("processing_recipe")
    a, b, messages = scan(unique)
    xy, xz = (zx.GridInfo.from_ispyb(g["gridinfo"]) for g in (a, b))
    pia = SimulatedPia(transport, q, messages, [a["dcid"], b["dcid"]])
    zocalo = device(transport, unique)
    callback = ZocaloCallback("do_fgs", connection=transport, results=zocalo,
                              start_info_generator_factory=lambda: start_infos_from_omega_map([0, 90]))
    RE.subscribe(callback)
    x, y, z = SimMotor("x"), SimMotor("y"), SimMotor("z")
    writer = soft_signal_rw(str, "ins_10_31", name="eiger_odin_file_writer_id")
    geometry = grid_geometry()
    md = {"subplan_name": "do_fgs", "omega_to_scan_spec": {"0": xy.steps_x * xy.steps_y, "90": xz.steps_x * xz.steps_y},
          "grid_plane_to_id_map": {"0": a["dcid"], "90": b["dcid"]}}

    def plan():
        yield from ensure_connected(zocalo, x, y, z, writer)
        yield from bps.stage(zocalo, wait=True)
        yield from bps.open_run(md=md)
        yield from bps.create(name=ZOCALO_HW_READ)  # the detector's file: the callback sends the starts now
        yield from bps.read(writer)
        yield from bps.save()
        yield from bps.close_run()  # ... and the ends: PIA runs, the service centres
        yield from bps.trigger(zocalo, wait=True)
        com = yield from bps.rd(zocalo.centre_of_mass)  # the best first; in boxes, each box's corner at k
        centre = geometry.boxes_to_mm(tuple(c - 0.5 for c in com[0]))  # box k centred on k (docs/algorithm.md)
        yield from bps.mv(x, centre[0], y, centre[1], z, centre[2])
        yield from bps.unstage(zocalo, wait=True)
        return centre

    centre = RE(plan()).plan_result
    want = geometry.to_motor(direct_3d().sorted(by="max_count")[0]).centre_mm
    np.testing.assert_allclose(centre, want)
    positions = [RE(bps.rd(m)).plan_result for m in (x, y, z)]
    np.testing.assert_allclose(positions, want)
    starts = [p for p in pia.seen if p["event"] == "start"]
    assert [(p["ispyb_dcid"], p["filename"], p["start_frame_index"], p["number_of_frames"], p["message_index"])
            for p in starts] == [(a["dcid"], "ins_10_31", 0, xy.steps_x * xy.steps_y, 0),
                                 (b["dcid"], "ins_10_31", xy.steps_x * xy.steps_y, xz.steps_x * xz.steps_y, 1)]
    assert sorted(p["ispyb_dcid"] for p in pia.seen if p["event"] == "end") == [a["dcid"], b["dcid"]]
    pia.subscription.cancel()


def test_a_triggering_run_with_no_collection_is_an_error(RE, transport):
    callback = ZocaloCallback("do_fgs", connection=transport,
                              start_info_generator_factory=lambda: start_infos_from_omega_map([0]))
    RE.subscribe(callback)
    md = {"subplan_name": "do_fgs", "omega_to_scan_spec": {"0": 4}, "grid_plane_to_id_map": {"0": 5}}
    with pytest.raises(NoCollectionsError, match="no collection"):
        RE(_run(md))


def _run(md):
    yield from bps.open_run(md=md)
    yield from bps.close_run()


def test_as_the_emit_target_of_another_callback_and_a_refused_trigger_stops_the_plan(RE, transport, unique):
    """mx-bluesky's ISPyB callback adds the DCIDs to the start document and
    emits to this one. With no processing_recipe queue to take the starts,
    the broker refuses them: the plan sees the error at once, not 180 s on."""
    transport.delete_queue("processing_recipe")
    callback = ZocaloCallback("do_fgs", connection=transport,
                              start_info_generator_factory=lambda: start_infos_from_omega_map([0]))

    def ispyb(name, doc):  # what mx-bluesky's ISPyB callback does before emitting
        if name == "start" and doc.get("subplan_name") == "do_fgs":
            doc = {**doc, "grid_plane_to_id_map": {"0": 5150}}
        callback(name, doc)

    RE.subscribe(ispyb)
    writer = soft_signal_rw(str, "ins_11", name="eiger_odin_file_writer_id")

    def plan():
        yield from ensure_connected(writer)
        yield from bps.open_run(md={"subplan_name": "do_fgs", "omega_to_scan_spec": {"0": 4}})
        yield from bps.create(name=ZOCALO_HW_READ)
        yield from bps.read(writer)
        yield from bps.save()
        yield from bps.close_run()

    t0 = time.monotonic()
    with pytest.raises(zx.UnroutableError, match="processing_recipe"):
        RE(plan())
    assert time.monotonic() - t0 < 30


@pytest.mark.parametrize("where", ["in-process", "rabbitmq"])
def test_the_example_plan_runs_and_moves_to_the_best_crystal(where, request):
    """examples/gridscan_plan.py as a user runs it, in-process and on RabbitMQ."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    options = []
    if where == "rabbitmq":
        rabbit = request.getfixturevalue("rabbit")
        if not hasattr(rabbit, "vhost"):
            pytest.skip("an external broker: no vhost of our own")
        options = ["--broker", rabbit.vhost(f"example-{time.monotonic_ns()}")]
    out = subprocess.run([sys.executable, str(root / "examples" / "gridscan_plan.py"), *options],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    x, y, z = grid_geometry().to_motor(direct_3d().sorted(by="max_count")[0]).centre_mm
    assert f"moved to x {x:.4f} mm, y {y:.4f} mm, z {z:.4f} mm" in out.stdout, out.stdout
    assert out.stdout.startswith(f"{len(direct_3d())} crystal(s)")


def test_the_example_plan_uses_a_running_local_zocalo(rabbit, tmp_path):
    """--broker where `zocalo-xrc local up` runs: the scan is registered in
    that one's state directory and the plan gets its result (before: the
    example started a second local Zocalo there and ended in a BrokerInUseError
    traceback); a wrong --state is one line."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    if not hasattr(rabbit, "vhost"):
        pytest.skip("an external broker: no vhost of our own")
    root = Path(__file__).resolve().parent.parent
    url = rabbit.vhost(f"example-up-{time.monotonic_ns()}")
    state = tmp_path / "state"
    up = subprocess.Popen([sys.executable, "-m", "zocalo_xrc", "local", "up", "--broker", url, "--state", str(state),
                           "--frame-rate", "20000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "local Zocalo up" in up.stdout.readline()
        plan = [sys.executable, str(root / "examples" / "gridscan_plan.py"), "--broker", url]
        out = subprocess.run([*plan, "--state", str(state)], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        x, y, z = grid_geometry().to_motor(direct_3d().sorted(by="max_count")[0]).centre_mm
        assert f"moved to x {x:.4f} mm, y {y:.4f} mm, z {z:.4f} mm" in out.stdout, out.stdout
        wrong = subprocess.run([*plan, "--state", str(tmp_path / "elsewhere")], capture_output=True, text=True,
                               timeout=120)
        assert wrong.returncode == 1
        assert wrong.stderr.splitlines() == [
            f"gridscan_plan.py: {url.replace('guest:guest@', 'guest@')} has a Zocalo running, but "
            f"{tmp_path / 'elsewhere'} is no local Zocalo's state directory: give --state the one of its "
            "`zocalo-xrc local up`"], wrong.stderr
    finally:
        up.send_signal(signal.SIGTERM)
        up.communicate(timeout=60)


@pytest.mark.parametrize("source, want", [("GPU", 2), ("CPU", 1), ("EITHER", 1)])
def test_the_results_source_as_dodals_and_the_first_of_either(RE, transport, unique, source, want):
    """CPU and GPU results for one collection: the chosen source's, or
    whichever came first; unread results stay for the next reader."""
    transport.declare_results_queue(f"xrc.{unique}")
    zocalo = device(transport, unique, timeout_s=10, results_source=source)
    one = zx.XrcResults(direct_3d()[:1])
    two = direct_3d()

    def plan():
        yield from bps.stage(zocalo, wait=True)
        for results, gpu in ((one, False), (two, True)):
            body = zx.build_result_message(results, dcid=7, dcgid=8, gpu=gpu, beamline=unique)
            transport.publish("results", f"xrc.{unique}", body, {"workflows-recipe": True}).result(10)
        yield from bps.trigger(zocalo, wait=True)
        return (yield from bps.rd(zocalo.n_voxels))

    assert len(RE(plan()).plan_result) == want
    transport.delete_queue(f"xrc.{unique}")
    transport.delete_queue(f"dlq.xrc.{unique}")


def test_made_before_there_is_a_broker_configured(RE, monkeypatch):
    """A beamline makes its devices and callbacks at start-up, broker or not:
    the configuration is read when first needed, and a missing one is then a
    clear error."""
    monkeypatch.delenv("ZOCALO_CONFIG", raising=False)
    zocalo = ZocaloResults(name="zocalo", zocalo_environment="dev_bluesky", results_source="GPU")
    callback = ZocaloCallback("do_fgs", "dev_bluesky", lambda: start_infos_from_omega_map([0]))
    assert zocalo.results_source == "GPU" and callback.triggering_plan == "do_fgs"
    with pytest.raises(zx.ConfigurationError, match="ZOCALO_CONFIG"):
        zocalo.receiver


def test_frames_from_the_scan_points_mx_bluesky_puts_in_the_start_document():
    """mx-bluesky's start document: omega -> the scan's points by axis."""
    generator = start_infos_from_omega_map([0, 90])
    next(generator)
    points = {"0": {"sam_x": np.zeros(240), "sam_y": np.zeros(240)}, "90": {"sam_x": np.zeros(200), "sam_z": np.zeros(200)}}
    infos = generator.send({"omega_to_scan_spec": points, "grid_plane_to_id_map": {"0": 1001, "90": 1002}})
    assert [(i.ispyb_dcid, i.start_frame_index, i.number_of_frames, i.message_index) for i in infos] == \
        [(1001, 0, 240, 0), (1002, 240, 200, 1)]


def test_unstaging_leaves_unread_results_for_the_next_reader(RE, transport, unique):
    transport.declare_results_queue(f"xrc.{unique}")
    zocalo = device(transport, unique, timeout_s=10)

    def plan():
        yield from bps.stage(zocalo, wait=True)
        for dcid in (1, 2):
            body = zx.build_result_message(direct_3d(), dcid=dcid, dcgid=8, gpu=True, beamline=unique)
            transport.publish("results", f"xrc.{unique}", body, {"workflows-recipe": True}).result(10)
        yield from bps.trigger(zocalo, wait=True)
        dcid = yield from bps.rd(zocalo.ispyb_dcid)
        yield from bps.unstage(zocalo, wait=True)
        return dcid

    assert RE(plan()).plan_result == 1
    assert eventually(lambda: transport.message_count(f"xrc.{unique}") == 1)  # DCID 2's, for whoever reads next
    transport.delete_queue(f"xrc.{unique}")
    transport.delete_queue(f"dlq.xrc.{unique}")


# ---- a run that ends mid-trigger, a broker that cannot be reached, a result sent twice ----------------


def send_result(transport, unique, dcid=None, body=None):
    """As the centring service sends a result (``body``, or a new one for
    ``dcid``): its message_id made from its content."""
    if body is None:
        body = zx.build_result_message(direct_3d(), dcid=dcid, dcgid=8, gpu=True, beamline=unique)
    transport.publish("results", f"xrc.{unique}", body, {"workflows-recipe": True}, message_id_for(body)).result(10)
    return body


@pytest.fixture
def results_queue(transport, unique):
    transport.declare_results_queue(f"xrc.{unique}")
    yield f"xrc.{unique}"
    transport.delete_queue(f"xrc.{unique}")
    transport.delete_queue(f"dlq.xrc.{unique}")


@pytest.mark.parametrize("ending", ["the plan raises", "RE.abort()", "the plan raises, unstaged"])
def test_a_run_that_ends_mid_trigger_leaves_the_next_run_its_result(RE, transport, unique, results_queue, ending):
    """The trigger of a run that ended stops waiting: the next run's trigger
    waits, and the next run's result is its own (never the orphan's)."""
    zocalo = device(transport, unique, timeout_s=20)
    RE(ensure_connected(zocalo))
    staged = "unstaged" not in ending

    def first_run():
        if staged:
            yield from bps.stage(zocalo, wait=True)
        if ending == "RE.abort()":
            threading.Timer(0.5, RE.abort).start()
            yield from bps.trigger(zocalo, wait=True)
        yield from bps.trigger(zocalo, group="zocalo")
        yield from bps.sleep(0.3)
        raise RuntimeError("the plan fails")

    t0 = time.monotonic()
    with pytest.raises(Exception):
        RE(first_run())
    assert time.monotonic() - t0 < 5

    def next_run():
        if staged:
            yield from bps.stage(zocalo, wait=True)
            send_result(transport, unique, dcid=2)  # while nobody waits: an orphan would take it
            time.sleep(0.3)
            yield from bps.trigger(zocalo, wait=True)
        else:  # the RunEngine says nothing to a device it did not stage: the next trigger stops the orphan
            yield from bps.trigger(zocalo, group="zocalo")
            send_result(transport, unique, dcid=2)
            yield from bps.wait("zocalo")
        return (yield from bps.rd(zocalo.ispyb_dcid))

    t0 = time.monotonic()
    assert RE(next_run()).plan_result == 2
    assert time.monotonic() - t0 < 5
    assert eventually(lambda: transport.message_count(results_queue) == 0)


def test_a_broker_that_cannot_be_reached_is_an_error_by_the_devices_deadline(RE, through, proxy, direct, unique):
    """Staging and triggering keep to the device's timeout_s, not the 30 s
    of a call to the broker."""
    zocalo = ZocaloResults(name="zocalo", channel=f"xrc.{unique}", connection=through, timeout_s=5)
    RE(ensure_connected(zocalo))
    RE(bps.stage(zocalo, wait=True))  # the broker is there: staged
    RE(bps.unstage(zocalo, wait=True))
    proxy.refuse()  # the broker's port closes
    for step in (bps.stage, bps.trigger):
        t0 = time.monotonic()
        with pytest.raises(FailedStatus) as failed:
            RE(step(zocalo, wait=True))
        assert time.monotonic() - t0 < 5 + MARGIN_S
        error = failed.value.args[0].exception()
        assert isinstance(error, zx.TransportError), error
        assert f"cannot count the results waiting in xrc.{unique} within 5 s" in str(error), error
        assert "not connected to amqp://guest@127.0.0.1" in str(error) and "guest:guest" not in str(error), error
    direct.delete_queue(f"xrc.{unique}")  # declared by the first stage
    direct.delete_queue(f"dlq.xrc.{unique}")


def test_a_result_sent_twice_is_not_the_next_collections(RE, transport, unique, results_queue):
    """The centring service can send one result twice (the broker killed in the
    middle of its commit), with the same message_id: the second copy is never
    the next collection's, across triggers and runs."""
    zocalo = device(transport, unique, timeout_s=10)
    RE(ensure_connected(zocalo))

    def run(send, timeout_s=10):
        zocalo.timeout_s = timeout_s  # (read by the next trigger)
        yield from bps.stage(zocalo, wait=True)
        send()
        try:
            yield from bps.trigger(zocalo, wait=True)
        except FailedStatus as e:
            return e.args[0].exception()
        finally:
            yield from bps.unstage(zocalo, wait=True)
        return (yield from bps.rd(zocalo.ispyb_dcid))

    first = zx.build_result_message(direct_3d(), dcid=1, dcgid=8, gpu=True, beamline=unique)
    assert RE(run(lambda: send_result(transport, unique, body=first))).plan_result == 1
    again = lambda: send_result(transport, unique, body=first)  # noqa: E731 (the same bytes, the same message_id)
    assert isinstance(RE(run(again, timeout_s=1)).plan_result, NoResultsFromZocaloError)
    assert RE(run(lambda: (again(), send_result(transport, unique, dcid=2)))).plan_result == 2
    stale = send_result(transport, unique, dcid=3)  # waits before staging: settled as stale ...
    assert eventually(lambda: transport.message_count(results_queue) == 1)
    send_copy = lambda: send_result(transport, unique, body=stale)  # noqa: E731 (... and so is its copy after)
    assert RE(run(lambda: (send_copy(), send_result(transport, unique, dcid=4)))).plan_result == 4
    assert eventually(lambda: transport.message_count(results_queue) == 0)
