"""Faults against the fake cluster (tests/fakes): Slurm unreachable during the teardown, a full
state directory, Ctrl-C during the start, a node that starts but never gets ready, a flood of
output from Jupyter, probes racing a start, srun killed while its job pends. Each ends with
nothing left behind, and the user told what happened.

Only the public API and the configuration are used (as in test_session_fakes.py); the fakes'
switches set the faults.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest

from spunnel_jupyter.errors import (
    ExitCode,
    JupyterError,
    SlurmLost,
    SlurmUnavailable,
    SpunnelError,
    StateError,
    UsageError,
)
from spunnel_jupyter.manager import SpunnelManager
from spunnel_jupyter.slurm import SlurmCLI
from spunnel_jupyter.state import StateDir
from tests.fakes.cluster import FakeCluster, fetch, until

UNCANCELLED = "uncancelled.json"


@pytest.fixture(params=["cli", "pyslurm"])
def fake(monkeypatch, request):
    cluster = FakeCluster(monkeypatch, backend=request.param)
    yield cluster
    cluster.close()


def run(coro: Any, timeout: float = 40) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def token_of(url: str) -> str:
    return parse_qs(urlparse(url).query)["token"][0]


def request(m: SpunnelManager, **options: Any) -> Any:
    return m.request({"mem": "100", "tunnel_mode": "forward", **options}, extra=[])


async def start(m: SpunnelManager, **options: Any) -> Any:
    return await m.start(request(m, **options), owner="cli")


async def ready(session: Any, timeout: float = 10) -> None:
    await until(lambda: session.phase.value in ("ready", "ended"), timeout, "the session ready")
    assert session.phase.value == "ready", session.outcome


async def url_answers(url: str) -> bool:
    return await fetch(urlparse(url).port, "/api/status", token_of(url)) == (
        200,
        b'{"started": "fake", "connections": 0, "kernels": 0}',
    )


async def stop(session: Any) -> Any:
    session.request_stop("done")
    return await session.wait()


# -- 1. Slurm unreachable during the teardown -----------------------------------------------------
TEARDOWN = {"stop_timeout": 1.0, "jupyter_stop_grace": 0.5}
# The fake's switch (and its content) for each way Slurm cannot confirm the end: the controller
# refuses connections, munged is down, the controller accepts but never answers (longer than the
# teardown waits: SlurmCLI.timeout is 5 s).
FAULTS = {
    "controller_down": ("controller_down", ""),
    "munge_down": ("munge_down", ""),
    "controller_hangs": ("slurm_delay", "30"),
}


async def end_unconfirmed(fake: FakeCluster, m: SpunnelManager, fault: str) -> tuple[Any, float]:
    """A session whose teardown Slurm cannot confirm (``fault``, see FAULTS): the job stays in the
    queue (the controller never heard it ended). Returns the session and how long the teardown
    took."""
    s = await start(m)
    await ready(s)
    fake.switch(*FAULTS[fault])
    fake.switch("job_end_lost")
    stopped_at = time.monotonic()
    s.request_stop("done")
    outcome = await s.wait()
    took = time.monotonic() - stopped_at
    assert outcome.reason == "done"
    return s, took


def slurm_back(fake: FakeCluster, fault: str) -> None:
    fake.unswitch(FAULTS[fault][0])
    fake.unswitch("job_end_lost")


def assert_told_and_remembered(
    fake: FakeCluster, m: SpunnelManager, s: Any, took: float, fault: str
) -> None:
    # Measured: 1.5 s; a hung controller costs the 1 s of slack the teardown gives Slurm's end.
    bound = TEARDOWN["stop_timeout"] + TEARDOWN["jupyter_stop_grace"] + 0.8
    bound += 1.0 if fault == "controller_hangs" else 0.0
    assert took < bound, f"the teardown took {took:.2f} s (bound {bound:g} s)"
    assert s.job_gone is False
    # Only the job is left (Slurm could not be told); srun, ssh, the files and the lock are gone.
    assert fake.leftovers(m) == [f"active job {s.job_id} (RUNNING)"]
    assert json.loads((fake.state_dir / UNCANCELLED).read_text())["job_id"] == s.job_id
    told = [n for n in s.notes if f"job {s.job_id} may still be in the queue" in n]
    assert len(told) == 1, s.notes
    assert "cancelled at your next start or `spunnel-notebook stop`" in told[0]
    assert told[0] in m.last_ended()["notes"]


@pytest.mark.parametrize("fault", FAULTS)
def test_teardown_slurm_cannot_confirm_is_bounded_and_the_next_start_cancels_the_job(fake, fault):
    m = SpunnelManager(config=fake.config(SpunnelManager=TEARDOWN))

    async def scenario():
        s, took = await end_unconfirmed(fake, m, fault)
        assert_told_and_remembered(fake, m, s, took, fault)
        slurm_back(fake, fault)
        s2 = await start(m)
        notes = list(s2.notes)
        uncancelled_after_start = (fake.state_dir / UNCANCELLED).exists()
        await ready(s2)
        await stop(s2)
        return s, notes, uncancelled_after_start

    s, notes, uncancelled_after_start = run(scenario())
    assert notes == [f"cancelled job {s.job_id} left by an earlier session"]
    assert not uncancelled_after_start
    assert fake.job(s.job_id)["state"] == "CANCELLED"
    fake.assert_clean(m)


def test_an_unconfirmed_end_whose_job_ended_since_is_told_so_by_stop(fake):
    m = SpunnelManager(config=fake.config(SpunnelManager=TEARDOWN))

    async def scenario():
        s, _ = await end_unconfirmed(fake, m, "controller_down")
        slurm_back(fake, "controller_down")
        assert fake.scancel(s.job_id).returncode == 0  # it ended meanwhile (here: scancel)
        return s, await m.stop_running()

    s, said = run(scenario())
    # Not a "record of a session whose supervisor died": there was none, and no supervisor died.
    assert said == f"job {s.job_id}, whose end an earlier session could not confirm, has ended"
    assert len(fake.cancels()) == 2  # the teardown's, refused; the one above
    fake.assert_clean(m)


def test_stop_while_a_start_holds_the_lock_before_its_control_socket_still_stops_it(fake):
    m, other = SpunnelManager(config=fake.config()), SpunnelManager(config=fake.config())

    async def scenario():
        fake.switch("slurm_delay", "0.5")  # sinfo is slow: the start holds the lock meanwhile
        starting = asyncio.ensure_future(start(m))
        await until(lambda: m.state().is_locked(), what="the start's lock")
        assert not (fake.state_dir / "control.sock").exists() and m.status() is None
        stopping = asyncio.ensure_future(other.stop_running())
        s = await starting
        fake.unswitch("slurm_delay")
        return await s.wait(), await stopping

    outcome, said = run(scenario())
    # It once found no control socket and no record, sent nothing and waited 20 s in vain.
    assert said == "session stopped"
    assert outcome.reason == "stopped with `spunnel-notebook stop` or from JupyterLab"
    fake.assert_clean(m)


def test_munge_down_is_told_as_slurm_unavailable_not_as_a_refusal(fake):
    fake.switch("munge_down")
    m = SpunnelManager(config=fake.config())
    with pytest.raises(SpunnelError) as err:
        run(start(m))
    assert fake.calls("srun") == [] and fake.leftovers(m) == []
    assert "refused" not in err.value.message and "options" not in err.value.remedy
    assert isinstance(err.value, SlurmUnavailable) and err.value.exit_code == ExitCode.SLURM


def test_teardown_note_says_why_when_the_controller_never_answers(fake):
    m = SpunnelManager(config=fake.config(SpunnelManager=TEARDOWN))

    async def scenario():
        s, _ = await end_unconfirmed(fake, m, "controller_hangs")
        slurm_back(fake, "controller_hangs")
        assert (await m.stop_running()).startswith(f"cancelled job {s.job_id}")
        return s

    s = run(scenario())
    fake.assert_clean(m)
    (told,) = [n for n in s.notes if "may still be in the queue" in n]
    assert "()" not in told and "did not confirm its end (no answer)" in told


def test_teardown_slurm_cannot_confirm_then_stop_cancels_the_job_holding_the_lock(fake):
    m = SpunnelManager(config=fake.config(SpunnelManager=TEARDOWN))
    other = SpunnelManager(config=fake.config(SpunnelManager=TEARDOWN))

    async def scenario():
        s, took = await end_unconfirmed(fake, m, "controller_down")
        assert_told_and_remembered(fake, m, s, took, "controller_down")
        slurm_back(fake, "controller_down")
        fake.switch("slurm_delay", "0.3")  # a slow controller: `stop` is busy for a while
        before = len(fake.cancels())
        stopping = asyncio.ensure_future(m.stop_running())
        await until(lambda: len(fake.cancels()) > before, what="stop's scancel")
        # A start racing the `stop` that cleans up waits until the cleaning is over (the lock
        # free), then starts, with nothing more to clean: it never runs alongside the cleaning.
        assert not stopping.done() and m.state().is_locked()
        s2 = await start(other)
        assert stopping.done()
        said = await stopping
        fake.unswitch("slurm_delay")
        notes = list(s2.notes)
        await ready(s2)
        await stop(s2)
        return s, said, notes

    s, said, notes = run(scenario())
    assert said == f"cancelled job {s.job_id} left by an earlier session"
    assert notes == []
    assert len(fake.calls("srun")) == 2  # the first session and the start that waited
    assert [c["argv"] for c in fake.cancels()] == [[str(s.job_id)]] * 2  # teardown, stop
    assert fake.job(s.job_id)["state"] == "CANCELLED"
    assert not (fake.state_dir / UNCANCELLED).exists()
    fake.assert_clean(m)


# -- 2. a full state directory ----------------------------------------------------------------
@pytest.fixture
def small_state_dir(fake):
    """The state directory on a 64 KiB tmpfs (the tests run as root); ``fill()`` fills it."""
    fake.state_dir.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(fake.state_dir)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (the tests run as root): {mounted.stderr.strip()}")
    filler = fake.state_dir / "filler"

    def fill() -> None:
        with open(filler, "ab", buffering=0) as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 512)
        probe = fake.state_dir / "probe"
        with pytest.raises(OSError), open(probe, "wb", buffering=0) as f:  # really full
            f.write(b"x")
        probe.unlink()

    try:
        yield fill
    finally:
        subprocess.run(["umount", "-l", str(fake.state_dir)], check=False)


def test_a_full_state_directory_refuses_the_start_before_srun(fake, small_state_dir):
    m = SpunnelManager(config=fake.config())
    small_state_dir()
    with pytest.raises(StateError, match="cannot write the session record") as err:
        run(start(m))
    assert err.value.exit_code == ExitCode.STATE == 7
    assert fake.calls("srun") == [] and fake.jobs() == []
    assert fake.leftovers(m) == []


def test_the_state_directory_filling_up_while_ready_stops_nothing(fake, small_state_dir):
    from tests.fakes.cluster import free_port

    m = SpunnelManager(config=fake.config())

    async def scenario():
        s = await start(m)
        await ready(s)
        small_state_dir()
        # A change of the record (a forward added) cannot be written: told once, nothing stops.
        pair = f"{free_port()}:8000"
        assert (await m.control(f"forward {pair}")).startswith("forwarding")
        assert (await m.control(f"cancel {pair}")).startswith("cancelled")
        assert s.phase.value == "ready" and await url_answers(s.url)
        outcome = await stop(s)
        return s, outcome

    s, outcome = run(scenario())
    assert outcome.reason == "done" and outcome.error is None
    told = [n for n in s.notes if "cannot update" in n]
    assert told == [f"cannot update {fake.state_dir / 'session.json'}: No space left on device"]
    assert s.job_gone and fake.job(s.job_id)["state"] == "COMPLETED"
    fake.assert_clean(m)


# -- 3. Ctrl-C during the start ---------------------------------------------------------------
# m.start returns as soon as srun is spawned (before the fake srun even logs its call), so the last
# Ctrl-C that can cancel it lands inside asyncio's spawn of srun; a later one is the session's
# request_stop (test_session_fakes: test_stop_while_pending_revokes_the_job_without_scancel).
class InterruptedAt(SlurmCLI):
    """SlurmCLI whose caller is cancelled (Ctrl-C, as the CLI does it: main.cancel()) at its
    first suspension after entering ``where``: for start_step, that is inside asyncio's spawn,
    after srun was forked and exec'd (no await comes before the fork), before m.start returns."""

    where = ""

    def _interrupt(self, name: str) -> None:
        if name == self.where:
            task = asyncio.current_task()
            assert task is not None
            asyncio.get_running_loop().call_soon(task.cancel)

    async def partitions(self) -> Any:
        self._interrupt("partitions")
        return await super().partitions()

    async def start_step(self, *args: Any, **kwargs: Any) -> Any:
        self._interrupt("start_step")
        return await super().start_step(*args, **kwargs)


@pytest.mark.parametrize("where", ["partitions", "start_step"])
def test_ctrl_c_during_the_start_leaves_nothing(fake, monkeypatch, where):
    spawned: list[subprocess.Popen[bytes]] = []
    execute_child = subprocess.Popen._execute_child  # type: ignore[attr-defined]

    def watched(self: Any, *args: Any, **kwargs: Any) -> None:  # what was forked, for the checks
        execute_child(self, *args, **kwargs)
        spawned.append(self)

    monkeypatch.setattr(subprocess.Popen, "_execute_child", watched)
    monkeypatch.setattr(InterruptedAt, "where", where)
    m = SpunnelManager(config=fake.config(SpunnelManager={"slurm_class": InterruptedAt}))
    fake.hold()
    with pytest.raises(asyncio.CancelledError):
        run(start(m))
    sruns = [p for p in spawned if str(p.args[0]).endswith("/srun")]
    assert len(sruns) == (where == "start_step")  # forked and exec'd before the Ctrl-C landed
    for p in sruns:
        assert p.poll() is not None, f"srun {p.pid} still runs"
    time.sleep(0.3)  # a srun that escaped would have queued its job by now
    assert fake.active_jobs() == []
    fake.assert_clean(m)


# -- 4. STARTING is bounded on the login side -------------------------------------------------
NEVER_READY = """
import os, socket, sys, time
from spunnel_jupyter.protocol import NodeEvent
sys.stdin.readline()
sys.stdout.write(NodeEvent("started", {"host": socket.gethostname(), "pid": os.getpid(),
    "job_id": os.environ["SLURM_JOB_ID"], "socket": "/nonexistent/jupyter.sock"}).line())
sys.stdout.flush()
time.sleep(600)
"""


def test_a_node_that_starts_but_never_gets_ready_is_ended_from_the_login_side(fake):
    ssh = {"connect_timeout": 0.2, "reconnect_timeout": 0.1, "adopt_retry_timeout": 0.1}
    start_timeout = 0.2
    config = fake.config(
        SpunnelManager={
            "launcher_command": [sys.executable, "-c", NEVER_READY],
            "start_timeout": start_timeout,
        },
        SshTunnel=ssh,
    )
    m = SpunnelManager(config=config)
    bound = start_timeout + ssh["adopt_retry_timeout"] + 2 * ssh["connect_timeout"]
    bound += ssh["reconnect_timeout"] + 10.0  # the message names the whole bound it waited

    async def scenario():
        s = await start(m)
        await until(lambda: s.phase.value != "pending", what="the node's started event")
        assert s.phase.value == "starting"
        started_at = time.monotonic()
        outcome = await s.wait()
        return s, outcome, time.monotonic() - started_at

    s, outcome, took = run(scenario())
    assert isinstance(outcome.error, JupyterError) and outcome.exit_code == ExitCode.JUPYTER == 6
    assert (
        outcome.reason == f"the session did not become ready within {bound:g} s of the job starting"
    )
    # The login side waits its whole bound, then tears down.
    assert bound <= took < bound + 2.0
    assert s.url == ""
    fake.assert_clean(m)


# -- 5. a flood of output from Jupyter while ready ----------------------------------------------
@pytest.mark.parametrize(("line", "then"), [(1 << 20, 0), (300_000, 400_000)])
def test_a_huge_line_from_jupyter_is_logged_masked_and_the_session_stays_responsive(
    fake, line, then
):
    from tests.fakes.fake_jupyter import flood

    m = SpunnelManager(config=fake.config())
    log = fake.state_dir / "session.log"

    async def scenario():
        s = await start(m)
        await ready(s)
        port, token = urlparse(s.url).port, token_of(s.url)
        asked = await fetch(port, f"/fake/print?line={line}&then={then}", token, method="POST")
        assert asked[0] == 200
        assert await url_answers(s.url)
        await until(lambda: b"FLOOD-END\n" in log.read_bytes(), what="the flood in the log")
        assert s.phase.value == "ready" and await url_answers(s.url)
        stopped_at = time.monotonic()
        outcome = await stop(s)
        return s, outcome, time.monotonic() - stopped_at

    s, outcome, took = run(scenario())
    assert outcome.reason == "done" and took < 2.0
    token = token_of(s.url)
    text = Path(m.last_ended()["log"]).read_bytes()
    expected = flood(token, line, then)
    assert token.encode() not in text
    assert expected.replace(token.encode(), b"<token>") in text
    assert expected.count(token.encode()) > 50
    fake.assert_clean(m)


# -- 6. probes of the lock racing a start -------------------------------------------------------
PROBER = """
import sys
from pathlib import Path
from traitlets.config import Config
from spunnel_jupyter.manager import SpunnelManager
from spunnel_jupyter.state import StateDir
path, stop = sys.argv[1], Path(sys.argv[2])
m = SpunnelManager(config=Config({"SpunnelManager": {"state_dir": path}}))
d, n = StateDir(path), 0
print("probing", flush=True)
while not stop.exists():
    d.is_locked()
    m.status()
    n += 1
print(n, flush=True)
"""


def test_status_probes_racing_starts_never_make_a_start_fail(fake):
    m = SpunnelManager(config=fake.config())
    other = SpunnelManager(config=fake.config())
    fake.state_dir.mkdir()
    stop_file = fake.root / "stop-probing"
    prober = subprocess.Popen(
        [sys.executable, "-c", PROBER, str(fake.state_dir), str(stop_file)],
        stdout=subprocess.PIPE,
        text=True,
    )
    probes = {"thread": 0, "errors": []}  # type: dict[str, Any]

    def probe_in_a_thread() -> None:
        d = StateDir(fake.state_dir)
        while not stop_file.exists():
            try:
                d.is_locked()
                other.status()
                probes["thread"] += 1
            except Exception as e:  # pragma: no cover - reported below
                probes["errors"].append(repr(e))

    thread = threading.Thread(target=probe_in_a_thread, daemon=True)
    taken = socket.socket()
    try:
        assert prober.stdout is not None and prober.stdout.readline() == "probing\n"
        thread.start()
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        refused = request(m, port=taken.getsockname()[1])

        async def scenario():
            # Many starts that take the lock and are then refused for the port (fast, local).
            for _ in range(1500):
                with pytest.raises(UsageError, match="local port"):
                    await m.start(refused)
            s = await start(m)  # and a whole session, probed all along
            await ready(s)
            seen = other.status()
            await stop(s)
            return s, seen

        s, seen = run(scenario())
    finally:
        stop_file.touch()
        taken.close()
        out, _ = prober.communicate(timeout=10)
        thread.join(timeout=10)
    assert seen is not None and seen["job_id"] == s.job_id
    assert probes["errors"] == []
    assert int(out.split()[-1]) > 100 and probes["thread"] > 100  # they really probed
    assert prober.returncode == 0
    fake.assert_clean(m)


# -- 7. srun killed while the job pends ---------------------------------------------------------
def test_srun_killed_while_pending_is_a_clear_error_and_the_job_is_cancelled(fake):
    fake.hold("Priority")
    m = SpunnelManager(config=fake.config())

    async def scenario():
        s = await start(m)
        await until(lambda: s.job_id, what="the job id")
        killed_at = time.monotonic()
        os.kill(m.status()["srun_pid"], signal.SIGKILL)
        return s, await s.wait(), time.monotonic() - killed_at

    s, outcome, took = run(scenario())
    assert isinstance(outcome.error, SlurmLost) and outcome.exit_code == ExitCode.SLURM
    assert f"srun ended (killed by SIGKILL) while job {s.job_id}" in outcome.reason
    assert "the job is cancelled" in outcome.reason
    assert took < 2.0
    assert fake.job(s.job_id)["state"] == "CANCELLED"
    assert fake.active_jobs() == []
    fake.assert_clean(m)


def test_srun_killed_before_it_named_its_pending_job_is_a_clear_error(fake):
    fake.hold("Priority")
    fake.switch("srun_queue_delay", "3")  # the job is queued; srun has not said so yet
    m = SpunnelManager(config=fake.config())

    async def scenario():
        s = await start(m)
        await until(lambda: fake.jobs(), what="the queued job")
        os.kill(m.status()["srun_pid"], signal.SIGKILL)
        return await s.wait()

    outcome = run(scenario())
    (job,) = fake.jobs()
    assert job["state"] == "CANCELLED"  # found by its tag and cancelled
    fake.assert_clean(m)
    assert outcome.exit_code == ExitCode.SLURM
    assert "killed by SIGKILL" in outcome.reason and "refused" not in outcome.reason
