"""A private MariaDB server for the tests: Debian's mariadb-server, its data
in a directory of its own (initialised with mariadb-install-db, no system
tables touched), listening on a free port of 127.0.0.1 and on a socket in
that directory, with one database and one user with a password; stopped and
removed when the test session ends, and by its warden (``warden.py``) if the
session ends without stopping it (killed). Works as root (CI) and as anyone else."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from warden import Warden

#: Where Debian puts the server (not always on a user's PATH).
_SEARCH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"])
#: Small and fast: this server holds a few test rows, and losing them in a crash is fine.
_SERVER_OPTIONS = (
    "--skip-log-bin",
    "--skip-name-resolve",
    "--innodb-buffer-pool-size=32M",
    "--innodb-log-file-size=8M",
    "--innodb-flush-log-at-trx-commit=0",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _binary(*names: str) -> str | None:
    for name in names:
        found = shutil.which(name, path=_SEARCH)
        if found:
            return found
    return None


def binaries() -> tuple[str | None, str | None]:
    """The installer and the server, or None where missing."""
    return _binary("mariadb-install-db", "mysql_install_db"), _binary("mariadbd", "mysqld")


def available() -> bool:
    return None not in binaries()


class MariaDB:
    """One server: :meth:`start`, use :attr:`url` (SQLAlchemy, pymysql), :meth:`stop`."""

    def __init__(self, database: str = "ispyb", user: str = "zocalo") -> None:
        install_db, server = binaries()
        if install_db is None or server is None:
            raise RuntimeError(
                "MariaDB is not installed (no mariadb-install-db / mariadbd on PATH or in /usr/sbin): "
                "apt-get install -y mariadb-server"
            )
        self.install_db, self.server = install_db, server
        self.database, self.user = database, user
        self.password = "pw-" + secrets.token_hex(12)  # this session's only; URL-safe
        self.port = free_port()
        self.base = Path(tempfile.mkdtemp(prefix="zocalo-xrc-mariadb-"))
        self.data = self.base / "data"
        self.socket = self.base / "mariadb.sock"
        self.process: subprocess.Popen[bytes] | None = None
        self._warden: Warden | None = None
        self._as_root = ["--user=root"] if os.geteuid() == 0 else []  # mariadbd refuses root without it

    @property
    def url(self) -> str:
        """The SQLAlchemy URL of the test database, as the test user."""
        return f"mysql+pymysql://{self.user}:{self.password}@127.0.0.1:{self.port}/{self.database}"

    def start(self, timeout: float = 60.0) -> None:
        installed = subprocess.run(
            [self.install_db, "--no-defaults", f"--datadir={self.data}", "--skip-test-db", *self._as_root,
             *_SERVER_OPTIONS],
            capture_output=True, text=True, timeout=120,
        )
        if installed.returncode != 0:
            raise RuntimeError(f"mariadb-install-db failed ({installed.returncode}): "
                               f"{(installed.stdout + installed.stderr)[-2000:]}")
        init = self.base / "init.sql"  # run by the server at startup: the test database and its user
        init.write_text(
            f"CREATE DATABASE IF NOT EXISTS `{self.database}`;\n"
            f"CREATE USER IF NOT EXISTS '{self.user}'@'%' IDENTIFIED BY '{self.password}';\n"
            f"GRANT ALL PRIVILEGES ON `{self.database}`.* TO '{self.user}'@'%';\n"
        )
        init.chmod(0o600)
        self.log = self.base / "error.log"
        self.start_server(timeout)

    def start_server(self, timeout: float = 60.0) -> None:
        """Run the server on the data :meth:`start` installed (again, after :meth:`stop_server`)."""
        init = self.base / "init.sql"
        self.process = subprocess.Popen(
            [self.server, "--no-defaults", f"--datadir={self.data}", f"--socket={self.socket}",
             f"--port={self.port}", "--bind-address=127.0.0.1", "--skip-networking=0",
             f"--pid-file={self.base / 'mariadb.pid'}", f"--log-error={self.log}", f"--tmpdir={self.base}",
             f"--init-file={init}", *self._as_root, *_SERVER_OPTIONS],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        self._warden = Warden(self.process.pid, self.base)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mariadbd exited ({self.process.returncode}): {self._log_tail()}")
            if self._can_log_in():
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"mariadbd did not accept the test user within {timeout} s: {self._log_tail()}")

    def _can_log_in(self) -> bool:
        import pymysql

        try:
            pymysql.connect(host="127.0.0.1", port=self.port, user=self.user, password=self.password,
                            database=self.database, connect_timeout=2).close()
            return True
        except pymysql.err.MySQLError:
            return False

    def _log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no error log)"

    def stop_server(self) -> None:
        """Stop the server (SIGTERM: a clean shutdown), keeping its data for :meth:`start_server`."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait()
        self.process = None
        if self._warden is not None:
            self._warden.release()
            self._warden = None

    def stop(self) -> None:
        self.stop_server()
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="session")
def mariadb_url() -> Iterator[str]:
    """The SQLAlchemy URL of a database on a private MariaDB server, for the
    whole session (``$ZOCALO_XRC_TEST_MARIADB_URL`` names an existing one instead)."""
    url = os.environ.get("ZOCALO_XRC_TEST_MARIADB_URL")
    if url:
        yield url
        return
    if not available():
        message = "MariaDB is not installed (mariadb-install-db, mariadbd): apt-get install -y mariadb-server"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    server = MariaDB()
    try:
        server.start()
        yield server.url
    finally:
        server.stop()
