"""Desktop sessions (NX, X2Go, a VNC desktop on the login host), on the real cluster: a desktop
made of Xvfb on a free display, a D-Bus session bus of alice's with a notification daemon (dunst)
and a monitor of the Notifications interface, and $BROWSER a wrapper around Debian's chromium
(browser.py's arguments, a profile in alice's home, a DevTools port to ask what its tabs show).

Shown: the URL opens in chromium once it answers, through the 0600 redirect page in the state
directory (chromium's command line holds the page's file:// URL; no process has the token on its
command line) and the tab is JupyterLab, served from c1 through the tunnel; the page is gone with
the session. With ssh's forwarded X11 (DISPLAY=localhost:10.0 and SSH_CONNECTION), with
--no-browser, or detached, nothing opens; a detached session opens it with --browser. The
installed desktop entry passes desktop-file-validate, and its Exec starts a session on a terminal
(closing the terminal ends it; --hold keeps the terminal for an error). The start notification of
a job that waited reaches the desktop's notification daemon. Screenshots of the display are saved
to the artifacts directory. Nothing here skips: a missing tool fails the test.
"""

from __future__ import annotations

import configparser
import contextlib
import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import websocket  # websocket-client

from .browser import CHROMIUM_ARGS, VENV, chromium_path, free_port
from .cluster import PROG, as_user, procs_of, start, state_dir, uid, user_env, wait_clean

USER = "alice"
ENTRY = VENV / "share" / "applications" / "spunnel-notebook.desktop"
ICONS = VENV / "share" / "icons" / "hicolor" / "scalable" / "apps"
NX_SSH = "10.200.0.9 50022 10.200.0.1 22"  # NX and X2Go sessions run through ssh
OPENING = "opening it in this desktop's browser"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: tests/cluster/up.sh installs it", pytrace=False)
    return path


@dataclass
class Desktop:
    """Xvfb, alice's D-Bus session with dunst and a monitor, and the browser wrapper."""

    display: str
    bus: str
    scratch: Path  # readable by alice: the wrapper, the monitor's log
    profile: Path  # chromium's user data directory, in alice's home
    devtools: int  # chromium's DevTools port
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def browser(self) -> Path:
        return self.scratch / "desktop-browser"

    @property
    def notifications(self) -> Path:
        return self.scratch / "notifications.log"

    def env(self, **extra: str) -> dict[str, str]:
        """What a terminal of this desktop has (start() adds HOME, PATH, ...)."""
        return {"DISPLAY": self.display, "DBUS_SESSION_BUS_ADDRESS": self.bus,
                "BROWSER": str(self.browser), **extra}  # fmt: skip

    def screenshot(self, path: Path) -> None:
        subprocess.run([tool("import"), "-display", self.display, "-window", "root", str(path)],
                       check=True, timeout=30)  # fmt: skip

    def tabs(self) -> list[dict]:
        """Chromium's open pages (DevTools' /json/list): url and title of each."""
        listing = f"http://127.0.0.1:{self.devtools}/json/list"
        try:
            with urllib.request.urlopen(listing, timeout=5) as r:
                return [t for t in json.load(r) if t.get("type") == "page"]
        except OSError:
            return []

    def chromium(self) -> list[tuple[int, str]]:
        """alice's chromium processes: (pid, command line)."""
        return [(pid, cmd) for pid, cmd in procs_of(USER) if "chromium" in cmd]

    def close_browser(self) -> None:
        """End the chromium this test's session started (by its processes' ids)."""
        for pid, _cmd in self.chromium():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while self.chromium() and time.monotonic() < deadline:
            time.sleep(0.1)


def as_alice(argv: list[str], env: dict[str, str], **kw) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, user=USER, group=USER, extra_groups=[], cwd=f"/home/{USER}",
                            env=user_env(USER, **env), start_new_session=True, **kw)  # fmt: skip


@pytest.fixture
def desktop(artifacts: Path) -> Iterator[Desktop]:
    chromium = chromium_path()
    # Xvfb picks a free display itself and says which (-displayfd).
    read_end, write_end = os.pipe()
    xvfb = subprocess.Popen(
        [tool("Xvfb"), "-displayfd", str(write_end), "-screen", "0", "1280x900x24",
         "-nolisten", "tcp", "-ac"],
        pass_fds=(write_end,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    os.close(write_end)
    with os.fdopen(read_end) as f:
        number = f.readline().strip()
    scratch = Path(tempfile.mkdtemp(prefix="desktop-", dir="/tmp"))
    scratch.chmod(0o777)
    profile = Path(f"/home/{USER}/.desktop-test-chromium")
    procs: list[subprocess.Popen[bytes]] = [xvfb]
    try:
        assert number.isdigit(), f"Xvfb gave no display ({number!r})"
        bus_daemon = as_alice([tool("dbus-daemon"), "--session", "--nofork", "--print-address=1"],
                              {}, stdout=subprocess.PIPE)  # fmt: skip
        procs.append(bus_daemon)
        assert bus_daemon.stdout is not None
        bus = bus_daemon.stdout.readline().decode().strip()
        assert bus.startswith("unix:"), bus
        desk = Desktop(f":{number}", bus, scratch, profile, free_port(), procs)
        args = " ".join(shlex.quote(a) for a in CHROMIUM_ARGS)
        desk.browser.write_text(
            f"#!/bin/sh\nexec {chromium} {args} --user-data-dir={profile} "
            f"--remote-debugging-port={desk.devtools} --window-size=1280,900 "
            '--window-position=0,0 "$@"\n'
        )
        desk.browser.chmod(0o755)
        env = desk.env()
        with open(desk.notifications, "wb") as log:
            procs.append(as_alice(
                [tool("dbus-monitor"), "--session", "interface='org.freedesktop.Notifications'"],
                env, stdout=log, stderr=subprocess.STDOUT,
            ))  # fmt: skip
        procs.append(as_alice([tool("dunst")], env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL))  # fmt: skip
        time.sleep(1)  # the monitor and the daemon on the bus
        yield desk
    finally:
        with contextlib.suppress(NameError):
            desk.close_browser()
        for proc in reversed(procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        with contextlib.suppress(OSError):
            shutil.copy(scratch / "notifications.log", artifacts / "desktop-notifications.log")
        subprocess.run(["rm", "-rf", str(scratch), str(profile)], check=False)


def page() -> Path:
    return state_dir(USER) / "open.html"


def everyones_command_lines() -> list[str]:
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError), open(f"/proc/{entry}/cmdline", "rb") as f:
            found.append(f.read().replace(b"\0", b" ").decode(errors="replace"))
    return found


def wait_for_lab(desk: Desktop, port: int, timeout: float = 90) -> dict:
    """The chromium tab showing JupyterLab from 127.0.0.1:port (the session's tunnel), once its
    launcher is drawn (asked through DevTools: the page's title comes long before)."""
    deadline = time.monotonic() + timeout
    while True:
        for tab in desk.tabs():
            if tab["url"].startswith(f"http://127.0.0.1:{port}/lab") and drawn(tab):
                return tab
        assert time.monotonic() < deadline, f"no JupyterLab tab: {desk.tabs()}"
        time.sleep(0.5)


def drawn(tab: dict) -> bool:
    """JupyterLab's launcher cards are on the page (DevTools' Runtime.evaluate)."""
    expression = "document.querySelectorAll('.jp-LauncherCard').length > 0"
    try:
        ws = websocket.create_connection(tab["webSocketDebuggerUrl"], timeout=10)
    except (OSError, websocket.WebSocketException):
        return False
    try:
        params = {"expression": expression, "returnByValue": True}
        ws.send(json.dumps({"id": 1, "method": "Runtime.evaluate", "params": params}))
        while (answer := json.loads(ws.recv())).get("id") != 1:
            pass
        return answer.get("result", {}).get("result", {}).get("value") is True
    except (OSError, websocket.WebSocketException, ValueError):
        return False
    finally:
        ws.close()


def assert_opened_without_the_token(desk: Desktop, token: str) -> None:
    mains = [cmd for _pid, cmd in desk.chromium() if page().as_uri() in cmd]
    assert mains, f"no chromium with {page().as_uri()} on its command line: {desk.chromium()}"
    assert not [cmd for cmd in everyones_command_lines() if token in cmd]


def test_on_a_desktop_the_url_opens_in_chromium_through_a_private_page(desktop, artifacts):
    # A local display with the ssh variables set: an NX or X2Go session, a desktop.
    s = start(USER, "-t", "10", tty=True, **desktop.env(SSH_CONNECTION=NX_SSH))
    try:
        s.wait_ready()
        assert f"Jupyter is running on c1 (job {s.job_id})" in s.output
        s.wait_for(OPENING, 10)
        st = page().stat()
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == uid(USER)
        assert s.url in page().read_text().replace("&amp;", "&")
        tab = wait_for_lab(desktop, s.port)
        assert tab["url"].startswith(s.url.split("?")[0])
        desktop.screenshot(artifacts / "desktop-browser.png")
        assert_opened_without_the_token(desktop, s.token)
        s.signal(signal.SIGINT)
        assert s.finish() == 130, s.output
        assert not page().exists()  # removed with the session
    finally:
        s.close()
        desktop.close_browser()  # its command line names the page (spunnel-jupyter-UID)
    _took, left = wait_clean(USER, timeout=15)
    assert not left, left


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["--no-browser"], {}),
        ([], {"DISPLAY": "localhost:10.0", "SSH_CONNECTION": NX_SSH}),  # ssh -X from a laptop
    ],
    ids=["no-browser", "ssh-x11-forwarding"],
)
def test_nothing_opens(desktop, args, env):
    s = start(USER, *args, "-t", "10", **{**desktop.env(), **env})
    try:
        s.wait_ready()
        time.sleep(3)
        assert OPENING not in s.output
        assert not page().exists() and not desktop.chromium()
        s.signal(signal.SIGINT)
        assert s.finish() == 130, s.output
    finally:
        s.close()
    _took, left = wait_clean(USER, timeout=15)
    assert not left, left


def test_a_detached_session_opens_only_with_browser(desktop, artifacts):
    s = start(USER, "--detach", "-t", "10", **desktop.env())
    try:
        assert s.finish(120) == 0, s.output
        time.sleep(3)
        assert not page().exists() and not desktop.chromium()
        assert as_user(USER, [PROG, "stop"]).returncode == 0
    finally:
        s.close()
    _took, left = wait_clean(USER, timeout=15)
    assert not left, left
    # --browser: the supervisor, in the background, opens it, and removes the page at the end.
    s = start(USER, "--detach", "--browser", "-t", "10", **desktop.env())
    try:
        assert s.finish(120) == 0, s.output
        s.wait_ready(1)
        wait_for_lab(desktop, s.port)
        desktop.screenshot(artifacts / "desktop-browser-detached.png")
        assert_opened_without_the_token(desktop, s.token)
        stopped = as_user(USER, [PROG, "stop"])
        assert stopped.returncode == 0, stopped
        deadline = time.monotonic() + 15
        while page().exists():
            assert time.monotonic() < deadline, "the page outlived the session"
            time.sleep(0.1)
    finally:
        s.close()
        desktop.close_browser()
    _took, left = wait_clean(USER, timeout=15)
    assert not left, left


def entry() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read(ENTRY)
    return parser["Desktop Entry"]


def test_the_desktop_entry_validates_and_starts_a_session_on_a_terminal(desktop):
    checked = subprocess.run([tool("desktop-file-validate"), str(ENTRY)],
                             capture_output=True, text=True, timeout=30)  # fmt: skip
    assert checked.returncode == 0 and not checked.stdout.strip(), checked
    e = entry()
    assert e["Type"] == "Application" and e["Name"] == "Jupyter on a compute node"
    assert e["Terminal"] == "true"
    assert (ICONS / f"{e['Icon']}.svg").is_file()
    argv = shlex.split(e["Exec"])
    assert argv[0] == PROG and not [a for a in argv if a.startswith("%")]
    # What the desktop does with it: the command on a terminal of the desktop's.
    s = start(USER, *argv[1:], "-t", "10", tty=True, **desktop.env())
    try:
        s.wait_ready()
        wait_for_lab(desktop, s.port)
        s.close_terminal()  # the window closed: the session ends
        assert s.finish() == 129, s.output
    finally:
        s.close()
        desktop.close_browser()
    _took, left = wait_clean(USER, timeout=15)
    assert not left, left
    # An error stays on the window (--hold) until Enter.
    s = start(USER, *argv[1:], "--mem", "lots", tty=True, **desktop.env())
    try:
        s.wait_for(r"error: invalid memory 'lots'", 30)
        s.wait_for(r"press Enter to close this window", 10)
        time.sleep(0.5)
        assert s.proc.poll() is None
        assert s.master_fd is not None
        os.write(s.master_fd, b"\n")
        assert s.finish() == 2, s.output
    finally:
        s.close()


def test_the_start_notification_reaches_the_desktop(desktop, node_full, artifacts):
    s = start(USER, "--no-browser", "--mem", "1000", "-t", "10", tty=True, **desktop.env())
    try:
        s.wait_for(r"job \d+ PENDING \(Resources\), waiting 0:00:1[1-9]", timeout=60)
        subprocess.run(["scancel", node_full], check=True)
        started = s.wait_for(r"\x07spunnel-notebook: (job \d+ started after 0:0\d:\d\d in the "
                             r"queue)", 60)  # fmt: skip
        s.wait_ready()
        deadline = time.monotonic() + 15
        while "member=Notify" not in desktop.notifications.read_text(errors="replace"):
            assert time.monotonic() < deadline, desktop.notifications.read_text()
            time.sleep(0.2)
        desktop.screenshot(artifacts / "desktop-notification.png")
        said = desktop.notifications.read_text(errors="replace")
        call = said[said.index("member=Notify") :]
        assert 'string "spunnel-notebook"' in call
        assert 'string "Jupyter on a compute node"' in call
        assert f'string "{started[1]}; Jupyter is starting"' in call
        s.signal(signal.SIGINT)
        assert s.finish() == 130, s.output
    finally:
        s.close()
    _took, left = wait_clean(USER, timeout=15)
    assert not left, left
