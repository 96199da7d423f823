"""What a dead supervisor left behind on this host and in Slurm, found and removed.

Only called with the state directory's lock held by the caller (a start, or a `stop` that found no
session): then nobody else owns these things.
"""

from __future__ import annotations

import signal

from . import process
from .backend import SlurmBackend
from .protocol import job_tag
from .state import LEFTOVERS, UNCANCELLED, StateDir


async def clean_leftovers(slurm: SlurmBackend, state: StateDir) -> list[str]:
    """Remove what a dead supervisor left: its job, ssh master, srun, sockets and record; retry
    the cancel of a job whose end an earlier teardown could not confirm. Notes for the user."""
    record, uncancelled = state.read(), state.read(UNCANCELLED)
    notes: list[str] = []
    if record is None and uncancelled is None:
        return notes  # the record is written before srun starts and removed last
    # Jobs this tool submitted from this host; with the lock ours, none has a live owner.
    tag = job_tag()
    named = (uncancelled or {}).get("job_id")
    running = set()
    for job_id, comment, job_state in await slurm.my_jobs():
        if (comment.startswith(tag) or job_id == named) and job_state.active:
            await slurm.cancel(job_id)
            notes.append(f"cancelled job {job_id} left by an earlier session")
        elif job_state.active:
            running.add(job_id)
    state.remove(UNCANCELLED)
    left = record or {}
    for what in ("ssh", "srun"):
        pid = left.get(f"{what}_pid")
        if process.signal_if_alive(pid, left.get(f"{what}_start"), signal.SIGKILL):
            notes.append(f"stopped a leftover {what} (pid {pid})")
    # Each --tunnel pair's and runtime forward's socket too (ports.py names them port-SP.sock).
    pairs = [path.name for path in state.path.glob("port-*.sock")]
    state.remove(*LEFTOVERS, *pairs)
    if not notes and record is None:  # only an unconfirmed end to retry: the job ended since
        job = f"job {named}" if named else "the job"
        notes.append(f"{job}, whose end an earlier session could not confirm, has ended")
    elif not notes:
        pid = left.get("supervisor_pid", "?")
        notes.append(
            f"removed the record and sockets of a session whose supervisor died (pid {pid})"
        )
    if left.get("kind", "foreground") != "foreground" and left.get("job_id") in running:
        notes.append(
            f"job {left['job_id']} (detached) runs on: `spunnel-notebook attach` gets back "
            "to it, `spunnel-notebook stop` ends it"
        )
    return notes
