"""``--shell``: the terminal becomes an interactive shell on the node, beside Jupyter.

Once the session is ready (the URL, or the tunnel lines, and the laptop line printed), the command
line runs the shell step, ``srun --jobid=JOB --overlap --pty ... <login shell> -l``, a step of the
session's own job, in a process group of its own made the terminal's foreground group: the keys,
Ctrl-C and Ctrl-Z go to the shell, never to the supervisor, which stops drawing its progress line
meanwhile. When the shell exits, the supervisor takes the terminal back (its foreground group and
its modes) and the session ends by the usual rules. When the session ends first (`stop`, scancel,
the time limit, SIGHUP), the shell's srun gets SIGHUP at once, beside the teardown (srun then
kills its step: no waiting for Slurm's KillWait, which an interactive shell ignoring SIGTERM would
cost), and SIGKILL if it is still there ``NodeShell.stop_grace`` seconds later.

Only the command line runs a shell: with a terminal on stdin, in the foreground, not detached
(``check_terminal``); the REST API refuses it (``fields.refuse_terminal_only``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import signal
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from traitlets import Float, List, Unicode
from traitlets.config import LoggingConfigurable

from . import privatetmp, process
from .backend import SlurmBackend
from .channel import job_environment
from .errors import UsageError
from .machine import Phase

if TYPE_CHECKING:
    from .console import Console
    from .session import Session
    from .settings import SessionSettings

SHELL_STEP = "spunnel-shell"  # the step's name in `squeue --steps`


class NodeShell(LoggingConfigurable):
    """The shell ``spunnel-notebook --shell`` runs on the node."""

    command = List(
        Unicode(),
        [],
        config=True,
        help="""The shell to run on the node (argv). Empty: the user's login shell (the passwd
        entry's, else $SHELL, else /bin/sh) as a login shell (-l).""",
    )
    srun_args = List(
        Unicode(),
        [],
        config=True,
        help="""Extra srun options for the shell's step (after --jobid --overlap --pty), e.g.
        ["--mem=1G"] where Slurm wants a step to ask for memory of its own.""",
    )
    stop_grace = Float(
        1.0,
        config=True,
        help="""Seconds the shell's srun gets to end once the session ends (it is hung up at
        once), before it is killed.""",
    )


def login_shell() -> list[str]:
    """The user's login shell, run as one: the passwd entry's, else $SHELL, else /bin/sh."""
    try:
        shell = pwd.getpwuid(os.getuid()).pw_shell
    except KeyError:
        shell = ""
    return [shell or os.environ.get("SHELL") or "/bin/sh", "-l"]


def shell_argv(
    config: NodeShell, slurm: SlurmBackend, job_id: int, private: PrivateTmpPlan | None = None
) -> list[str]:
    """The shell step's argv: the one place where what runs on the node is put together. With
    ``private`` (the session's private /tmp is on), the shell runs in the same private /tmp as
    the kernels (privatetmp.py's wrapper, over the same directories)."""
    command = list(config.command) or login_shell()
    if private is not None:
        command = private.wrap(command)
    return slurm.pty_step_argv(job_id, SHELL_STEP, list(config.srun_args), command)


@dataclass(frozen=True)
class PrivateTmpPlan:
    """The session's private /tmp, as its launcher made it in ``runtime_dir`` on the node."""

    python: str  # the node's Python (the launcher's)
    runtime_dir: str
    base: str  # "": in the runtime directory
    mounts: tuple[str, ...]

    def wrap(self, command: list[str]) -> list[str]:
        base = self.base or privatetmp.default_base(self.runtime_dir)
        note = os.path.join(self.runtime_dir, "shell-tmp.json")
        return privatetmp.wrap(command, base, list(self.mounts), [self.runtime_dir], note,
                               python=self.python)  # fmt: skip


def check_terminal(detach: bool | None, tty: int = 0) -> None:
    """--shell is refused, before anything is submitted, unless this command runs in the
    foreground of a terminal (on ``tty``, stdin), and not detached."""
    if detach:
        raise UsageError(
            "--shell cannot be detached: the shell is this terminal's",
            "leave out --detach (or --shell: `spunnel-notebook attach` follows a detached "
            "session, and `srun --jobid=JOB --overlap --pty bash` opens a shell in it)",
        )
    if not os.isatty(tty):
        raise UsageError(
            "--shell needs a terminal on stdin",
            "run it from an interactive terminal, not with stdin from a pipe, file or script",
        )
    with contextlib.suppress(OSError):
        if os.tcgetpgrp(tty) == os.getpgrp():
            return
    raise UsageError(
        "--shell must run in the terminal's foreground", "run it without `&`, or `fg` it"
    )


class TerminalShell:
    """The shell step of one session, holding this terminal while it runs."""

    def __init__(
        self, config: NodeShell, settings: SessionSettings, console: Console, tty: int = 0
    ) -> None:
        self.config, self.settings, self.console, self.tty = config, settings, console, tty
        self.slurm = settings.slurm
        self.proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Future[None] | None = None
        self._hung_up = False

    def follow(self, session: Session) -> None:
        """Called on every change of the session: start the shell once it is ready (after its
        URL was printed), hang it up once the session ends."""
        if session.phase is Phase.READY and self._task is None and session.job_id is not None:
            self.console.paused = True  # from now on the terminal is the shell's
            self._task = asyncio.ensure_future(self._run(session, session.job_id))
        elif session.phase in (Phase.ENDING, Phase.ENDED):
            self._hang_up()

    async def _run(self, session: Session, job_id: int) -> None:
        enabled, base, mounts = self.settings.private_tmp
        runtime_dir = session.channel.runtime_dir
        python = (self.settings.launcher_command or (sys.executable,))[0]
        plan = PrivateTmpPlan(python, runtime_dir, base, mounts)
        argv = shell_argv(
            self.config, self.slurm, job_id, plan if enabled and runtime_dir else None
        )
        try:
            with process.terminal_held(self.tty):
                self.proc = await process.spawn_foreground(
                    argv, tty=self.tty, env=job_environment()
                )
                if self._hung_up:  # the session ended while the shell started
                    self._hang_up(again=True)
                code = await self.proc.wait()
        except OSError as e:
            self.console.paused = False
            session.request_stop(f"the shell could not be started ({e.strerror or e})")
            return
        self.console.paused = False
        if not self._hung_up:
            how = f" (exit code {code})" if code else ""
            session.request_stop(f"the shell on {session.node} exited{how}", ends_job=True)

    def _hang_up(self, again: bool = False) -> None:
        """SIGHUP to the shell's srun, as a terminal closing would: srun kills its step ("forcing
        job termination"), so the shell ends now, not after Slurm's KillWait (an interactive
        shell ignores the SIGTERM Slurm sends first)."""
        if self._hung_up and not again:
            return
        self._hung_up = True
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGHUP)

    async def end(self) -> None:
        """Once the session ended: the shell's srun is gone within ``stop_grace`` (killed
        otherwise), and the terminal is ours again, before the end lines are printed."""
        if self._task is None:
            return
        self._hang_up()
        proc = self.proc
        if proc is not None and proc.returncode is None:
            try:
                await asyncio.wait_for(asyncio.shield(proc.wait()), self.config.stop_grace)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(asyncio.TimeoutError, OSError):
            await asyncio.wait_for(self._task, self.config.stop_grace + 1.0)
