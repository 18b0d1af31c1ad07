"""A warden for a server the tests start (a RabbitMQ node, a MariaDB server):
a process that outlives whatever ends the session, SIGKILL included, and then
ends the server's process group, runs a last command (``epmd -kill``, say) and
removes the server's directory.

It waits for its stdin, a pipe only the session holds, to end: the session
ending closes it, however it ends. A server stopped the ordinary way
releases its warden (:meth:`Warden.release`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

_WARDEN = """
import os, shutil, subprocess, sys, time
sys.stdin.buffer.read()
group, base, last = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
try:
    os.killpg(group, 9)
except ProcessLookupError:
    pass
for _ in range(120 if last else 0):  # epmd refuses -kill ("not allowed") while it counts the killed node alive
    if b"not allowed" not in subprocess.run(last, capture_output=True, check=False).stdout:
        break
    time.sleep(0.25)
shutil.rmtree(base, ignore_errors=True)
"""


class Warden:
    """Ends the process group ``group`` (a server started with
    ``start_new_session=True``), runs ``last`` and removes ``base`` once the
    session that made it is gone."""

    def __init__(self, group: int, base: Path, last: list[str] | None = None) -> None:
        read, write = os.pipe()  # neither end is inherited by anything else the session starts
        self.process = subprocess.Popen([sys.executable, "-c", _WARDEN, str(group), str(base), *(last or [])],
                                        stdin=read, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)
        os.close(read)
        self._write: int | None = write

    def release(self) -> None:
        """The server is stopped: nothing is left for the warden to do (and
        the group's id may be reused)."""
        if self._write is None:
            return
        self.process.kill()
        self.process.wait()
        os.close(self._write)
        self._write = None
