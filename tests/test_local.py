"""The local Zocalo, trigger to result, out of real parts: zocalo's Dispatcher
with the package's recipes and ISPyB filters, Mimas, simulated per-image
analysis, the X-ray centring service; ISPyB on SQLite in-process and on
MariaDB with RabbitMQ. Triggered by ZocaloTrigger, read by ZocaloResults.

Every expected result is computed here from the scan's own counts with the
core's ``centre_3d_scans``/``centre_2d`` (tested against the spec and scipy
elsewhere), and modelled crystals are found where the model put them."""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from zocalo_xrc import ZocaloResults, ZocaloResults2D, ZocaloStartInfo, ZocaloTrigger
from zocalo_xrc.centring import GridScan, centre_2d, centre_3d_scans
from zocalo_xrc.client import NoResultsFromZocaloError, Source
from zocalo_xrc.geometry import GridGeometry
from zocalo_xrc.local.scan import Scan
from zocalo_xrc.local.settings import Settings
from zocalo_xrc.local.zocalo import default_scan

from local_zocalo import running

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
FAST = Settings(frame_rate=20000.0, idle_s=3.0)


@pytest.fixture(scope="module", params=["in-process+sqlite", "rabbitmq+mariadb"])
def local(request):
    with running(request, request.param.split("+")[0], FAST, mariadb=request.param.endswith("mariadb")) as z:
        yield z


def trigger(local, scan: Scan, name: str = "scan"):
    """Register ``scan`` and trigger it as dodal does; the registered scan."""
    registered = local.add_scan(scan, name=name)
    t = ZocaloTrigger(local.transport(), timeout_s=10)
    t.run_start(*scan.start_infos(registered.dcids, name))
    t.run_end(*registered.dcids)
    return registered


def receiver(local, scan: Scan, source: Source, timeout_s: float = 90.0):
    kind = ZocaloResults if len(scan.grids) == 2 else ZocaloResults2D
    r = kind(local.transport(), beamline=scan.beamline, private_queue=True, source=source, timeout_s=timeout_s)
    r.subscribe()
    return r


def expected(scan: Scan):
    if len(scan.grids) == 2:
        return centre_3d_scans(*(GridScan(k + 1, scan.counts(k), g) for k, g in enumerate(scan.grids)),
                               sample_id=scan.sample_id)
    return centre_2d(scan.counts(0), scan.grids[0], sample_id=scan.sample_id)


def modelled(**changes) -> Scan:
    data = json.loads(default_scan().read_text())
    data.update(changes)
    return Scan.from_dict(data)


@pytest.mark.parametrize("source", [Source.GPU, Source.CPU])
def test_a_recorded_3d_scan_gives_the_result_of_its_counts(local, source):
    scan = Scan.load(EXAMPLES / "scan3d.json")
    with receiver(local, scan, source) as r:
        registered = trigger(local, scan)
        got = r.trigger(dcids=registered.dcids, dcgid=registered.dcgid)
        assert r.last_message.dcid in registered.dcids and r.last_message.gpu == (source is Source.GPU)
    assert got.to_dicts() == expected(scan).to_dicts()
    assert len(got) == 2


def test_a_2d_scan(local):
    scan = Scan.load(EXAMPLES / "scan2d.json")
    with receiver(local, scan, Source.GPU) as r:
        registered = trigger(local, scan)
        (got,) = r.trigger(dcids=registered.dcids)
    assert got.to_dict() == expected(scan).to_dict()


def test_modelled_crystals_are_found_where_the_model_put_them(local):
    scan = Scan.load(default_scan())
    with receiver(local, scan, Source.GPU) as r:
        registered = trigger(local, scan)
        got = r.trigger(dcids=registered.dcids, dcgid=registered.dcgid)
    assert got.to_dicts() == expected(scan).to_dicts()
    xy, xz = scan.grids
    # boxes -> mm from the first box's corner: the model's frame
    geometry = GridGeometry(0.5 * xy.dx_mm, xy.dx_mm, xy.steps_x, 0.5 * xy.dy_mm, xy.dy_mm, xy.steps_y,
                            0.5 * xz.dy_mm, xz.dy_mm, xz.steps_y)
    found = sorted(tuple(geometry.to_motor(x).centre_mm) for x in got)
    truth = sorted(c.centre_mm for c in scan.crystals)
    assert len(found) == len(truth) == 2
    np.testing.assert_allclose(found, truth, atol=xy.dx_mm)  # within a box of the truth


def test_a_pin_with_nothing_that_diffracts_gives_no_crystal(local):
    scan = modelled(crystals=[], background=0.0)
    with receiver(local, scan, Source.CPU) as r:
        registered = trigger(local, scan)
        got = r.trigger(dcids=registered.dcids, dcgid=registered.dcgid)
    assert len(got) == 0


def test_a_scan_whose_analysis_never_finishes_is_aborted_in_the_logbook(local, caplog):
    scan = modelled(lost_frames=3)
    with caplog.at_level(logging.WARNING), receiver(local, scan, Source.GPU, timeout_s=2.0) as r:
        registered = trigger(local, scan)
        with pytest.raises(NoResultsFromZocaloError, match=str(registered.dcids[0])):
            r.trigger(dcids=registered.dcids, dcgid=registered.dcgid)
        # the service gives the group up after its idle time: {} to the abort step, in the logbook
        deadline = time.monotonic() + 60  # under load, each spot finder may take a while to send its frames
        while time.monotonic() < deadline:
            entries = list(local.logbook.entries())
            runs = {e["guid"] for e in entries if str(e.get("dcid")) in {str(d) for d in registered.dcids}}
            aborts = [e for e in entries if e["queue"] == "xrc.abort" and e["dir"] == "out" and e["guid"] in runs]
            if len(aborts) == 2:
                break
            time.sleep(0.2)
        # one abort of the group per spot finder (GPU from start, CPU from end), each {}
        assert sorted(e["service"] for e in aborts) == ["X-ray centring (zocalo-xrc)", "X-ray centring, GPU (zocalo-xrc)"]
        assert all(e["payload"] == {} for e in aborts)
    # the service's log (in this process) says what never came
    missing = [m.message for m in caplog.records if "abandoned" in m.message and str(registered.dcids[0]) in m.message]
    assert missing and "images 1798, 1799, 1800" in missing[0]


def test_two_beamlines_at_once(local):
    i03, i04 = modelled(), modelled(beamline="i04", seed=7)
    with receiver(local, i03, Source.GPU) as r3, receiver(local, i04, Source.GPU) as r4:
        a, b = trigger(local, i03, "a"), trigger(local, i04, "b")
        assert r4.trigger(dcids=b.dcids, dcgid=b.dcgid).to_dicts() == expected(i04).to_dicts()
        assert r3.trigger(dcids=a.dcids, dcgid=a.dcgid).to_dicts() == expected(i03).to_dicts()
        assert r3.last_message.dcgid == a.dcgid and r4.last_message.dcgid == b.dcgid


def test_the_logbook_shows_every_message_of_a_run(local):
    scan = Scan.load(EXAMPLES / "scan3d.json")
    with receiver(local, scan, Source.GPU) as r:
        registered = trigger(local, scan)
        r.trigger(dcids=registered.dcids, dcgid=registered.dcgid)
    time.sleep(0.5)  # the journal's last lines
    runs = [x for x in local.logbook.runs() if str(x["dcid"]) == str(registered.dcids[0])]
    mimas = [x for x in runs if x["what"] and "Mimas" in x["what"]]
    assert mimas, runs
    book = local.logbook.run(mimas[0]["guid"])
    guids = [run.guid for run in book]
    assert len(guids) >= 2  # the mimas run, and the GPU analysis it started (CPU at end: a third)
    assert book[0].dispatch is not None and "Incoming message body" in book[0].dispatch.read_text()
    entries = [e for run in book for e in run.entries]
    pia = [e for e in entries if e["dir"] == "out" and e["queue"] == "reduce.xray_centering.gpu"]
    assert sorted(e["payload"]["file-number"] for e in pia) == list(range(1, scan.grids[0].image_count + 1))
    # the one 3D result went out once, in the run of the grid whose image completed the group
    everything = [run for d in registered.dcids for x in local.logbook.runs() if str(x["dcid"]) == str(d)
                  for run in local.logbook.run(x["guid"]) if "gpu" in (x["what"] or "").lower()]
    results = {(e["guid"], e["t"]) for run in everything for e in run.entries if e.get("exchange") == "results"}
    assert len(results) == 1


def test_local_up_runs_each_service_as_a_zocalo_service_process(rabbit, mariadb_url, tmp_path):
    """``zocalo-xrc local up``: zocalo.service processes on RabbitMQ, one per
    service; a scan registered with ``local add-scan`` by another process and
    triggered by a client gets its result; a killed service is started again."""
    import os
    import signal

    import zocalo_xrc as zx
    import subprocess
    import sys

    if not hasattr(rabbit, "vhost"):
        pytest.skip("an external broker: no vhost of our own")
    vhost = f"up-{uuid.uuid4().hex[:8]}"
    url = rabbit.vhost(vhost)
    state = tmp_path / "state"
    config = tmp_path / "zocalo.yml"  # the broker by environment name: no password on the command line
    config.write_text(f"version: 1\nr: {{plugin: pika, host: 127.0.0.1, port: {rabbit.port}, username: guest, "
                      f"password: guest, vhost: {vhost}}}\nenvironments: {{lab: [r]}}\n")
    up = subprocess.Popen([sys.executable, "-m", "zocalo_xrc", "local", "up", "--broker", "lab", "--state", str(state),
                           "--ispyb", mariadb_url, "--frame-rate", "20000", "--pia", "gpu"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "ZOCALO_CONFIG": str(config)})
    try:
        assert "local Zocalo up" in up.stdout.readline()
        # dodal's device consumes xrc.i03 and never declares it: the local Zocalo has
        from zocalo_xrc.messaging.rabbitmq import AmqpTransport

        with AmqpTransport(zx.ConnectionSettings.from_url(url)) as admin:
            assert admin.queue_exists("xrc.i03") and not admin.queue_exists("xrc.i04")
            # registered from another directory, with a relative state directory and a scan on i04
            i04 = tmp_path / "i04.json"
            i04.write_text(json.dumps({**json.loads((EXAMPLES / "scan2d.json").read_text()), "beamline": "i04"}))
            subprocess.run([sys.executable, "-m", "zocalo_xrc", "local", "add-scan", str(i04), "--state", "state",
                            "--ispyb", mariadb_url], cwd=tmp_path, capture_output=True, text=True, check=True)
            assert admin.queue_exists("xrc.i04")
        added = subprocess.run([sys.executable, "-m", "zocalo_xrc", "local", "add-scan", str(EXAMPLES / "scan3d.json"),
                                "--json", "--state", "state", "--ispyb", mariadb_url], cwd=tmp_path,
                               capture_output=True, text=True, check=True)
        registered = json.loads(added.stdout)
        assert mariadb_url.split("@")[0] not in added.stdout + added.stderr
        with ZocaloResults(url, private_queue=True, source=Source.GPU, timeout_s=60) as r:
            r.subscribe()
            t = ZocaloTrigger(url, timeout_s=10)
            t.run_start(*(ZocaloStartInfo(s["parameters"]["ispyb_dcid"], registered["filename"],
                                          s["parameters"]["start_frame_index"], s["parameters"]["number_of_frames"],
                                          s["parameters"]["message_index"]) for s in registered["starts"]))
            t.run_end(*registered["dcids"])
            got = r.trigger(dcids=registered["dcids"], dcgid=registered["dcgid"])
        r.transport.close()  # the process's connection to this test's own vhost
        assert got.to_dicts() == expected(Scan.load(EXAMPLES / "scan3d.json")).to_dicts()
        listing = subprocess.run([sys.executable, "-m", "zocalo_xrc", "local", "logbook", "--state", str(state),
                                  "--dcid", str(registered["dcids"][0])], capture_output=True, text=True, check=True)
        assert "Mimas" in listing.stdout
        guid = listing.stdout.split()[0]
        book = subprocess.run([sys.executable, "-m", "zocalo_xrc", "local", "logbook", guid, "--state", str(state)],
                              capture_output=True, text=True, check=True).stdout
        assert "per-image message(s)" in book and "dispatcher's record" in book
    finally:
        up.send_signal(signal.SIGTERM)
        out, err = up.communicate(timeout=60)
    assert up.returncode == 0, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    assert not [line for line in subprocess.run(["pgrep", "-af", str(state)], capture_output=True, text=True).stdout
                .splitlines() if "pgrep" not in line]  # every service process is gone


def test_the_journal_records_a_send_inside_a_transaction_once_it_commits(tmp_path):
    from zocalo_xrc.local.logbook import Journal, Logbook
    from zocalo_xrc.messaging import InProcessBroker
    from zocalo_xrc.messaging.workflows_inprocess import InProcessWorkflowsTransport

    broker = InProcessBroker()
    broker.declare_queue("q")
    transport = InProcessWorkflowsTransport(broker)
    transport.add_middleware(Journal(tmp_path / "journal", "a service"))
    transport.connect()

    def request(guid):
        return {"recipes": ["mimas"], "parameters": {"guid": guid, "ispyb_dcid": 1}}

    txn = transport.transaction_begin()
    transport.send("q", request("aborted"), transaction=txn)
    transport.transaction_abort(txn)
    txn = transport.transaction_begin()
    transport.send("q", request("committed"), transaction=txn)
    assert not list(Logbook(tmp_path).entries())  # not sent yet
    transport.transaction_commit(txn)
    transport.send("q", request("at once"))
    assert [e["guid"] for e in Logbook(tmp_path).entries()] == ["committed", "at once"]
    transport.disconnect()
    broker.close()
