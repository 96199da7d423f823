"""``--shell`` and ``--no-jupyter`` on the real cluster, as alice, on a real pseudo-terminal: the
terminal becomes bash on c1 inside the session's job (real ``srun --jobid --overlap --pty``),
beside Jupyter or, with --no-jupyter, beside nothing but the ``--tunnel`` pairs (what the spunnel
plugin's ``srun --pty -p interact --mem 4000 --tunnel 8001:8000,8889:8888 bash`` did)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

from .cluster import (
    Session,
    as_user,
    jobs_submitted,
    procs_of,
    squeue,
    start,
    state_dir,
    wait_clean,
)
from .jupyter_client_util import execute, rest

TEARDOWN_LIMIT = 2.0  # seconds, as in test_cli.py
SHELL_FOLLOWS = "A shell on the node follows"
PROG_EXITED = "spunnel-notebook exited"
JUPYTER = re.compile(r"jupyter_server|jupyter-lab|jupyter-server|jupyterlab")

# Run as alice on the login host: GET a path through a login port, print the body.
GET = """
import sys, urllib.request
with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/{sys.argv[2]}", timeout=5) as r:
    print(r.read().decode().strip())
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _type(s: Session, keys: str) -> None:
    assert s.master_fd is not None
    os.write(s.master_fd, keys.encode())


def _shell_answers(s: Session, timeout: float = 60) -> None:
    """Wait until bash on the node reads what is typed (keys typed before srun put the
    terminal in raw mode may be flushed: ask again until it answers)."""
    deadline = time.monotonic() + timeout
    while True:
        _type(s, "echo shell-$((40+2))\r")
        try:
            s.wait_for(r"shell-42", 2)
            return
        except AssertionError:
            if time.monotonic() > deadline or s.proc.poll() is not None:
                raise


def _run_in_shell(s: Session, command: str, answer: str, timeout: float = 30) -> str:
    """Type ``command`` (Enter included) and wait for ``answer`` (a regex) after it."""
    mark = len(s.output)
    _type(s, command + "\r")
    deadline = time.monotonic() + timeout
    while not (m := re.search(answer, s.output[mark:])):
        assert time.monotonic() < deadline, f"{answer!r} not seen after {command!r}:\n{s.output}"
        assert s.proc.poll() is None, f"{PROG_EXITED} ({s.proc.returncode}):\n{s.output}"
        s.output += s._read(0.2)
    return m.group(0)


def _get(user: str, port: int, path: str) -> str:
    result = as_user(user, ["python3", "-c", GET, str(port), path], timeout=30)
    return result.stdout.strip() if result.returncode == 0 else ""


def _serve_from_the_shell(s: Session, node_port: int, text: str) -> None:
    """A server started in the shell on c1, in the background, serving who.txt = ``text``."""
    _run_in_shell(
        s,
        f"mkdir -p /tmp/served-{node_port} && echo {text} > /tmp/served-{node_port}/who.txt && "
        f"(python3 -m http.server {node_port} --bind 127.0.0.1 --directory /tmp/served-{node_port}"
        f" </dev/null >/dev/null 2>&1 &) && echo started-$((1+{node_port}))",
        rf"started-{node_port + 1}",
    )


def _through(port: int, text: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while _get("alice", port, "who.txt") != text:
        assert time.monotonic() < deadline, f"{text!r} never came through port {port}"
        time.sleep(0.2)


def _no_server_left(node_port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while [p for p, cmd in procs_of("alice") if f"http.server {node_port}" in cmd]:
        assert time.monotonic() < deadline, "the shell's server outlived the session"
        time.sleep(0.1)


def test_the_shell_runs_in_the_job_on_c1_beside_jupyter_and_exit_ends_everything():
    tunnel = _free_port()
    s = start("alice", "--shell", "-t", "10", "--tunnel", f"{tunnel}:8000", tty=True)
    try:
        s.wait_ready()  # the URL first, with the laptop line ...
        s.wait_for(SHELL_FOLLOWS, 10)  # ... then the shell
        assert s.output.index("From a laptop") < s.output.index(SHELL_FOLLOWS)
        job = s.job_id
        _shell_answers(s)
        # bash on the node, in the session's own job, a step of its own beside the launcher's.
        assert _run_in_shell(s, "hostname", r"\nc1\r?\n")
        _run_in_shell(s, 'echo "job=$SLURM_JOB_ID"', rf"job={job}\b")
        steps = subprocess.run(["squeue", "-h", "-s", "-j", str(job), "-o", "%i %j"],
                               capture_output=True, text=True, check=True).stdout  # fmt: skip
        assert f"{job}.0 " in steps and "spunnel-shell" in steps, steps
        # Jupyter is still there, through its URL; the shell has the kernels' private /tmp.
        assert rest(s.port, s.token, "GET", "/api/status")[0] == 200
        execute(s.port, s.token, "open('/tmp/from-the-kernel', 'w').write('k-wrote-it')")
        _run_in_shell(s, "cat /tmp/from-the-kernel; echo", r"\nk-wrote-it\r?\n")
        assert not Path("/tmp/from-the-kernel").exists()  # not the node's own /tmp
        # Ctrl-C is the shell's: it interrupts what runs there, and the session runs on.
        _type(s, "sleep 300\r")
        time.sleep(1)
        _type(s, "\x03")
        _run_in_shell(s, "echo alive-$((1+1))", r"alive-2")
        assert s.proc.poll() is None and s.record["phase"] == "ready"
        # A server started in the shell answers through the --tunnel pair, on the login host.
        _serve_from_the_shell(s, 8000, "from-the-shell")
        _through(tunnel, "from-the-shell")
        # exit: the session ends, and nothing is left within the usual bound.
        _type(s, "exit\r")
        elapsed, left = wait_clean("alice", timeout=10)
        assert not left, left
        assert elapsed <= TEARDOWN_LIMIT, f"teardown after exit took {elapsed:.2f} s"
        assert s.finish() == 0, s.output
        assert "session ended: the shell on c1 exited" in s.output
        assert f"job {job} gone from the queue" in s.output
        _no_server_left(8000)
    finally:
        s.close()


def test_no_jupyter_starts_none_and_the_shell_still_forwards():
    tunnel = _free_port()
    s = start("alice", "--shell", "--no-jupyter", "-t", "10", "--tunnel", f"{tunnel}:8000",
              tty=True)  # fmt: skip
    try:
        s.wait_for(r"the tunnels to c1 are up", 90)
        s.wait_for(SHELL_FOLLOWS, 10)
        assert "http://127.0.0.1" not in s.output  # no URL
        assert f"127.0.0.1:{tunnel} -> port 8000 on c1" in s.output
        assert f"ssh -N -L {tunnel}:127.0.0.1:{tunnel} " in s.output
        _shell_answers(s)
        # The launcher holds the step; no Jupyter runs, on the node or here.
        cmds = [cmd for _, cmd in procs_of("alice")]
        assert any("spunnel_jupyter.launcher" in cmd for cmd in cmds), cmds
        assert not [cmd for cmd in cmds if JUPYTER.search(cmd)], cmds
        record = s.record
        assert (
            record["url"] == "" and record["port"] == 0 and record["tunnels"] == [f"{tunnel}:8000"]
        )
        _serve_from_the_shell(s, 8000, "no-jupyter-here")
        _through(tunnel, "no-jupyter-here")
        # Another user gets nothing from the pair, as with Jupyter (test_ports.py).
        assert _get("bob", tunnel, "who.txt") == ""
        _type(s, "exit\r")
        elapsed, left = wait_clean("alice", timeout=10)
        assert not left, left
        assert elapsed <= TEARDOWN_LIMIT, f"teardown after exit took {elapsed:.2f} s"
        assert s.finish() == 0, s.output
        _no_server_left(8000)
    finally:
        s.close()


def kill_wait() -> float:
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True,
                            check=True).stdout  # fmt: skip
    m = re.search(r"^KillWait\s*=\s*(\d+) sec", config, re.M)
    assert m, config
    return float(m.group(1))


ENDINGS = {
    # how the session ends while the shell runs: (trigger, exit code)
    "terminal-closed": (lambda s: s.close_terminal(), 129),
    "stop-command": (lambda s: as_user("alice", ["spunnel-notebook", "stop"], timeout=30), 0),
    "scancel": (lambda s: subprocess.run(["scancel", str(s.job_id)], check=True), 0),
}


@pytest.mark.parametrize("how", list(ENDINGS))
def test_a_session_ending_while_the_shell_runs_takes_the_shell_with_it(how):
    """An interactive bash ignores SIGTERM: the shell is hung up at once, not left to Slurm's
    KillWait. Except when Slurm itself ends the job (scancel): it signals every step first, the
    shell's srun is gone before it can be hung up, and bash on the node lives until KillWait's
    SIGKILL (as under the spunnel plugin's `srun --pty bash`); the terminal is back at once."""
    trigger, code = ENDINGS[how]
    bound = TEARDOWN_LIMIT + (kill_wait() if how == "scancel" else 0.0)
    s = start("alice", "--shell", "-t", "10", tty=True)
    try:
        s.wait_ready()
        s.wait_for(SHELL_FOLLOWS, 10)
        _shell_answers(s)
        trigger(s)
        elapsed, left = wait_clean("alice", timeout=10)
        assert not left, f"after {how}: {left}"
        assert elapsed <= bound, f"{how}: teardown took {elapsed:.2f} s"
        assert s.finish() == code, s.output
        assert not [p for p, cmd in procs_of("alice") if "bash" in cmd and "-l" in cmd]
        if how == "terminal-closed":
            log = (state_dir("alice") / "session.log").read_text()
            assert "the terminal was closed" in log
    finally:
        s.close()


def test_the_shell_needs_a_terminal_and_no_detach_and_submits_nothing_otherwise():
    before = jobs_submitted()
    no_tty = as_user("alice", ["spunnel-notebook", "--shell", "-t", "10"], timeout=60)
    assert no_tty.returncode == 2
    assert "--shell needs a terminal on stdin" in no_tty.stderr
    s = start("alice", "--shell", "--detach", "-t", "10", tty=True)
    try:
        assert s.finish() == 2
        assert "--shell cannot be detached" in s.output
    finally:
        s.close()
    alone = as_user("alice", ["spunnel-notebook", "--no-jupyter", "-t", "10"], timeout=60)
    assert alone.returncode == 2 and "--no-jupyter needs --shell" in alone.stderr
    assert jobs_submitted() == before
    assert squeue("alice") == []
