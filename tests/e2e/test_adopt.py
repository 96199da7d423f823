"""The pam_slurm_adopt variant of the test cluster: ssh into c1 only into a job of one's own.

The module switches the cluster to the variant (SPUNNEL_ADOPT=1 up.sh: PrologFlags=contain and
pam_slurm_adopt on c1's sshd) and back to the plain cluster when it is done.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .cluster import as_user, cluster_env, procs_of, squeue, start, uid, user_env, wait_clean
from .test_access import ssh_through_the_stanza, write_stanza

UP = Path(__file__).parents[1] / "cluster" / "up.sh"


def _up(adopt: bool) -> None:
    env = dict(os.environ, SPUNNEL_ADOPT="1" if adopt else "0")
    result = subprocess.run(["bash", str(UP)], env=env, capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module", autouse=True)
def adoption_cluster(cluster):
    _up(adopt=True)
    assert cluster_env()["ADOPT"] == "1"
    yield
    _up(adopt=False)


def _sshd_sessions_of(user: str) -> list[int]:
    """pids of sshd processes running as ``user`` (the per-connection ones, on c1)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid != uid(user):
                    continue
                comm = Path(f"/proc/{entry}/comm").read_text().strip()
            except OSError:
                continue
            if comm.startswith("sshd"):
                found.append(int(entry))
    return found


def test_ssh_without_a_job_is_refused_by_pam_slurm_adopt():
    result = as_user("alice", ["ssh", "-o", "BatchMode=yes", "c1", "true"])
    assert result.returncode != 0
    assert "pam_slurm_adopt" in result.stderr or "Access denied" in result.stderr, result


def test_tunnel_sshd_is_adopted_into_the_job_and_dies_with_it():
    s = start("alice", "-t", "10", "--tunnel-mode", "forward")
    try:
        s.wait_ready(timeout=120)
        job = s.job_id
        sessions = _sshd_sessions_of("alice")
        assert sessions, "no sshd session of alice on c1"
        for pid in sessions:
            cgroup = Path(f"/proc/{pid}/cgroup").read_text()
            assert f"job_{job}/step_extern" in cgroup, cgroup
        t0 = time.monotonic()
        subprocess.run(["scancel", str(job)], check=True)
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{pid}").exists() for pid in sessions):
            assert time.monotonic() < deadline, "the adopted sshd outlived the job"
            time.sleep(0.05)
        assert s.finish(timeout=20) in (0, 5), s.output  # job ended (or tunnel lost first)
        elapsed, left = wait_clean("alice", timeout=10)
        assert not left, left
        assert time.monotonic() - t0 < 2.0 + elapsed
    finally:
        s.close()


def test_other_jobs_on_the_node_are_warned_about():
    other = subprocess.run(
        ["sbatch", "--parsable", "-t", "10", "--mem=500", "--wrap", "sleep 300"],
        user="alice", group="alice", extra_groups=[], cwd="/tmp", capture_output=True, text=True,
        env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/home/alice"}, check=True,
    ).stdout.strip()  # fmt: skip
    deadline = time.monotonic() + 30
    while f"{other} RUNNING" not in squeue("alice"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    s = start("alice", "-t", "10", "--tunnel-mode", "forward")
    try:
        s.wait_ready(timeout=120)
        s.wait_for(rf"other jobs on c1 \({other}\).*may be adopted into one of them", timeout=10)
        s.signal(signal.SIGINT)
        assert s.finish() == 130
    finally:
        s.close()
        subprocess.run(["scancel", other], check=False)


def test_doctor_reports_adoption():
    result = as_user("alice", ["spunnel-notebook", "doctor", "--allocate"], timeout=180)
    assert result.returncode == 0, result
    assert "allowed, adopted into the job (pam_slurm_adopt)" in result.stdout


def test_an_ssh_config_connection_joins_the_job_and_dies_with_it():
    s = start("alice", "-t", "10", "--tunnel-mode", "forward")
    config = None
    try:
        s.wait_ready(timeout=120)
        job = s.job_id
        assert f"job_{job}/step_extern" in ssh_through_the_stanza(["cat", "/proc/self/cgroup"])
        config, host = write_stanza()
        ssh = subprocess.Popen(
            ["ssh", "-F", str(config), "-o", "BatchMode=yes", host, "sleep", "301"],
            user="alice", group="alice", extra_groups=[], cwd="/home/alice",
            env=user_env("alice"), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while not (sleeps := [p for p, cmd in procs_of("alice") if cmd == "sleep 301"]):
            assert time.monotonic() < deadline, "the ssh-config connection never ran its sleep"
            time.sleep(0.1)
        cgroup = Path(f"/proc/{sleeps[0]}/cgroup").read_text()
        assert f"job_{job}/step_extern" in cgroup, cgroup  # adopted into the session's job
        s.signal(signal.SIGINT)
        assert s.finish() == 130
        deadline = time.monotonic() + 10
        while [p for p, cmd in procs_of("alice") if cmd == "sleep 301"]:
            assert time.monotonic() < deadline, "the adopted connection outlived the job"
            time.sleep(0.05)
        ssh.wait(30)
    finally:
        s.close()
        if config is not None:
            shutil.rmtree(config.parent, ignore_errors=True)
