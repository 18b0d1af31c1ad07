"""A beamline's wait on a local Zocalo: ``end`` sent -> results in the caller.

A 3D 60x30+60x30 scan is registered in ISPyB and started; GPU per-image
analysis plays all 3,600 frames (fast, 20,000 frames/s) and the centring
service takes every one and sends its result: the scan's frames have all been
analysed. Then, timed: the beamline sends ``end`` for both grids and waits
for the scan's results, as Hyperion does after a grid scan. On the in-process
broker and on RabbitMQ (the services in threads of this process), p50 and p99.

* ours: ``ZocaloTrigger.run_end`` (pipelined, confirmed) and ``ZocaloResults.trigger``;
* the workflows way (what dodal's classes do): a new workflows transport per
  message to send each ``end``, and a ``workflows.recipe.wrap_subscribe``
  consumer of the results queue that decodes and sorts the results.

Each contender has its own beamline, so they never share a results queue.
"""

from __future__ import annotations

import json
import queue
import time

import pytest
import workflows.recipe

import zocalo_xrc as zx
from bench_result_messages import from_dicts
from local_zocalo import running
from zocalo_xrc.client import Source
from zocalo_xrc.local import LocalZocalo, Scan, Settings
from zocalo_xrc.local.zocalo import default_scan

ROUNDS = 100
SCAN = json.loads(default_scan().read_text())


@pytest.fixture(scope="module", params=["in-process", "rabbitmq"])
def local(request):
    with running(request, request.param, Settings(pia=frozenset({"gpu"}), frame_rate=20000.0)) as z:
        yield z


class Rounds:
    """Per round: a scan started and analysed, its result on its way."""

    def __init__(self, local: LocalZocalo, beamline: str) -> None:
        self.local, self.scan = local, Scan.from_dict({**SCAN, "beamline": beamline})
        self.trigger = zx.ZocaloTrigger(local.transport(), timeout_s=10)
        (self.pia,) = local.per_image_analysis()
        self.xrc = local.services["XRayCenteringGPU"].xrc

    def setup(self):
        registered = self.local.add_scan(self.scan, name="bench")
        self.trigger.run_start(*self.scan.start_infos(registered.dcids, "bench"))
        deadline = time.monotonic() + 30
        done = self.xrc.completed + 1
        while not (all(d in self.pia.progress and self.pia.progress[d].done.is_set() for d in registered.dcids)
                   and self.xrc.completed >= done):
            assert time.monotonic() < deadline, "the scan was not analysed and centred in 30 s"
            time.sleep(0.002)
        return (registered,), {}


def expected(rounds: Rounds) -> list[float]:
    scans = [zx.GridScan(k + 1, rounds.scan.counts(k), g) for k, g in enumerate(rounds.scan.grids)]
    return [r.max_count for r in zx.centre_3d_scans(*scans, sample_id=rounds.scan.sample_id)]


def test_end_to_results_zocalo_xrc(record, local):
    rounds = Rounds(local, "bench1")
    zocalo = zx.ZocaloResults(local.transport(), beamline="bench1", source=Source.GPU, timeout_s=30)
    zocalo.subscribe()

    def wait(registered):
        rounds.trigger.run_end(*registered.dcids)
        return zocalo.trigger(dcids=registered.dcids, dcgid=registered.dcgid)

    where = "in-process" if local.broker is not None else "RabbitMQ"
    results = record("local Zocalo: end -> results in the caller", f"3D 60x30+60x30, {where}", "zocalo-xrc",
                     wait, rounds=ROUNDS, setup=rounds.setup)
    assert [r.max_count for r in results] == expected(rounds)
    zocalo.close()


def test_end_to_results_workflows(record, local):
    rounds = Rounds(local, "bench2")
    if local.broker is not None:
        from zocalo_xrc.messaging.workflows_inprocess import InProcessWorkflowsTransport

        def transport():
            return InProcessWorkflowsTransport(local.broker)
    else:
        from workflows.transport.pika_transport import PikaTransport

        from zocalo_xrc.local.host import isolate_transport_tables

        settings = local.broker_settings

        def transport():
            t = PikaTransport()
            t.config = {"--rabbit-host": settings.host, "--rabbit-port": settings.port,
                        "--rabbit-user": settings.username, "--rabbit-pass": settings.password.reveal(),
                        "--rabbit-vhost": settings.vhost}
            isolate_transport_tables(t)
            return t

    local.transport().declare_results_queue("xrc.bench2")
    consumer = transport()
    consumer.connect()
    got: queue.Queue = queue.Queue()

    def on_result(rw, header, message):
        consumer.ack(header)
        results = sorted(from_dicts(message["results"]), key=lambda r: r.max_count, reverse=True)
        got.put((int(rw.recipe_step["parameters"]["dcgid"]), results))

    workflows.recipe.wrap_subscribe(consumer, "xrc.bench2", on_result, acknowledgement=True)

    def wait(registered):
        for dcid in registered.dcids:  # as dodal's ZocaloTrigger: a transport per message
            sender = transport()
            sender.connect()
            sender.send("processing_recipe", {"recipes": ["mimas"], "parameters": {"ispyb_dcid": dcid, "event": "end"}})
            sender.disconnect()
        while True:
            dcgid, results = got.get(timeout=30)
            if dcgid == registered.dcgid:
                return results

    where = "in-process" if local.broker is not None else "RabbitMQ"
    results = record("local Zocalo: end -> results in the caller", f"3D 60x30+60x30, {where}",
                     "workflows (dodal's way)", wait, rounds=ROUNDS, setup=rounds.setup)
    assert [r.max_count for r in results] == expected(rounds)
    consumer.disconnect()
