"""A detached session across login hosts, for real: started on the first login host, whose
supervisor is then killed and whose sshd is stopped, it is attached from the second (login2,
tests/cluster/login2.sh), where the kernel's variables are still there; `status` on either host
says where its tunnels are; `stop` from the second ends it everywhere."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from . import jupyter_client_util
from .cluster import PROG, URL_RE, as_user, squeue, state_dir
from .hosts import (
    force_clean_everywhere,
    login2_env,
    on_login2,
    start_notebook,
    wait_clean_everywhere,
)
from .jupyter_client_util import execute_in, start_kernel
from .test_faults import _daemons_back, _kill_daemon

SSHD_LOGIN = "/run/spunnel-test/sshd-login.pid"
TEARDOWN = 15.0

# Runs a kernel request inside login2's network namespace (its 127.0.0.1 is its own): the
# token comes on stdin, never on a command line.
_ON_LOGIN2 = (
    Path(jupyter_client_util.__file__).read_text()
    + "\nimport sys\nport, kernel, code = int(sys.argv[1]), sys.argv[2], sys.argv[3]\n"
    "print(execute_in(port, sys.stdin.read().strip(), kernel, code), end='')\n"
)


def execute_on_login2(user: str, port: int, token: str, kernel: str, code: str) -> str:
    out = on_login2(user, ["python3", "-c", _ON_LOGIN2, str(port), kernel, code], input=token)
    assert out.returncode == 0, out
    return out.stdout


@pytest.fixture(autouse=True)
def everywhere(cluster):
    login2_env()
    force_clean_everywhere("alice")
    yield
    force_clean_everywhere("alice")


def detach_on_the_first_host() -> tuple[int, int, str, str]:
    """(job, port, token, kernel) of a detached session with ``x = 42`` in a kernel."""
    out = as_user("alice", [PROG, "--detach", "-t", "10", "--mem", "300"], timeout=120)
    assert out.returncode == 0, out
    _url, port, _ui, token = URL_RE.search(out.stdout).groups()  # type: ignore[union-attr]
    kernel = start_kernel(int(port), token)
    assert execute_in(int(port), token, kernel, "x = 6 * 7; print(x)").strip() == "42"
    record = json.loads((state_dir("alice") / "session.json").read_text())
    return record["job_id"], int(port), token, kernel


def test_attached_from_the_second_login_host_after_the_first_one_lost_everything():
    job, _port, token, kernel = detach_on_the_first_host()
    record = json.loads((state_dir("alice") / "session.json").read_text())
    os.kill(record["supervisor_pid"], signal.SIGKILL)
    sshd = _kill_daemon(SSHD_LOGIN)  # the first host's sshd goes too
    try:
        began = time.monotonic()
        attached = start_notebook("login2", "alice", "attach")
        try:
            attached.wait_ready(timeout=60)
            print(f"attach on login2 to the URL: {time.monotonic() - began:.2f} s")
            assert attached.token == token
            assert "Ctrl-C detaches" in attached.output
            got = execute_on_login2("alice", attached.port, token, kernel, "print(x)")
            assert got.strip() == "42"
            here = on_login2("alice", [PROG, "status"])
            assert here.returncode == 0 and "session attached on login2" in here.stdout, here
            there = as_user("alice", [PROG, "status"])  # the first host: no session of its own
            assert f"job {job} RUNNING on c1 (detached, started on" in there.stderr, there
            assert "tunnels on: login2" in there.stderr, there
            stopped = on_login2("alice", [PROG, "stop"])
            assert stopped.returncode == 0, stopped
            assert attached.finish(timeout=30) == 0, attached.output
            assert "stopped with `spunnel-notebook stop`" in attached.output
            assert f"job {job} gone from the queue" in attached.output
        finally:
            attached.close()
    finally:
        _daemons_back(sshd)
    assert squeue("alice") == []
    # The first host's supervisor died with SIGKILL: its record is named and cleaned there next.
    cleaned = as_user("alice", [PROG, "stop"])
    assert "removed the record and sockets of a session whose supervisor" in cleaned.stderr, cleaned
    _took, left = wait_clean_everywhere("alice", TEARDOWN)
    assert not left, left


def test_stop_from_the_second_host_ends_the_first_hosts_supervisor_too():
    job, _port, _token, _kernel = detach_on_the_first_host()
    attached = start_notebook("login2", "alice", "attach")
    try:
        attached.wait_ready(timeout=60)
        there = on_login2("alice", [PROG, "status"])
        assert "session attached on login2" in there.stdout, there
        both = as_user("alice", [PROG, "status", "--json"])
        assert json.loads(both.stdout)["kind"] == "detached"
        first = as_user("alice", [PROG, "status"])
        assert "session detached on" in first.stdout, first
        stopped = on_login2("alice", [PROG, "stop", str(job)])
        assert stopped.returncode == 0, stopped
        assert attached.finish(timeout=30) == 0, attached.output
    finally:
        attached.close()
    _took, left = wait_clean_everywhere("alice", TEARDOWN)  # the first host's supervisor too
    assert not left, left
    assert as_user("alice", [PROG, "status"]).returncode == 8
