"""Desktop sessions (NX, X2Go, VNC on the login host) against the fakes (tests/fakes): the display
heuristic, when the browser opens (--browser, --no-browser, the site default, --detach, a command
run from inside Jupyter, the REST API's sessions), the redirect page (0600, in the state
directory, holding the URL, gone when the session ends) and the token on no command line: the
browser is a fake $BROWSER that records its argv, its stdio and every command line holding the
token at the moment it ran. Also --hold, the desktop entry's window kept open after a failure.
"""

from __future__ import annotations

import asyncio
import io
import json
import stat
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from spunnel_jupyter.cli import parse
from spunnel_jupyter.console import Console
from spunnel_jupyter.desktop import (
    SessionDesktop,
    desktop_display,
    hold_on_failure,
    notify,
    should_open,
)
from spunnel_jupyter.manager import SpunnelManager
from tests.fakes.cluster import FakeCluster, until
from tests.fakes.terminal import Terminal

URL = r"http://127\.0\.0\.1:\d+/lab\?token=[0-9a-f]+"
OPENING = "opening it in this desktop's browser"
SSH = "192.0.2.7 51000 10.0.0.1 22"

FAKE_BROWSER = """#!{python}
import html, json, os, re, sys, urllib.parse
page = urllib.parse.urlparse(sys.argv[-1]).path
text = open(page).read()
url = html.unescape(re.search(r'url=([^"]+)"', text).group(1))
token = urllib.parse.parse_qs(urllib.parse.urlparse(url).query)["token"][0]
holding = []
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        with open(f"/proc/{{pid}}/cmdline", "rb") as f:
            if token.encode() in f.read():
                holding.append(pid)
    except OSError:
        pass
said = {{"argv": sys.argv[1:], "page": page, "mode": os.stat(page).st_mode & 0o7777,
        "url": url, "holding_token": holding, "own_session": os.getsid(0) == os.getpid(),
        "stdio": [os.readlink(f"/proc/self/fd/{{fd}}") for fd in (0, 1, 2)]}}
with open({record!r} + ".tmp", "w") as f:
    json.dump(said, f)
os.replace({record!r} + ".tmp", {record!r})
"""


# -- what counts as a desktop --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("env", "desktop"),
    [
        ({}, False),
        ({"DISPLAY": ""}, False),
        ({"DISPLAY": ":0"}, True),  # the host's own X server
        ({"DISPLAY": ":1001", "SSH_CONNECTION": SSH}, True),  # NX: local, though over ssh
        ({"DISPLAY": ":50.0", "SSH_CLIENT": "192.0.2.7 51000 22"}, True),  # X2Go
        ({"DISPLAY": ":1", "SSH_CONNECTION": SSH}, True),  # a VNC desktop
        ({"DISPLAY": "unix:3.0", "SSH_CONNECTION": SSH}, True),
        ({"DISPLAY": "localhost:10.0", "SSH_CONNECTION": SSH}, False),  # ssh -X from a laptop
        ({"DISPLAY": "localhost:12", "SSH_CLIENT": "192.0.2.7 51000 22"}, False),
        ({"DISPLAY": "login1:10.0", "SSH_CONNECTION": SSH}, False),  # X11UseLocalhost=no
        ({"DISPLAY": "127.0.0.1:11.0", "SSH_CONNECTION": SSH}, False),
        ({"DISPLAY": "localhost:10.0"}, True),  # no ssh in sight: not taken as forwarded
        ({"DISPLAY": "localhost:2", "SSH_CONNECTION": SSH}, True),  # below X11DisplayOffset
        ({"WAYLAND_DISPLAY": "wayland-0", "SSH_CONNECTION": SSH}, True),
        ({"WAYLAND_DISPLAY": "wayland-0", "DISPLAY": "localhost:10", "SSH_CONNECTION": SSH}, True),
        ({"DISPLAY": "not a display"}, False),
    ],
)
def test_the_display_heuristic(env, desktop):
    assert desktop_display(env)[0] is desktop, desktop_display(env)[1]


DESK = {"DISPLAY": ":5", "SSH_CONNECTION": SSH}
FORWARDED = {"DISPLAY": "localhost:10.0", "SSH_CONNECTION": SSH}


@pytest.mark.parametrize(
    ("flag", "kind", "site", "env", "opens"),
    [
        (None, "foreground", True, DESK, True),
        (None, "foreground", True, FORWARDED, False),
        (None, "foreground", True, {}, False),
        (False, "foreground", True, DESK, False),  # --no-browser
        (None, "foreground", False, DESK, False),  # c.Desktop.open_browser = False
        (True, "foreground", False, DESK, True),  # --browser overrides the site
        (None, "detached", True, DESK, False),
        (True, "detached", True, DESK, True),
        (None, "attached", True, DESK, False),
        (None, "foreground", True, {**DESK, "JUPYTER_SERVER_URL": "http://x/"}, False),
        (None, "foreground", True, {**DESK, "JPY_PARENT_PID": "12"}, False),
        (True, "foreground", True, {**DESK, "JUPYTER_SERVER_URL": "http://x/"}, True),
        (True, "foreground", True, FORWARDED, True),  # asked for: even over ssh's X11
        (True, "foreground", True, {}, False),  # nothing to open it on
        (True, "foreground", True, {"BROWSER": "/bin/true"}, True),
    ],
)
def test_when_the_browser_opens(flag, kind, site, env, opens):
    assert should_open(flag, kind, site, env)[0] is opens


def test_the_notification_goes_to_a_desktop_only(tmp_path, monkeypatch):
    said = tmp_path / "said"
    (tmp_path / "notify-send").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {said}\n')
    (tmp_path / "notify-send").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    assert not notify("Jupyter on a compute node", "job 5 started", FORWARDED)
    assert not notify("Jupyter on a compute node", "job 5 started", {})
    assert notify("Jupyter on a compute node", "job 5 started", DESK)
    deadline = time.monotonic() + 10
    while not said.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert said.read_text().splitlines()[1:] == ["Jupyter on a compute node", "job 5 started"]


# -- the command line, with a fake browser -------------------------------------------------------
@pytest.fixture
def fake(monkeypatch):
    cluster = FakeCluster(monkeypatch)
    yield cluster
    cluster.close()


@pytest.fixture
def desk(fake, monkeypatch) -> Path:
    """A desktop's environment (NX-like: a local display, reached over ssh) whose $BROWSER is
    the fake; returns where the fake browser writes what it saw."""
    record = fake.root / "browser.json"
    browser = fake.root / "fake-browser"
    browser.write_text(FAKE_BROWSER.format(python=sys.executable, record=str(record)))
    browser.chmod(0o755)
    for name in ("WAYLAND_DISPLAY", "SSH_CLIENT", "JUPYTER_SERVER_URL", "JPY_PARENT_PID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {**DESK, "BROWSER": str(browser)}.items():
        monkeypatch.setenv(name, value)
    return record


def seen(record: Path, timeout: float = 10) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while not record.exists():
        assert time.monotonic() < deadline, "the browser was never started"
        time.sleep(0.05)
    return json.loads(record.read_text())


def stop(fake: FakeCluster) -> SpunnelManager:
    m = SpunnelManager(config=fake.config())
    asyncio.run(m.stop_running())
    return m


def test_on_a_desktop_the_browser_opens_a_private_page_never_the_token(fake, desk, terminals):
    t = Terminal(fake, "-t", "10")
    terminals.append(t)
    url = t.wait_for(URL)[0]
    t.wait_for(OPENING)
    said = seen(desk)
    page = fake.state_dir / "open.html"
    assert said["page"] == str(page)
    assert said["argv"] == [page.as_uri()]  # the file's URL, nothing else
    assert said["mode"] == 0o600 and stat.S_IMODE(fake.state_dir.stat().st_mode) == 0o700
    assert said["url"] == url  # the page redirects to the session's URL, token and all
    assert said["holding_token"] == []  # no process had the token on its command line
    assert said["own_session"] and said["stdio"] == ["/dev/null"] * 3
    assert page.exists() and t.proc.poll() is None
    m = stop(fake)
    assert t.finish() == 0, t.output
    assert not page.exists()  # removed with the session
    fake.assert_clean(m)


@pytest.mark.parametrize(
    ("args", "env", "sections"),
    [
        (["--no-browser"], {}, {}),
        ([], FORWARDED, {}),  # ssh -X from a laptop: the laptop's browser is the place
        ([], {"JUPYTER_SERVER_URL": "http://127.0.0.1:8888/"}, {}),  # a JupyterLab terminal
        ([], {}, {"Desktop": {"open_browser": False}}),  # the site's default
    ],
    ids=["no-browser", "ssh-x11", "from-jupyterlab", "site-default"],
)
def test_nothing_opens(fake, desk, terminals, monkeypatch, args, env, sections):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    t = Terminal(fake, *args, "-t", "10", **sections)
    terminals.append(t)
    t.wait_for(URL)
    time.sleep(1.0)
    assert OPENING not in t.output
    assert not (fake.state_dir / "open.html").exists() and not desk.exists()
    m = stop(fake)
    assert t.finish() == 0, t.output
    fake.assert_clean(m)


def test_browser_overrides_the_site_default(fake, desk, terminals):
    t = Terminal(fake, "--browser", "-t", "10", Desktop={"open_browser": False})
    terminals.append(t)
    url = t.wait_for(URL)[0]
    assert seen(desk)["url"] == url
    m = stop(fake)
    assert t.finish() == 0, t.output
    fake.assert_clean(m)


@pytest.mark.parametrize(
    ("argv", "kind", "opens"),
    [
        ([], "foreground", True),
        (["--no-browser"], "foreground", False),
        # --detach: the supervisor runs with the same options, less --detach (background.py).
        (["--as-detached-supervisor"], "detached", False),
        (["--as-detached-supervisor", "--browser"], "detached", True),
    ],
)
def test_the_command_lines_choice_reaches_the_session(desk, argv, kind, opens):
    """The fakes have no sbatch: a detached session's browser is tests/e2e/test_desktop.py's."""
    args = parse([*argv, "-t", "10"])

    async def make() -> bool:
        return SessionDesktop(SpunnelManager(), args, kind, Console()).opens

    assert asyncio.run(make()) is opens


def test_a_session_the_rest_api_starts_opens_nothing(fake, desk):
    """The JupyterLab panel's sessions (the server extension's SpunnelManager.start) are seen in
    the browser that started them."""
    m = SpunnelManager(config=fake.config(SshTunnel={"mode": "forward"}))

    async def scenario() -> None:
        s = await m.start(m.request({"mem": "100"}, extra=[]), owner="extension")
        await until(lambda: s.phase.value in ("ready", "ended"), 10, "the session ready")
        assert s.phase.value == "ready", s.outcome
        await asyncio.sleep(1.0)
        assert not desk.exists() and not (fake.state_dir / "open.html").exists()
        await m.stop_running()

    asyncio.run(asyncio.wait_for(scenario(), 40))
    fake.assert_clean(m)


def test_a_leftover_page_is_removed_by_the_next_start(fake, desk, terminals):
    fake.state_dir.mkdir(mode=0o700, exist_ok=True)
    (fake.state_dir / "session.json").write_text("{}")  # a supervisor killed outright
    (fake.state_dir / "open.html").write_text("token=dead")
    t = Terminal(fake, "--no-browser", "-t", "10")
    terminals.append(t)
    t.wait_for(URL)
    assert not (fake.state_dir / "open.html").exists()
    m = stop(fake)
    assert t.finish() == 0, t.output
    fake.assert_clean(m)


# -- --hold ----------------------------------------------------------------------------------
def test_hold_keeps_the_window_open_after_a_failure_until_enter(fake, terminals):
    t = Terminal(fake, "--hold", "--mem", "lots")
    terminals.append(t)
    t.wait_for(r"error: invalid memory 'lots'")
    t.wait_for("press Enter to close this window")
    time.sleep(0.3)
    assert t.proc.poll() is None  # waiting for Enter
    t.type("\n")
    assert t.finish() == 2, t.output


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("argv", "code", "waits"),
    [
        (["--hold"], 2, True),
        (["--hold"], 0, False),  # ended normally
        (["--hold"], 130, False),  # Ctrl-C: the user ended it
        (["--hold"], 129, False),  # the window was closed
        ([], 5, False),
        (["--", "--hold"], 4, False),  # srun's --hold, not ours
    ],
)
def test_hold_only_after_a_failure(argv, code, waits):
    stdin = _Tty("\n")
    hold_on_failure(argv, code, stdin)
    assert (stdin.tell() == 1) is waits
