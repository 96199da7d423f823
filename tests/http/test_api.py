"""The REST API against a real in-process Jupyter server and the real Slurm cluster."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tornado.httpclient import HTTPClientError

API = ("spunnel", "api")
ROUTES = [
    ("GET", "detached"),
    ("GET", "config"),
    ("GET", "session"),
    ("POST", "session"),
    ("DELETE", "session"),
    ("GET", "session/events"),
]


def _slurm_conf() -> str:
    """The running release's slurm.conf (tests/cluster/up.sh records it in cluster.env)."""
    lines = Path("/run/spunnel-test/cluster.env").read_text().splitlines()
    env = dict(ln.split("=", 1) for ln in lines if "=" in ln)
    return env.get("SLURM_CONF", "/etc/slurm/slurm.conf")


def _squeue() -> list[str]:
    out = subprocess.run(
        ["squeue", "-h", "-u", os.environ["USER"], "-o", "%i %T"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.splitlines()


async def _status(jp_fetch, method, path, body=None, **kw):
    try:
        resp = await jp_fetch(*API, path, method=method, body=body, raise_error=True, **kw)
    except HTTPClientError as e:
        assert e.response is not None
        return e.code, json.loads(e.response.body or b"null")
    return resp.code, json.loads(resp.body or b"null")


@pytest.mark.parametrize(("method", "path"), ROUTES)
async def test_every_verb_requires_authentication(jp_fetch, method, path):
    body = "{}" if method == "POST" else None
    code, _ = await _status(jp_fetch, method, path, body, headers={"Authorization": ""})
    assert code == 403
    assert _squeue() == []


async def test_config_lists_partitions_and_site_defaults(jp_fetch):
    code, data = await _status(jp_fetch, "GET", "config")
    assert code == 200
    parts = {p["name"]: p for p in data["partitions"]}
    assert parts["interact"]["default"] and parts["interact"]["max_time"] == 8 * 3600
    assert parts["interact"]["max_mem_mb"] == 8000
    assert parts["debug"]["max_time"] == 3600
    assert set(data["defaults"]) >= {"partition", "mem", "time", "cpus_per_task", "ui"}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"mem": "9000"}, "more than any node"),
        ({"partition": "nosuch"}, "unknown partition"),
        ({"time": "2x"}, "invalid time limit"),
        ({"tunnels": "80:8000"}, "out of range"),
        ({"cpus_per_task": "two"}, "must be a int"),
        ({"colour": "blue"}, "unknown field"),
        ({"cpus_per_task": True}, "must be a int"),
        ({"cpus_per_task": 0}, "at least 1"),
        ({"cpus_per_task": 2.5}, "must be a int"),
        ({"port": 0}, "out of range"),
        ({"mem": 4000}, "must be a str"),
        ({"mem": "0"}, "more than 0"),
        ({"tunnels": "\u00b2:8000"}, "malformed --tunnel pair"),
        ({"tunnels": ",".join(f"{p}:{p}" for p in range(2000, 2100))}, "more than 64"),
        ({"tunnels": ",".join(f"{p}:{p}" for p in range(2000, 62000))}, "over 16384 bytes"),
        ({"ui": "vscode"}, "unknown ui"),
        ({"tunnel_mode": "sideways"}, "unknown tunnel_mode"),
        ({"partition": "interact,nosuch"}, "unknown partition 'nosuch'"),
    ],
)
async def test_bad_input_is_400_with_a_message_and_submits_nothing(jp_fetch, body, message):
    before = _jobs_submitted()
    code, data = await _status(jp_fetch, "POST", "session", json.dumps(body))
    assert code == (413 if len(json.dumps(body)) > 16 * 1024 else 400), data
    assert message in data["message"] and data["remedy"]
    assert _squeue() == []
    assert _jobs_submitted() == before


async def test_a_body_that_is_not_an_object_is_400(jp_fetch):
    code, data = await _status(jp_fetch, "POST", "session", "[1, 2]")
    assert code == 400 and "JSON object" in data["message"]


def _jobs_submitted() -> int:
    """slurmctld's count of submitted jobs (sdiag): a refused srun would move it too."""
    out = subprocess.run(["sdiag"], capture_output=True, text=True, check=True).stdout
    return int(out.split("Jobs submitted:")[1].split()[0])


async def test_slurm_unreachable_is_503(jp_fetch, monkeypatch, tmp_path):
    conf = tmp_path / "slurm.conf"
    lines = [
        ln for ln in open(_slurm_conf()).read().splitlines() if not ln.startswith("SlurmctldPort")
    ]
    conf.write_text("SlurmctldPort=6999\n" + "\n".join(lines) + "\n")
    monkeypatch.setenv("SLURM_CONF", str(conf))
    code, data = await _status(jp_fetch, "POST", "session", json.dumps({"time": "10"}))
    assert code == 503, data
    assert "does not answer" in data["message"]
    code, _ = await _status(jp_fetch, "GET", "config")
    assert code == 503


async def test_start_watch_and_stop_on_the_real_cluster(jp_fetch):
    code, _ = await _status(jp_fetch, "GET", "session")
    assert code == 404
    code, view = await _status(
        jp_fetch, "POST", "session", json.dumps({"mem": "1000", "time": "10"})
    )
    assert code == 201, view
    assert view["owner"] == "jupyterlab" and "token" not in view
    # A second session is refused and the answer names the running one.
    code, err = await _status(jp_fetch, "POST", "session", json.dumps({"time": "10"}))
    assert code == 409 and "already have a session" in err["message"]
    deadline = time.monotonic() + 60
    while True:
        code, view = await _status(jp_fetch, "GET", "session")
        assert code == 200
        if view["phase"] == "ready":
            break
        assert view["phase"] in ("pending", "starting") and time.monotonic() < deadline
        await _sleep(0.2)
    assert view["node"] == "c1" and view["url"].startswith("http://127.0.0.1:")
    assert set(view["durations"]) == {"queued", "starting"}
    while view["time_left"] is None:  # asked of Slurm just after the URL is published
        assert time.monotonic() < deadline, view
        await _sleep(0.05)
        code, view = await _status(jp_fetch, "GET", "session")
    assert view["time_left"] > 500
    assert _squeue() == [f"{view['job_id']} RUNNING"]
    # The CLI sees the session started here.
    status = subprocess.run(["spunnel-notebook", "status"], capture_output=True, text=True)
    assert status.returncode == 0 and view["url"] in status.stdout and "jupyterlab" in status.stdout
    code, _ = await _status(jp_fetch, "DELETE", "session")
    assert code == 204
    assert _squeue() == []
    code, gone = await _status(jp_fetch, "GET", "session")
    assert code == 404 and gone["last"]["ended_reason"] == "stopped from JupyterLab"


async def test_events_stream_progress_without_polling_by_the_page(jp_fetch, jp_serverapp):
    """A session started in a terminal appears on the event stream, then its end does."""
    views: list[dict | None] = []

    def on_chunk(chunk: bytes) -> None:
        for block in chunk.decode().split("\n\n"):
            if block.startswith("data: "):
                views.append(json.loads(block[6:]))

    stream = jp_fetch(*API, "session/events", streaming_callback=on_chunk, request_timeout=120)
    cli = subprocess.Popen(
        ["spunnel-notebook", "-t", "10"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not any(v and v["phase"] == "ready" for v in views):
            assert time.monotonic() < deadline, views
            await _sleep(0.1)
        ready = next(v for v in views if v and v["phase"] == "ready")
        assert ready["owner"] == "cli" and ready["url"]
        phases = [v["phase"] for v in views if v]
        assert phases.index("ready") > 0  # progress came before ready, pushed by the server
        # Stopped from JupyterLab, although the terminal started it.
        code, _ = await _status(jp_fetch, "DELETE", "session")
        assert code == 204
        assert cli.wait(10) == 0
        assert b"stopped with `spunnel-notebook stop` or from JupyterLab" in cli.stdout.read()
        while not (views[-1] and views[-1]["phase"] == "ended"):
            assert time.monotonic() < deadline + 10, views
            await _sleep(0.1)
    finally:
        if cli.poll() is None:
            cli.send_signal(signal.SIGINT)
            cli.wait(10)
        stream.cancel()
    assert _squeue() == []


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)


async def _cli(*args: str, timeout: float = 120) -> tuple[int, str, str]:
    """spunnel-notebook ARGS without blocking the in-process server's event loop (a `stop` must
    reach a session this server holds)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "spunnel_jupyter.cli", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_a_detached_session_is_listed_attached_detached_and_stopped(jp_fetch):
    """Started detached in a terminal; the server lists it, attaches to it (a tunnel of its own:
    the same token), detaches (the job runs on), and the terminal's `stop` ends it."""
    code, out, err = await _cli("--detach", "-t", "10", "--mem", "300")
    assert code == 0, (out, err)
    try:
        code, listed = await _status(jp_fetch, "GET", "detached")
        assert code == 200 and listed["sessions"] == []  # this host's own: the current session
        assert (await _cli("stop"))[0] == 0
        code, out, err = await _cli("--detach", "-t", "10", "--mem", "300")
        assert code == 0, (out, err)
        token = out.split("?token=")[1].split()[0]
        record = json.loads(
            (Path(f"/tmp/spunnel-jupyter-{os.getuid()}") / "session.json").read_text()
        )
        job = record["job_id"]
        os.kill(record["supervisor_pid"], signal.SIGKILL)  # its tunnel here is gone
        await _sleep(0.5)
        code, listed = await _status(jp_fetch, "GET", "detached")
        assert code == 200, listed
        (only,) = listed["sessions"]
        assert only["job_id"] == job and only["state"] == "RUNNING" and only["node"] == "c1"
        code, err = await _status(jp_fetch, "POST", "session", json.dumps({"attach": True}))
        assert code == 400 and "attach must be a job id" in err["message"]
        code, view = await _status(jp_fetch, "POST", "session", json.dumps({"attach": job}))
        assert code == 201, view
        assert view["kind"] == "attached" and view["job_id"] == job
        for _ in range(300):
            code, view = await _status(jp_fetch, "GET", "session")
            if view.get("phase") in ("ready", "ended"):
                break
            await _sleep(0.1)
        assert view["phase"] == "ready", view
        assert "token" not in view and view["url"].endswith(f"?token={token}")  # the same Jupyter
        code, _ = await _status(jp_fetch, "DELETE", "session", params={"detach": "1"})
        assert code == 204
        assert _squeue() == [f"{job} RUNNING"]  # detached: the job runs on
    finally:
        await _cli("stop", timeout=60)
    for _ in range(100):
        if not _squeue():
            break
        await _sleep(0.1)
    assert _squeue() == []
