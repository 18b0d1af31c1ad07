"""The local Zocalo under faults around it, with real parts: ISPyB (a MariaDB
server of the test's own) stopped mid-run and started again; the journal's
filesystem full; several processes registering the first scans of a fresh
state directory at once; scan names that try to be paths."""

from __future__ import annotations

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
