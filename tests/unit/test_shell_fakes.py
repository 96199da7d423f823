"""``--shell`` and ``--no-jupyter`` against the fakes (tests/fakes): the command line run on a real
pseudo-terminal (as its controlling terminal, TOSTOP set), its shell step a fake shell
(fake_shell.py, ``c.NodeShell.command``) run by fake ``srun --jobid --overlap --pty``.

What is shown: the shell step starts only after the session is ready, with the job's id,
--overlap and --pty; it holds the terminal (its Ctrl-C is its own, the supervisor runs on);
exiting it ends the session with nothing left; a session that ends first hangs it up at once;
--no-jupyter starts no Jupyter and still forwards a --tunnel pair; bad combinations and a
missing terminal are refused with nothing submitted; the REST API refuses both.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from spunnel_jupyter.errors import UsageError
from spunnel_jupyter.fields import build_request, refuse_terminal_only
from spunnel_jupyter.manager import SpunnelManager
from tests.fakes.cluster import FAKES, EchoServer, FakeCluster, echo_through, free_port, until
from tests.fakes.terminal import FAKE_SHELL, Terminal

URL = re.compile(r"http://127\.0\.0\.1:(\d+)/lab\?token=")


@pytest.fixture
def fake(monkeypatch):
    cluster = FakeCluster(monkeypatch)
    yield cluster
    cluster.close()


def shell_steps(fake: FakeCluster) -> list[dict[str, Any]]:
    return [c for c in fake.calls("srun") if any(a.startswith("--jobid=") for a in c["argv"])]


def manager(fake: FakeCluster) -> SpunnelManager:
    return SpunnelManager(config=fake.config())


# -- --shell -----------------------------------------------------------------------------------
def test_the_shell_starts_after_ready_holds_the_terminal_and_its_exit_ends_the_session(
    fake, terminals
):
    t = Terminal(fake, "--shell", "--mem", "100", "-t", "10")
    terminals.append(t)
    url = t.wait_for(URL.pattern)
    banner = t.wait_for(r"fake-shell: job=(\d+) step=1 foreground=(\w+) pid=(\d+) args=(.*)\r")
    job = int(banner[1])
    # Printed in this order: the URL and the laptop line, then the shell.
    assert url.start() < t.output.index("From a laptop") < banner.start()
    assert "A shell on the node follows; exiting it ends the session." in t.output
    assert len(fake.calls("srun")) == 2  # the session's, then the shell's
    (step,) = shell_steps(fake)
    assert step["argv"][:5] == [f"--jobid={job}", "--overlap", "--pty", "--nodes=1", "--ntasks=1"]
    assert "--job-name=spunnel-shell" in step["argv"]
    assert step["argv"][-3:] == [sys.executable, str(FAKE_SHELL), "-l"]
    record = json.loads((fake.state_dir / "session.json").read_text())
    assert record["phase"] == "ready" and record["job_id"] == job
    assert step["t"] > record["times"]["ready"]  # started once the session was ready
    # The shell's process group is the terminal's foreground group: the keys are its, and so
    # is Ctrl-C (the supervisor, its terminal's session leader, runs on).
    assert banner[2] == "True"
    assert os.tcgetpgrp(t.master) == step["pid"] != t.proc.pid
    t.type("hello\n")
    t.wait_for(r"fake-shell: got hello")
    t.type("\x03")
    t.wait_for(r"fake-shell: SIGINT")
    t.type("\x1a")
    t.wait_for(r"fake-shell: SIGTSTP")
    t.type("still here\n")
    t.wait_for(r"fake-shell: got still here")
    assert t.proc.poll() is None
    assert not [e for e in fake.events("signal", prog="srun") if e.get("job") == job]
    progress_before = t.output.count("Ctrl-C to stop")
    time.sleep(1.5)  # the supervisor draws no progress line over the shell meanwhile
    t.output += t._read(0.1)
    assert t.output.count("Ctrl-C to stop") == progress_before
    # exit: the session ends by the usual rules, and the end lines come once the terminal is
    # the supervisor's again (with TOSTOP, a write from the background would have stopped it).
    t.type("exit 3\n")
    assert t.finish() == 0, t.output
    assert f"session ended: the shell on {record['node']} exited (exit code 3); job {job} gone" in (
        t.output
    )
    m = manager(fake)
    fake.assert_clean(m)
    assert fake.job(job)["state"] == "COMPLETED"
    assert m.last_ended()["ended_reason"].startswith("the shell on")


@pytest.mark.parametrize("how", ["stop", "scancel"])
def test_a_session_that_ends_first_hangs_the_shell_up_at_once(fake, terminals, how):
    fake.switch("kill_wait", "10")  # Slurm's own end of the step would take 10 s (SIGTERM ignored)
    t = Terminal(fake, "--shell", "-t", "10")
    terminals.append(t)
    job = int(t.wait_for(r"fake-shell: job=(\d+) step=1 foreground=True")[1])
    m = manager(fake)
    ended = time.monotonic()
    if how == "stop":
        asyncio.run(m.stop_running())
    else:
        fake.scancel(job)
    assert t.finish() == 0, t.output
    assert time.monotonic() - ended < 3.0
    fake.assert_clean(m)
    signals = [e for e in fake.events("step-signal") if e["job"] == job]
    assert signals and signals[0]["sig"] == "SIGHUP"
    (exit_,) = [e for e in fake.events("step-exit") if e["job"] == job]
    assert exit_["code"] == -signal.SIGKILL  # srun's own kill, at once: not after kill_wait


def test_closing_the_terminal_ends_the_shell_and_the_session(fake, terminals):
    t = Terminal(fake, "--shell", "-t", "10")
    terminals.append(t)
    job = int(t.wait_for(r"fake-shell: job=(\d+) step=1 foreground=True")[1])
    assert t.master is not None
    os.close(t.master)  # SIGHUP to the supervisor, its session leader
    t.master = None
    t.proc.wait(timeout=10)
    assert t.proc.returncode == 129
    fake.assert_clean(manager(fake))
    assert fake.job(job)["state"] not in ("RUNNING", "PENDING")


# -- --no-jupyter ------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_no_jupyter_starts_none_and_still_forwards_a_tunnel_pair(fake, mode):
    m = manager(fake)

    async def scenario() -> bytes:
        async with EchoServer() as node:
            sp = free_port()
            options = {"shell": True, "no_jupyter": True, "tunnel_mode": mode,
                       "tunnels": f"{sp}:{node.port}", "mem": "100"}  # fmt: skip
            s = await m.start(m.request(options))
            await until(lambda: s.phase.value in ("ready", "ended"), 15, "ready")
            assert s.phase.value == "ready", s.outcome
            assert s.url == "" and s.port == 0 and m.status()["url"] == ""
            got = await echo_through(sp)
            s.request_stop("done")
            await s.wait()
            return got

    got = asyncio.run(asyncio.wait_for(scenario(), 40))
    assert got == b"echo:hello\n"
    assert fake.calls("jupyter") == []  # no Jupyter, not even started
    started = [line for line in Path(m.last_ended()["log"]).read_text().splitlines()
               if '"event": "started"' in line]  # fmt: skip
    assert started, "the launcher ran"
    if mode == "forward":
        (master,) = fake.ssh_calls("master")
        forwards = [a for a in master["argv"] if "tunnel.sock" in a]
        assert forwards == []  # no forward to a Jupyter socket
    fake.assert_clean(m)


def test_no_jupyter_on_the_command_line_prints_the_tunnel_lines_not_a_url(fake, terminals):
    async def scenario() -> Terminal:
        async with EchoServer() as node:
            sp = free_port()
            t = Terminal(fake, "--shell", "--no-jupyter", "--tunnel", f"{sp}:{node.port}")
            terminals.append(t)
            await asyncio.to_thread(t.wait_for, r"fake-shell: job=\d+ step=1 foreground=True")
            assert f"127.0.0.1:{sp} -> port {node.port} on " in t.output
            assert f"ssh -N -L {sp}:127.0.0.1:{sp} " in t.output
            assert "http://" not in t.output and "no Jupyter" in t.output
            assert await echo_through(sp) == b"echo:hello\n"
            t.type("exit\n")
            assert await asyncio.to_thread(t.finish) == 0, t.output
            return t

    asyncio.run(asyncio.wait_for(scenario(), 40))
    assert fake.calls("jupyter") == []
    fake.assert_clean(manager(fake))


# -- refused, with nothing submitted -----------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "tty", "message"),
    [
        (["--shell"], False, "--shell needs a terminal on stdin"),
        (["--shell", "--detach"], True, "--shell cannot be detached"),
        (["--no-jupyter"], True, "--no-jupyter needs --shell"),
        (["--shell", "--no-jupyter", "--port", "18001"], True, "--port: for Jupyter"),
        (["--shell", "--no-jupyter", "--notebook"], True, "--lab/--notebook: for Jupyter"),
        (["--shell", "--no-jupyter", "--idle-timeout", "5"], True, "--idle-timeout: for Jupyter"),
    ],
)
def test_bad_combinations_are_refused_before_anything_is_submitted(
    fake, terminals, args, tty, message
):
    t = Terminal(fake, *args, tty=tty)
    terminals.append(t)
    assert t.finish() == 2, t.output
    errors = [line for line in t.output.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("spunnel-notebook: error: "), errors
    assert message in errors[0] and "(" in errors[0]  # with what to do
    assert fake.calls("srun") == [] and fake.jobs() == []


@pytest.mark.parametrize(
    "body", [{"shell": True}, {"shell": True, "no_jupyter": True}, {"no_jupyter": True}]
)
def test_the_rest_api_refuses_the_shell_whatever_comes_with_it(body):
    with pytest.raises(UsageError, match="only in a terminal, not from the REST API") as e:
        refuse_terminal_only(body, "the REST API")
    assert "spunnel-notebook --" in e.value.remedy
    refuse_terminal_only({"shell": False, "mem": "1G"}, "the REST API")  # false is no request


def test_the_fields_take_flags_and_refuse_other_types():
    req = build_request({"shell": True, "no_jupyter": True, "tunnels": "8001:8000"}, {}, [])
    assert req.shell and req.no_jupyter and not req.jupyter
    assert build_request({}, {}, []).jupyter
    for bad in ({"shell": 1}, {"shell": "yes"}, {"no_jupyter": 0}):
        with pytest.raises(UsageError, match="must be a bool"):
            build_request(bad, {}, [])


def test_a_shell_step_on_a_job_that_is_not_running_is_refused_by_fake_srun(fake):
    result = subprocess.run(
        [str(FAKES / "bin" / "srun"), "--jobid=4242", "--overlap", "--pty", "true"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 1 and "Invalid job id" in result.stderr
