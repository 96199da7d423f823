"""Child processes: argv lists only (never a shell), bounded waits, tied to our lifetime.

Every long-lived child (srun, ssh) is started in its own session so that Ctrl-C and SIGHUP from the
terminal reach only the supervisor, which then tears things down in the right order; and with
PR_SET_PDEATHSIG so that a supervisor killed with SIGKILL takes its children with it. The one
exception, ``--shell``'s srun, is given the terminal on purpose (``spawn_foreground``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
import termios
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import IO

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def python_module(module: str) -> list[str]:
    """``python -m MODULE`` that never imports from its working directory (``-m`` puts it first
    on sys.path: a directory others can write, /tmp or a shared project, could plant code)."""
    if sys.version_info >= (3, 11):
        return [sys.executable, "-P", "-m", module]
    run = "import runpy, sys; del sys.path[0]; "
    run += f"runpy.run_module({module!r}, None, '__main__', alter_sys=True)"
    return [sys.executable, "-c", run]


def die_with_parent(parent: int, sig: int) -> None:
    """Runs in the child between fork and exec: send us ``sig`` when the parent thread dies."""
    _libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), sig)


async def spawn(
    argv: Sequence[str],
    *,
    stdin: int | IO[bytes] | None = asyncio.subprocess.DEVNULL,
    stdout: int | IO[bytes] | None = asyncio.subprocess.PIPE,
    stderr: int | IO[bytes] | None = asyncio.subprocess.PIPE,
    env: dict[str, str] | None = None,
    death_signal: int = signal.SIGTERM,
) -> asyncio.subprocess.Process:
    """Start a supervised child in its own session that gets ``death_signal`` when we die."""
    parent = os.getpid()
    return await asyncio.create_subprocess_exec(
        *argv,
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        env=env,
        start_new_session=True,
        preexec_fn=lambda: die_with_parent(parent, death_signal),
    )


async def spawn_foreground(
    argv: Sequence[str], *, tty: int, env: dict[str, str] | None = None,
    death_signal: int = signal.SIGHUP,
) -> asyncio.subprocess.Process:  # fmt: skip
    """Start a child on our terminal ``tty`` (stdin, stdout and stderr inherited) in a process
    group of its own made the terminal's foreground group: the keys and the terminal's signals
    (Ctrl-C, Ctrl-Z) go to it, not to us. Call with SIGTTOU blocked (``terminal_held``); the
    child unblocks it. ``take_terminal`` gives the terminal back once it exited."""
    parent = os.getpid()

    def in_child() -> None:  # between fork and exec, so that it never runs in the background
        os.setpgid(0, 0)
        os.tcsetpgrp(tty, os.getpgrp())
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTTOU})
        die_with_parent(parent, death_signal)

    return await asyncio.create_subprocess_exec(
        *argv, stdin=None, stdout=None, stderr=None, env=env, preexec_fn=in_child
    )


@contextlib.contextmanager
def terminal_held(tty: int) -> Iterator[None]:
    """While a child holds the terminal ``tty``: SIGTTOU blocked (a background group may then
    still write to it, and take it back), the terminal's modes restored afterwards (a killed
    child may leave it raw), and our process group made its foreground group again. A terminal
    that is gone (hung up) is left alone."""
    modes = termios.tcgetattr(tty)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTTOU})
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.tcsetpgrp(tty, os.getpgrp())
        with contextlib.suppress(OSError, termios.error):
            termios.tcsetattr(tty, termios.TCSADRAIN, modes)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTTOU})


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


async def run(argv: Sequence[str], *, timeout: float, env: dict[str, str] | None = None) -> Result:
    """Run a short command to completion; kill it and raise TimeoutError past ``timeout``.

    Raises FileNotFoundError when the program is not on PATH.
    """
    proc = await spawn(argv, env=env)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        await stop(proc, grace=0)
        raise TimeoutError(f"{argv[0]} did not answer within {timeout:g} s") from None
    except asyncio.CancelledError:  # our caller gave up (a teardown): the child goes too
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        raise
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


async def stop(
    proc: asyncio.subprocess.Process, *, grace: float, first: int | None = signal.SIGTERM
) -> int:
    """Signal ``proc`` (``first``, or nothing if None), SIGKILL it after ``grace`` s; reap it."""
    if proc.returncode is None:
        if first is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(first)
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode


def start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot); None if gone or a zombie.

    A pid together with its start time names a process unambiguously, even after pid reuse.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat.rsplit(b")", 1)[1].split()
    return None if fields[0] == b"Z" else int(fields[19])


def alive(pid: int | None, started: int | None) -> bool:
    """True if the process ``pid`` that started at ``started`` still runs (not a zombie)."""
    return pid is not None and started is not None and start_time(pid) == started


def signal_if_alive(pid: int | None, started: int | None, sig: int) -> bool:
    """Send ``sig`` to exactly that process (pid and start time), if it still runs."""
    if pid is None or not alive(pid, started):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    return True


async def lines(stream: asyncio.StreamReader) -> AsyncIterator[bytes]:
    """The lines of ``stream``; a line longer than the reader's buffer comes in pieces instead
    of stopping the reader (``async for`` on a StreamReader raises on a line over 64 KiB, and a
    reader that stops leaves the writer blocked on a full pipe)."""
    while True:
        try:
            line = await stream.readuntil(b"\n")
        except asyncio.LimitOverrunError as e:
            line = await stream.read(max(e.consumed, 1))
        except asyncio.IncompleteReadError as e:
            if e.partial:
                yield e.partial
            return
        yield line
