"""Slurm through its command-line tools: the allocation's srun command, job queries, cancel.

Job state UNKNOWN means "the controller did not answer"; it never means the job died.
Every call here is bounded by ``SlurmCLI.timeout`` and runs without a shell.
"""

from __future__ import annotations

import getpass
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from enum import Enum

from traitlets import Float, Unicode
from traitlets.config import LoggingConfigurable

from . import process
from .errors import SlurmRejected, SlurmUnavailable, SpunnelError, UsageError

COMMENT_PREFIX = "spunnel-jupyter"  # jobs are tagged --comment=spunnel-jupyter:<host>:<session>


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
_TIME_FORMS = "minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS (e.g. 2:00:00)"


def parse_time_limit(text: str) -> int | None:
    """Seconds in a Slurm time limit, None for UNLIMITED. Raises UsageError when malformed."""
    value = text.strip()
    if value.upper() in ("UNLIMITED", "INFINITE"):
        return None
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", value)
    if not m:
        raise UsageError(f"invalid time limit {text!r}", f"use {_TIME_FORMS}")
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
        raise UsageError(f"invalid time limit {text!r}: it must be longer than zero", _TIME_FORMS)
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
    m = re.fullmatch(r"(\d+)([KMGT]?)B?", text.strip().upper())
    if not m:
        raise UsageError(f"invalid memory {text!r}", "use megabytes or a unit, e.g. 4000 or 4G")
    scale = {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024 * 1024}[m.group(2)]
    return int(int(m.group(1)) * scale)


@dataclass
class JobRequest:
    """What the user asks Slurm for; each field maps to the srun option of the same name."""

    partition: str = ""
    mem: str = ""
    time: str = ""
    cpus_per_task: int | None = None
    gpus: str = ""
    gres: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    reservation: str = ""
    job_name: str = "spunnel-notebook"
    extra: list[str] = field(default_factory=list)  # after `--`: passed to srun verbatim

    def srun_options(self) -> list[str]:
        opts = []
        for name in (
            "partition",
            "mem",
            "time",
            "gpus",
            "gres",
            "account",
            "qos",
            "constraint",
            "reservation",
            "job_name",
        ):
            value = getattr(self, name)
            if value:
                opts.append(f"--{name.replace('_', '-')}={value}")
        if self.cpus_per_task:
            opts.append(f"--cpus-per-task={self.cpus_per_task}")
        return [*opts, *self.extra]


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


# Fragments of Slurm's own error texts that mean "the controller did not answer".
_UNREACHABLE = (
    "Unable to contact slurm controller",
    "Socket timed out",
    "Zero Bytes were transmitted",
    "Connection refused",
    "Communication connection failure",
)
# srun's immediate rejections of a request, mapped to what the user should change.
_REJECTIONS = [
    ("Invalid partition name", "unknown partition", "pick one from `sinfo -s`"),
    (
        "Requested node configuration is not available",
        "no node can satisfy this request (memory, CPUs, GPUs or constraint)",
        "ask for less; `sinfo -o '%P %m %c %G'` shows what nodes have",
    ),
    ("Invalid --time specification", "invalid time limit", f"use {_TIME_FORMS}"),
    (
        "Requested time limit is invalid",
        "the time limit exceeds the partition's",
        "ask for less time; `sinfo -o '%P %l'` shows the limits",
    ),
    (
        "Invalid account",
        "invalid account or account/partition combination",
        "check your accounts with `sacctmgr show assoc user=$USER`",
    ),
    ("Invalid qos", "invalid QOS", "check your QOS with `sacctmgr show assoc user=$USER`"),
    ("Invalid generic resource", "invalid --gres/--gpus request", "see `sinfo -o '%P %G'`"),
    ("Requested reservation is invalid", "invalid reservation", "see `scontrol show res`"),
    ("Invalid feature specification", "invalid --constraint", "see `sinfo -o '%P %f'`"),
]


def classify_error(stderr: str) -> SpunnelError:
    """Turn a Slurm command's stderr into the error the user should see."""
    text = " ".join(line.strip() for line in stderr.splitlines() if line.strip())
    if any(fragment in text for fragment in _UNREACHABLE):
        return SlurmUnavailable(
            "the Slurm controller does not answer",
            "try again in a minute; if it persists, tell your administrators",
        )
    for fragment, message, remedy in _REJECTIONS:
        if fragment.lower() in text.lower():
            return UsageError(f"Slurm refused the job: {message}", remedy)
    detail = re.sub(r"^(srun|salloc|squeue|sinfo|scancel): (error: )?", "", text) or "no output"
    return SlurmRejected(f"Slurm refused the request: {detail}", "check the options you passed")


class SlurmCLI(LoggingConfigurable):
    """The Slurm backend built on srun/squeue/sinfo/scancel; works wherever Slurm does.

    squeue runs with --local: one RPC to the controller instead of two (no federation lookup).
    """

    commands_dir = Unicode(
        "",
        config=True,
        help="""Directory holding srun, squeue, sinfo and scancel. Empty (the default): find them
        on PATH.""",
    )
    timeout = Float(
        15.0,
        config=True,
        help="""Seconds to wait for squeue/sinfo/scancel before treating the controller as
        unreachable (the job's state is then UNKNOWN, which never counts as 'job ended').""",
    )

    def command(self, name: str) -> str:
        path = os.path.join(self.commands_dir, name) if self.commands_dir else shutil.which(name)
        if not path or not os.access(path, os.X_OK):
            raise SlurmUnavailable(
                f"the Slurm command {name!r} is not on PATH",
                "load Slurm into your environment (e.g. `module load slurm`) "
                "or set c.SlurmCLI.commands_dir",
            )
        return path

    async def _query(self, name: str, *args: str) -> process.Result:
        argv = [self.command(name), *args]
        try:
            result = await process.run(argv, timeout=self.timeout)
        except TimeoutError as e:
            raise SlurmUnavailable(
                f"the Slurm controller does not answer ({name}: no answer in {self.timeout:g} s)",
                "try again in a minute; if it persists, tell your administrators",
            ) from e
        self.log.debug("%s -> %s %s", " ".join(argv), result.returncode, result.stderr.strip())
        return result

    # -- queries -----------------------------------------------------------------------------
    async def partitions(self) -> list[Partition]:
        """The partitions this user can see, with the largest node's limits."""
        result = await self._query("sinfo", "-h", "-N", "-o", "%P|%a|%l|%m|%c")
        if result.returncode != 0:
            raise classify_error(result.stderr)
        found: dict[str, Partition] = {}
        for line in result.stdout.splitlines():
            fields = line.strip().split("|")
            if len(fields) != 5:
                continue
            raw, avail, limit, mem, cpus = fields
            name = raw.rstrip("*")
            try:
                max_time = parse_time_limit(limit)
            except UsageError:
                max_time = None
            part = found.setdefault(
                name, Partition(name, raw.endswith("*"), avail == "up", max_time, 0, 0, 0)
            )
            part.max_mem_mb = max(part.max_mem_mb, int(re.sub(r"\D", "", mem) or 0))
            part.max_cpus = max(part.max_cpus, int(re.sub(r"\D", "", cpus) or 0))
            part.nodes += 1
        return list(found.values())

    async def job(self, job_id: int) -> JobInfo:
        """The job's state; GONE when the controller no longer knows it, UNKNOWN if unreachable."""
        # One RPC to the controller (squeue costs two or three): this runs every few seconds.
        try:
            result = await self._query("scontrol", "--local", "-o", "show", "job", str(job_id))
        except SlurmUnavailable:
            return JobInfo(job_id, JobState.UNKNOWN)
        if result.returncode != 0:
            if "Invalid job id" in result.stderr:
                return JobInfo(job_id, JobState.GONE)
            return JobInfo(job_id, JobState.UNKNOWN)
        fields = dict(_KEY_VALUE.findall(result.stdout))
        if fields.get("JobId") != str(job_id):
            return JobInfo(job_id, JobState.GONE)
        nodes = fields.get("NodeList", "")
        return JobInfo(
            job_id,
            JobState.parse(fields.get("JobState", "")),
            "" if fields.get("Reason") == "None" else fields.get("Reason", ""),
            "" if nodes == "(null)" else nodes,
            _epoch(fields.get("EndTime", "")),
        )

    async def in_queue(self, job_id: int) -> bool:
        """True while the job is in the queue (pending, running or completing)."""
        return (await self.job(job_id)).state.active

    async def my_jobs(self, node: str = "") -> list[tuple[int, str, JobState]]:
        """(job id, comment, state) of this user's jobs in the queue (on ``node`` if given)."""
        where = ["-w", node] if node else []
        result = await self._query(
            "squeue", "--local", "-h", "-u", getpass.getuser(), *where, "-o", "%i|%k|%T"
        )
        if result.returncode != 0:
            raise classify_error(result.stderr)
        jobs = []
        for line in result.stdout.splitlines():
            job_id, _, rest = line.strip().partition("|")
            comment, _, state = rest.rpartition("|")
            if job_id.isdigit():
                jobs.append((int(job_id), comment, JobState.parse(state)))
        return jobs

    async def cancel(self, job_id: int) -> None:
        """Cancel the job; a job that is already gone is not an error."""
        result = await self._query("scancel", str(job_id))
        if result.returncode != 0 and not re.search(
            r"Invalid job id|already completing or completed", result.stderr
        ):
            raise classify_error(result.stderr)

    def srun_argv(self, job: JobRequest, comment: str, command: list[str]) -> list[str]:
        """The srun that creates the allocation and runs ``command`` as its single task."""
        return [
            self.command("srun"),
            "--nodes=1",
            "--ntasks=1",
            f"--comment={comment}",
            *job.srun_options(),
            *command,
        ]


_KEY_VALUE = re.compile(r"(?:^|\s)([A-Za-z:]+)=(\S*)")  # `scontrol -o show job` fields


def _epoch(text: str) -> float | None:
    try:
        return time.mktime(datetime.strptime(text.strip(), "%Y-%m-%dT%H:%M:%S").timetuple())
    except ValueError:
        return None  # N/A, Unknown, or an unlimited job
