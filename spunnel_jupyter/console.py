"""What the user of ``spunnel-notebook`` sees: the progress line, the URL block, warnings, the
status, errors.

Progress and status go to stderr (one updating line on a terminal), the URL block to stdout.
Writes never fail: the terminal may be gone (SIGHUP, or a detached supervisor's).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from typing import TYPE_CHECKING, Any

from .errors import ExitCode, SpunnelError

if TYPE_CHECKING:
    from .manager import SpunnelManager
    from .session import Session

PROG = "spunnel-notebook"


class Console:
    """What the user sees. Progress and status go to stderr (one updating line on a terminal),
    the URL block to stdout. Writes never fail: the terminal may be gone (SIGHUP)."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.paused = False  # the terminal is --shell's: no progress line, lines end in \r\n
        self._last = ""
        self._partial = False

    def _write(self, stream: Any, text: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            stream.write(text)
            stream.flush()

    def progress(self, text: str) -> None:
        if text == self._last or self.paused:
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
        if self.paused:  # the shell's srun may have put the terminal in raw mode
            text = text.replace("\n", "\r\n") + "\r"
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
        what = "starting Jupyter" if session.req.jupyter else "building the tunnels"
        return f"{job} RUNNING on {session.node or '?'}, {what}"
    if session.phase is Phase.READY:
        left = time_left(session.end_time)
        remaining = f", {format_duration(left)} left" if left is not None else ""
        tunnel = ", tunnel reconnecting" if session.tunnel_state == "reconnecting" else ""
        ctrl_c = "Ctrl-C detaches" if session.kind == "attached" else "Ctrl-C to stop"
        return f"{job} on {session.node}{remaining}{tunnel} ({ctrl_c})"
    return f"{job} {session.phase.value}"


def time_left(end_time: float | None) -> float | None:
    return None if end_time is None else max(0.0, end_time - time.time())


def laptop(manager: SpunnelManager, ports: list[int]) -> str:
    """The laptop's ssh command that forwards ``ports`` to this host's same ports."""
    from .access import LaptopAccess, laptop_line

    forwards = [f"-L {p}:127.0.0.1:{p}" for p in ports]
    return laptop_line(manager.login_host, LaptopAccess(parent=manager).gateway, forwards)


def url_block(manager: SpunnelManager, node: str, job_id: object, url: str, port: int) -> str:
    ssh_line = laptop(manager, [port])
    return (
        f"{PROG}: Jupyter is running on {node} (job {job_id})\n\n"
        f"    {url}\n\n"
        f"  From a laptop: run  {ssh_line}\n"
        f"  there, then open the same URL."
    )


def tunnels_block(manager: SpunnelManager, session: Session) -> str:
    """What --no-jupyter prints instead of the URL: which login port goes to which node port."""
    node, pairs = session.node, session.req.tunnels
    lines = [f"    127.0.0.1:{p.local} -> port {p.remote} on {node}" for p in pairs]
    line = laptop(manager, [p.local for p in pairs])
    from_laptop = [f"  From a laptop: run  {line}"] if pairs else []
    return "\n".join([
        f"{PROG}: the tunnels to {node} are up (job {session.job_id}; no Jupyter)", "",
        *(lines or [f"    no --tunnel pairs (`{PROG} forward SP:EP` adds one)"]), "", *from_laptop,
        " ",  # what follows (AFTER_SHELL) on a line of its own, indented like the rest
    ])  # fmt: skip


AFTER_SHELL = "A shell on the node follows; exiting it ends the session."

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


def time_limit_warning(job_id: object, left: float) -> str:
    """The warning as the terminal shows it (the node's JupyterLab and the panel say the same)."""
    minutes = max(1, round(left / 60))
    unit = "minute" if minutes == 1 else "minutes"
    return (
        f"job {job_id} reaches its time limit in {minutes} {unit}: save your work (the session "
        "saves open notebooks before it ends)"
    )


def show_status(manager: SpunnelManager, as_json: bool, console: Console) -> int:
    """`status`: this host's session, and the user's detached sessions elsewhere."""
    from .backend import format_duration
    from .protocol import public_view

    record = manager.status()
    elsewhere, unknown = [], ""
    try:
        here = record.get("job_id") if record else None
        elsewhere = [j for j in asyncio.run(manager.detached()) if j.job_id != here]
    except SpunnelError as e:
        unknown = f"your detached sessions are unknown: {e}"
    if as_json:
        view = public_view(record) if record else None
        if elsewhere:
            view = {**(view or {}), "detached_elsewhere": [j.to_json() for j in elsewhere]}
        console.say(json.dumps(view, indent=1, sort_keys=True), sys.stdout)
        return ExitCode.OK if view else ExitCode.NO_SESSION
    others = [f"  {job.describe()}" for job in elsewhere] + ([f"  ({unknown})"] if unknown else [])
    if others:
        others.insert(0, f"detached sessions (`{PROG} attach JOBID`, `{PROG} stop JOBID`):")
    if record is None:
        console.say("\n".join([f"{PROG}: no session is running on this host", *others]))
        return ExitCode.OK if elsewhere else ExitCode.NO_SESSION
    left = ""
    if record.get("end_time"):
        left = f", {format_duration(record['end_time'] - time.time())} left"
    kind = "" if record.get("kind", "foreground") == "foreground" else f" {record['kind']}"
    lines = [
        f"session{kind} on {record.get('host')}: {record.get('phase')} "
        f"(started from {record.get('owner')}, supervisor pid {record.get('supervisor_pid')})",
        f"  job {record.get('job_id') or '?'} {record.get('job_state', '')} "
        f"on {record.get('node') or '?'}{left}",
    ]
    if record.get("reason"):
        lines.append(f"  pending reason: {record['reason']}")
    if record.get("url"):
        lines.append(f"  URL: {record['url']}")
    if record.get("tunnels"):
        lines.append(f"  extra tunnels: {', '.join(record['tunnels'])}")
    lines.append(f"  stop it with `{PROG} stop`")
    console.say("\n".join([*lines, *others]), sys.stdout)
    return ExitCode.OK
