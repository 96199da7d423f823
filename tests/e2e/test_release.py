"""The running cluster is the Slurm release this test run asked for, on every host and daemon.

``SPUNNEL_SLURM=25.11 bash tests/run.sh ...`` runs the suite on Slurm 25.11 (tests/cluster/up.sh
builds and switches to it); without it, Debian's 22.05. A 25.11 run must never silently test
22.05 (a client command found first on some PATH, a daemon left over from the other release).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from .cluster import as_user, cluster_env
from .hosts import login2_env, on_host

WANTED = os.environ.get("SPUNNEL_SLURM", "22.05")
DAEMON_DIR = {"22.05": "/usr/sbin", "25.11": "/opt/slurm-25.11/sbin"}
# "slurm 25.11.7" (built from source), "slurm-wlm 22.05.8" (Debian)
VERSION = re.compile(r"^slurm(?:-wlm)? (\d+\.\d+)\.\d+", re.M)


def release_of(text: str) -> str:
    m = VERSION.search(text)
    assert m, f"no Slurm version in {text!r}"
    return m.group(1)


def test_the_cluster_env_records_the_release():
    env = cluster_env()
    assert env["SLURM_RELEASE"] == WANTED
    assert Path(env["SLURM_CONF"]).is_file()


CLIENTS = ["sinfo", "squeue", "srun", "salloc", "scontrol", "scancel", "sbatch", "sacct", "sdiag"]


@pytest.mark.parametrize("command", CLIENTS)
def test_client_commands_on_the_login_host(command):
    result = as_user("alice", [command, "--version"])
    assert result.returncode == 0, result.stderr
    assert release_of(result.stdout) == WANTED


@pytest.mark.parametrize("name", ["slurmctld", "slurmd"])
def test_the_daemons_are_the_release(name):
    pid = int(Path(f"/run/spunnel-test/{name}.pid").read_text().split()[0])
    exe = os.readlink(f"/proc/{pid}/exe")
    # Debian's /usr/sbin/slurmctld is a link to slurmctld-wlm
    assert exe == os.path.realpath(f"{DAEMON_DIR[WANTED]}/{name}")


def test_controller_and_node_report_the_release():
    """What the controller says of itself and of c1's slurmd, through the client commands."""
    env = cluster_env()
    config = as_user("alice", ["scontrol", "show", "config"])
    assert config.returncode == 0, config.stderr
    m = re.search(r"^SLURM_VERSION\s*=\s*(\S+)", config.stdout, re.M)
    assert m and m.group(1).startswith(WANTED + "."), m and m.group(0)
    node = as_user("alice", ["scontrol", "show", "node", env["NODE"], "-o"])
    assert node.returncode == 0, node.stderr
    m = re.search(r"\bVersion=(\S+)", node.stdout)
    assert m and m.group(1).startswith(WANTED + "."), node.stdout


def test_a_job_on_the_node_sees_the_release():
    """srun runs on c1, and the commands a job there finds on its PATH are the same release."""
    result = as_user("alice", ["srun", "-p", "interact", "-t", "1", "sh", "-c",
                               "hostname; sinfo --version; scontrol --version"])  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == cluster_env()["NODE"]
    assert [release_of(ln) for ln in lines[1:]] == [WANTED, WANTED]


def test_an_ssh_session_on_the_node_sees_the_release():
    env = cluster_env()
    # The suite runs on the plain cluster (test_adopt.py switches back after its variant); with
    # pam_slurm_adopt on, an ssh without a job would be refused: fail, never skip.
    assert env["ADOPT"] == "0", "the cluster runs its pam_slurm_adopt variant: up.sh without it"
    result = as_user("alice", ["ssh", "-o", "BatchMode=yes", env["NODE"], "sinfo --version"])
    assert result.returncode == 0, result.stderr
    assert release_of(result.stdout) == WANTED


def test_login2_sees_the_release():
    login2_env()
    result = on_host("login2", "carol", ["sinfo", "--version"], timeout=30)
    assert result.returncode == 0, result.stderr
    assert release_of(result.stdout) == WANTED


# pyslurm is built for Slurm 25.11 only: on a 22.05 run this test does not exist (not a skip),
# and the next one checks what 22.05 must say instead.
if WANTED == "25.11":

    def test_pyslurm_talks_to_the_cluster():
        """pyslurm 25.11 imports as a normal user (libslurm found by rpath), reads the cluster.

        In a child process: importing pyslurm without a Slurm configuration ends the process.
        """
        env = cluster_env()
        assert env["PYSLURM"] == "1"
        code = (
            "import pyslurm\n"
            "print(' '.join(sorted(pyslurm.Partitions.load())))\n"
            "print(pyslurm.Partitions.load()['interact'].max_time)\n"
        )
        result = as_user("alice", [f"{env['VENV']}/bin/python", "-c", code])
        assert result.returncode == 0, result.stderr
        # MaxTime=8:00:00, in minutes
        assert result.stdout.splitlines() == ["debug interact", "480"]


def test_pyslurm_is_only_offered_on_25_11():
    """On 22.05 a pyslurm the venv may hold from a 25.11 run cannot talk to the cluster (a 25.11
    client, a 22.05 controller): cluster.env says so, and the rest of the suite runs beside it."""
    assert cluster_env()["PYSLURM"] == ("1" if WANTED == "25.11" else "0")
