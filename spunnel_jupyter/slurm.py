"""The Slurm backend built on Slurm's command-line tools (srun, scontrol, squeue, sinfo, scancel).

It implements ``backend.SlurmBackend``. Job state UNKNOWN means "the controller did not answer";
it never means the job died. Every call here is bounded by ``SlurmCLI.timeout`` and runs without
a shell.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import re
import shlex
import shutil
import signal
import time
from collections.abc import Mapping
from datetime import datetime

from traitlets import Float, Unicode
from traitlets.config import LoggingConfigurable

from . import process
from .backend import TIME_FORMS, JobInfo, JobState, Partition, parse_time_limit
from .errors import SlurmRejected, SlurmUnavailable, SpunnelError, UsageError

# Fragments of Slurm's own error texts that mean "the controller did not answer".
_UNREACHABLE = (
    "Unable to contact slurm controller",
    "Socket timed out",
    "Zero Bytes were transmitted",
    "Connection refused",
    "Communication connection failure",
)
# Fragments that mean "this host cannot authenticate to Slurm" (munge down), not "refused".
_AUTH_BROKEN = ("Munge encode failed", "Munge decode failed", "auth/munge",
                "Protocol authentication error", "Invalid authentication credential")  # fmt: skip
# srun's immediate rejections of a request, mapped to what the user should change.
_REJECTIONS = [
    ("Invalid partition name", "unknown partition", "pick one from `sinfo -s`"),
    (
        "Requested node configuration is not available",
        "no node can satisfy this request (memory, CPUs, GPUs or constraint)",
        "ask for less; `sinfo -o '%P %m %c %G'` shows what nodes have",
    ),
    ("Invalid --time specification", "invalid time limit", f"use {TIME_FORMS}"),
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


def unanswered(timeout: float) -> SlurmUnavailable:
    """What the user is told of a controller that did not answer in time (either backend)."""
    return SlurmUnavailable(
        f"the Slurm controller does not answer (waited {timeout:g} s)",
        "try again in a minute; if it persists, tell your administrators",
    )


def classify_error(stderr: str) -> SpunnelError:
    """Turn a Slurm command's stderr into the error the user should see."""
    text = " ".join(line.strip() for line in stderr.splitlines() if line.strip())
    if any(fragment in text for fragment in _AUTH_BROKEN):
        return SlurmUnavailable(
            "Slurm's authentication (munge) does not work on this host",
            "try again in a minute; if it persists, tell your administrators (is munged running?)",
        )
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

    async def _query(
        self, name: str, *args: str, env: Mapping[str, str] | None = None
    ) -> process.Result:
        argv = [self.command(name), *args]
        try:
            result = await process.run(argv, timeout=self.timeout, env=dict(env) if env else None)
        except TimeoutError as e:
            raise unanswered(self.timeout) from e
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
            _epoch(fields.get("StartTime", "")),
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

    def srun_argv(self, options: list[str], tag: str, command: list[str]) -> list[str]:
        """The srun that creates the allocation and runs ``command`` as its single task."""
        return [self.command("srun"), "--nodes=1", "--ntasks=1", f"--comment={tag}",
                *options, *command]  # fmt: skip

    async def start_step(
        self, options: list[str], tag: str, command: list[str], *, stdin: int,
        env: Mapping[str, str], death_signal: signal.Signals,
    ) -> asyncio.subprocess.Process:  # fmt: skip
        argv = self.srun_argv(options, tag, command)
        self.log.debug("$ %s", " ".join(argv))
        try:
            return await process.spawn(argv, stdin=stdin, env=dict(env), death_signal=death_signal)
        except FileNotFoundError as e:
            raise SlurmUnavailable(f"cannot run srun: {e}", "load Slurm into your PATH") from e

    async def submit(
        self, options: list[str], tag: str, command: list[str], env: Mapping[str, str]
    ) -> int:
        result = await self._query(
            "sbatch", "--parsable", "--nodes=1", "--ntasks=1", f"--comment={tag}",
            "--output=/dev/null", *options, f"--wrap=exec {shlex.join(command)}", env=env,
        )  # fmt: skip
        job_id = result.stdout.strip().split(";")[0]
        if result.returncode != 0 or not job_id.isdigit():
            raise classify_error(result.stderr or result.stdout)
        return int(job_id)

    async def start_follower(
        self, job_id: int, name: str, command: list[str], *, stdin: int,
        env: Mapping[str, str], death_signal: signal.Signals,
    ) -> asyncio.subprocess.Process:  # fmt: skip
        # --mem: steps share CPUs with --overlap, not memory (Slurm 22.05); a follower needs
        # little, and must not wait for the memory another step holds.
        argv = [self.command("srun"), f"--jobid={job_id}", "--overlap", "--nodes=1",
                "--ntasks=1", "--mem=32M", f"--job-name={name}", "--quiet", *command]  # fmt: skip
        self.log.debug("$ %s", " ".join(argv))
        try:
            return await process.spawn(argv, stdin=stdin, env=dict(env), death_signal=death_signal)
        except FileNotFoundError as e:
            raise SlurmUnavailable(f"cannot run srun: {e}", "load Slurm into your PATH") from e

    def pty_step_argv(
        self, job_id: int, name: str, options: list[str], command: list[str]
    ) -> list[str]:
        # No --mem of its own (like the steps the e2e tests run beside a session's launcher);
        # a site whose Slurm wants one adds it to ``options`` (c.NodeShell.srun_args).
        return [self.command("srun"), f"--jobid={job_id}", "--overlap", "--pty", "--nodes=1",
                "--ntasks=1", f"--job-name={name}", *options, *command]  # fmt: skip

    async def signal_batch(self, job_id: int, signal_name: str) -> None:
        result = await self._query("scancel", "--batch", f"--signal={signal_name}", str(job_id))
        if result.returncode != 0 and not re.search(
            r"Invalid job id|already completing or completed", result.stderr
        ):
            raise classify_error(result.stderr)

    async def my_steps(self) -> list[tuple[str, str]]:
        result = await self._query(
            "squeue", "--local", "-h", "-s", "-u", getpass.getuser(), "-o", "%i|%j"
        )
        if result.returncode != 0:
            raise classify_error(result.stderr)
        steps = []
        for line in result.stdout.splitlines():
            step, _, name = line.strip().partition("|")
            if re.fullmatch(r"\d+\.\w+", step):
                steps.append((step, name))
        return steps

    async def cancel_step(self, step: str) -> None:
        result = await self._query("scancel", step)
        if result.returncode != 0 and "Invalid job id" not in result.stderr:
            raise classify_error(result.stderr)

    def classify_error(self, text: str) -> SpunnelError:
        return classify_error(text)

    async def describe(self) -> str:
        return "Slurm's commands (cli)"

    def close(self) -> None:
        pass  # every query is a process of its own, ended when it answers

    def commands(self) -> list[str]:
        names = ("srun", "sbatch", "scontrol", "squeue", "sinfo", "scancel")
        return [self.command(name) for name in names]


_KEY_VALUE = re.compile(r"(?:^|\s)([A-Za-z:]+)=(\S*)")  # `scontrol -o show job` fields


def _epoch(text: str) -> float | None:
    try:
        return time.mktime(datetime.strptime(text.strip(), "%Y-%m-%dT%H:%M:%S").timetuple())
    except ValueError:
        return None  # N/A, Unknown, or an unlimited job
