"""A private RabbitMQ node for the tests: Debian's rabbitmq-server, started on
free ports of 127.0.0.1 only (AMQP, distribution and epmd), in a directory of
its own, and stopped when the test session ends.

With ``tmpfs=True`` (the benches ask for it) that directory, the node's data
included, is on tmpfs (``/dev/shm``): the broker's disk writes are not what a
bench measures. Every node has a warden (``warden.py``), which ends the node
(beam.smp and its epmd) and removes its directory if the session ends
without stopping it: killed, SIGKILL included."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from warden import Warden

BIN = Path("/usr/lib/rabbitmq/bin")
TMPFS = Path("/dev/shm")

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def zocalo_config(path: Path, url: str, **blocks: str) -> Path:
    """A zocalo YAML file at ``path`` whose environment ``xrc-test`` reaches
    the broker at ``url`` (as guest), with further plugin ``blocks`` (name:
    YAML flow mapping) after it."""
    port = url.rsplit(":", 1)[1].split("/")[0]
    lines = ["version: 1",
             f"test-rabbit: {{plugin: pika, host: 127.0.0.1, port: {port}, username: guest, password: guest, vhost: /}}",
             *(f"{name}: {block}" for name, block in blocks.items()),
             "environments:", f"  xrc-test: [{', '.join(['test-rabbit', *blocks])}]"]
    path.write_text("\n".join(lines) + "\n")
    return path


def available() -> bool:
    return (BIN / "rabbitmq-server").exists()


class RabbitMQ:
    def __init__(self, tmpfs: bool = False) -> None:
        self.tmpfs = tmpfs
        self.base = Path(tempfile.mkdtemp(prefix="zocalo-xrc-rabbitmq-", dir=TMPFS if tmpfs else None))
        self._warden: Warden | None = None
        self.port = free_port()
        self.node = f"zxrc{os.getpid()}@localhost"
        (self.base / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = 127.0.0.1:{self.port}\nloopback_users = none\n"
        )
        # the consistent-hash exchange, for the service's shards (it ships with rabbitmq-server)
        (self.base / "enabled_plugins").write_text("[rabbitmq_consistent_hash_exchange].\n")
        epmd = free_port()
        self.env = {
            **os.environ,
            "HOME": str(self.base),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq"),
            "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "ERL_EPMD_PORT": str(epmd),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "RABBITMQ_CTL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> None:
        self.log = open(self.base / "server.out", "wb")
        self.process = subprocess.Popen(
            [str(BIN / "rabbitmq-server")], env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._warden = Warden(self.process.pid, self.base, [self._epmd(), "-port", self.env["ERL_EPMD_PORT"], "-kill"])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"rabbitmq-server exited: {(self.base / 'server.out').read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    pass
                self.ctl("await_startup", timeout=60)
                return
            except (OSError, subprocess.CalledProcessError):
                time.sleep(0.5)
        raise RuntimeError("rabbitmq-server did not start in time")

    def _epmd(self) -> str:
        return str(shutil.which("epmd") or "epmd")

    def ctl(self, *args: str, timeout: float = 30) -> str:
        return subprocess.run(
            [str(BIN / "rabbitmqctl"), "-n", self.node, *args], env=self.env, capture_output=True, text=True,
            timeout=timeout, check=True,
        ).stdout

    def add_user(self, user: str, password: str) -> None:
        """A user with every permission on the default vhost (once per session)."""
        if user not in self.ctl("list_users", "--quiet"):
            self.ctl("add_user", user, password)
            self.ctl("set_permissions", "-p", "/", user, ".*", ".*", ".*")

    def vhost(self, name: str, user: str = "guest", password: str = "guest") -> str:
        """A vhost of its own (``user`` may use it): the URL to reach it."""
        self.ctl("add_vhost", name)
        self.ctl("set_permissions", "-p", name, user, ".*", ".*", ".*")
        return f"amqp://{user}:{password}@127.0.0.1:{self.port}/{name}"

    def close_all_connections(self) -> None:
        self.ctl("close_all_connections", "test: the broker drops every connection")

    def stop(self) -> None:
        if self.process is None:
            return
        try:
            self.ctl("stop", timeout=60)
        except Exception:
            pass
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, 9)
            self.process.wait()
        subprocess.run(["pkill", "-f", "--", f"-sname {self.node}"], check=False)
        # epmd was started for this node on its own port; make sure it is gone.
        subprocess.run([self._epmd(), "-port", self.env["ERL_EPMD_PORT"], "-kill"],
                       env=self.env, capture_output=True, check=False)
        self.log.close()
        shutil.rmtree(self.base, ignore_errors=True)
        if self._warden is not None:
            self._warden.release()
            self._warden = None
