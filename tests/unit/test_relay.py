"""The login-side relay: real TCP and Unix sockets, no ssh. Bytes arrive whole, in order, both ways;
ends are passed on; every accepted connection has TCP_NODELAY; close frees everything. Only the
owner's connections are relayed (other users' are reset unread); out of descriptors it pauses
without spinning; the connection cap and a full ssh backlog hold back nobody else; a dying relay
says so."""

from __future__ import annotations

import hashlib
import os
import resource
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from spunnel_jupyter.probes import free_port, port_in_use
from spunnel_jupyter.relay import Relay, raise_nofile_limit

NOBODY = 65534


class UnixServer:
    """A Unix-socket stand-in for ssh's -L socket; ``handler(conn)`` serves each connection."""

    def __init__(self, path: str, handler) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(16)
        self.handler = handler
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
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

    def make(handler, **options) -> Relay:
        opened.append(UnixServer(target, handler))
        opened.append(Relay(free_port(), target, **options))
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
    assert relay.refused == 0 and relay.owner_uid == os.getuid()


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


def wait_for(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def read_or_reset(sock: socket.socket) -> bytes:
    """What the client reads before the end: a reset counts as an end."""
    try:
        return recv_all(sock)
    except ConnectionResetError:
        return b""


def try_to_use(port: int) -> bytes:
    """Connect, send, read to the end: what came back. A reset (it may come as soon as connect
    returns) counts as an end."""
    got = b""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            c.sendall(b"ping")
            got = recv_all(c)
    except ConnectionResetError:
        pass
    return got


def as_user(uid: int, port: int) -> str:
    """Connect to ``port`` from a child process running as ``uid``; what it read, as text."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        answer = b"child failed"
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            answer = b"read %d bytes" % len(try_to_use(port))
        except BaseException as e:
            answer = repr(e).encode()
        finally:
            os.write(w, answer)
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        answer = pipe.read().decode()
    os.waitpid(pid, 0)
    return answer


def test_another_users_connection_is_reset_unread(relay_to, target):
    refusals: list[int | None] = []
    relay = relay_to(echo_until_eof, on_refused=refusals.append)
    assert as_user(NOBODY, relay.port) == "read 0 bytes"
    wait_for(lambda: relay.refused == 1)
    assert refusals == [NOBODY]
    with connect(relay) as c:  # the owner's own still works
        c.sendall(b"ping")
        assert c.recv(4) == b"ping"
    assert relay.refused == 1


def test_a_relay_for_another_uid_refuses_ours(relay_to):
    refusals: list[int | None] = []
    relay = relay_to(echo_until_eof, owner_uid=NOBODY, allow_root=False, on_refused=refusals.append)
    assert try_to_use(relay.port) == b""
    wait_for(lambda: relay.refused == 1)
    assert refusals == [os.getuid()]


def test_root_may_use_any_users_relay_by_default(relay_to):
    """root can read the token file anyway; refusing it would protect nothing."""
    relay = relay_to(echo_until_eof, owner_uid=NOBODY)
    assert os.getuid() == 0, "the tests run as root"
    with connect(relay) as c:
        c.sendall(b"ping")
        assert c.recv(4) == b"ping"
    assert relay.refused == 0


def test_a_peer_the_kernel_cannot_find_is_refused(relay_to):
    """Fail closed: a connection reset while it waited in the backlog has no peer socket left."""
    refusals: list[int | None] = []
    relay = relay_to(echo_until_eof, max_connections=1, on_refused=refusals.append)
    with connect(relay) as first:  # at the cap: the next one waits in the kernel's backlog
        first.sendall(b"1")
        assert first.recv(1) == b"1"
        gone = connect(relay)
        gone.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        gone.close()
    wait_for(lambda: relay.refused == 1)
    assert refusals == [None]


def test_the_cap_holds_new_connections_until_one_ends(relay_to, target):
    relay = relay_to(echo_until_eof, max_connections=2)
    first, second = connect(relay), connect(relay)
    for c in (first, second):
        c.sendall(b"x")
        assert c.recv(1) == b"x"
    with connect(relay) as third:
        third.sendall(b"3")
        third.settimeout(0.3)
        with pytest.raises(socket.timeout):
            third.recv(1)
        first.close()
        third.settimeout(5)
        assert third.recv(1) == b"3"
    second.close()


def test_a_full_ssh_backlog_stalls_nobody(target):
    """ssh not accepting (its backlog full: a Unix connect says EAGAIN) holds up only the new
    connection, which gets through once there is room."""
    ssh = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ssh.bind(target)
    ssh.listen(0)  # room for one pending connection
    ssh.settimeout(5)
    relay = Relay(free_port(), target)
    try:
        with connect(relay) as a:
            up_a, _ = ssh.accept()
            filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            filler.settimeout(5)
            filler.connect(target)  # the backlog is full now
            b = connect(relay)
            b.sendall(b"b")
            wait_for(lambda: relay._waiting)  # b's upstream connect waits for a retry
            started = time.monotonic()
            for _ in range(50):
                a.sendall(b"x")
                assert up_a.recv(1) == b"x"
                up_a.sendall(b"y")
                assert a.recv(1) == b"y"
            assert time.monotonic() - started < 0.5
            ssh.accept()[0].close()  # the filler's: room for b's
            up_b, _ = ssh.accept()
            assert up_b.recv(1) == b"b"
            up_b.sendall(b"B")
            assert b.recv(1) == b"B"
            for sock in (up_a, up_b, filler, b):
                sock.close()
    finally:
        relay.close()
        ssh.close()


OUT_OF_DESCRIPTORS = """
import os, resource, sys, time
from spunnel_jupyter.relay import Relay

relay = Relay(int(sys.argv[1]), sys.argv[2])
clock = time.pthread_getcpuclockid(relay._thread.ident)

def cpu_over(seconds):
    start = time.clock_gettime(clock)
    time.sleep(seconds)
    return time.clock_gettime(clock) - start

resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
spare = []
try:
    while True:
        spare.append(os.open("/dev/null", os.O_RDONLY))
except OSError:
    pass
print("full", flush=True)
sys.stdin.readline()  # a client waits in the backlog: accept says EMFILE
print(cpu_over(1.0), flush=True)
os.close(spare.pop())  # room for the client, none for its upstream
deadline = time.monotonic() + 3
while not relay._waiting and time.monotonic() < deadline:
    time.sleep(0.01)
print(len(relay._waiting), cpu_over(0.3), flush=True)
for fd in spare:
    os.close(fd)
sys.stdin.readline()
relay.close()
"""


def test_out_of_descriptors_it_pauses_without_spinning_and_recovers(target):
    server = UnixServer(target, echo_until_eof)
    port = free_port()
    child = subprocess.Popen(
        [sys.executable, "-c", OUT_OF_DESCRIPTORS, str(port), target],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[2],
    )
    assert child.stdin and child.stdout
    try:
        assert child.stdout.readline() == "full\n"
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            c.sendall(b"ping")
            child.stdin.write("connected\n")
            child.stdin.flush()
            assert float(child.stdout.readline()) < 0.05  # relay thread CPU over 1 s
            waiting, cpu = child.stdout.readline().split()
            assert waiting == "1" and float(cpu) < 0.05  # the upstream connect is retried
            assert recv_exactly(c, 4) == b"ping"  # descriptors back: it serves again
        assert server.accepted == 1
    finally:
        child.stdin.close()
        assert child.wait(10) == 0
        server.close()


def test_a_dying_relay_says_so_and_ends_its_connections(relay_to):
    deaths: list[BaseException] = []
    relay = relay_to(echo_until_eof, on_death=deaths.append)
    with connect(relay) as c:
        c.sendall(b"x")
        assert c.recv(1) == b"x"

        def boom(*args: object) -> None:
            raise RuntimeError("injected")

        relay._service = boom  # type: ignore[method-assign]
        c.sendall(b"y")
        assert read_or_reset(c) == b""
    wait_for(lambda: deaths)
    assert isinstance(deaths[0], RuntimeError) and relay.error is deaths[0]
    assert not relay.alive
    assert port_in_use(relay.port)  # held until close(): no one else may take it meanwhile
    relay.close()
    assert not port_in_use(relay.port)


def test_raise_nofile_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 512), hard))
    try:
        assert raise_nofile_limit() == hard
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_close_from_a_callback(relay_to):
    """The session may close the relay from on_refused or on_death (on the relay thread)."""
    relay = relay_to(
        echo_until_eof, owner_uid=NOBODY, allow_root=False, on_refused=lambda uid: relay.close()
    )
    assert try_to_use(relay.port) == b""
    wait_for(lambda: not relay._thread.is_alive())
    assert not port_in_use(relay.port)
    dying = Relay(free_port(), relay.target, on_death=lambda exc: dying.close())
    dying._accept = lambda: 1 / 0  # type: ignore[method-assign]
    try_to_use(dying.port)
    wait_for(lambda: not dying._thread.is_alive())
    assert isinstance(dying.error, ZeroDivisionError)
    assert not port_in_use(dying.port)


def test_a_host_whose_kernel_cannot_name_owners_fails_at_once_with_one_error(monkeypatch, tmp_path):
    """sock_diag blocked (a seccomp or LSM policy): one clear error when the port is bound, before
    anything is submitted, instead of every connection refused one by one; the port is freed."""
    from spunnel_jupyter.errors import TunnelError
    from spunnel_jupyter.peers import OwnerCheckUnavailable, PeerOwner
    from spunnel_jupyter.ports import Ports
    from spunnel_jupyter.state import StateDir

    def blocked(self, peer, local):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(PeerOwner, "uid", blocked)
    port = free_port()
    with pytest.raises(OwnerCheckUnavailable, match="sock_diag: Permission denied"):
        Relay(port, str(tmp_path / "t.sock"))
    assert not port_in_use(port)
    ports = Ports(StateDir(str(tmp_path / "state")).ensure(), port, open(os.devnull, "wb"), print)
    with pytest.raises(TunnelError, match="does not tell who connects") as err:
        ports.bind([])
    assert "NETLINK_SOCK_DIAG" in err.value.remedy and "nothing was submitted" in err.value.remedy
    assert ports.relays == {} and not port_in_use(port)
