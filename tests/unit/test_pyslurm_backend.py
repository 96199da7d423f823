"""The pyslurm backend against the fake cluster and the fake pyslurm (tests/fakes/pylib): which
backend `auto` picks and why, the errors told exactly as the command line tells them, a controller
that never answers, and the worker process's lifetime. The session and fault suites
(test_session_fakes.py, test_faults_fakes.py) also run whole sessions on both backends; the real
pyslurm on a real Slurm 25.11 is tests/e2e/test_pyslurm.py's."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from spunnel_jupyter import process, pyslurm_backend
from spunnel_jupyter.backend import JobState
from spunnel_jupyter.errors import ExitCode, SlurmUnavailable, SpunnelError
from spunnel_jupyter.manager import SpunnelManager
from spunnel_jupyter.pyslurm_backend import SlurmPyslurm, release
from spunnel_jupyter.slurm import SlurmCLI
from tests.fakes.cluster import FakeCluster


@pytest.fixture
def fake(monkeypatch):
    cluster = FakeCluster(monkeypatch, backend="pyslurm")
    yield cluster
    cluster.close()


def backend(fake: FakeCluster, kind: str = "auto", **slurm: Any) -> Any:
    config = fake.config(SpunnelManager={"slurm_backend": kind}, SlurmCLI=slurm)
    return SpunnelManager(config=config).slurm


def run(coro: Any, timeout: float = 30) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def workers(fake: FakeCluster) -> list[str]:
    return [p for p in fake.processes() if "pyslurm_worker" in p]


def test_release_is_the_major_version():
    assert release("25.11.2") == release("slurm 25.11.7") == "25.11"
    assert release("22.05.8") == "22.05" and release("") == ""


def test_auto_uses_pyslurm_built_for_this_slurm_and_runs_no_command_per_query(fake):
    slurm = backend(fake)
    assert isinstance(slurm, SlurmPyslurm)
    said = run(slurm.describe())
    assert said == "pyslurm (auto): pyslurm 25.11.2, built for this host's Slurm 25.11.7"
    job = fake.add_job(comment="x")
    before = len(fake.calls())
    info = run(slurm.job(job["job_id"]))
    assert info.state is JobState.RUNNING and info.nodes == job["node"] and info.end_time
    assert run(slurm.my_jobs()) == [(job["job_id"], "x", JobState.RUNNING)]
    assert {p.name for p in run(slurm.partitions())} == {"interact", "debug"}
    run(slurm.cancel(job["job_id"]))
    assert fake.job(job["job_id"])["state"] == "CANCELLED"
    # four calls, each answered by the one worker: no scontrol, squeue, sinfo or scancel ran
    assert {c["prog"] for c in fake.calls()[before:]} == {"pyslurm"}
    assert len(workers(fake)) == 1
    slurm.close()
    assert workers(fake) == [] and fake.zombie_children() == []


@pytest.mark.parametrize(
    "how, why",
    [
        ("missing", "pyslurm is not installed in this Python environment"),
        ("fatal", "pyslurm does not load here (exit 1: fatal: Could not establish a "
                  "configuration source)"),
        ("other release", "pyslurm 25.11.2 is built for Slurm 25.11, this host's is 22.05.8"),
    ],
)  # fmt: skip
def test_auto_uses_the_commands_where_pyslurm_cannot_be_used_and_says_why(
    fake, monkeypatch, how, why
):
    if how == "missing":
        real = importlib.util.find_spec
        monkeypatch.setattr(
            pyslurm_backend.importlib.util, "find_spec",
            lambda name, *a: None if name == "pyslurm" else real(name, *a),
        )  # fmt: skip
    elif how == "fatal":
        fake.switch("pyslurm_fatal")  # importing it ends the process, as libslurm does
    else:
        fake.switch("slurm_version", "22.05.8")
    slurm = backend(fake)
    assert run(slurm.describe()) == f"Slurm's commands (auto): {why}"
    job = fake.add_job()
    assert run(slurm.job(job["job_id"])).state is JobState.RUNNING
    assert fake.calls("scontrol") and not fake.calls("pyslurm")  # the command line answered
    assert workers(fake) == [] and fake.zombie_children() == []


def test_pyslurm_required_where_it_cannot_be_used_refuses_before_anything_is_submitted(fake):
    fake.switch("slurm_version", "22.05.8")
    m = SpunnelManager(config=fake.config(SpunnelManager={"slurm_backend": "pyslurm"}))
    with pytest.raises(SlurmUnavailable) as err:
        run(m.start(m.request({})))
    assert err.value.message == (
        "the pyslurm backend cannot be used: pyslurm 25.11.2 is built for Slurm 25.11, this "
        "host's is 22.05.8"
    )
    assert "slurm_backend" in err.value.remedy and err.value.exit_code == ExitCode.SLURM
    assert fake.calls("srun") == [] and fake.jobs() == [] and fake.lock_free()
    assert workers(fake) == []


def told(call: Any) -> tuple[str, str, str, int]:
    try:
        run(call)
    except SpunnelError as e:
        return type(e).__name__, e.message, e.remedy, e.exit_code
    raise AssertionError("no error")


@pytest.mark.parametrize("fault", ["controller_down", "munge_down", "slurm_delay"])
def test_errors_are_told_the_same_whichever_backend(fake, fault):
    cli, pyslurm = backend(fake, "cli", timeout=0.5), backend(fake, "pyslurm", timeout=0.5)
    job = fake.add_job()
    run(pyslurm.describe())  # the worker is up before the fault
    fake.switch(fault, "2" if fault == "slurm_delay" else "")  # delay: a hung controller
    for name, args in [("partitions", ()), ("my_jobs", ()), ("cancel", (job["job_id"],))]:
        by_cli = told(getattr(cli, name)(*args))
        assert told(getattr(pyslurm, name)(*args)) == by_cli, name
        assert by_cli[0] == "SlurmUnavailable" and by_cli[3] == ExitCode.SLURM
    assert run(cli.job(job["job_id"])).state is JobState.UNKNOWN  # never "ended"
    assert run(pyslurm.job(job["job_id"])).state is JobState.UNKNOWN
    fake.unswitch(fault)
    gone = 4242
    assert run(cli.job(gone)).state is run(pyslurm.job(gone)).state is JobState.GONE
    run(cli.cancel(gone))  # a job that is gone already: no error, either way
    run(pyslurm.cancel(gone))
    pyslurm.close()


def test_a_controller_that_never_answers_is_bounded_and_never_blocks_the_event_loop(fake):
    slurm = backend(fake, timeout=0.5)
    run(slurm.describe())
    (first,) = workers(fake)
    fake.switch("slurm_delay", "30")  # the controller hangs

    async def ticking() -> tuple[BaseException | None, int, float]:
        ticks, t0 = 0, time.monotonic()
        call = asyncio.ensure_future(slurm.partitions())
        while not call.done():
            await asyncio.sleep(0.01)
            ticks += 1
        return call.exception(), ticks, time.monotonic() - t0

    error, ticks, took = run(ticking())
    assert isinstance(error, SlurmUnavailable)
    assert error.message == "the Slurm controller does not answer (waited 0.5 s)"
    assert 0.5 <= took < 1.5 and ticks > 25  # the loop ran all along (a tick each 10 ms)
    assert workers(fake) == []  # the stuck worker was killed
    fake.unswitch("slurm_delay")
    assert len(run(slurm.partitions())) == 2  # a new worker answers
    (second,) = workers(fake)
    assert second != first
    slurm.close()
    assert fake.zombie_children() == []


def test_the_worker_dies_with_its_parent(fake):
    child = subprocess.Popen(
        [sys.executable, "-c", (
            "import asyncio, sys; from spunnel_jupyter.manager import SpunnelManager; "
            "from traitlets.config import Config; c = Config(); "
            f"c.SlurmCLI.commands_dir = {str(fake.config().SlurmCLI.commands_dir)!r}; "
            "c.SpunnelManager.slurm_backend = 'pyslurm'; "
            "s = SpunnelManager(config=c).slurm; asyncio.run(s.partitions()); "
            "print('asked', flush=True); sys.stdin.readline()"
        )],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=os.environ,
    )  # fmt: skip
    assert child.stdout is not None and child.stdout.readline() == b"asked\n"
    assert len(workers(fake)) == 1
    child.send_signal(signal.SIGKILL)
    child.wait()
    deadline = time.monotonic() + 2
    while workers(fake) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert workers(fake) == []


def test_cli_backend_is_the_command_line(fake):
    slurm = backend(fake, "cli")
    assert type(slurm) is SlurmCLI
    assert run(slurm.describe()) == "Slurm's commands (cli)"


def test_calls_at_once_share_one_worker(fake):
    slurm = backend(fake)

    async def together() -> list[Any]:
        return await asyncio.gather(*(slurm.partitions() for _ in range(4)))

    assert all(len(parts) == 2 for parts in run(together()))
    assert len(workers(fake)) == 1
    slurm.close()
    assert workers(fake) == [] and fake.zombie_children() == []


def test_a_close_waits_for_the_calls_in_flight(fake):
    """Another page's form, loaded while this one's call waits for a slow controller, closes the
    backend when its own call is done (as SpunnelManager._outside_session does): this call still
    gets its answer, and the worker ends after it."""
    slurm = backend(fake)
    run(slurm.choice())
    fake.switch("slurm_delay", "1")

    async def two_pages() -> Any:
        first = asyncio.create_task(slurm.partitions())
        await asyncio.sleep(0.3)
        slurm.close()  # the other page's call is done
        return await first

    assert len(run(two_pages())) == 2
    assert workers(fake) == [] and fake.zombie_children() == []


def test_code_planted_in_the_working_directory_is_never_imported(fake, tmp_path, monkeypatch):
    """The JupyterLab server's working directory may be one others can write (/tmp, a shared
    project): neither the worker nor any ``python -m`` we start imports from it."""
    planted = tmp_path / "planted"
    for module in ("pyslurm", "json"):
        (tmp_path / f"{module}.py").write_text(f"open({str(planted)!r}, 'a').write('{module}')\n")
    monkeypatch.chdir(tmp_path)
    slurm = backend(fake)
    assert len(run(slurm.partitions())) == 2
    slurm.close()
    json_tool = [process.python_module("json.tool")]  # -P, from Python 3.11
    monkeypatch.setattr(process.sys, "version_info", (3, 10, 0))
    json_tool.append(process.python_module("json.tool"))  # sys.path[0] dropped, before 3.11
    assert json_tool[0][1] == "-P" and json_tool[1][1] == "-c"
    for argv in json_tool:
        ran = subprocess.run(argv, input="{}", text=True, capture_output=True, timeout=30)
        assert ran.stdout.strip() == "{}", ran.stderr
    assert not planted.exists(), planted.read_text()
