"""Fixtures shared by tests/ and benches/: one real RabbitMQ broker per session."""

import os
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "tests"))

import rabbitmq  # noqa: E402
from mariadb import mariadb_url  # noqa: E402,F401 (a private MariaDB server per session)


def pytest_configure(config):
    """A SIGTERM ends the session as Ctrl-C does: every fixture's teardown
    runs, so the private broker and database go (their wardens, tests/warden.py,
    end them if the session is killed outright)."""

    def interrupt(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the teardown is not to be interrupted again
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


@pytest.fixture(scope="session")
def rabbit():
    """A real RabbitMQ broker on 127.0.0.1, for the whole session; its data
    on tmpfs with ``ZOCALO_XRC_BROKER_TMPFS=1`` (the benches set it)."""
    url = os.environ.get("ZOCALO_XRC_TEST_AMQP_URL")
    if url:
        yield type("External", (), {"url": url, "close_all_connections": None, "tmpfs": None})()
        return
    if not rabbitmq.available():
        if os.environ.get("CI"):
            pytest.fail("rabbitmq-server is not installed (.ci/run installs it)")
        pytest.skip("rabbitmq-server is not installed: apt-get install rabbitmq-server")
    broker = rabbitmq.RabbitMQ(tmpfs=os.environ.get("ZOCALO_XRC_BROKER_TMPFS") == "1")
    broker.start()
    yield broker
    from zocalo_xrc.messaging.rabbitmq import AmqpTransport

    AmqpTransport.close_shared()  # the clients' connections, made once per process: not left retrying at exit
    broker.stop()
