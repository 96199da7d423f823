from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import pytest

from .cluster import cluster_env, force_clean, squeue


@pytest.fixture(scope="session")
def cluster() -> dict[str, str]:
    return cluster_env()


@pytest.fixture(autouse=True)
def clean(cluster: dict[str, str]):
    """Every e2e test starts and ends with no job, process or file of the test users."""
    for user in ("alice", "bob"):
        force_clean(user)
    yield
    for user in ("alice", "bob"):
        force_clean(user)


@pytest.fixture
def node_full() -> Iterator[str]:
    """bob holds all of c1's memory, so alice's next job must wait in the queue."""
    job = subprocess.run(
        ["sbatch", "--parsable", "-p", "interact", "--mem=8000", "-t", "10", "--wrap", "sleep 600"],
        user="bob",
        group="bob",
        extra_groups=[],
        cwd="/tmp",
        capture_output=True,
        text=True,
        env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/home/bob"},
        check=True,
    ).stdout.strip()
    deadline = time.monotonic() + 30
    while squeue("bob") != [f"{job} RUNNING"]:
        assert time.monotonic() < deadline, squeue("bob")
        time.sleep(0.2)
    yield job
    subprocess.run(["scancel", job], check=False)
