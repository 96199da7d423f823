"""Sessions end to end against fake Slurm, ssh and Jupyter executables (tests/fakes): every phase,
every ending, and what each ending leaves behind (nothing). No cluster, munge or sshd needed.

The real code runs unchanged (SpunnelManager, Session, SlurmCLI, SshTunnel, the launcher); only the
executables at the process boundary are fakes, chosen through the normal configuration. Only the
public API is used: SpunnelManager.request/start/status/stop_running/control/last_ended, and a
session's phase, job_id, node, url, notes, tunnel_state, request_stop and wait.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import time
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest

from spunnel_jupyter.errors import (
    ExitCode,
    JupyterError,
    SessionExists,
    SlurmLost,
    SlurmUnavailable,
    TunnelError,
    UsageError,
)
from spunnel_jupyter.manager import SpunnelManager
from tests.fakes.cluster import ACTIVE, FakeCluster, fetch, until

STATUS_BODY = b'{"started": "fake", "connections": 0, "kernels": 0}'


@pytest.fixture(params=["cli", "pyslurm"])
def fake(monkeypatch, request):
    cluster = FakeCluster(monkeypatch, backend=request.param)
    yield cluster
    cluster.close()


class Watch:
    """on_change: the phases seen, in order, each once."""

    def __init__(self) -> None:
        self.phases: list[str] = []
        self.calls = 0

    def __call__(self, session: Any) -> None:
        self.calls += 1
        phase = session.phase.value
        if not self.phases or self.phases[-1] != phase:
            self.phases.append(phase)


def run(coro: Any, timeout: float = 40) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def token_of(url: str) -> str:
    return parse_qs(urlparse(url).query)["token"][0]


async def start(m: SpunnelManager, watch: Watch | None = None, **options: Any) -> Any:
    options = {"mem": "100", "tunnel_mode": "forward", **options}
    watch = watch or Watch()
    session = await m.start(m.request(options, extra=[]), watch, owner="cli")
    watch(session)  # the phase it starts in (pending), even if nothing changed yet
    return session


async def ready(session: Any, timeout: float = 10) -> None:
    await until(lambda: session.phase.value in ("ready", "ended"), timeout, "the session ready")
    assert session.phase.value == "ready", session.outcome


async def answers(url: str) -> None:
    """The URL really reaches (fake) Jupyter, with the token only."""
    u = urlparse(url)
    assert await fetch(u.port, "/api/status", token_of(url)) == (200, STATUS_BODY)
    assert (await fetch(u.port, "/api/status"))[0] == 403
    assert (await fetch(u.port, "/api/status", "wrong-token"))[0] == 403
    assert (await fetch(u.port, f"{u.path}?{u.query}"))[0] == 200


def after(fake: FakeCluster, since: float) -> list[dict[str, Any]]:
    return [r for r in fake.log() if r["t"] >= since]


def first(records: list[dict[str, Any]], what: str, **match: Any) -> dict[str, Any]:
    for r in records:
        if all(r.get(k) == v for k, v in match.items()):
            return r
    raise AssertionError(f"no {what} ({match}) in {records}")


def job_final(fake: FakeCluster, job_id: int) -> dict[str, Any]:
    """The event of the job leaving the queue (its last state change)."""
    changes = [r for r in fake.events("state") if r["job"] == job_id]
    assert changes and changes[-1]["state"] not in ("PENDING", "RUNNING"), changes
    return changes[-1]


# -- the normal life, and its teardown ----------------------------------------------------------
def test_every_phase_in_order_the_url_answers_and_teardown_is_ordered(fake):
    fake.hold("Priority")
    m = SpunnelManager(config=fake.config())
    watch = Watch()

    async def scenario():
        s = await start(m, watch)
        await until(lambda: s.job_id, what="the job id from srun's queue line")
        assert s.phase.value == "pending"
        await until(lambda: (m.status() or {}).get("reason") == "Priority", what="the reason")
        assert m.status()["job_id"] == s.job_id and m.status()["owner"] == "cli"
        fake.release()
        await ready(s)
        assert s.node == socket.gethostname()
        assert s.tunnel_state == "up"
        assert urlparse(s.url)[:3] == ("http", f"127.0.0.1:{urlparse(s.url).port}", "/lab")
        await answers(s.url)
        assert m.status()["url"] == s.url and m.status()["phase"] == "ready"
        stopped_at = time.time()
        s.request_stop("stopped by the test")
        return s, await s.wait(), stopped_at

    s, outcome, stopped_at = run(scenario())
    assert watch.phases == ["pending", "starting", "ready", "ending", "ended"]
    assert (outcome.reason, outcome.exit_code, outcome.error) == (
        "stopped by the test",
        ExitCode.OK,
        None,
    )
    fake.assert_clean(m)
    job = fake.job(s.job_id)
    assert job["state"] == "COMPLETED"
    assert job["comment"].startswith(f"spunnel-jupyter:{socket.gethostname()}:")
    (srun,) = fake.calls("srun")
    assert {"--partition=interact", "--mem=100", "--nodes=1", "--ntasks=1"} <= set(srun["argv"])

    # Teardown: srun asked (SIGUSR1) to end the step first, the tunnel closed with -O exit only
    # after that (the node's JupyterLab saves open documents through it meanwhile); Slurm asked
    # once more only after the job left the queue; no scancel.
    log = after(fake, stopped_at)
    exit_request = first(log, "ssh -O exit", prog="ssh", argv=["-S", str(fake.state_dir / "ctl"),
                                                              "-O", "exit", s.node])  # fmt: skip
    master_exit = first(log, "the master's exit", event="master-exit")
    usr1 = first(log, "SIGUSR1 to srun", event="signal", prog="srun")
    gone = job_final(fake, s.job_id)
    assert usr1["sig"] == "SIGUSR1" and usr1.get("forwarded_to")
    assert usr1["t"] < exit_request["t"] < master_exit["t"]
    assert usr1["t"] < gone["t"]
    assert fake.cancels() == []
    assert fake.job_queries()[-1]["t"] > gone["t"]  # it waited until the job left the queue
    assert len(fake.ssh_calls("master")) == 1 and len(fake.ssh_calls("exit")) == 1
    assert [c["argv"][-1] for c in fake.ssh_calls("command")] == ["true"]  # TCP_NODELAY trick

    # The token reached the node but never a log: the launcher masked Jupyter's own URL line.
    last = m.last_ended()
    assert last["phase"] == "ended" and last["ended_reason"] == "stopped by the test"
    assert not last.get("token") and not last.get("url")  # last.json holds no secret
    session_log = open(last["log"]).read()
    assert token_of(s.url) not in session_log
    assert "lab?token=<token>" in session_log
    assert all(token_of(s.url) not in " ".join(c["argv"]) for c in fake.calls())


def test_job_id_is_known_from_the_node_when_srun_says_nothing(fake):
    fake.switch("srun_quiet")  # a real srun is silent when the job starts at once
    m = SpunnelManager(config=fake.config())

    async def scenario():
        s = await start(m)
        await ready(s)
        job_id = s.job_id
        s.request_stop("done")
        await s.wait()
        return job_id

    job_id = run(scenario())
    assert job_id == fake.jobs()[0]["job_id"]
    fake.assert_clean(m)


# -- stop requested in each phase ---------------------------------------------------------------
def test_stop_while_pending_revokes_the_job_without_scancel(fake):
    fake.hold()
    m = SpunnelManager(config=fake.config())
    watch = Watch()

    async def scenario():
        s = await start(m, watch)
        await until(lambda: s.job_id, what="the job id")
        s.request_stop("interrupted", ExitCode.SIGINT)
        return s, await s.wait()

    s, outcome = run(scenario())
    assert (outcome.reason, outcome.exit_code) == ("interrupted", ExitCode.SIGINT)
    assert watch.phases == ["pending", "ending", "ended"]
    assert fake.job(s.job_id)["state"] == "CANCELLED"
    assert fake.events("task") == [] and fake.calls("ssh") == [] and fake.cancels() == []
    fake.assert_clean(m)


def test_stop_while_starting_ends_jupyter_and_the_master_it_was_building(fake):
    # Jupyter never listens: the session stays in "starting" until it is stopped.
    m = SpunnelManager(config=fake.config(SpunnelManager={"jupyter_args": ["--Fake.mode=silent"]}))
    watch = Watch()

    async def scenario():
        s = await start(m, watch)
        await until(lambda: s.phase.value == "starting", what="starting")
        await until(lambda: fake.events("listening") or fake.calls("jupyter"), what="jupyter")
        await asyncio.sleep(0.3)  # the master connects while Jupyter starts
        s.request_stop("stopped while starting")
        return s, await s.wait()

    s, outcome = run(scenario())
    assert outcome.reason == "stopped while starting" and outcome.exit_code == ExitCode.OK
    assert watch.phases == ["pending", "starting", "ending", "ended"]
    assert s.url == ""
    assert len(fake.events("master-up")) == len(fake.events("master-exit"))
    fake.assert_clean(m)


def test_scancel_is_only_the_fallback_when_srun_does_not_end_the_step(fake):
    fake.switch("srun_ignore_signals", "SIGUSR1")  # srun does not pass the stop on
    m = SpunnelManager(config=fake.config(SpunnelManager={"jupyter_stop_grace": 0.2}))

    async def scenario():
        s = await start(m)
        await ready(s)
        stopped_at = time.time()
        s.request_stop("stop")
        return s, await s.wait(), stopped_at

    s, outcome, stopped_at = run(scenario())
    assert outcome.reason == "stop"
    log = after(fake, stopped_at)
    ignored = first(log, "the ignored SIGUSR1", event="signal", sig="SIGUSR1")
    (scancel,) = fake.cancels()
    assert scancel["argv"] == [str(s.job_id)]
    assert ignored["t"] < scancel["t"] < job_final(fake, s.job_id)["t"]
    assert scancel["t"] - ignored["t"] >= 1.0  # jupyter_stop_grace + 1 s first
    assert fake.job(s.job_id)["state"] == "CANCELLED"
    fake.assert_clean(m)


# -- refused before or at submission ------------------------------------------------------------
def test_bad_input_is_refused_before_anything_runs(fake):
    m = SpunnelManager(config=fake.config())
    with pytest.raises(UsageError, match="invalid memory 'lots'") as err:
        m.request({"mem": "lots"}, extra=[])
    assert err.value.exit_code == ExitCode.USAGE and err.value.remedy
    with pytest.raises(UsageError, match="unknown field"):
        m.request({"memory": "100"}, extra=[])
    with pytest.raises(UsageError, match="malformed --tunnel pair"):
        m.request({"tunnels": "8001-8000"}, extra=[])
    assert fake.calls() == []


def test_an_unknown_partition_is_refused_before_submitting(fake):
    m = SpunnelManager(config=fake.config())
    with pytest.raises(UsageError, match="unknown partition 'nope'") as err:
        run(start(m, partition="nope"))
    assert err.value.exit_code == ExitCode.USAGE
    assert "interact, debug" in err.value.remedy
    with pytest.raises(UsageError, match="exceeds partition 'debug'"):
        run(start(m, partition="debug", time="2:00:00"))
    assert fake.calls("srun") == [] and m.status() is None and fake.lock_free()


def test_a_site_default_the_cluster_refuses_is_blamed_on_the_site(fake):
    m = SpunnelManager(config=fake.config(SpunnelManager={"partition": "gone", "time": "9:00:00"}))
    with pytest.raises(UsageError, match="unknown partition 'gone', from the site's") as err:
        run(start(m))
    assert "c.SpunnelManager.partition" in err.value.message
    assert "administrators" in err.value.remedy and "interact, debug" in err.value.remedy
    with pytest.raises(UsageError) as err:
        run(start(m, partition="mine"))
    assert err.value.message == "unknown partition 'mine'"  # the user's own: no blame
    with pytest.raises(UsageError, match=r"exceeds partition 'debug'.*c\.SpunnelManager\.time"):
        run(start(m, partition="debug"))
    assert fake.calls("srun") == [] and m.status() is None and fake.lock_free()


def test_a_taken_port_is_refused_before_submitting(fake):
    m = SpunnelManager(config=fake.config())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(UsageError, match=f"local port {port}") as err:
            run(start(m, port=port))
    assert err.value.exit_code == ExitCode.USAGE
    assert fake.calls("srun") == [] and m.status() is None and fake.lock_free()


def test_slurm_refusing_the_job_is_a_usage_error_with_nothing_left(fake):
    fake.switch("srun_refuse", "Invalid partition name specified")
    m = SpunnelManager(config=fake.config())
    watch = Watch()

    async def scenario():
        s = await start(m, watch)
        return await s.wait()

    outcome = run(scenario())
    assert isinstance(outcome.error, UsageError)
    assert outcome.exit_code == ExitCode.USAGE
    assert outcome.reason == "Slurm refused the job: unknown partition"
    assert outcome.error.remedy
    assert watch.phases == ["pending", "ending", "ended"]
    assert fake.jobs() == [] and fake.calls("ssh") == []
    fake.assert_clean(m)


def test_an_unreachable_controller_is_reported_before_submitting(fake):
    fake.switch("controller_down")
    m = SpunnelManager(config=fake.config())
    with pytest.raises(SlurmUnavailable) as err:
        run(start(m))
    assert err.value.exit_code == ExitCode.SLURM
    assert fake.calls("srun") == [] and m.status() is None and fake.lock_free()


def test_missing_slurm_commands_are_reported(fake, tmp_path):
    m = SpunnelManager(config=fake.config(SlurmCLI={"commands_dir": str(tmp_path)}))
    with pytest.raises(SlurmUnavailable, match="'sinfo' is not on PATH"):
        run(start(m))
    assert fake.calls() == [] and fake.lock_free()


# -- the job ends on its own ----------------------------------------------------------------------
def test_job_cancelled_elsewhere_while_pending(fake):
    fake.hold()
    m = SpunnelManager(config=fake.config())
    watch = Watch()

    async def scenario():
        s = await start(m, watch)
        await until(lambda: s.job_id, what="the job id")
        assert fake.scancel(s.job_id).returncode == 0
        return s, await s.wait()

    s, outcome = run(scenario())
    assert outcome.reason == f"job {s.job_id} was cancelled (scancel or Slurm)"
    assert outcome.exit_code == ExitCode.OK
    assert watch.phases == ["pending", "ending", "ended"]
    assert len(fake.cancels()) == 1  # the test's own: nothing more to cancel
    fake.assert_clean(m)


async def cancelled_when_ready(fake: FakeCluster, m: SpunnelManager) -> tuple[Any, Any, float]:
    """A session scancelled once ready: it, its outcome, and the seconds from scancel to its end."""
    s = await start(m)
    await ready(s)
    cancelled_at = time.monotonic()
    assert fake.scancel(s.job_id).returncode == 0
    outcome = await s.wait()
    return s, outcome, time.monotonic() - cancelled_at


def test_job_cancelled_elsewhere_while_ready_ends_everything_within_two_seconds(fake):
    m = SpunnelManager(config=fake.config())
    s, outcome, took = run(cancelled_when_ready(fake, m))
    assert outcome.reason == f"job {s.job_id} was cancelled (scancel or Slurm)"
    assert outcome.exit_code == ExitCode.OK and outcome.error is None
    assert took < 2.0
    assert fake.job(s.job_id)["state"] == "CANCELLED"
    assert len(fake.cancels()) == 1
    fake.assert_clean(m)


def _node_exit(fake: FakeCluster) -> dict[str, Any]:
    """The launcher's last event (``exited``), as the session log has it."""
    log = (fake.state_dir / "session.log").read_text()
    return json.loads(re.findall(r'@spunnel (\{"event": "exited".*\})', log)[-1])


def test_scancel_ends_jupyter_at_once_without_waiting_for_its_own_shutdown(fake):
    """Slurm ending the step (SIGTERM to each of its processes) ends Jupyter's process group at
    once once the save is done: its own shutdown (here 5 s, with 10 s of grace) is not waited
    for, since slurmd only looks again 0.67 s and then 1.67 s after its SIGTERM."""
    slow = {"jupyter_args": ["--Fake.stop_delay=5"], "jupyter_stop_grace": 10.0}
    m = SpunnelManager(config=fake.config(SpunnelManager=slow))
    s, outcome, took = run(cancelled_when_ready(fake, m))
    assert outcome.reason == f"job {s.job_id} was cancelled (scancel or Slurm)"
    assert took < 1.0, took
    said = _node_exit(fake)
    assert said["signal"] == "SIGTERM" and said["jupyter"] == "killed"
    assert said["save"] == "no-browser"  # the save came first (none to wait for: no browser)
    assert fake.events("exit", prog="jupyter") == []  # killed, not shut down
    log = (fake.state_dir / "session.log").read_text()
    assert "task 0: Exited with exit code" not in log  # the launcher ended cleanly (0)
    fake.assert_clean(m)


def test_a_stop_still_gives_jupyter_its_own_shutdown(fake):
    """A stop from the login side (SIGUSR1 through srun) lets Jupyter shut down (its kernels end
    with a shutdown request), within jupyter_stop_grace."""
    args = {"jupyter_args": ["--Fake.stop_delay=0.5"]}
    m = SpunnelManager(config=fake.config(SpunnelManager=args))

    async def scenario():
        s = await start(m)
        await ready(s)
        s.request_stop("stopped by the test", ends_job=True)
        return await s.wait()

    run(scenario())
    assert _node_exit(fake)["jupyter"] == "stopped"
    assert [e["why"] for e in fake.events("exit", prog="jupyter")] == ["stopped"]
    fake.assert_clean(m)


def test_time_limit(fake):
    m = SpunnelManager(config=fake.config())

    async def scenario():
        s = await start(m, time="1:00:00")
        await ready(s)
        await until(lambda: (m.status() or {}).get("end_time"), what="the end time")
        left = m.status()["end_time"] - time.time()
        fake.expire(s.job_id)
        return s, await s.wait(), left

    s, outcome, left = run(scenario())
    assert 3590 < left <= 3601
    assert outcome.reason == f"job {s.job_id} reached its time limit"
    assert outcome.exit_code == ExitCode.OK
    assert fake.job(s.job_id)["state"] == "TIMEOUT"
    assert "DUE TO TIME LIMIT" in open(m.last_ended()["log"]).read()
    fake.assert_clean(m)


def test_an_idle_release_ahead_is_warned_on_the_login_side(fake):
    m = SpunnelManager(config=fake.config())

    async def scenario():
        s = await start(m, idle_timeout=1)  # the fake Jupyter: released in 20 s unless used
        await ready(s)
        await until(lambda: s.warnings, what="the node's warning")
        record = m.status()
        s.request_stop("done")
        await s.wait()
        return s, record

    s, record = run(scenario())
    (text,) = s.warnings
    assert re.fullmatch(r"Jupyter stops in (1\d|20) s: nothing ran and no one used it for 1 min "
                        r"\(--idle-timeout\)\. Use it to keep it\.", text), text  # fmt: skip
    assert record["warnings"] == [text]
    fake.assert_clean(m)


def test_time_limit_told_by_slurmstepd_when_the_controller_is_away(fake):
    m = SpunnelManager(config=fake.config(SpunnelManager={"stop_timeout": 1.0}))

    async def scenario():
        s = await start(m)
        await ready(s)
        fake.switch("controller_down")
        fake.expire(s.job_id)
        outcome = await s.wait()
        fake.unswitch("controller_down")
        return s, outcome

    s, outcome = run(scenario())
    fake.assert_clean(m)
    assert any("teardown:" in note for note in m.last_ended()["notes"])  # could not confirm it
    assert "\nslurmstepd: error: *** STEP" in open(m.last_ended()["log"]).read()  # its own line
    assert outcome.reason == f"job {s.job_id} reached its time limit"


def test_srun_killed_while_the_job_runs_cancels_the_job_at_once(fake):
    m = SpunnelManager(config=fake.config())

    async def scenario():
        s = await start(m)
        await ready(s)
        killed_at = time.monotonic()
        os.kill(m.status()["srun_pid"], signal.SIGKILL)  # e.g. the login node's OOM killer
        return s, await s.wait(), time.monotonic() - killed_at

    s, outcome, took = run(scenario())
    assert isinstance(outcome.error, SlurmLost) and outcome.exit_code == ExitCode.SLURM
    assert outcome.reason == (
        f"srun ended (killed by SIGKILL) while job {s.job_id} still ran; the job is cancelled"
    )
    assert took < 2.0  # not after stop_timeout: srun cannot end the step any more
    (scancel,) = fake.cancels()
    assert scancel["argv"] == [str(s.job_id)]
    assert fake.job(s.job_id)["state"] == "CANCELLED"
    fake.assert_clean(m)


# -- Jupyter ends or never starts ---------------------------------------------------------------
def test_jupyter_shut_down_from_its_menu(fake):
    m = SpunnelManager(config=fake.config())

    async def scenario():
        s = await start(m)
        await ready(s)
        port = urlparse(s.url).port
        assert (await fetch(port, "/api/shutdown", token_of(s.url), method="POST"))[0] == 200
        return s, await s.wait()

    s, outcome = run(scenario())
    assert outcome.reason == "Jupyter was shut down (from its own menu or API)"
    assert outcome.exit_code == ExitCode.OK and outcome.error is None
    assert fake.job(s.job_id)["state"] == "COMPLETED"
    fake.assert_clean(m)


@pytest.mark.parametrize(
    ("crash", "how"),
    [("code=1", "exited on {node} with code 1"), ("signal=9", "on {node} was killed by SIGKILL")],
)
def test_jupyter_crashing_after_ready_is_a_jupyter_error(fake, crash, how):
    m = SpunnelManager(config=fake.config())

    async def scenario():
        s = await start(m)
        await ready(s)
        port = urlparse(s.url).port
        await fetch(port, f"/fake/crash?{crash}", token_of(s.url), method="POST")
        return s, await s.wait()

    s, outcome = run(scenario())
    assert isinstance(outcome.error, JupyterError) and outcome.exit_code == ExitCode.JUPYTER
    assert outcome.reason == "Jupyter " + how.format(node=s.node)
    assert ("--mem" in outcome.error.remedy) == ("signal=9" in crash)  # SIGKILL: out of memory?
    assert fake.job(s.job_id)["state"] == "FAILED"  # the launcher exits 1, like Jupyter
    fake.assert_clean(m)


def test_jupyter_exiting_before_ready_is_a_jupyter_error(fake):
    args = ["--Fake.mode=exit", "--Fake.code=3", "--Fake.delay=0.2"]
    m = SpunnelManager(config=fake.config(SpunnelManager={"jupyter_args": args}))
    watch = Watch()

    async def scenario():
        s = await start(m, watch)
        return s, await s.wait()

    s, outcome = run(scenario())
    assert isinstance(outcome.error, JupyterError)
    assert outcome.exit_code == ExitCode.JUPYTER
    assert outcome.reason == f"Jupyter exited on {s.node} with code 3 before it was ready"
    assert watch.phases == ["pending", "starting", "ending", "ended"]
    assert len(fake.events("master-up")) == len(fake.events("master-exit"))
    fake.assert_clean(m)


@pytest.mark.parametrize("mode", ["silent", "hang"])
def test_jupyter_that_never_answers_ends_at_start_timeout(fake, mode):
    config = fake.config(
        SpunnelManager={"jupyter_args": [f"--Fake.mode={mode}"], "start_timeout": 0.5}
    )
    m = SpunnelManager(config=config)

    async def scenario():
        s = await start(m)
        return await s.wait()

    outcome = run(scenario())
    assert isinstance(outcome.error, JupyterError)
    assert outcome.exit_code == ExitCode.JUPYTER
    assert "Jupyter did not answer within 0.5 s" in outcome.reason
    fake.assert_clean(m)


# -- the tunnel ---------------------------------------------------------------------------------
def test_a_killed_master_is_rebuilt_on_the_same_url_then_lost_for_good(fake):
    m = SpunnelManager(config=fake.config(SshTunnel={"reconnect_timeout": 1.0}))
    watch = Watch()

    async def scenario():
        s = await start(m, watch)
        await ready(s)
        url, first_pid = s.url, m.status()["ssh_pid"]
        os.kill(first_pid, signal.SIGKILL)
        await until(lambda: any("re-established" in n for n in s.notes), what="reconnected")
        assert s.tunnel_state == "up" and s.phase.value == "ready"
        assert s.url == url and m.status()["url"] == url
        assert m.status()["ssh_pid"] != first_pid
        await answers(url)
        # Now the node refuses ssh: the next loss is for good after reconnect_timeout.
        fake.switch("ssh_refuse_forward", "Connection closed by 10.0.0.1 port 22")
        os.kill(m.status()["ssh_pid"], signal.SIGKILL)
        lost_at = time.monotonic()
        return s, await s.wait(), time.monotonic() - lost_at

    s, outcome, took = run(scenario())
    assert any("reconnecting" in n for n in s.notes)
    assert isinstance(outcome.error, TunnelError)
    assert outcome.exit_code == ExitCode.TUNNEL
    assert "was lost and not re-established within 1 s" in outcome.reason
    assert "Connection closed by 10.0.0.1" in outcome.reason
    assert took < 1.0 + 3.0  # reconnect_timeout, then teardown
    assert watch.phases == ["pending", "starting", "ready", "ending", "ended"]
    assert len(fake.ssh_calls("master")) >= 3
    fake.assert_clean(m)


def test_pam_slurm_adopt_refusing_the_first_masters_is_retried(fake):
    fake.switch("ssh_refuse_forward", "Access denied by pam_slurm_adopt: you have no active jobs")
    fake.switch("ssh_refuse_forward_count", "2")
    m = SpunnelManager(config=fake.config(SshTunnel={"adopt_retry_timeout": 5.0}))

    async def scenario():
        s = await start(m)
        await ready(s)
        await answers(s.url)
        s.request_stop("done")
        await s.wait()

    run(scenario())
    assert len(fake.events("refused", prog="ssh")) == 2
    assert len(fake.ssh_calls("master")) == 3
    assert open(m.last_ended()["log"]).read().count("pam_slurm_adopt refused ssh") == 2
    fake.assert_clean(m)


def test_auto_mode_falls_back_to_reverse_when_the_node_refuses_ssh(fake):
    fake.switch("ssh_refuse_forward", "alice@c1: Permission denied (publickey).")
    m = SpunnelManager(config=fake.config())

    async def scenario():
        s = await start(m, tunnel_mode="auto")
        await ready(s)
        await answers(s.url)
        mode = m.status()["tunnel_mode"]
        s.request_stop("done")
        await s.wait()
        return s, mode

    s, mode = run(scenario())
    assert mode == "reverse"
    assert any("Permission denied" in n and "falling back to reverse" in n for n in s.notes)
    forward, reverse = fake.ssh_calls("master")
    assert "-L" in forward["argv"] and forward["argv"][-1] == s.node
    port = urlparse(s.url).port
    # The port stayed the supervisor's own through the fallback: sshd serves its Unix socket.
    assert f"{m.state().file('tunnel.sock')}:" in " ".join(reverse["argv"])
    assert reverse["argv"][-1] == "login1" and port == s.port
    assert fake.events("refused", prog="ssh")[0]["direction"] == "forward"
    fake.assert_clean(m)


def test_forward_mode_does_not_fall_back(fake):
    fake.switch("ssh_refuse_forward", "alice@c1: Permission denied (publickey).")
    m = SpunnelManager(config=fake.config())

    async def scenario():
        s = await start(m, tunnel_mode="forward")
        return await s.wait()

    outcome = run(scenario())
    assert isinstance(outcome.error, TunnelError) and outcome.exit_code == ExitCode.TUNNEL
    assert "Permission denied" in outcome.reason
    assert [c for c in fake.ssh_calls("master") if "-R" in c["argv"]] == []
    fake.assert_clean(m)


def test_reverse_mode_dials_back_and_the_node_rebuilds_a_lost_tunnel_notebook_ui(fake):
    m = SpunnelManager(config=fake.config())

    async def scenario():
        s = await start(m, tunnel_mode="reverse", ui="notebook")
        await ready(s)
        assert urlparse(s.url).path == "/tree"
        await answers(s.url)
        (master,) = fake.ssh_calls("master")
        os.kill(master["pid"], signal.SIGKILL)
        await until(lambda: len(fake.events("master-up")) == 2, what="a new reverse master")
        await until(lambda: any("re-established" in n for n in s.notes), what="told")
        await answers(s.url)
        s.request_stop("done")
        return s, await s.wait()

    s, outcome = run(scenario())
    assert outcome.reason == "done"
    assert all("-R" in c["argv"] and "-L" not in c["argv"] for c in fake.ssh_calls("master"))
    assert "--ServerApp.default_url=/tree" in fake.calls("jupyter")[0]["argv"]
    assert any("reverse tunnel" in n and "lost" in n for n in s.notes)
    fake.assert_clean(m)


def test_reverse_tunnel_refused_for_good_is_a_tunnel_error(fake):
    fake.switch("ssh_refuse_reverse", "Permission denied (publickey).")
    m = SpunnelManager(config=fake.config(SshTunnel={"reconnect_timeout": 0.5}))

    async def scenario():
        s = await start(m, tunnel_mode="reverse")
        return await s.wait()

    outcome = run(scenario())
    assert isinstance(outcome.error, TunnelError) and outcome.exit_code == ExitCode.TUNNEL
    assert "Permission denied" in outcome.reason
    fake.assert_clean(m)


def test_forwards_at_start_and_added_or_cancelled_at_runtime(fake):
    from tests.fakes.cluster import EchoServer, echo_through, free_port, port_answers

    m = SpunnelManager(config=fake.config())

    async def scenario():
        async with EchoServer() as node_a, EchoServer() as node_b:
            sp_a, sp_b = free_port(), free_port()
            s = await start(m, tunnels=f"{sp_a}:{node_a.port}")
            await ready(s)
            assert await echo_through(sp_a) == b"echo:hello\n"
            answer = await m.control(f"forward {sp_b}:{node_b.port}")
            assert answer == f"forwarding 127.0.0.1:{sp_b} -> port {node_b.port} on {s.node}"
            assert await echo_through(sp_b) == b"echo:hello\n"
            assert m.status()["tunnels"] == [f"{sp_a}:{node_a.port}", f"{sp_b}:{node_b.port}"]
            with pytest.raises(UsageError, match="already forwarded"):
                await m.control(f"forward {sp_b}:{node_b.port}")
            assert (await m.control(f"cancel {sp_b}:{node_b.port}")).startswith("cancelled")
            assert not port_answers(sp_b)
            with pytest.raises(UsageError, match="is not forwarded"):
                await m.control(f"cancel {sp_b}:{node_b.port}")
            with pytest.raises(UsageError):
                await m.control("reboot")
            assert m.status()["tunnels"] == [f"{sp_a}:{node_a.port}"]
            s.request_stop("done")
            await s.wait()
            return sp_a

    sp_a = run(scenario())
    assert not port_answers(sp_a)
    ops = [c["argv"][c["argv"].index("-O") + 1] for c in fake.calls("ssh") if "-O" in c["argv"]]
    assert "forward" in ops and "cancel" in ops
    fake.assert_clean(m)


def test_runtime_forwards_are_refused_in_reverse_mode(fake):
    m = SpunnelManager(config=fake.config())

    async def scenario():
        s = await start(m, tunnel_mode="reverse")
        await ready(s)
        with pytest.raises(UsageError, match="forward mode only"):
            await m.control("forward 18123:8000")
        s.request_stop("done")
        await s.wait()

    run(scenario())
    fake.assert_clean(m)


# -- other front ends, one session per host -----------------------------------------------------
def test_stop_from_another_front_end(fake):
    m = SpunnelManager(config=fake.config())
    other = SpunnelManager(config=fake.config())

    async def scenario():
        s = await start(m)
        await ready(s)
        seen = other.status()
        assert seen["job_id"] == s.job_id and seen["url"] == s.url and seen["owner"] == "cli"
        said = await other.stop_running()
        assert s.phase.value == "ended"  # stop_running returns once it is torn down
        return said, await s.wait()

    said, outcome = run(scenario())
    assert said == "session stopped"
    assert outcome.reason == "stopped with `spunnel-notebook stop` or from JupyterLab"
    assert other.last_ended()["ended_reason"] == outcome.reason
    fake.assert_clean(m)
    with pytest.raises(Exception, match="no session") as err:
        run(other.stop_running())
    assert err.value.exit_code == ExitCode.NO_SESSION


def test_a_second_session_is_refused_while_one_runs(fake):
    fake.hold()
    m = SpunnelManager(config=fake.config())
    other = SpunnelManager(config=fake.config())

    async def scenario():
        s = await start(m)
        await until(lambda: s.job_id, what="the job id")
        with pytest.raises(SessionExists) as err:
            await start(other)
        assert err.value.exit_code == ExitCode.BUSY
        assert f"job {s.job_id}" in err.value.message
        assert s.phase.value == "pending"  # untouched
        s.request_stop("done")
        await s.wait()

    run(scenario())
    assert len(fake.calls("srun")) == 1
    fake.assert_clean(m)


SUPERVISOR = """
import asyncio, json, os, sys
from traitlets.config import Config
from spunnel_jupyter.manager import SpunnelManager

async def main():
    m = SpunnelManager(config=Config(json.loads(os.environ["SJ_CONFIG"])))
    s = await m.start(m.request({"tunnel_mode": "forward"}), owner="cli")
    while s.phase.value != "ready":
        await asyncio.sleep(0.01)
    print("READY", s.job_id, flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


def kill_a_supervisor(fake: FakeCluster) -> int:
    """Run a session in another process and SIGKILL that process once the URL is ready."""
    import json
    import subprocess
    import sys

    env = {**os.environ, "SJ_CONFIG": json.dumps(fake.config())}
    proc = subprocess.Popen([sys.executable, "-c", SUPERVISOR], env=env, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        assert line[:1] == [b"READY"], line
    finally:
        proc.kill()
        proc.wait()
    return int(line[1])


@pytest.mark.parametrize("then", ["start", "stop"])
def test_what_a_killed_supervisor_left_is_cleaned_by_the_next_start_or_stop(fake, then):
    # srun deaf to its death signal: the job, srun and the node side outlive the supervisor.
    fake.switch("srun_ignore_signals", "SIGUSR1")
    old_job = kill_a_supervisor(fake)
    m = SpunnelManager(config=fake.config())
    record = (fake.state_dir / "session.json").exists()
    assert record and fake.lock_free() and m.status() is None
    assert fake.job(old_job)["state"] == "RUNNING"
    fake.unswitch("srun_ignore_signals")

    async def scenario():
        if then == "stop":
            return await m.stop_running()
        s = await start(m)
        await ready(s)
        notes = list(s.notes)
        s.request_stop("done")
        await s.wait()
        return "; ".join(notes)

    said = run(scenario())
    # srun may exit at the scancel before it is killed: "stopped a leftover srun" is optional.
    assert f"cancelled job {old_job} left by an earlier session" in said.split("; ")
    assert set(said.split("; ")) - {f"cancelled job {old_job} left by an earlier session"} <= {
        n for n in said.split("; ") if n.startswith("stopped a leftover srun (pid ")
    }
    assert fake.job(old_job)["state"] == "CANCELLED"
    fake.assert_clean(m)


def test_a_record_without_a_job_is_removed_at_the_next_start(fake):
    old_job = kill_a_supervisor(fake)  # srun ends the job itself when the supervisor dies
    m = SpunnelManager(config=fake.config())

    async def scenario():
        await until(lambda: fake.job(old_job)["state"] not in ACTIVE, what="the old job ended")
        s = await start(m)
        await ready(s)
        s.request_stop("done")
        await s.wait()
        return s

    s = run(scenario())
    assert re.fullmatch(
        r"removed the record and sockets of a session whose supervisor died \(pid \d+\)",
        s.notes[0],
    ), s.notes
    assert len(fake.cancels()) == 0
    fake.assert_clean(m)
