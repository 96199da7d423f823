"""The user's desktop, when the command runs inside one (NX, X2Go, a VNC desktop on the login
host): the URL opened in the desktop's browser once it answers (browser.py, as ``jupyter lab``
does on a workstation), and a notification (``notify-send``) when a job that waited starts.
Neither blocks nor fails the session: a desktop that cannot be reached is simply not told.

What counts as a desktop (``desktop_display``): $WAYLAND_DISPLAY set, or $DISPLAY set and not an
X11 display that ssh forwards from a laptop. sshd's X11 forwarding sets DISPLAY=localhost:N (or
HOST:N with X11UseLocalhost=no), N >= 10 (X11DisplayOffset), in a session with $SSH_CONNECTION or
$SSH_CLIENT: a browser started there would be drawn on the laptop through the ssh connection,
where the laptop's own browser is the better place for the URL. A local display (``:N``,
``unix:N``) is this host's own X server, which NX, X2Go, VNC and Xpra desktops are: a desktop
even with the ssh variables set (X2Go runs its sessions through ssh). A display named by host with
N < 10, or without the ssh variables, counts as a desktop too.

When the browser opens (``should_open``): with ``--browser``, always (given a display or
$BROWSER); otherwise never with ``--no-browser``, for a detached session or an attach, for a
command run from inside Jupyter (a JupyterLab terminal or a notebook's ``!``: the user already
has a browser), or with ``c.Desktop.open_browser = False``; else on a desktop as above.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from traitlets import Bool, Unicode
from traitlets.config import Configurable

from .browser import open_in_browser, remove_page, write_page
from .console import PROG, Console
from .errors import ExitCode

if TYPE_CHECKING:
    from pathlib import Path

    from .manager import SpunnelManager
    from .session import Session

X11_FORWARD_OFFSET = 10  # sshd's default X11DisplayOffset: forwarded displays start at :10
_DISPLAY = re.compile(r"(?P<host>[^:]*):(?P<number>\d+)(\.\d+)?")
FROM_JUPYTER = ("JUPYTER_SERVER_URL", "JPY_PARENT_PID")  # a JupyterLab terminal, a kernel


class Desktop(Configurable):
    """The site's defaults for desktop sessions (NX, X2Go, VNC on the login host)."""

    open_browser = Bool(
        True,
        config=True,
        help="""Open the URL in the desktop's browser once it answers, when spunnel-notebook runs
        in a graphical session on this host (not over ssh's X11 forwarding), as `jupyter lab`
        does. --browser / --no-browser override it.""",
    )
    browser = Unicode(
        "",
        config=True,
        help="""The browser to open, as Python's webbrowser.get() takes it: a name ('firefox') or
        a command with %s for the URL ('chromium --new-window %s'). Empty: $BROWSER, else the
        desktop's default browser.""",
    )


def desktop_display(env: Mapping[str, str]) -> tuple[bool, str]:
    """Whether ``env`` is a graphical session on this host, and why (see the module's doc)."""
    if env.get("WAYLAND_DISPLAY"):
        return True, f"a Wayland desktop (WAYLAND_DISPLAY={env['WAYLAND_DISPLAY']})"
    display = env.get("DISPLAY", "")
    if not display:
        return False, "no display (DISPLAY and WAYLAND_DISPLAY are unset)"
    m = _DISPLAY.fullmatch(display)
    if m is None:
        return False, f"DISPLAY={display} is not an X11 display"
    host, number = m["host"], int(m["number"])
    over_ssh = bool(env.get("SSH_CONNECTION") or env.get("SSH_CLIENT"))
    if host not in ("", "unix") and number >= X11_FORWARD_OFFSET and over_ssh:
        return False, f"DISPLAY={display} is X11 forwarded by ssh (from the laptop)"
    return True, f"a desktop on DISPLAY={display}"


def should_open(
    flag: bool | None, kind: str, site_default: bool, env: Mapping[str, str]
) -> tuple[bool, str]:
    """Open the browser? ``flag``: --browser (True), --no-browser (False) or neither (None);
    ``kind``: the session's (foreground, detached, attached). With why, for --debug."""
    if flag is False:
        return False, "--no-browser"
    if flag:
        some = bool(env.get("DISPLAY") or env.get("WAYLAND_DISPLAY") or env.get("BROWSER"))
        return some, "--browser" if some else "--browser, but no display and no $BROWSER"
    if kind != "foreground":
        return False, f"a {kind} session (--browser opens it)"
    inside = [name for name in FROM_JUPYTER if env.get(name)]
    if inside:
        return False, f"run from inside Jupyter (${inside[0]}; --browser opens it)"
    if not site_default:
        return False, "c.Desktop.open_browser is False (--browser opens it)"
    return desktop_display(env)


def add_arguments(group: argparse._ArgumentGroup) -> None:
    """--browser / --no-browser, and --hold (the desktop entry's)."""
    choice = group.add_mutually_exclusive_group()
    choice.add_argument(
        "--browser", dest="browser", action="store_true", default=None,
        help="open the URL in this desktop's browser once it answers (the default in a "
        "graphical session on this host, NX/X2Go/VNC; site default c.Desktop.open_browser)",
    )  # fmt: skip
    choice.add_argument("--no-browser", dest="browser", action="store_false",
                        help="do not open a browser")  # fmt: skip
    group.add_argument(
        "--hold", action="store_true",
        help="after a failure, keep this terminal open until Enter (for the desktop entry's "
        "window, which closes when the command ends)",
    )  # fmt: skip


class SessionDesktop:
    """One session's dealings with the desktop, for the command line's ``run_session``:
    ``started`` (the notification), ``ready`` (the browser), ``ended`` (the page removed)."""

    def __init__(self, manager: SpunnelManager, args: argparse.Namespace, kind: str,
                 console: Console) -> None:  # fmt: skip
        self.settings = Desktop(parent=manager)
        self.console, self.log = console, manager.log
        flag = getattr(args, "browser", None)
        self.opens, why = should_open(flag, kind, self.settings.open_browser, os.environ)
        self.log.debug("%s the browser: %s", "opening" if self.opens else "not opening", why)
        self.loop = asyncio.get_running_loop()
        self.state_dir: Path | None = None

    def started(self, text: str) -> None:
        notify("Jupyter on a compute node", f"{text}; Jupyter is starting")

    def ready(self, session: Session) -> None:
        if not self.opens or not session.url or self.state_dir is not None:
            return
        self.state_dir = session.state.path
        try:
            page = write_page(self.state_dir, session.url, session.node or "")
        except OSError as e:
            self.console.say(f"{PROG}: could not write the browser's page ({e.strerror})")
            return
        self.console.say(f"{PROG}: opening it in this desktop's browser (--no-browser: not)")
        open_in_browser(page, self.settings.browser, self._report)

    def ended(self) -> None:
        if self.state_dir is not None:
            remove_page(self.state_dir)

    def _report(self, text: str) -> None:  # from the browser's thread
        with contextlib.suppress(RuntimeError):  # the loop is closed: the session is over
            self.loop.call_soon_threadsafe(self.console.say, f"{PROG}: {text}")


def notify(summary: str, body: str, env: Mapping[str, str] | None = None) -> bool:
    """Show a desktop notification; True if one was sent to a desktop."""
    if not desktop_display(os.environ if env is None else env)[0]:
        return False
    program = shutil.which("notify-send")
    if program is None:
        return False
    try:
        subprocess.Popen(
            [program, "--app-name=spunnel-notebook", summary, body],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
    except OSError:
        return False
    return True


def hold_on_failure(argv: list[str], code: int, stdin: Any = None) -> None:
    """``--hold``: after a failure (not a stop, Ctrl-C or a closed window), wait for Enter so
    that the desktop entry's terminal window stays open for the error to be read."""
    ours = argv[: argv.index("--")] if "--" in argv else argv
    stdin = sys.stdin if stdin is None else stdin
    if "--hold" not in ours or code in (ExitCode.OK, ExitCode.SIGHUP, ExitCode.SIGINT,
                                        ExitCode.SIGTERM):  # fmt: skip
        return
    with contextlib.suppress(OSError, ValueError, EOFError, KeyboardInterrupt):
        if stdin.isatty():
            sys.stderr.write(f"{PROG}: press Enter to close this window. ")
            sys.stderr.flush()
            stdin.readline()
