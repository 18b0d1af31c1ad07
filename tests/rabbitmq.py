"""A private RabbitMQ node for the tests: Debian's rabbitmq-server, started on
free ports of 127.0.0.1 only (AMQP, distribution and epmd), in a directory of
its own, and stopped when the test session ends.

With ``tmpfs=True`` (the benches ask for it) that directory, the node's data
included, is on tmpfs (``/dev/shm``): the broker's disk writes are not what a
bench measures. Such a node has a warden, a process that outlives whatever
kills the session (SIGKILL too) and then ends the node and frees its
memory."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path("/usr/lib/rabbitmq/bin")
TMPFS = Path("/dev/shm")

#: The warden of a node on tmpfs: waits for its stdin (a pipe the session
#: holds) to end, however the session ended, then kills the node's process
#: group and its epmd and removes its directory.
_WARDEN = """
import os, shutil, subprocess, sys
sys.stdin.buffer.read()
group, epmd, env_port, base = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
try:
    os.killpg(group, 9)
except ProcessLookupError:
    pass
subprocess.run([epmd, "-port", env_port, "-kill"], capture_output=True, check=False)
shutil.rmtree(base, ignore_errors=True)
"""


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
        self._warden: tuple[subprocess.Popen[bytes], int] | None = None
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
        if self.tmpfs:
            self._start_warden()
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

    def _start_warden(self) -> None:
        assert self.process is not None
        read, write = os.pipe()  # neither end is inherited by anything else the session starts
        warden = subprocess.Popen(
            [sys.executable, "-c", _WARDEN, str(self.process.pid), self._epmd(), self.env["ERL_EPMD_PORT"],
             str(self.base)], stdin=read, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        os.close(read)
        self._warden = (warden, write)

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
        if self._warden is not None:  # nothing left for it to do (and the node's group id may be reused)
            warden, write = self._warden
            warden.kill()
            warden.wait()
            os.close(write)
            self._warden = None
