"""HTTP tests of the server extension with pytest-jupyter, run as the cluster user alice.

tests/e2e/test_http_api.py runs this directory in a pytest of its own as alice (the server
extension starts sessions as whoever runs the server, and test users, not root, may ssh to c1).
"""

from __future__ import annotations

import pytest

pytest_plugins = ["pytest_jupyter.jupyter_server"]


@pytest.fixture
def jp_server_config():
    return {"ServerApp": {"jpserver_extensions": {"spunnel_jupyter": True}}}
