"""Every login-side port of a session answers only its owner, in forward and in reverse mode:
another user of the login host (bob) gets no byte from alice's Jupyter port nor from her
``--tunnel`` port, while alice (and root) get through."""

from __future__ import annotations

import signal
import socket
import subprocess
import time

import pytest

from .cluster import start, state_dir, uid, user_env, wait_clean
from .jupyter_client_util import rest

# Run as another user: connect, send a request, print how many bytes came back (0 if reset).
PROBE = """
import socket, sys
try:
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
    s.sendall(sys.stdin.buffer.read())  # the request (which may hold the token) comes on stdin
    got = b""
    while chunk := s.recv(65536):
        got += chunk
except ConnectionError:
    got = b""
print(len(got), got[:60])
"""


def _probe(user: str, port: int, request: str) -> tuple[int, str]:
    out = subprocess.run(
        ["python3", "-c", PROBE, str(port)], input=request, user=user, group=user,
        extra_groups=[], env=user_env(user), cwd="/", capture_output=True, text=True, timeout=30,
        check=True,
    ).stdout.strip().split(maxsplit=1)  # fmt: skip
    return int(out[0]), out[1] if len(out) > 1 else ""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_only_the_owner_reaches_her_ports(mode):
    extra = _free_port()
    s = start("alice", "-t", "10", "--tunnel-mode", mode, "--tunnel", f"{extra}:8000")
    server = None
    try:
        s.wait_ready()
        server = subprocess.Popen(
            ["srun", f"--jobid={s.job_id}", "--overlap", "-n1", "python3", "-m", "http.server",
             "8000", "--bind", "127.0.0.1", "--directory", "/"],
            user="alice", group="alice", extra_groups=[], cwd="/home/alice",
            env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/home/alice", "USER": "alice"},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        get = "GET / HTTP/1.0\r\n\r\n"
        status = f"GET /api/status?token={s.token} HTTP/1.0\r\n\r\n"
        for _ in range(100):  # the node's server takes a moment to listen
            if _probe("alice", extra, get)[0]:
                break
            time.sleep(0.2)
        # The owner gets through, to Jupyter and to her own server on the node.
        assert b"200 OK" in _probe("alice", s.port, status)[1].encode()
        assert _probe("alice", extra, get)[0] > 0
        assert rest(s.port, s.token, "GET", "/api/status")[0] == 200  # root, too
        # Another user of the login host gets not one byte, even with the token.
        assert _probe("bob", s.port, status) == (0, "b''")
        assert _probe("bob", extra, get) == (0, "b''")
        log = (state_dir("alice") / "session.log").read_text()
        for port in (s.port, extra):
            assert f"refused a connection to port {port} from uid {uid('bob')}" in log, log[-2000:]
        s.signal(signal.SIGINT)
        assert s.finish() == 130
    finally:
        if server is not None:
            server.kill()
            server.wait()
        s.close()
    _, left = wait_clean("alice", timeout=5)
    assert not left, left
