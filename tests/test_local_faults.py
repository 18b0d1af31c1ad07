"""The local Zocalo under faults around it, with real parts: ISPyB (a MariaDB
server of the test's own) stopped mid-run and started again; the journal's
filesystem full; several processes registering the first scans of a fresh
state directory at once; scan names that try to be paths."""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path

import pytest

from zocalo_xrc import ZocaloResults2D, ZocaloTrigger
from zocalo_xrc.centring import centre_2d
from zocalo_xrc.client import Source
from zocalo_xrc.local import LocalZocalo
from zocalo_xrc.local.scan import Scan
from zocalo_xrc.local.settings import Settings

import mariadb

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
FAST = Settings(frame_rate=20000.0, idle_s=3.0)


@pytest.fixture
def own_mariadb():
    """A MariaDB server this test may stop and start."""
    if not mariadb.available():
        pytest.skip("MariaDB is not installed (mariadb-install-db, mariadbd): apt-get install -y mariadb-server")
    server = mariadb.MariaDB()
    try:
        server.start()
        yield server
    finally:
        server.stop()


# ---- 10: ISPyB unreachable for a while ------------------------------------------


def test_a_run_triggered_while_ispyb_is_down_completes_once_it_is_back(rabbit, own_mariadb, caplog):
    """The beamline triggers while ISPyB's server is stopped; 20 s later it
    is started again. The Dispatcher's ISPyB filters wait for it (one line
    saying so) instead of failing each delivery until the queue's delivery
    limit dead-letters the request; the run gives its result."""
    if not hasattr(rabbit, "vhost"):
        pytest.skip("an external broker: no vhost of our own")
    scan = Scan.load(EXAMPLES / "scan2d.json")
    with LocalZocalo(broker=rabbit.vhost(f"faults-{uuid.uuid4().hex[:8]}"), ispyb_url=own_mariadb.url,
                     settings=FAST) as z:
        registered = z.add_scan(scan, name="outage")
        with caplog.at_level(logging.INFO), ZocaloResults2D(z.transport(), beamline=scan.beamline,
                                                            private_queue=True, source=Source.GPU,
                                                            timeout_s=60) as r:
            r.subscribe()
            own_mariadb.stop_server()
            stopped = time.monotonic()
            trigger = ZocaloTrigger(z.transport(), timeout_s=10)
            trigger.run_start(*scan.start_infos(registered.dcids, "outage"))
            trigger.run_end(*registered.dcids)
            time.sleep(20)  # six deliveries take well under a second
            own_mariadb.start_server()
            (got,) = r.trigger(dcids=registered.dcids)
            waited = time.monotonic() - stopped
        assert got.to_dict() == centre_2d(scan.counts(0), scan.grids[0], sample_id=scan.sample_id).to_dict()
        assert waited > 20
        assert not z.transport().message_count("dlq.processing_recipe")
    unreachable = [m for m in caplog.records if "unreachable" in m.getMessage()]
    assert len(unreachable) == 1 and unreachable[0].levelno == logging.WARNING, [m.getMessage() for m in unreachable]
    assert own_mariadb.password not in unreachable[0].getMessage()
    assert not [m for m in caplog.records if m.name.startswith("zocalo.service") and m.levelno >= logging.ERROR]
    assert [m for m in caplog.records if "answers again" in m.getMessage()]


# ---- 11: the journal's disk full ------------------------------------------------------


@pytest.fixture
def small_filesystem(tmp_path):
    """A 64 KiB tmpfs of the test's own, unmounted however the test ends."""
    import subprocess

    where = tmp_path / "small"
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs for a full filesystem (needs root): {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def fill(directory: Path) -> Path:
    """Fill the filesystem of ``directory`` to the last byte; the filler file."""
    import errno

    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        while True:
            try:
                f.write(b"x" * 4096)
            except OSError as e:
                assert e.errno == errno.ENOSPC
                break
        while True:
            try:
                f.write(b"x")
            except OSError:
                return filler


def test_a_full_disk_pauses_the_journal_and_the_service_goes_on(small_filesystem, caplog):
    """A service whose journal is on a full filesystem takes and sends its
    messages as ever; the journal says so once, counts what it could not
    write, keeps whole lines only, and writes again once there is space."""
    from zocalo_xrc.local.logbook import Journal, Logbook
    from zocalo_xrc.messaging import InProcessBroker
    from zocalo_xrc.messaging.workflows_inprocess import InProcessWorkflowsTransport

    def request(guid: str) -> dict[str, object]:
        return {"recipes": ["mimas"], "parameters": {"guid": guid, "ispyb_dcid": 1}}

    broker = InProcessBroker()
    broker.declare_queue("in")
    broker.declare_queue("out")
    transport = InProcessWorkflowsTransport(broker)
    journal = Journal(small_filesystem / "journal", "a service")
    transport.add_middleware(journal)
    transport.connect()
    taken: list[object] = []

    def on_message(header: dict[str, object], message: object) -> None:
        taken.append(message)
        transport.ack(header)
        transport.send("out", message)

    try:
        transport.subscribe("in", on_message, acknowledgement=True)
        transport.send("in", request("before"))
        deadline = time.monotonic() + 10
        while not taken and time.monotonic() < deadline:
            time.sleep(0.01)
        per_message = len(list(Logbook(small_filesystem).entries()))  # its sends and what it took
        assert per_message >= 2
        filler = fill(small_filesystem)
        with caplog.at_level(logging.WARNING, logger="zocalo_xrc.local.logbook"):
            for k in range(20):
                transport.send("in", request(f"full-{k}"))
            deadline = time.monotonic() + 10
            while len(taken) < 21 and time.monotonic() < deadline:
                time.sleep(0.01)
        assert len(taken) == 21  # every message taken, and passed on
        assert broker.message_count("out") == 21
        warnings = [m for m in caplog.records if m.name == "zocalo_xrc.local.logbook"]
        assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING, [m.getMessage() for m in warnings]
        assert "journal" in warnings[0].getMessage() and "No space left" in warnings[0].getMessage()
        assert journal.unwritten > 0
        filler.unlink()
        transport.send("in", request("after"))
        deadline = time.monotonic() + 10
        while len(taken) < 22 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
        guids = [e["guid"] for e in Logbook(small_filesystem).entries()]  # every line whole JSON
        # what fitted in the file's last page was written, the rest counted; then it writes again
        full = [g for g in guids if g.startswith("full")]
        assert len(full) + journal.unwritten == 20 * per_message
        assert guids == ["before"] * per_message + full + ["after"] * per_message
    finally:
        transport.disconnect()
        broker.close()
        journal.close()


# ---- 14: add-scan names, and first add-scans at once ------------------------------------


def add_scan(*args: str, cwd: Path) -> "subprocess.CompletedProcess[str]":
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "zocalo_xrc", "local", "add-scan", str(EXAMPLES / "scan2d.json"),
                           *args], cwd=cwd, capture_output=True, text=True, timeout=120, env=dict(os.environ))


@pytest.mark.parametrize("name", ["../../escape", "/tmp/escape-{}", "a/b", ".", "..", ""])
def test_a_scan_name_is_a_name_not_a_path(tmp_path, name):
    name = name.format(uuid.uuid4().hex[:8])
    state = tmp_path / "deep" / "state"
    done = add_scan("--name", name, "--state", str(state), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "--name" in line and repr(name) in line
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and state not in p.parents]
    assert not outside and not list((state / "data").glob("*")) if state.exists() else True
    if name.startswith("/tmp/"):
        assert not list(Path("/tmp").glob(f"{Path(name).name}*"))


def test_first_add_scans_at_once_on_a_fresh_state_directory_all_succeed(tmp_path):
    """Several processes register the first scans of fresh state directories
    at the same moment: each creates the ISPyB tables (SQLite), and every one
    succeeds, round after round."""
    import subprocess
    import sys

    for round_ in range(3):
        state = tmp_path / f"state{round_}"  # not there yet
        procs = [subprocess.Popen([sys.executable, "-m", "zocalo_xrc", "local", "add-scan",
                                   str(EXAMPLES / "scan2d.json"), "--json", "--state", str(state)],
                                  cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(6)]
        outcomes = [(p.wait(120), *p.communicate()) for p in procs]
        failed = [err.strip() for rc, _, err in outcomes if rc != 0]
        assert not failed, f"round {round_}: {failed}"
        dcids = [json.loads(out)["dcids"][0] for _, out, _ in outcomes]
        assert len(set(dcids)) == 6


# ---- issue 20, item 10: a temporary local Zocalo stopped part-way on a shared broker -------


def test_a_temporary_local_zocalo_stopped_mid_scan_leaves_no_work_on_the_broker(rabbit, caplog):
    """A demo on RabbitMQ interrupted mid-scan: its ISPyB, data and logbook
    go with its temporary state, so the work it left queued could only be
    dead-lettered by the next local Zocalo there (with a confusing line, and
    a run in a logbook that never registered it). Stopping empties its
    service queues; the next one starts on empty queues and dead-letters
    nothing."""
    from zocalo_xrc.local.zocalo import SERVICE_QUEUES

    if not hasattr(rabbit, "vhost"):
        pytest.skip("an external broker: no vhost of our own")
    url = rabbit.vhost(f"leftover-{uuid.uuid4().hex[:8]}")
    scan = Scan.load(EXAMPLES / "scan3d.json")
    slow = Settings(frame_rate=20.0, pia=frozenset({"gpu"}))  # the scan's frames take a minute to play
    with caplog.at_level(logging.INFO, logger="zocalo_xrc.local"):
        with LocalZocalo(broker=url, settings=slow) as z:
            registered = z.add_scan(scan, name="interrupted")
            ZocaloTrigger(z.transport(), timeout_s=10).run_start(*scan.start_infos(registered.dcids, "interrupted"))
            (pia,) = z.per_image_analysis()
            deadline = time.monotonic() + 30
            while not any(g.sent for g in pia.progress.values()):  # mid-scan: frames playing, more queued
                assert time.monotonic() < deadline, "per-image analysis never started"
                time.sleep(0.05)
            # the step held while its frames play, the images held by the centring service: back to the queues at stop
    assert any("dropped" in r.getMessage() and "unfinished work" in r.getMessage() for r in caplog.records)
    with LocalZocalo(broker=url, settings=slow) as again:
        t = again.transport()
        assert {q: t.message_count(q) for q in SERVICE_QUEUES} == {q: 0 for q in SERVICE_QUEUES}
        assert {q: t.message_count(f"dlq.{q}") for q in SERVICE_QUEUES} == {q: 0 for q in SERVICE_QUEUES}
