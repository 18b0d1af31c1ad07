"""The ophyd-async results device in a real RunEngine, on the in-process
broker and on RabbitMQ, with the project's own service answering: stale
results settled at staging, the first result after staging or the expected
collection's, honest dtypes and shapes, a deadline that is an error."""

import json
import time

import bluesky.plan_stubs as bps
import numpy as np
import pytest
from bluesky.run_engine import RunEngine
from bluesky.utils import FailedStatus
from ophyd_async.plan_stubs import ensure_connected

import zocalo_xrc as zx
from test_service import bodies, publish
from test_service_assembly import CASE_3D, direct_3d
from test_transport import eventually
from zocalo_xrc.bluesky import NO_SAMPLE_ID, NoResultsFromZocaloError, ZocaloResults
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


def scan(unique, shift=0):
    a, b = ({**g, "dcid": g["dcid"] + shift} for g in CASE_3D["grids"])
    return a, bodies(a, [b["dcid"]], unique, sample_id=CASE_3D["sample_id"]) + \
        bodies(b, [a["dcid"]], unique, sample_id=CASE_3D["sample_id"])


def device(transport, unique, **kwargs):
    kwargs.setdefault("timeout_s", 20)
    return ZocaloResults(name="zocalo", channel=f"xrc.{unique}", connection=transport, results_source="GPU", **kwargs)


def test_a_plan_reads_the_result_of_its_scan(RE, loop, unique):
    transport, q = loop
    zocalo = device(transport, unique)
    RE(ensure_connected(zocalo))
    stale_scan, stale = scan(unique, shift=1000)
    publish(transport, q, stale)  # a scan finished before this plan: its result waits in xrc.<unique>
    assert eventually(lambda: transport.message_count(f"xrc.{unique}") == 1)
    a, messages = scan(unique)
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


def test_the_expected_collection_only(RE, loop, unique):
    """Told the collection, the device takes that result, not an earlier one
    of another collection. (A plan stages its devices: the RunEngine unstages
    them when the plan ends.)"""
    transport, q = loop
    zocalo = device(transport, unique)
    RE(ensure_connected(zocalo))
    other, first = scan(unique, shift=500)
    a, messages = scan(unique)

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
    a, messages = scan(unique)

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
