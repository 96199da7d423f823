"""What the user of ``spunnel-notebook`` sees: the progress line, the URL block, errors.

Progress and status go to stderr (one updating line on a terminal), the URL block to stdout.
Writes never fail: the terminal may be gone (SIGHUP, or a detached supervisor's).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import TYPE_CHECKING, Any

from .errors import SpunnelError

if TYPE_CHECKING:
    from .manager import SpunnelManager
    from .session import Session

PROG = "spunnel-notebook"


class Console:
    """What the user sees. Progress and status go to stderr (one updating line on a terminal),
    the URL block to stdout. Writes never fail: the terminal may be gone (SIGHUP)."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self._last = ""
        self._partial = False

    def _write(self, stream: Any, text: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            stream.write(text)
            stream.flush()

    def progress(self, text: str) -> None:
        if text == self._last:
            return
        self._last = text
        if self.tty:
            self._write(sys.stderr, f"\r\x1b[K{PROG}: {text}")
            self._partial = True
        else:
            self._write(sys.stderr, f"{PROG}: {text}\n")

    def say(self, text: str, stream: Any = None) -> None:
        if self._partial:
            self._write(sys.stderr, "\r\x1b[K")
            self._partial = False
            self._last = ""
        self._write(stream or sys.stderr, text + "\n")

    def error(self, err: SpunnelError) -> None:
        self.say(f"{PROG}: error: {err.message}" + (f" ({err.remedy})" if err.remedy else ""))


def describe(session: Session) -> str:
    from .backend import format_duration
    from .machine import Phase

    if session.job_id is None:
        return "submitting the job"
    job = f"job {session.job_id}"
    if session.phase is Phase.PENDING and session.kind == "attached":
        return f"attaching to {job}"
    if session.phase is Phase.PENDING:
        waited = format_duration(time.time() - session.times["submitted"])
        reason = f" ({session.reason})" if session.reason else ""
        expected = ""
        if session.expected_start and session.expected_start > time.time():
            at = time.strftime("%H:%M", time.localtime(session.expected_start))
            expected = f", expected to start at {at}"
        return f"{job} {session.job_state.value}{reason}, waiting {waited}{expected}"
    if session.phase is Phase.STARTING:
        return f"{job} RUNNING on {session.node or '?'}, starting Jupyter"
    if session.phase is Phase.READY:
        left = session.time_left
        remaining = f", {format_duration(left)} left" if left is not None else ""
        tunnel = ", tunnel reconnecting" if session.tunnel_state == "reconnecting" else ""
        ctrl_c = "Ctrl-C detaches" if session.kind == "attached" else "Ctrl-C to stop"
        return f"{job} on {session.node}{remaining}{tunnel} ({ctrl_c})"
    return f"{job} {session.phase.value}"


def url_block(manager: SpunnelManager, node: str, job_id: object, url: str, port: int) -> str:
    ssh_line = (
        f"ssh -N -L {port}:127.0.0.1:{port} {os.environ.get('USER', '')}@{manager.login_host}"
    )
    return (
        f"{PROG}: Jupyter is running on {node} (job {job_id})\n\n"
        f"    {url}\n\n"
        f"  From a laptop: run  {ssh_line}\n"
        f"  there, then open the same URL."
    )


AFTER_URL = {
    "foreground": f"Stop with Ctrl-C or `{PROG} stop`.",
    "detached": f"Detached: it runs on without this terminal; `{PROG} attach` follows it (from "
    f"any login host), `{PROG} stop` ends it.",
    "attached": f"Ctrl-C detaches (the session runs on); `{PROG} stop` ends it.",
}


STARTED_AFTER = 10.0  # seconds in the queue after which the start is worth a bell


def started_after_waiting(session: Session) -> str:
    """ "job N started on NODE after M:SS in the queue", if it waited long enough to be told."""
    from .backend import format_duration

    waited = session.times.get("running", 0.0) - session.times["submitted"]
    if waited <= STARTED_AFTER:
        return ""
    return f"job {session.job_id} started after {format_duration(waited)} in the queue"
