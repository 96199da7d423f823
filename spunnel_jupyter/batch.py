"""The node channel of a detached session: the job is a batch job, and this host follows it.

``spunnel-notebook --detach`` submits the launcher as a batch job's script (sbatch): nothing on the
node then depends on a process of the login host, whose crash or reboot ends no job. Each login
host that holds a tunnel to the session (the one that submitted it, and any that ``attach``) runs
a follower beside it, an extra step of the job (``srun --jobid --overlap``, follow.py), whose
stdout carries the launcher's events, the token first, exactly as srun carries a foreground
session's. Ending the follower (detaching) leaves the job alone; ending the session asks the
launcher to stop (SIGUSR1 to the batch script), as a foreground session does through srun.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable
from typing import IO

from . import process
from .backend import JobState
from .channel import NodeChannel, _how, job_environment
from .errors import SlurmLost, SpunnelError
from .machine import Allocated, Event, JobPolled, Outcome, Queued, SrunExited
from .protocol import SETTINGS_ENV, LauncherSettings, follower_name
from .settings import SessionSettings

_FAST_FOR = 10.0  # seconds after submitting (or attaching) in which the start is polled quickly
_FAST = 0.25


def _node_command(settings: SessionSettings, module: str) -> list[str]:
    command = list(settings.launcher_command) or process.python_module("spunnel_jupyter.launcher")
    if command[-1] == "spunnel_jupyter.launcher":  # the default, or the same spelt by the site
        return [*command[:-1], f"spunnel_jupyter.{module}"]
    return command if module == "launcher" else [*command, "--follow"]


class BatchChannel(NodeChannel):
    """A detached session's job, submitted by this session (``job_id`` None) or attached to."""

    def __init__(
        self,
        settings: SessionSettings,
        log: IO[bytes],
        post: Callable[[Event], None],
        job_id: int | None = None,
    ) -> None:
        super().__init__(settings, log, post)
        self.job_id = job_id
        self.submitted = False  # by this session: then an interrupted start cancels it
        self._launcher: LauncherSettings | None = None
        self._running = asyncio.Event()  # set once _follow saw the job run

    async def start(self, options: list[str], tag: str, launcher: LauncherSettings) -> None:
        """Submit the batch job (or take the attached one), then follow it once it runs."""
        self._launcher = launcher
        if self.job_id is None:
            env = {**job_environment(), SETTINGS_ENV: launcher.line().decode().strip()}
            command = [*_node_command(self.settings, "launcher"), "--detached"]
            self.job_id = await self.settings.slurm.submit(options, tag, command, env)
            self.submitted = True
        self.post(Queued(self.job_id))
        self._tasks = [asyncio.ensure_future(self._follow(self.job_id))]

    async def _follow(self, job_id: int) -> None:
        """Wait until the job runs (Slurm's own poll: nothing of ours waits with it; each look
        also gives the session the pending reason), then start this host's follower step."""
        s, began = self.settings, time.monotonic()
        while True:
            info = await s.slurm.job(job_id)
            if info.state is JobState.RUNNING:
                break
            if info.state is not JobState.UNKNOWN and not info.state.active:
                self.post(SrunExited(0))  # ended before it ran: why_ended asks Slurm why
                return
            if info.state is not JobState.UNKNOWN:
                self.post(JobPolled(info))
            fast = time.monotonic() - began < _FAST_FOR
            await asyncio.sleep(_FAST if fast else s.pending_poll_interval)
        self._running.set()
        self.post(Allocated(job_id))
        await self._end_stale_followers(job_id)
        assert self._launcher is not None
        stdin, self._to_node = os.pipe()
        try:
            os.write(self._to_node, self._launcher.line())
            self.srun = await s.slurm.start_follower(
                job_id, follower_name(), _node_command(s, "follow"), stdin=stdin,
                env=job_environment(), death_signal=signal.SIGUSR1,
            )  # fmt: skip
        except SpunnelError as e:
            self.slurm_said.append(str(e))
            self.post(SrunExited(-1))
            return
        finally:
            os.close(stdin)
        self._pids = {"srun_pid": self.srun.pid, "srun_start": process.start_time(self.srun.pid)}
        readers = [self._read_events(self.srun.stdout), self._read_stderr(self.srun.stderr)]
        self._tasks += [asyncio.ensure_future(r) for r in readers]
        self._tasks.append(asyncio.ensure_future(self._wait_exit(self.srun, self._tasks[-2:])))

    async def poll_job(self, job_id: Callable[[], int | None]) -> None:
        """While the job pends, _follow already asks Slurm: the periodic look starts once it
        runs (for the time left)."""
        await self._running.wait()
        await super().poll_job(job_id)

    async def _end_stale_followers(self, job_id: int) -> None:
        """A follower of this host that outlived its supervisor (the host crashed, or srun was
        killed) would hold its step, and its name, until the job ends: end it."""
        slurm = self.settings.slurm
        with contextlib.suppress(SpunnelError):
            for step, name in await slurm.my_steps():
                if step.partition(".")[0] == str(job_id) and name == follower_name():
                    await slurm.cancel_step(step)

    async def stop(self, grace: float) -> bool:
        """Ask the launcher to end (SIGUSR1 to the batch script, what srun forwards in a
        foreground session); True once the follower has passed on its last word."""
        slurm, job_id = self.settings.slurm, self.job_id
        if job_id is None:
            return True
        with contextlib.suppress(SpunnelError, asyncio.TimeoutError):
            await asyncio.wait_for(slurm.signal_batch(job_id, "USR1"), grace)
        srun = self.srun
        if srun is None or srun.returncode is not None:
            return srun is not None  # pending, no follower: cancel it (end_step)
        try:
            await asyncio.wait_for(srun.wait(), grace)
        except asyncio.TimeoutError:
            return False
        return True

    async def detach(self) -> None:
        """End this host's follower only: the job runs on."""
        for task in self._tasks:
            task.cancel()
        if self.srun is not None:
            await process.stop(self.srun, grace=self.settings.stop_timeout)

    async def abort(self, tag: str) -> None:
        """Undo our own submission (interrupted or failed before the session began); a job we
        attached to is not ours to end."""
        if self.submitted:
            with contextlib.suppress(Exception):
                await self.end_step(self.job_id)
                await asyncio.wait_for(
                    self.end_job(self.job_id, tag), self.settings.stop_timeout + 1.0
                )
        else:
            with contextlib.suppress(Exception):
                await self.detach()

    async def why_ended(self, code: int, job_id: int | None, node: str, ready: bool) -> Outcome:
        """As for srun; but a follower that ended while the job runs is this host's loss only."""
        try:
            return await super().why_ended(code, job_id, node, ready)
        except SlurmLost as e:
            if not self.lost:
                raise
            self.lost = False
            raise SlurmLost(
                f"this host's link to job {job_id} (its follower step) ended ({_how(code)}); "
                "the job runs on",
                "attach to it again with `spunnel-notebook attach`",
            ) from e


def make_channel(
    kind: str, settings: SessionSettings, log: IO[bytes], post: Callable[[Event], None],
    job_id: int | None,
) -> NodeChannel:  # fmt: skip
    """srun's channel for a foreground session; a batch job's for a detached or attached one."""
    if kind == "foreground":
        return NodeChannel(settings, log, post)
    return BatchChannel(settings, log, post, job_id)
