"""A login host's follower of a detached session, on the node: run by srun as an extra step of
the job (``srun --jobid=J --overlap``), one per login host that holds a tunnel to it.

    python -m spunnel_jupyter.follow  < one line of settings on stdin (no token in it)

It finds the job's runtime directory (made by the detached launcher, launcher.py), says the
token (``token``, the first event: it never leaves the 0700 directory but through this pipe to
the user's own supervisor), replays the launcher's events from the start and follows them, and
copies Jupyter's (masked) log from now on to stderr, the same channel srun gives a foreground
session. Reverse mode's ``ssh -R`` to this login host runs here (dialback.py). It ends when the
launcher says it exited, when the launcher is gone, or when signalled; the job lives on.

Standard library only, like the launcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import BinaryIO

from . import probes
from .dialback import DialBack
from .launcher import connect_stdin, emit, emit_event
from .protocol import (
    EVENTS_FILE,
    EXITED,
    JUPYTER_LOG,
    TOKEN,
    TOKEN_FILE,
    LauncherSettings,
    NodeEvent,
    ProtocolError,
)
from .rundir import find_runtime_dir, launcher_alive

POLL = 0.05  # seconds between looks at the launcher's files


class Follower:
    def __init__(self, rundir: Path, commands: asyncio.StreamReader) -> None:
        self.rundir = rundir
        self.commands = commands
        self.done = asyncio.Event()
        self._partial = b""

    def _stop(self, *_: object) -> None:
        self.done.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            loop.add_signal_handler(sig, self._stop)
        token = (self.rundir / TOKEN_FILE).read_text()
        emit(TOKEN, token=token)
        events = open(self.rundir / EVENTS_FILE, "rb")
        log = open(self.rundir / JUPYTER_LOG, "rb")
        log.seek(0, os.SEEK_END)  # what Jupyter said before we came is in the node's file
        ctl = self.rundir / f"ctl.{os.getpid()}"
        dialer = DialBack(emit_event, self._give_up, self.rundir / "jupyter.sock", ctl)
        listening = asyncio.ensure_future(dialer.listen(self.commands))
        try:
            while not self.done.is_set():
                self._copy_log(log)
                if self._relay(events.read()) or not launcher_alive(self.rundir):
                    self._relay(events.read())  # its last words, if any
                    break
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.done.wait(), POLL)
        finally:
            listening.cancel()
            await dialer.cancel()
            with contextlib.suppress(FileNotFoundError):
                ctl.unlink()
            events.close()
            log.close()
        return 0

    def _relay(self, data: bytes) -> bool:
        """Pass on the launcher's complete event lines; True once it said it exited."""
        data, exited = self._partial + data, False
        *lines, self._partial = data.split(b"\n")
        for raw in lines:
            event = NodeEvent.parse(raw.decode(errors="replace"))
            if event is not None:
                emit_event(event)
                exited = exited or event.kind == EXITED
        return exited

    def _copy_log(self, log: BinaryIO) -> None:
        data = log.read()
        if data:
            with contextlib.suppress(OSError):
                sys.stderr.buffer.write(data)
                sys.stderr.buffer.flush()

    def _give_up(self, why: str) -> None:
        emit(EXITED, reason="tunnel-error", message=why, follower=True)
        self.done.set()


async def amain() -> int:
    stdin = await connect_stdin()
    try:
        settings = LauncherSettings.parse(await asyncio.wait_for(stdin.readline(), 60))
    except (asyncio.TimeoutError, ProtocolError) as e:
        emit(EXITED, reason="error", message=f"follower: {e or 'no settings on stdin'}")
        return 2
    job_id = os.environ.get("SLURM_JOB_ID", "")
    base = settings.runtime_base or tempfile.gettempdir()

    async def found() -> bool:
        return find_runtime_dir(base, job_id) is not None

    # The job runs: its launcher makes the directory within moments (it may still be starting).
    if not await probes.wait_until(found, timeout=float(settings.start_timeout), cap=0.1):
        emit(EXITED, reason="error", message=f"no detached session of job {job_id} on this node")
        return 1
    rundir = find_runtime_dir(base, job_id)
    assert rundir is not None
    return await Follower(rundir, stdin).run()


def main() -> int:
    return asyncio.run(amain())


if __name__ == "__main__":
    sys.exit(main())
