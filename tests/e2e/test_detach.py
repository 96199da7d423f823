"""Sessions that outlive the terminal, on the real cluster: ``--detach`` returns the prompt with
the URL and the job runs on as a batch job; ``attach`` builds a tunnel to it on this host (the
same token, the same kernels); ``status`` and ``stop`` find it through Slurm; Ctrl-C of an
attach only detaches. (From a second login host: test_login2_attach.py.)"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import signal
import subprocess
import termios
import time

from .cluster import (
    PROG,
    URL_RE,
    as_user,
    jobs_submitted,
    squeue,
    start,
    state_dir,
    uid,
    user_env,
    wait_clean,
)
from .jupyter_client_util import execute_in, rest, start_kernel

TEARDOWN = 15.0


def detach_from_a_shell(user: str, *args: str) -> tuple[str, float, int]:
    """``spunnel-notebook --detach ARGS`` typed into an interactive shell on a terminal; the
    shell then exits and its whole process group gets SIGHUP, as when a laptop's ssh drops.
    Returns what the terminal showed, the seconds until the prompt came back, the exit code."""
    master, slave = pty.openpty()
    os.fchown(slave, uid(user), -1)

    def controlling_terminal() -> None:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    command = f"{PROG} --detach {' '.join(args)}; echo PROMPT-BACK:$?"
    began = time.monotonic()
    shell = subprocess.Popen(
        ["bash", "-c", command], stdin=slave, stdout=slave, stderr=slave,
        preexec_fn=controlling_terminal, user=user, group=user, extra_groups=[],
        env=user_env(user), cwd=f"/home/{user}",
    )  # fmt: skip
    os.close(slave)
    shown, took = "", 0.0
    while "PROMPT-BACK:" not in shown:
        assert time.monotonic() - began < 120, shown
        try:
            shown += os.read(master, 65536).decode(errors="replace")
        except OSError:
            break
        took = time.monotonic() - began
    shell.wait(timeout=10)
    os.close(master)  # the terminal goes: the kernel hangs up the session
    with_code = re.search(r"PROMPT-BACK:(\d+)", shown)
    assert with_code, shown
    return shown, took, int(with_code[1])


def record(user: str) -> dict:
    return json.loads((state_dir(user) / "session.json").read_text())


def answers(port: int, token: str) -> bool:
    try:
        return rest(port, token, "GET", "/api/status")[0] == 200
    except OSError:
        return False


def test_detach_outlives_the_terminal_and_attach_reaches_the_same_kernel():
    shown, took, code = detach_from_a_shell("alice", "-t", "10", "--mem", "300")
    assert code == 0, shown
    assert "Detached: it runs on without this terminal" in shown
    url, port, _ui, token = URL_RE.search(shown).groups()  # type: ignore[union-attr]
    port = int(port)
    print(f"--detach to the prompt: {took:.2f} s")
    time.sleep(1)  # the hangup has reached everything it would
    assert answers(port, token)
    kernel = start_kernel(port, token)
    assert execute_in(port, token, kernel, "x = 6 * 7; print(x)").strip() == "42"
    first = record("alice")
    assert first["kind"] == "detached" and first["phase"] == "ready"
    job = first["job_id"]
    (line,) = squeue("alice")
    assert line == f"{job} RUNNING"

    # attach on the same host while its supervisor holds the tunnel: the same URL; Ctrl-C
    # leaves it all running
    same = start("alice", "attach")
    try:
        same.wait_ready(timeout=30)
        assert same.url == url
        same.signal(signal.SIGINT)
        assert same.finish() == 0
        assert f"detached; job {job} runs on" in same.output
    finally:
        same.close()
    assert answers(port, token)

    # the supervisor dies (SIGKILL): the job and the kernel live on; attach builds a new tunnel
    os.kill(first["supervisor_pid"], signal.SIGKILL)
    time.sleep(1)
    assert squeue("alice") == [f"{job} RUNNING"]
    began = time.monotonic()
    attached = start("alice", "attach")
    try:
        attached.wait_ready(timeout=60)
        print(f"attach (supervisor gone) to the URL: {time.monotonic() - began:.2f} s")
        assert attached.token == token
        assert execute_in(attached.port, token, kernel, "print(x)").strip() == "42"
        now = record("alice")
        assert now["kind"] == "attached" and now["job_id"] == job
        status = as_user("alice", [PROG, "status"])
        assert status.returncode == 0 and "session attached" in status.stdout
        attached.signal(signal.SIGINT)
        assert attached.finish() == 0, attached.output
        assert f"job {job} runs on, on c1" in attached.output
    finally:
        attached.close()
    assert squeue("alice") == [f"{job} RUNNING"]

    # no session on this host now: status lists the detached one; stop ends it
    status = as_user("alice", [PROG, "status"])
    assert status.returncode == 0, status
    assert f"job {job} RUNNING on c1 (detached, started on" in status.stderr
    stopped = as_user("alice", [PROG, "stop"])
    assert stopped.returncode == 0 and f"stopped job {job} (detached" in stopped.stderr, stopped
    took, left = wait_clean("alice", TEARDOWN)
    assert not left, left
    assert as_user("alice", [PROG, "status"]).returncode == 8


def test_ctrl_c_before_the_url_undoes_a_detached_start(node_full):
    before = jobs_submitted()
    s = start("alice", "--detach", "-t", "10", "--mem", "300")
    try:
        s.wait_for(r"PENDING", timeout=30)
        s.signal(signal.SIGINT)  # the terminal's side passes it on: the start is undone
        assert s.finish(timeout=30) == 130, s.output
        assert "interrupted with Ctrl-C" in s.output
    finally:
        s.close()
    assert jobs_submitted() == before + 1
    _took, left = wait_clean("alice", TEARDOWN)
    assert not left, left


def test_several_detached_sessions_are_listed_and_taken_by_job_id():
    jobs = []
    for _ in range(2):  # the second start finds the first supervisor dead: its job runs on
        out = as_user("alice", [PROG, "--detach", "-t", "10", "--mem", "300"], timeout=120)
        assert out.returncode == 0, out
        jobs.append(record("alice")["job_id"])
        os.kill(record("alice")["supervisor_pid"], signal.SIGKILL)
        time.sleep(0.5)
    assert sorted(squeue("alice")) == sorted(f"{j} RUNNING" for j in jobs)
    ambiguous = as_user("alice", [PROG, "attach"])
    assert ambiguous.returncode == 2, ambiguous
    assert "you have 2 detached sessions" in ambiguous.stderr
    assert f"{PROG} attach JOBID" in ambiguous.stderr
    bad_port = as_user("alice", [PROG, "attach", str(jobs[0]), "--port", "0"])
    assert bad_port.returncode == 2 and "out of range" in bad_port.stderr, bad_port
    unknown = as_user("alice", [PROG, "attach", "999999"])
    assert unknown.returncode == 8 and "not a detached session of yours" in unknown.stderr
    for job in jobs:
        stopped = as_user("alice", [PROG, "stop", str(job)])
        assert stopped.returncode == 0 and f"job {job}" in stopped.stderr, stopped
    _took, left = wait_clean("alice", TEARDOWN)
    assert not left, left
    nothing = as_user("alice", [PROG, "attach"])
    assert nothing.returncode == 8 and "you have no detached session" in nothing.stderr
