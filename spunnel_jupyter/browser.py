"""The session's URL opened in a browser on the desktop, without the token on any command line.

A browser's command line is readable by every user of the host (/proc/PID/cmdline), so the
tokened URL is never handed to one. As ``jupyter lab`` does with its ``jpserver-PID-open.html``,
a small redirect page holding the URL is written into the user's private state directory (0700,
state.py), itself 0600, and the browser is given ``file://.../open.html``. The page is replaced
by each session and removed when the session ends (``remove_page``; a supervisor killed outright
leaves it to the next start's clean-up, with a token that no longer opens anything).

Which browser: ``c.Desktop.browser`` if the site set one (as ``webbrowser.get`` takes it:
a name like ``firefox``, or a command with ``%s``), else ``$BROWSER``, else the desktop's default
(``xdg-settings``, then the browsers Python's ``webbrowser`` knows), never a text-mode one (it
would have no terminal). It is started without a shell, in a session of its own (Ctrl-C of this
terminal does not close it), with nothing of ours on its stdin, stdout or stderr.
"""

from __future__ import annotations

import contextlib
import html
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .state import PAGE

TEXT_MODE = frozenset({"www-browser", "links", "elinks", "lynx", "w3m", "browsh"})

_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<!-- Written by spunnel-notebook for the browser it opened: the URL's token is never put on a
     command line. Removed when the session ends. -->
<meta http-equiv="refresh" content="0;url={url}">
<title>Opening Jupyter on {node}</title>
</head>
<body>
<p>Opening Jupyter on {node}. If nothing happens, <a href="{url}">click here</a>.</p>
</body>
</html>
"""


def write_page(state_dir: Path, url: str, node: str) -> Path:
    """The redirect page to ``url``, 0600, replaced atomically in the state directory."""
    fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=".open.", suffix=".tmp")  # 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(_TEMPLATE.format(url=html.escape(url), node=html.escape(node or "the node")))
        os.replace(tmp, state_dir / PAGE)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return state_dir / PAGE


def remove_page(state_dir: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(state_dir / PAGE)


def open_in_browser(page: Path, name: str, report: Callable[[str], None]) -> threading.Thread:
    """Open ``file://page`` in the browser ``name`` (empty: $BROWSER or the desktop's default), in
    a thread: finding the browser may run ``xdg-settings``, and a browser named by $BROWSER is
    waited for (reaped) until it exits. ``report`` gets one line (from the thread) if it failed."""
    thread = threading.Thread(
        target=_open, args=(page.as_uri(), name, report), name="browser", daemon=True
    )
    thread.start()
    return thread


def _open(url: str, name: str, report: Callable[[str], None]) -> None:
    import webbrowser

    try:
        browser = webbrowser.get(name or None)
    except webbrowser.Error as e:
        report(f"found no web browser to open it in ({e}); open the URL yourself")
        return
    program = getattr(browser, "name", "") or ""
    if not name and os.path.basename(program) in TEXT_MODE:
        report(f"found only the text-mode browser {program}; open the URL yourself")
        return
    try:
        if isinstance(browser, webbrowser.GenericBrowser):  # $BROWSER, a command, xdg-open, ...
            argv = [program, *(arg.replace("%s", url) for arg in browser.args)]
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True,
            )  # fmt: skip
            began = time.monotonic()
            code = proc.wait()  # a browser that stays (chromium itself): reaped when it ends
            if code and time.monotonic() - began < 10:  # a failure, not the user closing it
                report(f"{os.path.basename(program)} exited with {code}; open the URL yourself")
        elif not browser.open(url, new=2):  # a known browser: webbrowser starts it, detached
            report(f"{program or 'the browser'} did not start; open the URL yourself")
    except OSError as e:
        report(f"could not start {program or 'a browser'} ({e.strerror}); open the URL yourself")
