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
from collections.abc import Callable
from typing import IO, Any

from . import probes, process
from .backend import JobState
from .errors import JupyterError, SlurmLost, SpunnelError, TunnelError
from .machine import Allocated, Event, FromNode, JobPolled, Outcome, Queued, SrunExited
from .protocol import EXITED, STARTED, TOKEN, LauncherSettings, NodeEvent
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
# Slurm's own lines on srun's stderr: "srun: ...", "slurmstepd: error: *** STEP ... ***" (22.05);
# 25.11 relays the step's with a timestamp instead: "[2026-12-03T20:11:47.651] error: *** STEP".
_SLURM_SAYS = re.compile(
    r"(srun|slurmstepd)(-[\w.-]+)?: |\[\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?\] \w+: "
)


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
        self.runtime_dir = ""  # the launcher's on the node (it said so when it started)
        self.lost = False  # srun ended while its job still ran: only scancel can end the job
        self._to_node: int | None = None
        self._tasks: list[asyncio.Future[Any]] = []
        self._pids: dict[str, Any] = {}

    async def start(self, options: list[str], tag: str, launcher: LauncherSettings) -> None:
        """Submit: srun with the settings already in its stdin pipe (a write can then never race
        an srun that refused the job and exited at once). Raises SlurmUnavailable."""
        command = list(self.settings.launcher_command)
        command = command or process.python_module("spunnel_jupyter.launcher")
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
        # For the record (a later start kills a leftover srun only if pid and start time match).
        self._pids = {"srun_pid": self.srun.pid, "srun_start": process.start_time(self.srun.pid)}
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
            event = NodeEvent.parse(raw.decode(errors="replace"))
            secret = event is not None and event.kind == TOKEN
            self.log.write(
                NodeEvent(TOKEN, {"token": "<token>"}).line().encode() if secret else raw
            )
            if event is not None:
                if event.kind == EXITED:
                    self.node_exit = event
                elif event.kind == STARTED:
                    self.runtime_dir = str(event.get("runtime_dir", ""))
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

    async def poll_job(self, job_id: Callable[[], int | None]) -> None:
        """Ask Slurm about the job (its pending reason, then its end time): every
        ``pending_poll_interval`` while it pends, every ``refresh_interval`` once it runs. srun
        itself reports the start."""
        s, running = self.settings, False
        while True:
            await asyncio.sleep(s.refresh_interval if running else s.pending_poll_interval)
            known = job_id()
            if known is not None:
                info = await s.slurm.job(known)
                running = info.state is not JobState.PENDING
                if info.state is not JobState.UNKNOWN:  # unreachable: not known to have ended
                    self.post(JobPolled(info))

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
        if reason == "idle":
            return Outcome(
                f"released after {exit_.get('minutes')} minutes with no busy kernel, terminal "
                "activity or open connection (--idle-timeout)",
                ends_job=True,
            )
        if reason == "jupyter-exit":
            if exit_.get("code") == 0:
                return Outcome("Jupyter was shut down (from its own menu or API)")
            raise _crashed(exit_.get("code"), node, ready, where)
        if job_id is None and code < 0:  # killed before Slurm named the job: nothing refused it
            raise SlurmLost(f"srun ended ({_how(code)}) before Slurm named the job", where)
        if job_id is None:
            raise slurm.classify_error(said or f"srun exited with code {code}")
        state = (await slurm.job(job_id)).state
        if state not in ENDINGS:  # the controller may lag or be away; Slurm's last words tell
            if "DUE TO TIME LIMIT" in said:
                state = JobState.TIMEOUT
            elif reason == "signal" and exit_.get("signal") == "SIGUSR1":  # a detached job's stop
                stopped = f"job {job_id} was stopped with `spunnel-notebook stop`"
                return Outcome(stopped, ends_job=True)
            elif "CANCELLED" in said or reason == "signal":
                state = JobState.CANCELLED
        if state in ENDINGS:
            return Outcome(f"job {job_id} {ENDINGS[state]}")
        if state.active:  # srun died (killed, crashed) while its job lives on: teardown ends it
            self.lost = True
            raise SlurmLost(
                f"srun ended ({_how(code)}) while job {job_id} still ran; the job is cancelled",
                f"start a new session; {where}",
            )
        if self.node_exit is None:  # the launcher always says why it ends, unless it was killed
            raise JupyterError(
                f"the launcher on {node or 'the node'} ended without a word (killed?), and "
                f"Jupyter with it; job {job_id} ended ({state.value})",
                where,
            )
        return Outcome(f"job {job_id} ended ({state.value}; srun exit {code})")

    async def stop(self, grace: float) -> bool:
        """Ask the launcher to end (srun forwards SIGUSR1): Jupyter stops, the node is cleaned,
        the step and the job end without the extra second a cancelled running step costs. While
        the job pends, srun revokes it. True once srun has exited.

        Sent again every 0.25 s: srun drops one that comes between the allocation and the
        launch of the step (a stop racing the start), and the launcher would run on."""
        srun = self.srun
        if srun is None or srun.returncode is not None:
            return True
        deadline = asyncio.get_running_loop().time() + grace
        while True:
            with contextlib.suppress(ProcessLookupError):
                srun.send_signal(signal.SIGUSR1)
            left = deadline - asyncio.get_running_loop().time()
            try:
                await asyncio.wait_for(srun.wait(), min(0.25, max(left, 0)))
                return True
            except asyncio.TimeoutError:
                if left <= 0.25:
                    return False

    async def end_step(self, job_id: int | None) -> None:
        """End srun and the step: SIGUSR1 (``stop``), else cancel and kill srun."""
        slurm, s = self.settings.slurm, self.settings
        if self.lost and job_id is not None:  # srun is gone: nothing else will end the job
            with contextlib.suppress(SpunnelError, asyncio.TimeoutError):
                await asyncio.wait_for(slurm.cancel(job_id), s.stop_timeout)
        if not await self.stop(grace=s.save_grace + s.jupyter_stop_grace + 1.0):
            if job_id is not None:
                with contextlib.suppress(SpunnelError, asyncio.TimeoutError):
                    await asyncio.wait_for(slurm.cancel(job_id), s.stop_timeout)
            if self.srun is not None:
                await process.stop(self.srun, grace=s.stop_timeout, first=None)

    async def detach(self) -> None:
        """Leave the job running: detached sessions only (batch.py); srun's job ends with it."""
        raise NotImplementedError

    async def abort(self, tag: str) -> None:
        """Undo a submission interrupted before the session began (Ctrl-C while starting)."""
        if self.srun is not None:
            with contextlib.suppress(Exception):
                await self.end_step(None)
                await asyncio.wait_for(self.end_job(None, tag), self.settings.stop_timeout + 1.0)

    async def end_job(self, job_id: int | None, tag: str) -> int | None:
        """Make sure the job left the queue (finding it by ``tag`` if srun never named it);
        return its id. Raises SpunnelError if Slurm does not confirm it."""
        slurm = self.settings.slurm
        if job_id is None:  # srun may have been granted a job it never named
            for found, job_tag, _ in await slurm.my_jobs():
                if job_tag == tag:
                    job_id = found
                    await slurm.cancel(found)
        if job_id is None:
            return None
        known_id = job_id

        async def gone() -> bool:
            return not await slurm.in_queue(known_id)

        # scontrol answers in ~5 ms: poll tightly, the user is waiting (bounded by the caller)
        if not await probes.wait_until(
            gone, timeout=self.settings.stop_timeout, first=0.02, cap=0.05
        ):
            await slurm.cancel(job_id)
            if not await gone():
                raise SpunnelError(f"job {job_id} is still in the queue after teardown")
        return job_id

    def pids(self) -> dict[str, Any]:
        return self._pids

    def close(self) -> None:
        """Close our end of srun's stdin and stop listening (idempotent)."""
        for task in self._tasks:
            task.cancel()
        if self._to_node is not None:
            os.close(self._to_node)
            self._to_node = None
