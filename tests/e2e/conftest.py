from __future__ import annotations

import pytest

from .cluster import cluster_env, force_clean


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
