"""A user's detached sessions, as Slurm knows them from any login host: which jobs they are, where
they were started, where their tunnels are (each attached host runs a named follower step), and
ending one that no supervisor of this host holds.

Nothing here reads a file of another login host: the job's tag (protocol.detached_tag) and its
steps (protocol.follower_name) are the whole truth, so ``status``, ``attach`` and ``stop`` work the
same from every login host.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import probes
from .backend import JobState, SlurmBackend
from .errors import NoSession, SpunnelError, UsageError
from .protocol import FOLLOWER_PREFIX, parse_detached_tag


@dataclass
class DetachedJob:
    job_id: int
    started_on: str  # the login host that submitted it
    state: JobState
    node: str = ""
    end_time: float | None = None
    attached_on: list[str] = field(default_factory=list)  # hosts holding a tunnel to it

    def describe(self) -> str:
        where = f" on {self.node}" if self.node else ""
        tunnels = ", ".join(self.attached_on) or "none"
        return (
            f"job {self.job_id} {self.state.value}{where} (detached, started on "
            f"{self.started_on}; tunnels on: {tunnels})"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id, "started_on": self.started_on, "state": self.state.value,
            "node": self.node, "end_time": self.end_time, "attached_on": self.attached_on,
        }  # fmt: skip


async def detached_jobs(slurm: SlurmBackend) -> list[DetachedJob]:
    """This user's detached sessions still in the queue, oldest first."""
    jobs = []
    for job_id, comment, state in await slurm.my_jobs():
        host = parse_detached_tag(comment)
        if host is not None and state.active:
            jobs.append(DetachedJob(job_id, host, state))
    if not jobs:
        return jobs
    steps = await slurm.my_steps()
    for job in jobs:
        info = await slurm.job(job.job_id)
        job.node, job.end_time = info.nodes, info.end_time
        job.attached_on = sorted(
            name.removeprefix(FOLLOWER_PREFIX)
            for step, name in steps
            if step.partition(".")[0] == str(job.job_id) and name.startswith(FOLLOWER_PREFIX)
        )
    return sorted(jobs, key=lambda j: j.job_id)


def choose(jobs: list[DetachedJob], job_id: int | None, verb: str) -> DetachedJob:
    """The one detached session ``verb`` (attach, stop) is about: ``job_id``'s, or the only one.
    Raises NoSession, or UsageError listing them when there are several."""
    if job_id is not None:
        for job in jobs:
            if job.job_id == job_id:
                return job
        raise NoSession(
            f"job {job_id} is not a detached session of yours in the queue",
            "see `spunnel-notebook status`",
        )
    if not jobs:
        raise NoSession(
            "you have no detached session", "start one with `spunnel-notebook --detach`"
        )
    if len(jobs) > 1:
        listed = "; ".join(job.describe() for job in jobs)
        raise UsageError(
            f"you have {len(jobs)} detached sessions: {listed}",
            f"say which: `spunnel-notebook {verb} JOBID`",
        )
    return jobs[0]


async def end_detached(slurm: SlurmBackend, job: DetachedJob, grace: float, bound: float) -> str:
    """End a detached session no supervisor of this host holds: ask its launcher to stop
    (Jupyter ends cleanly), and cancel the job if it has not left the queue within ``grace``.
    Every attached host's supervisor then sees the job end and closes its tunnel."""

    async def gone() -> bool:
        return not await slurm.in_queue(job.job_id)

    if job.state is JobState.RUNNING:
        await slurm.signal_batch(job.job_id, "USR1")
        if await probes.wait_until(gone, timeout=grace, cap=0.1):
            return f"stopped job {job.job_id} (detached, started on {job.started_on})"
    await slurm.cancel(job.job_id)
    if not await probes.wait_until(gone, timeout=bound, cap=0.1):
        raise SpunnelError(
            f"job {job.job_id} is still in the queue", f"try again, or run scancel {job.job_id}"
        )
    return f"cancelled job {job.job_id} (detached, started on {job.started_on})"
