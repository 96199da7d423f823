"""The Slurm backend seam: what a session needs from Slurm, and the values it speaks in.

``SlurmBackend`` is the interface. ``slurm.SlurmCLI`` implements it with Slurm's command-line tools,
``pyslurm_backend.SlurmPyslurm`` answers the queries through pyslurm instead (and the rest with the
commands); ``SpunnelManager.slurm_backend`` picks one, ``slurm_class`` plugs in another. Job state
UNKNOWN means "the controller did not answer", never "ended".
"""

from __future__ import annotations

import asyncio
import re
import signal
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Protocol

from .errors import SpunnelError, UsageError


class JobState(str, Enum):
    PENDING = "PENDING"
    CONFIGURING = "CONFIGURING"
    RUNNING = "RUNNING"
    SUSPENDED = "SUSPENDED"
    COMPLETING = "COMPLETING"
    COMPLETED = "COMPLETED"
    CANCELLED = "CANCELLED"
    FAILED = "FAILED"
    TIMEOUT = "TIMEOUT"
    NODE_FAIL = "NODE_FAIL"
    PREEMPTED = "PREEMPTED"
    OUT_OF_MEMORY = "OUT_OF_MEMORY"
    BOOT_FAIL = "BOOT_FAIL"
    DEADLINE = "DEADLINE"
    GONE = "GONE"  # no longer known to the controller
    UNKNOWN = "UNKNOWN"  # the controller did not answer: the job may well be alive

    @property
    def active(self) -> bool:
        """Holds resources or may still get them (UNKNOWN counts: we cannot say it ended)."""
        return self in _ACTIVE

    @classmethod
    def parse(cls, text: str) -> JobState:
        name = text.strip().split()[0] if text.strip() else ""
        return cls.__members__.get(name, cls.UNKNOWN)


_ACTIVE = {
    JobState.PENDING,
    JobState.CONFIGURING,
    JobState.RUNNING,
    JobState.SUSPENDED,
    JobState.COMPLETING,
    JobState.UNKNOWN,
}

# -- parsing user input ---------------------------------------------------------------------------
TIME_FORMS = "minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS (e.g. 2:00:00)"


def parse_time_limit(text: str) -> int | None:
    """Seconds in a Slurm time limit, None for UNLIMITED. Raises UsageError when malformed."""
    value = text.strip()
    if value.upper() in ("UNLIMITED", "INFINITE"):
        return None
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", value, re.ASCII)
    if not m:
        raise UsageError(f"invalid time limit {text!r}", f"use {TIME_FORMS}")
    days, a, b, c = (int(g) if g is not None else None for g in m.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = days * 86400 + (a or 0) * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:  # HH:MM:SS
        seconds = (a or 0) * 3600 + (b or 0) * 60 + c
    elif b is not None:  # MM:SS
        seconds = (a or 0) * 60 + b
    else:  # minutes
        seconds = (a or 0) * 60
    if seconds <= 0:
        raise UsageError(f"invalid time limit {text!r}: it must be longer than zero", TIME_FORMS)
    return seconds


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "UNLIMITED"
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    text = f"{rest // 3600}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}-{text}" if days else text


def parse_mem_mb(text: str) -> int:
    """Megabytes in a Slurm --mem value (default unit M; K, M, G, T suffixes)."""
    m = re.fullmatch(r"(\d+)([KMGT]?)B?", text.strip().upper(), re.ASCII)
    if not m:
        raise UsageError(f"invalid memory {text!r}", "use megabytes or a unit, e.g. 4000 or 4G")
    if int(m.group(1)) == 0:  # Slurm reads --mem=0 as "all the memory of the node"
        raise UsageError(f"invalid memory {text!r}: it must be more than 0", "e.g. --mem 4G")
    scale = {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024 * 1024}[m.group(2)]
    return int(int(m.group(1)) * scale)


@dataclass
class Partition:
    name: str
    default: bool
    available: bool
    max_time: int | None  # seconds; None = unlimited
    max_mem_mb: int  # largest node's memory
    max_cpus: int  # largest node's CPUs
    nodes: int

    def to_json(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class JobInfo:
    job_id: int
    state: JobState
    reason: str = ""
    nodes: str = ""
    end_time: float | None = None  # epoch seconds; None when unknown or unlimited
    start_time: float | None = None  # pending: when Slurm expects to start it, if it knows


class SlurmBackend(Protocol):
    """What a session, the manager and doctor ask of Slurm. Every call is bounded in time."""

    async def start_step(
        self, options: list[str], tag: str, command: list[str], *, stdin: int,
        env: Mapping[str, str], death_signal: signal.Signals,
    ) -> asyncio.subprocess.Process:  # fmt: skip
        """Start the interactive allocation running ``command`` as its single task (srun's
        stdout carries the node's events, its stderr Slurm's progress). The job carries ``tag``
        as its comment. Raises SlurmUnavailable when Slurm cannot be run at all."""

    async def submit(
        self, options: list[str], tag: str, command: list[str], env: Mapping[str, str]
    ) -> int:
        """Submit a batch job (one node, one task) whose script runs ``command`` on the node,
        tagged ``tag``; its id. Nothing of it runs on this host. Raises SpunnelError."""

    async def start_follower(
        self, job_id: int, name: str, command: list[str], *, stdin: int,
        env: Mapping[str, str], death_signal: signal.Signals,
    ) -> asyncio.subprocess.Process:  # fmt: skip
        """Run ``command`` as an extra step named ``name`` beside the running job's own
        (``srun --jobid --overlap``); ending it leaves the job alone."""

    def pty_step_argv(
        self, job_id: int, name: str, options: list[str], command: list[str]
    ) -> list[str]:
        """The argv that runs ``command`` on a pseudo-terminal as an extra step named ``name``
        of the running job (``srun --jobid --overlap --pty``, then ``options``), wired to this
        terminal: the caller runs it in the terminal's foreground (shell.py)."""

    async def signal_batch(self, job_id: int, signal_name: str) -> None:
        """Send ``signal_name`` (e.g. "USR1") to the job's batch script only."""

    async def my_steps(self) -> list[tuple[str, str]]:
        """(step id "JOB.STEP", step name) of this user's running steps."""

    async def cancel_step(self, step: str) -> None:
        """End one step ("JOB.STEP") of a job; the job and its other steps run on."""

    def classify_error(self, text: str) -> SpunnelError:
        """What the user should be told for Slurm's own error text."""

    async def job(self, job_id: int) -> JobInfo:
        """State, pending reason, nodes and end time; GONE when unknown, UNKNOWN if unreachable."""

    async def in_queue(self, job_id: int) -> bool:
        """True while the job is pending, running or completing (or its state is unknown)."""

    async def partitions(self) -> list[Partition]:
        """The partitions this user can see, with their largest node's limits."""

    async def cancel(self, job_id: int) -> None:
        """Cancel the job; a job that is already gone is not an error."""

    async def my_jobs(self, node: str = "") -> list[tuple[int, str, JobState]]:
        """(job id, comment/tag, state) of this user's queued jobs (on ``node`` if given)."""

    def commands(self) -> list[str]:
        """What this backend runs, for `doctor` (SlurmUnavailable if one is missing)."""

    def close(self) -> None:
        """End what the backend keeps running between calls (pyslurm's worker process); the
        next call starts it again. The manager calls it when a session ends."""

    async def describe(self) -> str:
        """Which backend answers the queries, and why, for `doctor` (SlurmUnavailable if the one
        the site asked for cannot be used)."""
