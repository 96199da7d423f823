"""The REST API (handlers.py) in an in-process Jupyter server with the spunnel_jupyter extension,
over fake Slurm, ssh and Jupyter executables (tests/fakes). No cluster needed."""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
from jupyter_server.utils import url_path_join

from spunnel_jupyter.manager import SpunnelManager
from tests.fakes.cluster import FakeCluster, fetch, until

API = ("spunnel", "api")


@pytest.fixture
def fake(monkeypatch):
    cluster = FakeCluster(monkeypatch)
    yield cluster
    cluster.close()


@pytest.fixture(autouse=True)
def jp_server_cleanup(fake, jp_server_cleanup):
    """pytest-jupyter's server cleanup (which stops the extension), before the fake cluster's."""
    yield


@pytest.fixture
def jp_server_config(jp_environ, fake):
    config = fake.config()
    config.ServerApp.jpserver_extensions = {"spunnel_jupyter": True}
    return config


async def call(jp_fetch, method: str, path: str, body: Any = None) -> tuple[int, Any, Any]:
    """(status, JSON body or None, headers) of one API request."""
    data = body if isinstance(body, str) or body is None else json.dumps(body)
    response = await jp_fetch(*API, path, method=method, body=data, raise_error=False)
    return response.code, json.loads(response.body or b"null"), response.headers


async def events_until(
    jp_http_port, jp_base_url, jp_auth_header, predicate, timeout: float = 15
) -> list[dict[str, Any]]:
    """The session views GET spunnel/api/session/events sends, until ``predicate(views)``.

    A plain client: the stream never ends, and this one hangs up cleanly when it has enough.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", jp_http_port)
    views: list[dict[str, Any]] = []
    try:
        path = url_path_join(jp_base_url, *API, "session/events")
        head = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{jp_http_port}"]
        head += [f"{k}: {v}" for k, v in jp_auth_header.items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
        headers = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        assert headers.startswith(b"HTTP/1.1 200"), headers
        assert b"content-type: text/event-stream" in headers.lower()
        assert b"transfer-encoding: chunked" in headers.lower()

        async def read() -> None:
            buffer = b""
            while not views or not predicate(views):
                size = int(await reader.readuntil(b"\r\n"), 16)  # chunked transfer encoding
                buffer += (await reader.readexactly(size + 2))[:-2]
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    if not event.startswith(b":"):  # a comment: the keepalive
                        assert event.startswith(b"data: "), event
                        views.append(json.loads(event[len(b"data: ") :]))

        await asyncio.wait_for(read(), timeout)
    finally:
        writer.close()
    return views


async def test_config_serves_site_defaults_partitions_and_the_form_schema(jp_fetch, fake):
    code, data, _ = await call(jp_fetch, "GET", "config")
    assert code == 200
    assert data["defaults"]["partition"] == "interact"
    assert set(data["defaults"]) >= {"partition", "mem", "time", "cpus_per_task", "ui"}
    parts = {p["name"]: p for p in data["partitions"]}
    assert list(parts) == ["interact", "debug"]
    assert parts["interact"]["default"] and not parts["debug"]["default"]
    assert parts["interact"]["max_time"] == 8 * 3600 and parts["debug"]["max_time"] == 3600
    assert parts["interact"]["max_mem_mb"] == 8000 and parts["interact"]["max_cpus"] == 2
    schema = data["schema"]
    assert schema["type"] == "object" and schema["properties"]
    assert schema["properties"]["partition"]["enum"] == ["interact", "debug"]
    assert schema["properties"]["partition"]["default"] == "interact"
    assert {"mem", "time", "cpus_per_task"} <= set(schema["properties"])
    assert [c["prog"] for c in fake.calls()] == ["sinfo"]


async def test_config_is_503_when_slurm_does_not_answer(jp_fetch, fake):
    fake.switch("controller_down")
    code, data, _ = await call(jp_fetch, "GET", "config")
    assert code == 503
    assert data["kind"] == "SlurmUnavailable" and data["message"] and data["remedy"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"mem": "lots"}, "invalid memory 'lots'"),
        ({"memory": "100"}, "unknown field(s): memory"),
        ({"cpus_per_task": "two"}, "cpus_per_task must be a"),
        ({"tunnels": "8001"}, "malformed --tunnel pair '8001'"),
        ({"partition": "nope"}, "unknown partition 'nope'"),
        ("[1, 2]", "the body must be a JSON object"),
        ({"shell": True}, "shell: only in a terminal, not from the REST API"),
        ({"shell": True, "no_jupyter": True}, "shell, no_jupyter: only in a terminal"),
        ({"no_jupyter": True, "mem": "100"}, "no_jupyter: only in a terminal"),
    ],
)
async def test_a_bad_post_is_400_with_message_and_remedy(jp_fetch, fake, body, message):
    code, data, _ = await call(jp_fetch, "POST", "session", body)
    assert code == 400
    assert data["message"].startswith(message) and data["remedy"] and data["kind"] == "UsageError"
    assert fake.calls("srun") == []
    code, data, _ = await call(jp_fetch, "GET", "session")
    assert code == 404 and data["last"] is None


async def test_post_get_events_delete(jp_fetch, jp_http_port, jp_base_url, jp_auth_header, fake):
    code, view, headers = await call(jp_fetch, "POST", "session", {"mem": "100"})
    assert code == 201
    assert headers["Location"].endswith("/spunnel/api/session")
    assert view["owner"] == "jupyterlab" and view["phase"] in ("pending", "starting")
    assert "token" not in view and "srun_pid" not in view
    session_id = view["session_id"]

    code, got, _ = await call(jp_fetch, "GET", "session")
    assert code == 200 and got["session_id"] == session_id

    seen = await events_until(
        jp_http_port, jp_base_url, jp_auth_header, lambda views: views[-1]["phase"] == "ready"
    )
    assert {v["session_id"] for v in seen} == {session_id}
    ready = seen[-1]
    assert ready["job_id"] == fake.jobs()[0]["job_id"] and ready["node"]
    assert ready["tunnel_state"] == "up" and ready["durations"]["starting"] >= 0
    url = urlparse(ready["url"])  # what JupyterLab's Open button opens
    token = parse_qs(url.query)["token"][0]
    assert (await fetch(url.port, "/api/status", token))[0] == 200

    code, busy, _ = await call(jp_fetch, "POST", "session", {})
    assert code == 409 and busy["kind"] == "SessionExists"
    assert f"job {ready['job_id']}" in busy["message"]

    code, body, _ = await call(jp_fetch, "DELETE", "session")
    assert (code, body) == (204, None)
    code, data, _ = await call(jp_fetch, "GET", "session")
    assert code == 404
    assert data["last"]["session_id"] == session_id
    assert data["last"]["ended_reason"] == "stopped from JupyterLab"
    assert data["last"]["phase"] == "ended"
    fake.assert_clean(SpunnelManager(config=fake.config()))

    code, data, _ = await call(jp_fetch, "DELETE", "session")
    assert code == 404 and data["kind"] == "NoSession"


async def test_a_session_started_in_a_terminal_shows_and_stops_here(jp_fetch, fake):
    cli = SpunnelManager(config=fake.config())
    session = await cli.start(cli.request({"tunnel_mode": "forward"}), owner="cli")
    await until(lambda: session.phase.value == "ready", what="the CLI's session ready")

    code, view, _ = await call(jp_fetch, "GET", "session")
    assert code == 200
    assert (view["owner"], view["job_id"], view["url"]) == ("cli", session.job_id, session.url)

    code, _, _ = await call(jp_fetch, "DELETE", "session")
    assert code == 204
    outcome = await session.wait()
    assert outcome.reason == "stopped with `spunnel-notebook stop` or from JupyterLab"
    fake.assert_clean(cli)


async def test_stopping_the_server_ends_its_session(jp_fetch, jp_serverapp, fake):
    code, _, _ = await call(jp_fetch, "POST", "session", {"tunnel_mode": "reverse"})
    assert code == 201
    manager = SpunnelManager(config=fake.config())
    await until(lambda: (manager.status() or {}).get("phase") == "ready", what="ready")
    extension = jp_serverapp.extension_manager.extension_apps["spunnel_jupyter"]
    (app,) = extension
    await app.stop_extension()
    assert manager.last_ended()["ended_reason"] == "the JupyterLab server stopped"
    fake.assert_clean(manager)
