"""The pyslurm backend: job and partition queries and cancels through pyslurm's API.

pyslurm calls libslurm's RPCs directly, where the command-line backend forks and execs scontrol,
squeue, sinfo or scancel for each query. Everything pyslurm cannot do stays with the command line
(``SlurmPyslurm`` extends ``SlurmCLI``): srun starts the interactive step, sbatch a detached one,
the extra steps and signals are srun's and scancel's. Errors are told exactly as the command
line's are: pyslurm's ``RPCError`` carries the same text (libslurm's ``slurm_strerror``) that the
commands print, and goes through the same ``classify_error``.

pyslurm runs in a worker process of its own (pyslurm_worker.py says why), started at the first
query and kept; each call is one JSON line each way, on a thread so that the event loop (the
JupyterLab server's) never waits, and bounded by ``SlurmCLI.timeout``: a worker that does not answer
in time is killed and a new one started at the next call. The worker's first line names the
pyslurm release; it is used only when that is the release of this host's Slurm commands (a client
newer than its controller cannot talk to it).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from typing import IO, Any

from traitlets import Bool

from . import process
from .backend import JobInfo, JobState, Partition
from .errors import SlurmUnavailable, SpunnelError
from .slurm import SlurmCLI, classify_error, unanswered

WORKER = "spunnel_jupyter.pyslurm_worker"


@dataclass(frozen=True)
class Choice:
    """Which backend answers the queries, and why (for `doctor`)."""

    pyslurm: bool
    why: str


def release(version: str) -> str:
    """A Slurm (or pyslurm) version's major release: '25.11' of '25.11.7' or 'slurm 25.11.7'."""
    return ".".join(version.split()[-1].split(".")[:2]) if version.strip() else ""


class Worker:
    """The pyslurm worker process: one call at a time, each a JSON line each way (blocking: call
    ``ask`` on a thread). Dies with its parent (PR_SET_PDEATHSIG, and EOF on its stdin)."""

    def __init__(self) -> None:
        self.errors: IO[bytes] = tempfile.TemporaryFile()  # libslurm's messages, read on death
        parent = os.getpid()
        self.proc = subprocess.Popen(
            process.python_module(WORKER), cwd="/",
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.errors,
            start_new_session=True,
            preexec_fn=lambda: process.die_with_parent(parent, signal.SIGKILL),
        )  # fmt: skip
        self.lock = threading.Lock()

    def read(self) -> dict[str, Any] | None:
        """Its next line; None at its end, or if the line is not its JSON (the protocol is lost:
        something else wrote on its stdout)."""
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        try:
            reply = json.loads(line) if line else None
        except ValueError:
            return None
        return reply if isinstance(reply, dict) else None

    def ask(self, call: str, args: list[Any]) -> dict[str, Any] | None:
        """The worker's reply, or None if it died (or was killed: ``end``) meanwhile."""
        assert self.proc.stdin is not None
        with self.lock:
            try:
                self.proc.stdin.write((json.dumps({"call": call, "args": args}) + "\n").encode())
                self.proc.stdin.flush()
            except OSError:
                return None
            return self.read()

    def said(self) -> str:
        """The end of what it wrote to stderr (why it died)."""
        self.errors.seek(0)
        return " ".join(self.errors.read().decode(errors="replace").split())[-300:]

    def end(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout, self.errors):
            if pipe is not None:
                pipe.close()


class SlurmPyslurm(SlurmCLI):
    """Queries through pyslurm where it can be used; else the commands, or an error (required)."""

    required = Bool(
        False,
        help="""True: pyslurm or nothing (c.SpunnelManager.slurm_backend = 'pyslurm'). False
        ('auto'): the command line where pyslurm cannot be used.""",
    )

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._choice: Choice | None = None  # two first calls at once may both probe: harmless
        self._worker: Worker | None = None
        self._calls = 0  # calls in flight: close() waits for them
        self._closing = False
        self._turn: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None

    async def _start(self) -> tuple[Worker | None, str]:
        """A new worker and the pyslurm version it says, or None and why it could not start."""
        worker = Worker()  # from the event loop's thread: PR_SET_PDEATHSIG follows that thread
        try:
            hello = await asyncio.wait_for(asyncio.to_thread(worker.read), self.timeout)
        except asyncio.TimeoutError:
            worker.end()
            return None, f"pyslurm did not load within {self.timeout:g} s"
        except BaseException:  # cancelled: nobody will use it
            worker.end()
            raise
        if hello is None or "version" not in hello:
            worker.proc.kill()
            code = worker.proc.wait()
            why = f"pyslurm does not load here (exit {code}: {worker.said() or 'no output'})"
            worker.end()
            return None, why
        if self._worker is not None and self._worker.proc.poll() is None:
            worker.end()  # a call at the same time started one first: keep that one
            return self._worker, str(hello["version"])
        self._worker = worker
        return worker, str(hello["version"])

    async def choice(self) -> Choice:
        """Decide once: pyslurm, if it imports and was built for this host's Slurm release."""
        if self._choice is None:
            choice = await self._probe()
            if not choice.pyslurm and self.required:
                raise SlurmUnavailable(
                    f"the pyslurm backend cannot be used: {choice.why}",
                    "tell your administrators (c.SpunnelManager.slurm_backend = 'pyslurm'; "
                    "'auto' would use Slurm's commands instead)",
                )
            self._choice = choice
        return self._choice

    async def _probe(self) -> Choice:
        if importlib.util.find_spec("pyslurm") is None:  # finds it without importing it
            return Choice(False, "pyslurm is not installed in this Python environment")
        local = await process.run([self.command("sinfo"), "--version"], timeout=self.timeout)
        running = (local.stdout.split() or [""])[-1]  # "slurm 25.11.7", "slurm-wlm 22.05.8"
        worker, said = await self._start()
        if worker is None:
            return Choice(False, said)
        if not running or release(said) != release(running):
            self.close()
            running = running or "unknown (sinfo --version said nothing)"
            return Choice(False, f"pyslurm {said} is built for Slurm {release(said)}, this "
                                 f"host's is {running}")  # fmt: skip
        return Choice(True, f"pyslurm {said}, built for this host's Slurm {running}")

    async def describe(self) -> str:
        choice = await self.choice()
        mode = "pyslurm" if self.required else "auto"
        if choice.pyslurm:
            return f"pyslurm ({mode}): {choice.why}"
        return f"Slurm's commands ({mode}): {choice.why}"

    def close(self) -> None:
        """End the worker, once the calls in flight (another page's, a starting session's) have
        their answers."""
        self._closing = True
        if not self._calls:
            self._end(self._worker)

    def _end(self, worker: Worker | None) -> None:
        """End ``worker`` if it is still the one in use (not one a later call started)."""
        if worker is not None and worker is self._worker:
            self._closing = False
            self._worker = None
            worker.end()

    def _lock(self) -> asyncio.Lock:
        """One call at a time, queued here (not against its time bound); one lock per loop."""
        loop = asyncio.get_running_loop()
        if self._turn is None or self._turn[0] is not loop:
            self._turn = (loop, asyncio.Lock())
        return self._turn[1]

    async def _ask(self, call: str, *args: Any) -> Any:
        """What the worker answers to ``call(*args)``; Slurm's own error as its SpunnelError
        (``classify_error``). A worker that dies or does not answer in time is replaced."""
        self._calls += 1
        try:
            async with self._lock():
                reply = await self._ask_worker(call, list(args))
        finally:
            self._calls -= 1
            if self._closing and not self._calls:
                self._end(self._worker)
        if "error" in reply:
            raise classify_error(str(reply["error"]))
        if "bug" in reply:
            raise SlurmUnavailable(f"pyslurm failed: {reply['bug']}",
                                   "tell your administrators (c.SpunnelManager.slurm_backend = "
                                   "'cli' avoids it)")  # fmt: skip
        return reply["ok"]

    async def _ask_worker(self, call: str, args: list[Any]) -> dict[str, Any]:
        worker = self._worker
        if worker is None or worker.proc.poll() is not None:
            self._end(worker)
            worker, said = await self._start()
            if worker is None:
                raise SlurmUnavailable(f"the pyslurm backend stopped working: {said}",
                                       "tell your administrators (or set "
                                       "c.SpunnelManager.slurm_backend = 'cli')")  # fmt: skip
        try:
            reply = await asyncio.wait_for(asyncio.to_thread(worker.ask, call, args), self.timeout)
        except asyncio.TimeoutError:
            reply = None
        if reply is None:  # no answer in time, or it died: the next call starts a new one
            self._end(worker)
            raise unanswered(self.timeout)
        return reply

    # -- the queries -------------------------------------------------------------------------
    async def job(self, job_id: int) -> JobInfo:
        if not (await self.choice()).pyslurm:
            return await super().job(job_id)
        try:
            found = await self._ask("job", job_id)
        except SpunnelError as e:
            gone = "Invalid job id" in str(e)  # Slurm forgot it, as scontrol says
            return JobInfo(job_id, JobState.GONE if gone else JobState.UNKNOWN)
        reason = found["reason"] or ""
        return JobInfo(job_id, JobState.parse(found["state"] or ""),
                       "" if reason == "None" else reason, found["nodes"] or "",
                       _epoch(found["end"]), _epoch(found["start"]))  # fmt: skip

    async def my_jobs(self, node: str = "") -> list[tuple[int, str, JobState]]:
        if not (await self.choice()).pyslurm:
            return await super().my_jobs(node)
        found = await self._ask("my_jobs", os.getuid(), node)
        jobs = [(int(i), str(comment), JobState.parse(state or "")) for i, comment, state in found]
        # as squeue shows them: the jobs in the queue
        return [job for job in jobs if job[2].active and job[2] is not JobState.UNKNOWN]

    async def cancel(self, job_id: int) -> None:
        if not (await self.choice()).pyslurm:
            return await super().cancel(job_id)
        try:
            await self._ask("cancel", job_id)
        except SpunnelError as e:
            if "Invalid job id" not in e.message:  # gone already: what a cancel wants
                raise

    async def partitions(self) -> list[Partition]:
        if not (await self.choice()).pyslurm:
            return await super().partitions()
        found = await self._ask("partitions")
        for p in found:
            limit = p["max_time"]  # minutes; None or "UNLIMITED" for none
            p["max_time"] = limit * 60 if isinstance(limit, int) and limit > 0 else None
        return [Partition(**p) for p in found]


def _epoch(value: Any) -> float | None:
    return float(value) if isinstance(value, int) and value > 0 else None
