"""Progress of long work on a terminal (one line, rewritten) or in a log
(a line every few seconds): the demo's waits, spot finding over a file."""

from __future__ import annotations

import sys
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    """What the demo is doing, on a terminal (one line, rewritten) or a log
    file (a line every few seconds)."""

    def __init__(self, stream: TextIO = sys.stderr, every_s: float = 5.0) -> None:
        self.stream, self.every_s = stream, every_s
        self.tty = stream.isatty()
        self._last = 0.0  # in a log, nothing for work shorter than every_s
        self._open = False

    def show(self, line: str, elapsed: float) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + line)
            self._open = True
        elif elapsed - self._last >= self.every_s:
            self.stream.write(line + "\n")
            self._last = elapsed
        self.stream.flush()

    def bar(self, what: str, done: int, total: int, elapsed: float, width: int = 30, finished: bool = False) -> None:
        """``finished``: the last call for this work (in a log, always a line)."""
        filled = width * done // max(total, 1)
        line = f"{what} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} ({elapsed:.1f} s)"
        if finished and not self.tty and self._last > 0:  # a log that showed the work going on shows its end
            self._last = -self.every_s
        self.show(line, elapsed)

    def waiting(self, what: str, elapsed: float, timeout: float) -> None:
        self.show(f"waiting for {what}: {elapsed:.0f} s of {timeout:g} s", elapsed)

    def done(self) -> None:
        if self._open:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._open = False
