"""Runs tests/http (pytest-jupyter, jp_fetch) as the cluster user alice, in a pytest of its own.

The server extension starts sessions as the user running the Jupyter server; only test users (not
root) may ssh to c1, as on a real cluster. The directory is copied to a place alice can read, since
the checkout may live where she cannot.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .cluster import user_env


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
