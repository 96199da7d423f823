"""The node side of a detached session, without Slurm: the launcher run as a batch script
(``--detached``) keeps its token, events and Jupyter's log in its 0700 directory, and any number of
followers (follow.py) replay and follow them, the token first, and end when the launcher ends or
is gone. Real processes and a fake Jupyter on a Unix socket; SLURM_JOB_ID set by hand."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spunnel_jupyter.protocol import EVENT_PREFIX, LauncherSettings
from spunnel_jupyter.rundir import find_runtime_dir

FAKE_JUPYTER = Path(__file__).resolve().parents[1] / "fakes" / "fake_jupyter.py"
JOB = "4242"


@pytest.fixture
def node(tmp_path):
    base = tmp_path / "node-tmp"
    base.mkdir(mode=0o700)
    fake = tmp_path / "fake"
    fake.mkdir()
    settings = LauncherSettings(
        token="", runtime_base=str(base), jupyter_command=[sys.executable, str(FAKE_JUPYTER)],
        start_timeout=20, stop_grace=1,
    )  # fmt: skip
    env = {**os.environ, "SLURM_JOB_ID": JOB, "FAKE_SLURM_DIR": str(fake)}
    return base, settings, env


def launch(node) -> subprocess.Popen[bytes]:
    _base, settings, env = node
    env = {**env, "SPUNNEL_SETTINGS": settings.line().decode().strip()}
    return subprocess.Popen(
        [sys.executable, "-m", "spunnel_jupyter.launcher", "--detached"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )  # fmt: skip


def follow(node) -> subprocess.Popen[bytes]:
    _base, settings, env = node
    proc = subprocess.Popen(
        [sys.executable, "-m", "spunnel_jupyter.follow"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    assert proc.stdin is not None
    proc.stdin.write(settings.line())
    proc.stdin.flush()  # kept open: the supervisor's commands would come here
    return proc


def events(out: bytes) -> list[dict]:
    return [
        json.loads(line[len(EVENT_PREFIX) :])
        for line in out.decode().splitlines()
        if line.startswith(EVENT_PREFIX)
    ]


def until(check, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def rundir(base: Path) -> Path:
    found = find_runtime_dir(str(base), JOB)
    assert found is not None
    return found


def test_followers_get_the_token_and_every_event_and_end_with_the_launcher(node):
    base = node[0]
    launcher = launch(node)
    try:
        until(lambda: find_runtime_dir(str(base), JOB) is not None)
        until(lambda: b'"ready"' in (rundir(base) / "events").read_bytes())
        d = rundir(base)
        token = (d / "token").read_text()
        assert len(token) == 48 and stat.S_IMODE((d / "token").stat().st_mode) == 0o600
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
        first, second = follow(node), follow(node)  # two login hosts attached at once
        time.sleep(1)
        launcher.send_signal(signal.SIGUSR1)  # what `stop` sends the batch script
        assert launcher.wait(timeout=20) == 0
        for f in (first, second):
            out, err = f.communicate(timeout=20)
            assert f.returncode == 0, err
            said = events(out)
            assert said[0] == {"event": "token", "token": token}
            assert [e["event"] for e in said[1:]] == ["started", "ready", "exited"]
            assert said[1]["detached"] is True and said[1]["runtime_dir"] == str(d)
            assert said[-1] == {"event": "exited", "reason": "signal", "signal": "SIGUSR1",
                                "jupyter": "stopped", "save": "no-browser", "save_s": 0.0,
                                "saved": 0}  # fmt: skip
            assert token.encode() not in err  # Jupyter's log comes masked
    finally:
        launcher.kill()
    assert not d.exists()  # the launcher removed its directory, token and all


def test_a_follower_of_a_killed_launcher_ends_without_a_word(node):
    base = node[0]
    launcher = launch(node)
    until(lambda: find_runtime_dir(str(base), JOB) is not None)
    until(lambda: b'"ready"' in (rundir(base) / "events").read_bytes())
    f = follow(node)
    time.sleep(1)
    launcher.kill()  # no chance to say "exited": its .held lock goes with it
    launcher.wait()
    try:
        out, _ = f.communicate(timeout=10)
    finally:  # its Jupyter, which Slurm would end with the step
        subprocess.run(["pkill", "-KILL", "-f", str(base)], check=False)
    assert f.returncode == 0
    assert [e["event"] for e in events(out)] == ["token", "started", "ready"]


def test_a_directory_someone_else_could_have_made_is_never_followed(node, tmp_path):
    base, _settings, env = node
    fake = base / f"spunnel.{JOB}.0"
    fake.mkdir(mode=0o755)  # not 0700: not the launcher's
    (fake / "events").write_text(EVENT_PREFIX + '{"event": "ready", "socket": "/x"}\n')
    (fake / "token").write_text("not-a-token")
    short = LauncherSettings(token="", runtime_base=str(base), start_timeout=1)
    f = follow((base, short, env))
    out, _ = f.communicate(timeout=10)
    assert f.returncode == 1
    assert events(out) == [
        {
            "event": "exited",
            "reason": "error",
            "message": f"no detached session of job {JOB} on this node",
        }
    ]
