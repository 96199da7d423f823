"""The node channel: srun, the launcher it runs on the node, what they say and why srun ended.

srun's stdin is a pipe of ours that carries the settings (the token's only path to the node), then
commands; its stdout carries the launcher's events, its stderr Slurm's progress and Jupyter's
token-masked log. Everything heard becomes an event for the session (machine.py); when srun has
exited, ``why_ended`` works out what to tell the user.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import Callable
from typing import IO, Any

from . import process
from .backend import JobState
from .errors import JupyterError, SlurmLost, TunnelError
from .machine import Allocated, Event, FromNode, Outcome, Queued, SrunExited
from .protocol import EXITED, LauncherSettings, NodeEvent
from .settings import SessionSettings

# Why a job ended, as the user is told.
ENDINGS = {
    JobState.TIMEOUT: "reached its time limit",
    JobState.CANCELLED: "was cancelled (scancel or Slurm)",
    JobState.PREEMPTED: "was preempted",
    JobState.NODE_FAIL: "lost its node (NODE_FAIL)",
    JobState.OUT_OF_MEMORY: "ran out of memory",
    JobState.DEADLINE: "reached its deadline",
}

# Variables of the login-side Jupyter (or JupyterHub) that must not reach the job: credentials
# and per-server state. The user's own JUPYTER_PATH, JUPYTER_CONFIG_DIR, ... pass through.
_NOT_FOR_THE_JOB = ("JUPYTERHUB_", "JPY_", "JUPYTER_TOKEN", "JUPYTER_RUNTIME_DIR",
                    "JUPYTERLAB_WORKSPACES_DIR", "JUPYTER_SERVER_")  # fmt: skip

_QUEUED = re.compile(r"srun: job (\d+) queued and waiting for resources")
_ALLOCATED = re.compile(r"srun: job (\d+) has been allocated resources")
_SLURM_SAYS = re.compile(r"(srun|slurmstepd)(-[\w.-]+)?: ")


def _how(code: object) -> str:
    if isinstance(code, int) and code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def _crashed(code: object, node: str, ready: bool, where: str) -> JupyterError:
    """Jupyter ended on its own with ``code`` (negative: the signal that killed it)."""
    when = "" if ready else " before it was ready"
    remedy = where
    if code == -signal.SIGKILL:
        remedy = f"it may have run out of memory: ask for more with --mem; {where}"
    node = node or "the node"
    if isinstance(code, int) and code < 0:
        return JupyterError(f"Jupyter on {node} was {_how(code)}{when}", remedy)
    return JupyterError(f"Jupyter exited on {node} with code {code}{when}", remedy)


def job_environment() -> dict[str, str]:
    """The environment srun exports to the job: ours, less the login server's own state."""
    return {k: v for k, v in os.environ.items() if not k.startswith(_NOT_FOR_THE_JOB)}


class NodeChannel:
    """srun and the launcher behind it, owned by one session."""

    def __init__(
        self, settings: SessionSettings, log: IO[bytes], post: Callable[[Event], None]
    ) -> None:
        self.settings = settings
        self.log = log
        self.post = post
        self.srun: asyncio.subprocess.Process | None = None
        self.slurm_said: list[str] = []  # Slurm's own lines, for error messages
        self.node_exit: NodeEvent | None = None  # the launcher's last word, if it said one
        self._to_node: int | None = None
        self._tasks: list[asyncio.Future[Any]] = []

    async def start(self, options: list[str], tag: str, launcher: LauncherSettings) -> None:
        """Submit: srun with the settings already in its stdin pipe (a write can then never race
        an srun that refused the job and exited at once). Raises SlurmUnavailable."""
        command = list(self.settings.launcher_command) or [
            sys.executable, "-m", "spunnel_jupyter.launcher"
        ]  # fmt: skip
        stdin, self._to_node = os.pipe()
        try:
            os.write(self._to_node, launcher.line())
            # If we die, srun gets SIGUSR1 and forwards it to the launcher, which cleans up on the
            # node and exits, ending the job. (srun turns SIGTERM into SIGKILL for its tasks.)
            self.srun = await self.settings.slurm.start_step(
                options, tag, command, stdin=stdin, env=job_environment(),
                death_signal=signal.SIGUSR1,
            )  # fmt: skip
        except BaseException:
            self.close()
            raise
        finally:
            os.close(stdin)
        readers = [self._read_events(self.srun.stdout), self._read_stderr(self.srun.stderr)]
        self._tasks = [asyncio.ensure_future(r) for r in readers]
        self._tasks.append(asyncio.ensure_future(self._wait_exit(self.srun, self._tasks[:2])))

    def send(self, data: bytes) -> None:
        """A command to the launcher (srun gone: the session hears of it from srun's exit)."""
        if self._to_node is not None:
            with contextlib.suppress(BrokenPipeError):
                os.write(self._to_node, data)

    async def _wait_exit(
        self, srun: asyncio.subprocess.Process, readers: list[asyncio.Future[Any]]
    ) -> None:
        code = await srun.wait()
        await asyncio.wait(readers, timeout=1)  # srun's last words
        self.post(SrunExited(code))

    async def _read_events(self, stream: asyncio.StreamReader | None) -> None:
        """Events from the launcher on the node (srun relays its stdout)."""
        assert stream is not None
        async for raw in process.lines(stream):
            self.log.write(raw)
            event = NodeEvent.parse(raw.decode(errors="replace"))
            if event is not None:
                if event.kind == EXITED:
                    self.node_exit = event
                self.post(FromNode(event))

    async def _read_stderr(self, stream: asyncio.StreamReader | None) -> None:
        """srun's own messages (queue progress, errors) and Jupyter's log, masked on the node."""
        assert stream is not None
        async for raw in process.lines(stream):
            self.log.write(raw)
            line = raw.decode(errors="replace").strip()
            if m := _QUEUED.search(line):
                self.post(Queued(int(m.group(1))))
            elif m := _ALLOCATED.search(line):
                self.post(Allocated(int(m.group(1))))
            elif _SLURM_SAYS.match(line):
                self.slurm_said.append(line)

    async def why_ended(self, code: int, job_id: int | None, node: str, ready: bool) -> Outcome:
        """Why srun exited with ``code``: an Outcome, or the SpunnelError the user must see."""
        said = " ".join(self.slurm_said)
        exit_ = self.node_exit or NodeEvent(EXITED, {})
        reason, where = exit_.get("reason"), f"see {self.log.name}"
        slurm = self.settings.slurm
        if job_id is None and code != 0 and "Unable to allocate" in said:
            raise slurm.classify_error(said)
        if reason == "tunnel-error":
            raise TunnelError(str(exit_.get("message")), where)
        if reason == "version":
            raise JupyterError(
                str(exit_.get("message")),
                "install the same spunnel-jupyter version on this host and in the nodes' Python "
                "(c.SpunnelManager.launcher_command)",
            )
        if reason == "error":
            raise JupyterError(
                f"Jupyter failed on {node or 'the node'}: {exit_.get('message')}", where
            )
        if reason == "jupyter-exit":
            if exit_.get("code") == 0:
                return Outcome("Jupyter was shut down (from its own menu or API)")
            raise _crashed(exit_.get("code"), node, ready, where)
        if job_id is None:
            raise slurm.classify_error(said or f"srun exited with code {code}")
        state = (await slurm.job(job_id)).state
        if state not in ENDINGS:  # the controller may lag or be away; Slurm's last words tell
            if "DUE TO TIME LIMIT" in said:
                state = JobState.TIMEOUT
            elif "CANCELLED" in said or reason == "signal":
                state = JobState.CANCELLED
        if state in ENDINGS:
            return Outcome(f"job {job_id} {ENDINGS[state]}")
        if state.active:  # srun died (killed, crashed) while its job lives on: teardown ends it
            raise SlurmLost(
                f"srun ended ({_how(code)}) while job {job_id} still ran; the job is cancelled",
                f"start a new session; {where}",
            )
        return Outcome(f"job {job_id} ended ({state.value}; srun exit {code})")

    async def stop(self, grace: float) -> bool:
        """Ask the launcher to end (srun forwards SIGUSR1): Jupyter stops, the node is cleaned,
        the step and the job end without the extra second a cancelled running step costs. While
        the job pends, srun revokes it. True once srun has exited."""
        srun = self.srun
        if srun is None or srun.returncode is not None:
            return True
        srun.send_signal(signal.SIGUSR1)
        try:
            await asyncio.wait_for(srun.wait(), grace)
        except asyncio.TimeoutError:
            return False
        return True

    async def kill(self, grace: float) -> None:
        if self.srun is not None:
            await process.stop(self.srun, grace=grace, first=None)

    def pids(self) -> dict[str, Any]:
        if self.srun is None:
            return {}
        return {"srun_pid": self.srun.pid, "srun_start": process.start_time(self.srun.pid)}

    def close(self) -> None:
        """Close our end of srun's stdin and stop listening (idempotent)."""
        for task in self._tasks:
            task.cancel()
        if self._to_node is not None:
            os.close(self._to_node)
            self._to_node = None
