"""A TCP proxy on 127.0.0.1 in front of the test broker, for outages on demand:

* ``forward()``: connections reach the broker;
* ``black_hole()``: every connection is dropped, and new ones are accepted
  and then never answered (a broker that takes TCP and says nothing);
* ``refuse()``: every connection is dropped and the port is closed
  (connection refused), until ``forward()`` opens it again.

Threads only; every socket is closed by ``close()``.
"""

from __future__ import annotations

import socket
import threading


class Proxy:
    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.mode = "forward"
        self.accepted = 0
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._closed = False
        self._listener: socket.socket | None = None
        self.port = 0
        self._listen()

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    def _listen(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                self.accepted += 1
                self._sockets.add(client)
                mode = self.mode
            if mode == "forward":
                try:
                    upstream = socket.create_connection(self.target, timeout=5)
                except OSError:
                    self._drop(client)
                    continue
                upstream.settimeout(None)
                with self._lock:
                    self._sockets.add(upstream)
                for a, b in ((client, upstream), (upstream, client)):
                    threading.Thread(target=self._pump, args=(a, b), daemon=True).start()
            elif mode == "refuse":  # accepted just as the port was closing
                self._drop(client)
            # black hole: keep the socket, say nothing

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        self._drop(src)
        self._drop(dst)

    def _drop(self, s: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(s)
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()

    def _drop_all(self) -> None:
        with self._lock:
            sockets = list(self._sockets)
        for s in sockets:
            self._drop(s)

    def forward(self) -> None:
        with self._lock:
            self.mode = "forward"
        if self._listener is None:
            self._listen()

    def black_hole(self) -> None:
        with self._lock:
            self.mode = "black hole"
        self._drop_all()
        if self._listener is None:
            self._listen()

    def refuse(self) -> None:
        with self._lock:
            self.mode = "refuse"
            listener, self._listener = self._listener, None
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread; close alone may not
            except OSError:
                pass
            listener.close()
        self._drop_all()

    def close(self) -> None:
        self.refuse()
