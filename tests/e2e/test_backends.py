"""The two Slurm backends on the real cluster, whichever release it runs (``SPUNNEL_SLURM``):

- on Slurm 25.11, with pyslurm 25.11 built against it (tests/cluster/up.sh), `auto` picks pyslurm:
  doctor says so, a whole session's queries go through its worker (a child of the supervisor) and
  the worker is gone with the session;
- on Debian's 22.05, `auto` picks the commands and says why, and a site that insists on pyslurm
  gets one clear error with nothing submitted;
- either way, what Slurm refuses, and a controller that does not answer, are told in the same
  words and exit codes by both backends.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .cluster import (
    PROG,
    as_user,
    cluster_env,
    jobs_submitted,
    procs_of,
    site_config,
    start,
    wait_clean,
)

USER = "alice"


@pytest.fixture(scope="module")
def release() -> str:
    return cluster_env()["SLURM_RELEASE"]


def config_for(backend: str, timeout: float = 15, refresh: float = 60) -> str:
    return site_config({"SpunnelManager": {"slurm_backend": backend, "refresh_interval": refresh},
                        "SlurmCLI": {"timeout": timeout}})  # fmt: skip


def backend_row(out: str) -> str:
    (row,) = [line for line in out.splitlines() if line.startswith("Slurm backend")]
    return re.sub(r"^Slurm backend\s+", "", row)


def test_doctor_says_which_backend_answers_and_why(release):
    result = as_user(USER, [PROG, "doctor"], timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    row = backend_row(result.stdout)
    if release == "25.11":
        assert re.fullmatch(
            r"ok\s+pyslurm \(auto\): pyslurm 25\.11\.\d+, built for this host's Slurm 25\.11\.\d+",
            row,
        ), row
    else:  # pyslurm is built for 25.11 only (or not installed yet in this run)
        assert re.fullmatch(
            r"ok\s+Slurm's commands \(auto\): (pyslurm is not installed in this Python "
            r"environment|pyslurm 25\.11\.\d+ is built for Slurm 25\.11, this host's is "
            r"22\.05\.\d+)",
            row,
        ), row


def workers_of(pid: int) -> list[int]:
    return [p for p, cmd in procs_of(USER) if "pyslurm_worker" in cmd and _ppid(p) == pid]


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError):
        return -1


def test_a_whole_session_on_the_backend_auto_picks(release):
    s = start(USER, "-p", "interact", "--mem", "500", "-t", "30",
              env_path=config_for("auto", refresh=1))  # fmt: skip
    try:
        s.wait_ready()
        deadline = time.monotonic() + 10
        while not s.record.get("end_time") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert s.record.get("end_time"), s.record  # the job's end time, from a job query
        workers = workers_of(s.proc.pid)
        assert len(workers) == (1 if release == "25.11" else 0), procs_of(USER)
        s.signal(signal.SIGINT)
        assert s.finish() == 130
    finally:
        s.close()
    _, left = wait_clean(USER, 10)
    assert left == [], left  # the worker too (wait_clean's processes: spunnel_jupyter ...)
    if release == "25.11":
        assert all(not Path(f"/proc/{w}").exists() for w in workers)


@pytest.mark.parametrize("backend", ["cli", "pyslurm"])
def test_a_refused_request_is_told_the_same_by_both_backends(release, backend):
    config = config_for(backend)
    before = jobs_submitted()
    unknown = as_user(USER, [PROG, "-p", "nope", "--mem", "500"], JUPYTER_CONFIG_PATH=config)
    too_long = as_user(USER, [PROG, "-p", "debug", "-t", "9:00:00"], JUPYTER_CONFIG_PATH=config)
    if backend == "pyslurm" and release != "25.11":
        for result in (unknown, too_long):  # the site insists on pyslurm: one clear error
            assert result.returncode == 4, result.stderr
            assert re.search(
                r"error: the pyslurm backend cannot be used: (pyslurm is not installed|pyslurm "
                r"25\.11\.\d+ is built for Slurm 25\.11, this host's is 22\.05)",
                result.stderr,
            ), result.stderr
    else:
        assert unknown.returncode == 2, unknown.stderr
        assert "error: unknown partition 'nope'" in unknown.stderr
        assert "interact" in unknown.stderr  # the remedy names the partitions there are
        assert too_long.returncode == 2, too_long.stderr
        assert "exceeds partition 'debug'" in too_long.stderr
    assert jobs_submitted() == before


@pytest.fixture
def controller_stopped():
    """slurmctld frozen (SIGSTOP): it holds its connections and answers nothing; thawed after."""
    pid = int(Path("/run/spunnel-test/slurmctld.pid").read_text().split()[0])
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if subprocess.run(["sinfo", "-h"], capture_output=True, timeout=30).returncode == 0:
                break
            time.sleep(0.5)


def test_a_controller_that_does_not_answer_is_told_the_same_by_both_backends(
    release, controller_stopped
):
    told = {}
    for backend in ("cli", "pyslurm") if release == "25.11" else ("cli",):
        config = config_for(backend, timeout=3)
        t0 = time.monotonic()
        result = as_user(USER, [PROG, "stop"], JUPYTER_CONFIG_PATH=config)
        took = time.monotonic() - t0
        assert result.returncode == 4, result.stdout + result.stderr
        assert took < 3 + 5, took  # bounded by SlurmCLI.timeout, plus starting up
        told[backend] = (result.stdout + result.stderr).strip()
    assert set(told.values()) == {
        "spunnel-notebook: error: the Slurm controller does not answer (waited 3 s) (try again "
        "in a minute; if it persists, tell your administrators)"
    }, told
    assert not [cmd for _, cmd in procs_of(USER) if "pyslurm_worker" in cmd]
