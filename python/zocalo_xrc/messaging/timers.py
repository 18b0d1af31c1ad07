"""One thread for every timer a transport is asked for.

``threading.Timer`` is a thread per call: a service with thousands of open
scans, each with an idle timer, had thousands of threads. :class:`Timers`
keeps every pending call in one heap, served by one daemon thread that
starts with the first call and sleeps until the earliest is due.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from typing import Callable

log = logging.getLogger(__name__)


class Timers:
    """``call_later(delay, fn)`` runs ``fn`` on this object's one thread
    after ``delay`` seconds (``fn`` should be quick: hand real work to
    another thread); :meth:`close` drops whatever has not run."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._wake = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None
        self._closed = False

    def __len__(self) -> int:
        """How many calls are pending."""
        with self._wake:
            return len(self._heap)

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        with self._wake:
            if self._closed:
                return
            heapq.heappush(self._heap, (time.monotonic() + max(0.0, delay), next(self._seq), fn))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            elif self._heap[0][2] is fn:  # the new one is the earliest: sleep less
                self._wake.notify()

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._heap.clear()
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closed and (not self._heap or self._heap[0][0] > time.monotonic()):
                    self._wake.wait(self._heap[0][0] - time.monotonic() if self._heap else None)
                if self._closed:
                    return
                fn = heapq.heappop(self._heap)[2]
            try:
                fn()
            except Exception:  # one failing call must not stop the others
                log.exception("a timer of %s failed", self.name)
