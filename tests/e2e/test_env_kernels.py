"""Kernels from the user's own environments on the real cluster (``--env PATH``), as alice.

alice makes her own venvs under /home/alice (shared with c1, as an HPC cluster's home is): one
with ipykernel from PyPI (``ENV/bin/python -m pip install ipykernel``; PyPI is reachable from the
test machine; about 20 s, once per module), at a path with a space and a non-ASCII letter, and one
without. Her own kernelspec is installed the usual way (``ipykernel install --user``).
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest

from .cluster import as_user, jobs_submitted, squeue, start, wait_clean
from .jupyter_client_util import execute_in, rest

ENVS = Path("/home/alice/envs")
VENV = ENVS / "my env ü"  # with ipykernel
BARE = ENVS / "bare"  # without
KERNEL = "spunnel-env-my-env-u"  # the kernel name spunnel gives VENV
OWN_KERNELS = Path("/home/alice/.local/share/jupyter/kernels")


def _as_alice(*argv: str, timeout: float = 300) -> None:
    result = as_user("alice", list(argv), timeout=timeout)
    assert result.returncode == 0, result


@pytest.fixture(scope="module")
def venvs():
    shutil.rmtree(ENVS, ignore_errors=True)
    shutil.rmtree(OWN_KERNELS / "alice-own", ignore_errors=True)
    _as_alice("mkdir", "-p", str(ENVS))
    _as_alice("/usr/bin/python3", "-m", "venv", str(VENV))
    _as_alice(str(VENV / "bin" / "python"), "-m", "pip", "install", "-q", "ipykernel")
    _as_alice("/usr/bin/python3", "-m", "venv", "--without-pip", str(BARE))
    own = ["-m", "ipykernel", "install", "--user", "--name", "alice-own"]
    _as_alice(str(VENV / "bin" / "python"), *own, timeout=60)
    yield
    shutil.rmtree(ENVS, ignore_errors=True)
    shutil.rmtree(OWN_KERNELS / "alice-own", ignore_errors=True)


def test_a_kernel_of_her_venv_runs_on_c1_in_that_venv_beside_her_own_kernelspecs(venvs):
    s = start("alice", "--env", str(VENV), "-t", "10")
    try:
        s.wait_ready(timeout=120)
        job = s.job_id
        status, specs = rest(s.port, s.token, "GET", "/api/kernelspecs")
        assert status == 200
        names = set(specs["kernelspecs"])
        assert {KERNEL, "alice-own", "python3"} <= names, names  # hers stay listed
        spec = specs["kernelspecs"][KERNEL]["spec"]
        assert spec["display_name"] == "Python (my env ü)"
        assert spec["argv"][0] == f"{VENV}/bin/python"
        status, kernel = rest(s.port, s.token, "POST", "/api/kernels", {"name": KERNEL})
        assert status == 201, status
        code = (
            "import json, os, socket, sys; print(json.dumps([sys.prefix, socket.gethostname(), "
            "os.environ['SLURM_JOB_ID'], os.environ['PATH'].split(os.pathsep)[0]]))"
        )
        out = execute_in(s.port, s.token, kernel["id"], code, timeout=120)
        assert json.loads(out) == [str(VENV), "c1", str(job), f"{VENV}/bin"]
        # This session's kernel was written in its runtime directory, not in alice's home.
        assert sorted(p.name for p in OWN_KERNELS.iterdir()) == ["alice-own"]
        s.signal(signal.SIGINT)
        _, left = wait_clean("alice", timeout=10)
        assert not left, left
        assert s.finish() == 130
    finally:
        s.close()


@pytest.mark.parametrize(
    ("given", "words"),
    [
        (str(BARE), ["cannot import ipykernel", f"{BARE}/bin/python -m pip install ipykernel"]),
        ("envs/bare", [f"--env {BARE}: ", "cannot import ipykernel"]),  # made absolute
        (str(ENVS / "nope"), ["no such directory"]),
        (str(VENV / "bin" / "python"), ["is a Python, not an environment"]),
    ],
)
def test_an_environment_that_cannot_run_a_kernel_is_refused_before_submission(venvs, given, words):
    before = jobs_submitted()
    result = as_user("alice", ["spunnel-notebook", "-t", "10", "--env", given], timeout=120)
    assert result.returncode == 2, result
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("spunnel-notebook: error: "), errors
    for word in words:
        assert word in errors[0], (word, errors[0])
    assert jobs_submitted() == before and squeue("alice") == []


def test_the_login_side_check_runs_no_shell(venvs):
    """A path that a shell would take apart is only ever an argv element."""
    odd = ENVS / "x; touch pwned"
    _as_alice("/usr/bin/python3", "-m", "venv", "--without-pip", str(odd))
    result = as_user("alice", ["spunnel-notebook", "-t", "10", "--env", str(odd)], timeout=120)
    assert result.returncode == 2 and "cannot import ipykernel" in result.stderr, result
    assert not Path("/home/alice/pwned").exists()
