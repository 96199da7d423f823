"""The login-side relay: real TCP and Unix sockets, no ssh. Bytes arrive whole, in order, both ways;
ends are passed on; every accepted connection has TCP_NODELAY; close frees everything."""

from __future__ import annotations

import hashlib
import os
import socket
import threading

import pytest

from spunnel_jupyter.probes import free_port, port_in_use
from spunnel_jupyter.relay import Relay


class UnixServer:
    """A Unix-socket stand-in for ssh's -L socket; ``handler(conn)`` serves each connection."""

    def __init__(self, path: str, handler) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(16)
        self.handler = handler
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            self.handler(conn)

    def close(self) -> None:
        self.sock.close()


def echo_until_eof(conn: socket.socket) -> None:
    while data := conn.recv(1 << 16):
        conn.sendall(data)


def digest_then_blob(conn: socket.socket) -> None:
    """Read to EOF, answer with the sha256 of what came, then 8 MB of a known pattern."""
    h = hashlib.sha256()
    while data := conn.recv(1 << 16):
        h.update(data)
    conn.sendall(h.digest())
    conn.sendall(bytes(range(256)) * (8 << 12))


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while data := sock.recv(1 << 16):
        chunks.append(data)
    return b"".join(chunks)


@pytest.fixture
def target(tmp_path):
    return str(tmp_path / "tunnel.sock")


@pytest.fixture
def relay_to(target):
    """``relay_to(handler)``: a relay on a free port in front of a server running ``handler``."""
    opened = []

    def make(handler) -> Relay:
        opened.append(UnixServer(target, handler))
        opened.append(Relay(free_port(), target))
        return opened[-1]

    yield make
    for thing in reversed(opened):
        thing.close()


def connect(relay: Relay) -> socket.socket:
    return socket.create_connection(("127.0.0.1", relay.port), timeout=10)


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    got = b""
    while len(got) < size:
        got += sock.recv(1 << 16)
    return got


def test_round_trips_and_nodelay(relay_to):
    relay = relay_to(echo_until_eof)
    with connect(relay) as c:
        for size in (1, 100, 70_000):
            msg = os.urandom(size)
            c.sendall(msg)
            assert recv_exactly(c, size) == msg
        (pair,) = relay._pairs  # the relay's side of this connection
        accepted = pair.socks[0]
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_large_both_ways_with_half_close(relay_to):
    relay = relay_to(digest_then_blob)
    sent = os.urandom(20 << 20)
    with connect(relay) as c:
        c.sendall(sent)
        c.shutdown(socket.SHUT_WR)  # our EOF must reach the server for it to answer
        answer = recv_all(c)
    assert answer[:32] == hashlib.sha256(sent).digest()
    assert answer[32:] == bytes(range(256)) * (8 << 12)


def test_many_connections_at_once(relay_to):
    relay = relay_to(echo_until_eof)
    results: list[bool] = []

    def client(i: int) -> None:
        msg = os.urandom(300_000 + i)
        with connect(relay) as c:
            sender = threading.Thread(target=c.sendall, args=(msg,))
            sender.start()
            results.append(recv_exactly(c, len(msg)) == msg)
            sender.join()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [True] * 12


def test_no_upstream_closes_the_client(target):
    relay = Relay(free_port(), target)  # nothing listens at target (ssh down or reconnecting)
    try:
        with connect(relay) as c:
            assert c.recv(10) == b""
        server = UnixServer(target, echo_until_eof)  # ssh back: the same port works again
        with connect(relay) as c:
            c.sendall(b"ping")
            assert c.recv(10) == b"ping"
        server.close()
    finally:
        relay.close()


def test_close_ends_connections_and_frees_the_port(relay_to):
    relay = relay_to(echo_until_eof)
    with connect(relay) as c:
        c.sendall(b"x")
        assert c.recv(1) == b"x"
        relay.close()
        assert c.recv(1) == b""  # closed under the client
    assert not port_in_use(relay.port)
    assert not relay._thread.is_alive()


def test_taken_port_is_an_error(target):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        with pytest.raises(OSError):
            Relay(taken.getsockname()[1], target)
