"""Runs tests/http (pytest-jupyter, jp_fetch) as the cluster user alice, in a pytest of its own.

The server extension starts sessions as the user running the Jupyter server; only test users (not
root) may ssh to c1, as on a real cluster. The directory is copied to a place alice can read, since
the checkout may live where she cannot.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .browser import jupyterlab
from .cluster import squeue, state_dir, user_env, wait_clean


def test_rest_api_as_alice():
    work = Path(tempfile.mkdtemp(prefix="spunnel-http-"))
    work.chmod(0o755)
    shutil.copytree(Path(__file__).parent.parent / "http", work / "http")
    (work / "pytest.ini").write_text("[pytest]\n")  # pytest-jupyter runs the coroutines
    subprocess.run(["chown", "-R", "alice:alice", str(work)], check=True)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:asyncio",
            "-q",
            "-rA",
            str(work / "http"),
        ],
        user="alice",
        group="alice",
        extra_groups=[],
        cwd=str(work),
        env=user_env("alice"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    shutil.rmtree(work, ignore_errors=True)
    print(result.stdout[-20000:], result.stderr[-5000:])
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and " failed" not in result.stdout


def test_server_extension_is_enabled_after_pip_install():
    out = subprocess.run(["/opt/spunnel/venv/bin/jupyter", "server", "extension", "list"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    text = re.sub(r"\x1b\[[0-9;]*m", "", out.stdout + out.stderr)  # colours off
    assert re.search(r"spunnel_jupyter enabled", text), text
    assert re.search(r"spunnel_jupyter \S+ OK", text), text


def test_login_server_stopping_tears_its_session_down(cluster, artifacts):
    """A session owned by a JupyterLab server ends by the usual rules when that server stops."""
    with jupyterlab("alice", artifacts) as lab:
        code, view = lab.api("POST", "/spunnel/api/session")
        assert code == 201, view
        deadline = time.monotonic() + 60
        while view["phase"] != "ready":
            assert time.monotonic() < deadline, view
            time.sleep(0.2)
            code, view = lab.api("GET", "/spunnel/api/session")
        assert squeue("alice") == [f"{view['job_id']} RUNNING"]
        os.killpg(lab.proc.pid, signal.SIGTERM)
        lab.proc.wait(30)
        elapsed, left = wait_clean("alice", timeout=10)
        assert not left, left
        assert elapsed <= 2.0  # the server waited for the teardown before it exited
    last = json.loads((state_dir("alice") / "last.json").read_text())
    assert last["ended_reason"] == "the JupyterLab server stopped"
    assert last["job_id"] == view["job_id"]
