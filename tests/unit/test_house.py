"""The house's own rules, no cluster needed: the transition table, the one protocol, the fields
declared once, no descriptor leaked by refused starts, logs kept, the event stream's keepalive,
and no import cycles."""

from __future__ import annotations

import argparse
import ast
import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from traitlets.config import Config

from spunnel_jupyter import fields, protocol
from spunnel_jupyter.errors import SlurmUnavailable, UsageError
from spunnel_jupyter.hub import SessionHub
from spunnel_jupyter.machine import (
    TRANSITIONS,
    TUNNEL_TRANSITIONS,
    IllegalTransition,
    Phase,
    TunnelState,
    check_move,
)
from spunnel_jupyter.manager import SpunnelManager
from spunnel_jupyter.state import StateDir

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "spunnel_jupyter"


# -- the state machine ---------------------------------------------------------------------------
def test_every_phase_can_end_and_only_forwards():
    order = list(Phase)
    for phase, allowed in TRANSITIONS.items():
        for new in allowed:
            assert order.index(new) > order.index(phase), f"{phase} -> {new} goes back"
        if phase not in (Phase.ENDING, Phase.ENDED):
            assert Phase.ENDING in allowed, f"{phase} cannot end"
    assert TRANSITIONS[Phase.ENDED] == frozenset()


@pytest.mark.parametrize(
    ("current", "new"),
    [(Phase.READY, Phase.PENDING), (Phase.ENDED, Phase.ENDING), (Phase.PENDING, Phase.READY)],
)
def test_illegal_moves_are_refused(current, new):
    with pytest.raises(IllegalTransition):
        check_move(TRANSITIONS, current, new)


def test_tunnel_sub_state():
    check_move(TUNNEL_TRANSITIONS, TunnelState.UP, TunnelState.RECONNECTING)
    check_move(TUNNEL_TRANSITIONS, TunnelState.RECONNECTING, TunnelState.UP)
    with pytest.raises(IllegalTransition):
        check_move(TUNNEL_TRANSITIONS, TunnelState.DOWN, TunnelState.RECONNECTING)


# -- the protocol --------------------------------------------------------------------------------
def test_settings_round_trip_and_other_versions_are_refused():
    settings = protocol.LauncherSettings(token="t0k", ui="notebook", jupyter_args=["--x"])
    assert protocol.LauncherSettings.parse(settings.line()) == settings
    old = json.dumps({"token": "t0k"})  # version 1 sent no version field
    with pytest.raises(protocol.VersionMismatch, match="protocol 1"):
        protocol.LauncherSettings.parse(old)
    with pytest.raises(protocol.ProtocolError):
        protocol.LauncherSettings.parse(b"not json")


def test_a_launcher_of_another_version_refuses_with_one_line():
    line = json.dumps({"token": "secret-token", "version": protocol.VERSION + 1}) + "\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "spunnel_jupyter.launcher"],
        input=line, capture_output=True, text=True, timeout=30, env=env, cwd="/",
    )  # fmt: skip
    assert result.returncode == 2
    (event,) = [protocol.NodeEvent.parse(x) for x in result.stdout.splitlines()]
    assert event is not None and event.kind == protocol.EXITED
    assert event.get("reason") == "version"
    assert f"protocol {protocol.VERSION + 1}" in event.get("message")
    assert "secret-token" not in result.stdout + result.stderr


def test_events_and_control_lines_round_trip():
    event = protocol.NodeEvent("started", {"host": "c1", "socket": "/tmp/s"})
    assert protocol.NodeEvent.parse(event.line()) == event
    assert protocol.NodeEvent.parse("[I 12:00 ServerApp] hello") is None
    assert protocol.NodeEvent.parse(protocol.EVENT_PREFIX + "{broken") is None
    request = protocol.ControlRequest("forward", "8001:8000")
    assert protocol.ControlRequest.parse(request.line()) == request
    with pytest.raises(protocol.ProtocolError):
        protocol.ControlRequest.parse(b"rm -rf /\n")
    assert protocol.parse_reply(protocol.reply(False, "no")) == (False, "no")


def test_public_view_hides_token_and_pids():
    record = protocol.SessionRecord("id", "login", "alice", "cli", "ready", token="t", ssh_pid=3)
    view = protocol.public_view(record.to_json())
    assert view is not None
    assert not set(protocol.SECRET) & set(view)
    assert view["phase"] == "ready" and "durations" in view and "time_left" in view


def test_job_tag_names_host_and_session():
    assert protocol.job_tag("abc", host="login1") == "spunnel-jupyter:login1:abc"
    assert protocol.job_tag("abc", host="login1").startswith(protocol.job_tag(host="login1"))


# -- the fields ----------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    fields.add_arguments(parser)
    return parser


def test_every_field_reaches_argparse_rest_srun_and_the_form():
    args = _parser().parse_args(["-p", "a", "--qos", "high", "-c", "2", "--notebook"])
    options = fields.options_from_args(args)
    assert options == {"partition": "a", "qos": "high", "cpus_per_task": 2, "ui": "notebook"}
    req = fields.build_request(options, {}, [])
    assert "--qos=high" in req.srun_options() and req.ui == "notebook"
    schema = fields.json_schema({"mem": "4000"}, ["interact", "debug"])
    props = schema["properties"]
    assert props["partition"]["enum"] == ["interact", "debug"]
    assert props["mem"]["default"] == "4000"
    assert props["cpus_per_task"]["type"] == "integer"
    assert props["ui"]["enum"] == ["lab", "notebook"]
    for f in fields.FIELDS:
        assert f.form == (f.name in props)
        if f.srun:  # every srun field has a flag and a help text
            assert f.flags and f.help


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"cpus_per_task": True}, "must be a int"),
        ({"cpus_per_task": "2"}, "must be a int"),
        ({"mem": 4000}, "must be a str"),
        ({"ui": "vscode"}, "unknown ui"),
        ({"port": 80}, "out of range"),
        ({"cpus_per_task": 0}, "at least 1"),
        ({"bogus": "x"}, "unknown field"),
        ({"tunnels": "8001:8000", "port": 8001}, "both --port and a --tunnel"),
    ],
)
def test_bad_values_are_refused_whatever_the_front_end(body, message):
    with pytest.raises(UsageError, match=message):
        fields.build_request(body, {}, [])


def test_site_defaults_fill_what_the_user_left_empty():
    req = fields.build_request({"mem": ""}, {"mem": "4G", "cpus_per_task": 0, "ui": "lab"}, [])
    assert req.slurm["mem"] == "4G" and req.slurm["cpus_per_task"] is None


# -- resources: refused starts leak nothing, logs are kept ---------------------------------------
def test_fifty_refused_starts_leak_no_descriptor(tmp_path):
    """A start refused inside the session (srun missing) closes its log, pipe, socket and port."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sinfo = bin_dir / "sinfo"
    sinfo.write_text("#!/bin/sh\necho 'interact*|up|8:00:00|8000|2'\n")
    sinfo.chmod(0o755)
    config = Config()
    config.SpunnelManager.state_dir = str(tmp_path / "state")
    config.SlurmCLI.commands_dir = str(bin_dir)
    manager = SpunnelManager(config=config)

    async def refused_starts() -> tuple[int, int]:
        async def once() -> None:
            with pytest.raises(SlurmUnavailable, match="srun"):
                await manager.start(manager.request({}))

        await once()  # the first one warms up lazily opened things (event loop, selectors)
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(50):
            await once()
        return before, len(os.listdir("/proc/self/fd"))

    before, after = asyncio.run(refused_starts())
    assert after == before
    assert not manager.state().is_locked()
    assert not (tmp_path / "state" / "session.json").exists()


def test_earlier_session_logs_are_kept(tmp_path):
    state = StateDir(tmp_path).ensure()
    for n in range(7):
        with state.open_log("session.log", keep=3) as log:
            log.write(f"session {n}\n".encode())
    assert (tmp_path / "session.log").read_text() == "session 6\n"
    assert (tmp_path / "session.log.1").read_text() == "session 5\n"
    assert (tmp_path / "session.log.3").read_text() == "session 3\n"
    assert not (tmp_path / "session.log.4").exists()
    assert (tmp_path / "session.log.2").stat().st_mode & 0o777 == 0o600


# -- the event stream ----------------------------------------------------------------------------
class _NoSessions:
    stop_timeout = 1.0

    def __init__(self) -> None:
        self.reads = 0

    def status(self) -> None:
        self.reads += 1

    def last_ended(self) -> None:
        return None


def test_event_stream_keeps_alive_and_stops_when_the_client_is_gone():
    manager = _NoSessions()

    async def watch() -> list[tuple[bool, object]]:
        hub = SessionHub(manager)  # type: ignore[arg-type]
        seen: list[tuple[bool, object]] = []
        async for item in hub.changes(lambda: len(seen) == 3, poll=0.01, keepalive=0.05):
            seen.append(item)
        return seen

    seen = asyncio.run(asyncio.wait_for(watch(), 5))
    assert seen == [(True, None), (False, None), (False, None)]  # the view once, then keepalives
    reads = manager.reads
    assert reads >= 3
    asyncio.run(asyncio.sleep(0.1))
    assert manager.reads == reads  # nothing polls for a client that left


# -- the house -----------------------------------------------------------------------------------
def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                names.add(node.module.split(".")[0])
            else:
                names.update(alias.name for alias in node.names)
    return names


def test_no_import_cycles_and_no_module_over_400_lines():
    graph = {p.stem: _imports(p) for p in PACKAGE.glob("*.py")}
    for module, path in ((p.stem, p) for p in PACKAGE.glob("*.py")):
        assert len(path.read_text().splitlines()) <= 400, f"{module} is over 400 lines"

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, set()):
            if nxt == target or (nxt not in seen and reaches(nxt, target, seen | {nxt})):
                return True
        return False

    cycles = [m for m in graph if reaches(m, m, {m})]
    assert not cycles, f"import cycles through {cycles}"


NODE_SIDE = (
    "launcher", "follow", "dialback", "rundir", "protocol", "probes", "process", "errors",
    "notices", "privatetmp", "nodehold", "envkernels", "nodestop",
)  # fmt: skip


def test_the_node_side_stays_standard_library_only():
    """What runs on the node (the launcher, a follower) imports only each other."""
    for name in NODE_SIDE:
        for imported in _imports(PACKAGE / f"{name}.py"):
            assert imported in NODE_SIDE, (name, imported)
        for imported in _absolute_imports(PACKAGE / f"{name}.py"):
            assert imported in sys.stdlib_module_names, (name, imported)


def _absolute_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names - {"__future__"}
