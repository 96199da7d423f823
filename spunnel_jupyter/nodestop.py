"""How the launcher ends Jupyter on the node, and whatever Jupyter left behind.

Two ways, by what ended the session:

- **Slurm ended the step** (SIGTERM: scancel from elsewhere, the time limit, preemption): Slurm has
  already sent SIGTERM to every process of the step, Jupyter's kernels included, and SIGKILLs
  them after KillWait anyway. Once the save before the end is done (notices.py), Jupyter's own
  shutdown only costs time: it stops its kernels (already signalled) and removes files the
  launcher removes with the runtime directory, in 0.5 to 1.7 s. So its process group is SIGKILLed
  at once. That time matters more than it looks: slurmd, after signalling the step, looks whether
  it ended 20, 70, 170 and 670 ms later, then once a second; a step still there at 0.67 s keeps
  the job in the queue until 1.67 s.
- **Any other end** (a stop or Ctrl-C from the login side, SIGUSR1; Jupyter ending itself): Jupyter
  gets SIGTERM and ``grace`` seconds for its own shutdown, which ends each kernel with a shutdown
  request (the kernel's atexit handlers run, its open files are flushed), then SIGKILL.

Then every process left (kernels run in sessions of their own, re-parented to the launcher, the
subreaper) is SIGKILLed and reaped, before the launcher waits for the end of Jupyter's output
(which a kernel still alive would hold open).

Standard library only, like the launcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

from . import process

SLURM_ENDS_STEP = "SIGTERM"  # the signal slurmstepd sends every process of a step it ends


def _children() -> list[int]:
    me = str(os.getpid())
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError):
                with open(f"/proc/{entry}/stat", "rb") as f:
                    if f.read().rsplit(b")", 1)[1].split()[1].decode() == me:
                        pids.append(int(entry))
    return pids


def kill_leftovers(within: float = 2.0) -> list[int]:
    """SIGKILL every child left (kernels re-parented to us as the subreaper) and reap them.
    Only once no child of ours is awaited by asyncio (Jupyter, the dial-back's ssh). Bounded: a
    kernel that SIGKILL cannot end (in uninterruptible I/O on a hung filesystem) is given up
    after ``within`` seconds, and returned; Slurm's own cleanup of the step gets it later."""
    deadline = time.monotonic() + within
    while pids := _children():
        if time.monotonic() > deadline:
            return pids
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in pids:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        time.sleep(0.01)
    return []


def at_once(signal_name: str) -> bool:
    """True if Jupyter is to be killed without waiting for its own shutdown (see above)."""
    return signal_name == SLURM_ENDS_STEP


async def end_jupyter(jupyter: asyncio.subprocess.Process, signal_name: str, grace: float) -> str:
    """End Jupyter's process group (Jupyter runs in a session of its own); say how: "exited"
    (it had already), "killed" (at once), "stopped" (within ``grace``) or "killed-after-grace"."""
    how = "exited"
    if jupyter.returncode is None:
        if at_once(signal_name):
            how = "killed"
            with contextlib.suppress(ProcessLookupError):
                os.killpg(jupyter.pid, signal.SIGKILL)
            await jupyter.wait()
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(jupyter.pid, signal.SIGTERM)
            await process.stop(jupyter, grace=grace)
            how = "killed-after-grace" if jupyter.returncode == -signal.SIGKILL else "stopped"
    with contextlib.suppress(ProcessLookupError):
        os.killpg(jupyter.pid, signal.SIGKILL)  # whatever Jupyter started in its group
    return how
