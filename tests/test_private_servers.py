"""The private RabbitMQ node and MariaDB server a test session starts go when
the session goes, however it ends: stopped by SIGTERM (the fixtures' teardown
runs) or killed (their wardens end them)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mariadb
import rabbitmq

ROOT = Path(__file__).resolve().parent.parent

SESSION = '''
import json, os, time
from pathlib import Path

def test_holds_both(rabbit, mariadb_url):
    Path(os.environ["SERVERS"]).write_text(json.dumps({
        "epmd_port": rabbit.env["ERL_EPMD_PORT"], "rabbit_base": str(rabbit.base),
        "mariadb_port": mariadb_url.rsplit(":", 1)[1].split("/")[0]}))
    time.sleep(600)
'''


def servers_left(servers: dict) -> list[str]:
    """The processes of those servers still running: beam.smp and epmd by
    their epmd port, mariadbd by its port."""
    left = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        name = Path(argv[0].decode(errors="replace")).name
        if name in ("beam.smp", "epmd") and f"ERL_EPMD_PORT={servers['epmd_port']}".encode() in environ:
            left.append(f"{name} {proc.name}")
        if name == "mariadbd" and f"--port={servers['mariadb_port']}".encode() in argv:
            left.append(f"{name} {proc.name}")
    return left


@pytest.mark.skipif(not (rabbitmq.available() and mariadb.available()), reason="needs rabbitmq-server and mariadb-server")
@pytest.mark.skipif(bool(os.environ.get("ZOCALO_XRC_TEST_AMQP_URL") or os.environ.get("ZOCALO_XRC_TEST_MARIADB_URL")),
                    reason="the session uses an external broker or database")
@pytest.mark.parametrize("ending", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_session_ended_leaves_no_broker_or_database(tmp_path, ending):
    (tmp_path / "test_session.py").write_text(SESSION)
    out = tmp_path / "servers.json"
    env = {**os.environ, "SERVERS": str(out), "ZOCALO_XRC_BROKER_TMPFS": "0",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "python"), os.environ.get("PYTHONPATH", "")])}
    session = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                                "--rootdir", str(tmp_path), str(tmp_path / "test_session.py")],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not out.exists():
            assert session.poll() is None, session.communicate()[0].decode()
            assert time.monotonic() < deadline, "the session's servers did not start"
            time.sleep(0.5)
        servers = json.loads(out.read_text())
        assert len(servers_left(servers)) >= 3  # beam.smp, epmd, mariadbd: what is looked for is found
        session.send_signal(ending)
        session.wait(timeout=120)
    finally:
        if session.poll() is None:
            session.kill()
            session.wait()
    deadline = time.monotonic() + 40  # a killed session's wardens need a moment
    while (servers_left(servers) or Path(servers["rabbit_base"]).exists()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert servers_left(servers) == []
    assert not Path(servers["rabbit_base"]).exists()
