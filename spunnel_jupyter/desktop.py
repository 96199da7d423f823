"""A word to the user's desktop, when the command runs inside one (NX, X2Go, VNC on the login
host): a notification through ``notify-send`` (libnotify), if it is installed. Never blocks and
never fails the session: a desktop that cannot be reached is simply not told."""

from __future__ import annotations

import os
import shutil
import subprocess


def notify(summary: str, body: str) -> bool:
    """Show a desktop notification; True if one was sent to a desktop."""
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
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
