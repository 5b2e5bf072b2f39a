"""A small TCP proxy for fault tests: the service talks to Postgres through it, and the test cuts or
stalls the path. No external tool (toxiproxy, tc) is needed.

    proxy = TcpProxy("127.0.0.1", 5432).start()    # listens on 127.0.0.1:<proxy.port>
    proxy.cut()        # closes every connection and closes each new one at once: Postgres unreachable
    proxy.stall()      # sockets stay open, no byte moves either way (a hung network path)
    proxy.restore()    # forwards again (a stalled connection resumes where it stopped)
    proxy.close()

Threads, not asyncio: one accept thread, and per connection one pump thread per direction. A pump
holds what it read while the proxy is stalled and forwards it (end of stream included) on restore, so
a stall delays bytes and never drops or reorders them; a cut drops them with the connection.
"""

from __future__ import annotations

import socket
import struct
import threading

RECEIVE_BYTES_MAX = 65536
CONNECT_TIMEOUT_SECONDS = 5.0
GATE_POLL_SECONDS = 0.05


class _Connection:
    """One client connection and its upstream connection."""

    def __init__(self, client: socket.socket, upstream: socket.socket):
        self.client = client
        self.upstream = upstream
        self.closed = threading.Event()

    def close(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for sock in (self.client, self.upstream):
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the pump blocked in recv on it
            except OSError:
                pass
            sock.close()


class TcpProxy:
    """Forwards 127.0.0.1:<port> to upstream_host:upstream_port, with cut / stall / restore."""

    def __init__(self, upstream_host: str, upstream_port: int, listen_host: str = "127.0.0.1"):
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.create_server((listen_host, 0))
        self.host, self.port = self._listener.getsockname()[:2]
        self._lock = threading.Lock()
        self._connections: set[_Connection] = set()
        self._flowing = threading.Event()  # set: bytes move; clear: stalled or cut
        self._flowing.set()
        self._cut = False
        self._closed = False
        self.connections_accepted = 0
        self.connections_refused = 0
        self._accepter = threading.Thread(target=self._accept, name=f"tcp-proxy-{self.port}", daemon=True)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> "TcpProxy":
        self._accepter.start()
        return self

    # --- controls ---

    def cut(self) -> None:
        """Closes every current connection; new ones are accepted and closed at once, until restore()."""
        with self._lock:
            self._cut = True
            self._flowing.clear()
            connections = list(self._connections)
            self._connections.clear()
        for connection in connections:
            connection.close()

    def stall(self) -> None:
        """Stops forwarding bytes in both directions; connections (and new ones) stay open."""
        with self._lock:
            self._flowing.clear()

    def restore(self) -> None:
        """Forwards again: stalled bytes move on, new connections reach Postgres."""
        with self._lock:
            self._cut = False
            self._flowing.set()

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._connections)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            connections = list(self._connections)
            self._connections.clear()
        self._flowing.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        for connection in connections:
            connection.close()
        self._accepter.join(timeout=5)

    def __enter__(self) -> "TcpProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # --- threads ---

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # listener closed
            with self._lock:
                if self._closed:
                    client.close()
                    return
                refused = self._cut
            if refused:
                self.connections_refused += 1
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=CONNECT_TIMEOUT_SECONDS)
                upstream.settimeout(None)
            except OSError:
                self.connections_refused += 1
                _reset(client)
                continue
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection = _Connection(client, upstream)
            with self._lock:
                if self._cut or self._closed:  # cut while connecting
                    connection.close()
                    continue
                self._connections.add(connection)
                self.connections_accepted += 1
            for source, target, direction in ((client, upstream, "up"), (upstream, client, "down")):
                threading.Thread(
                    target=self._pump,
                    args=(connection, source, target),
                    name=f"tcp-proxy-{self.port}-{direction}",
                    daemon=True,
                ).start()

    def _pump(self, connection: _Connection, source: socket.socket, target: socket.socket) -> None:
        try:
            while not connection.closed.is_set():
                try:
                    data = source.recv(RECEIVE_BYTES_MAX)
                except OSError:
                    data = b""  # reset or closed under us: the end of this stream
                # hold the bytes (or the end of stream) while stalled; a cut closes the connection
                while not self._flowing.wait(GATE_POLL_SECONDS):
                    if connection.closed.is_set():
                        return
                if connection.closed.is_set():
                    return
                if not data:
                    return
                try:
                    target.sendall(data)
                except OSError:
                    return
        finally:
            with self._lock:
                self._connections.discard(connection)
            connection.close()


def _reset(sock: socket.socket) -> None:
    """Closes with RST, as a host that refuses the connection would."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()
