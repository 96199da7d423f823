"""The session manager shared by ``spunnel-notebook`` and the Jupyter server extension.

``SpunnelManager`` holds the site configuration (traitlets), validates requests against the
cluster before anything is submitted, enforces one session per user per host (the state
directory's lock), cleans up what a dead supervisor left, starts ``Session`` objects, and talks to
a running session's supervisor (whichever front end owns it) through its control socket.
"""

from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from traitlets import Enum as TEnum
from traitlets import Float, Instance, Int, List, Unicode, default
from traitlets.config import LoggingConfigurable

from . import probes, process
from .errors import NoSession, SessionExists, SpunnelError, UsageError
from .session import Session
from .slurm import (
    COMMENT_PREFIX,
    JobRequest,
    SlurmCLI,
    format_duration,
    parse_mem_mb,
    parse_time_limit,
)
from .state import CONTROL, CONTROL_PATH, LAST, RECORD, TUNNEL, StateDir, hostname
from .tunnel import PortPair, SshTunnel, check_port


@dataclass
class SessionRequest:
    job: JobRequest = field(default_factory=JobRequest)
    port: int | None = None
    ui: str = "lab"
    tunnels: list[PortPair] = field(default_factory=list)
    tunnel_mode: str = ""  # auto, forward or reverse; empty: SshTunnel.mode


class SpunnelManager(LoggingConfigurable):
    """Site defaults and the machinery shared by ``spunnel-notebook`` and the server extension."""

    partition = Unicode("", config=True, help="Default partition (empty: Slurm's default).")
    mem = Unicode("", config=True, help="Default --mem, e.g. '4000' (MB) or '4G'.")
    time = Unicode("", config=True, help="Default time limit, e.g. '2:00:00'.")
    cpus_per_task = Int(0, config=True, help="Default CPUs (0: Slurm's default).")
    ui = TEnum(["lab", "notebook"], "lab", config=True, help="Default UI: 'lab' or 'notebook'.")
    srun_args = List(
        Unicode(),
        [],
        config=True,
        help="Extra srun options the site adds to every session, before the user's own.",
    )
    state_dir = Unicode(
        "",
        config=True,
        help="""Where the lock, the session record (which holds the token) and the ssh control
        socket live. Must be private (0700, created if missing) and host-local. Empty:
        $SPUNNEL_STATE_DIR, $XDG_RUNTIME_DIR/spunnel-jupyter, or /tmp/spunnel-jupyter-UID.""",
    )
    runtime_base = Unicode(
        "",
        config=True,
        help="""Directory on the node in which the private per-job runtime directory
        spunnel.JOBID.RESTART (0700, holding Jupyter's socket) is made. Empty: the node's
        $TMPDIR or /tmp. Keep it short: Unix socket paths are limited to 107 bytes.""",
    )
    launcher_command = List(
        Unicode(),
        [],
        config=True,
        help="""Command srun runs on the node; it must read spunnel's settings on stdin.
        Empty: this Python, `-m spunnel_jupyter.launcher` (the login host's environment
        must then be reachable from the nodes, e.g. on a shared filesystem).""",
    )
    jupyter_command = List(
        Unicode(),
        [],
        config=True,
        help="Command that starts Jupyter on the node. Empty: `<node python> -m jupyter_server`.",
    )
    jupyter_args = List(Unicode(), [], config=True, help="Extra arguments for Jupyter on the node.")
    start_timeout = Float(
        300.0,
        config=True,
        help="Seconds Jupyter may take, once the job runs, to answer on the node.",
    )
    stop_timeout = Float(
        5.0,
        config=True,
        help="Upper bound in seconds on each teardown step (tunnel, job, queue).",
    )
    jupyter_stop_grace = Float(
        1.0,
        config=True,
        help="Seconds Jupyter gets to shut down on the node before it is killed.",
    )
    pending_poll_interval = Float(
        2.0,
        config=True,
        help="""Seconds between squeue calls while the job is pending (for Slurm's reason).
        The start itself is reported by srun at once; this only refreshes the reason.""",
    )
    refresh_interval = Float(
        60.0,
        config=True,
        help="Seconds between squeue calls while the session runs (for the time remaining).",
    )
    login_host = Unicode(
        config=True,
        help="Name of this login host as seen from laptops, for the printed `ssh -L` line.",
    )

    slurm = Instance(SlurmCLI)
    tunnel = Instance(SshTunnel)

    @default("login_host")
    def _login_host_default(self) -> str:
        return socket.getfqdn()

    @default("slurm")
    def _slurm_default(self) -> SlurmCLI:
        return SlurmCLI(parent=self)

    @default("tunnel")
    def _tunnel_default(self) -> SshTunnel:
        return SshTunnel(parent=self)

    def state(self) -> StateDir:
        return StateDir(self.state_dir or None).ensure()

    # -- requests ----------------------------------------------------------------------------
    def request(
        self,
        *,
        partition: str = "",
        mem: str = "",
        time: str = "",
        cpus_per_task: int | None = None,
        port: int | None = None,
        ui: str = "",
        tunnels: list[PortPair] | None = None,
        tunnel_mode: str = "",
        **job: Any,
    ) -> SessionRequest:
        """A request with the site defaults filled in and its syntax checked."""
        req = SessionRequest(
            job=JobRequest(
                partition=partition or self.partition,
                mem=str(mem or self.mem),
                time=time or self.time,
                cpus_per_task=cpus_per_task or self.cpus_per_task or None,
                **job,
            ),
            port=check_port(port, "--port") if port else None,
            ui=ui or self.ui,
            tunnels=list(tunnels or []),
            tunnel_mode=tunnel_mode,
        )
        if tunnel_mode not in ("", "auto", "forward", "reverse"):
            raise UsageError(f"unknown tunnel mode {tunnel_mode!r}", "use auto, forward or reverse")
        req.job.extra = [*self.srun_args, *req.job.extra]
        if req.ui not in ("lab", "notebook"):
            raise UsageError(f"unknown UI {req.ui!r}", "use 'lab' or 'notebook'")
        if req.job.time:
            parse_time_limit(req.job.time)
        if req.job.mem:
            parse_mem_mb(req.job.mem)
        if req.job.cpus_per_task is not None and req.job.cpus_per_task < 1:
            raise UsageError("--cpus-per-task must be at least 1", "e.g. -c 2")
        for pair in req.tunnels:
            if pair.local == req.port:
                raise UsageError(
                    f"port {pair.local} is both --port and a --tunnel login port",
                    "use different login-side ports",
                )
        return req

    def _check_local_ports(self, req: SessionRequest) -> None:
        for port, what in [(req.port, "--port"), *((p.local, "--tunnel") for p in req.tunnels)]:
            if port and probes.port_in_use(port):
                raise UsageError(
                    f"local port {port} ({what}) is already in use on this host",
                    "pick another port, or leave --port out to get a free one",
                )

    async def _check_against_cluster(self, job: JobRequest) -> None:
        """Refuse what Slurm would refuse (or leave pending forever) before submitting anything."""
        partitions = await self.slurm.partitions()
        names = ", ".join(p.name for p in partitions) or "none"
        if job.partition:
            wanted = [p for p in partitions if p.name == job.partition]
            if not wanted:
                raise UsageError(f"unknown partition {job.partition!r}", f"choose one of: {names}")
        else:
            wanted = [p for p in partitions if p.default]
        if not wanted:
            return  # no default partition visible: let Slurm decide
        part = wanted[0]
        if not part.available:
            raise UsageError(f"partition {part.name!r} is down", f"choose one of: {names}")
        if job.time and part.max_time is not None:
            limit = parse_time_limit(job.time)
            if limit is None or limit > part.max_time:
                raise UsageError(
                    f"time limit {job.time} exceeds partition {part.name!r}'s maximum "
                    f"{format_duration(part.max_time)}",
                    "ask for less time or choose another partition",
                )
        if job.mem and part.max_mem_mb and parse_mem_mb(job.mem) > part.max_mem_mb:
            raise UsageError(
                f"--mem {job.mem} is more than any node in partition {part.name!r} has "
                f"({part.max_mem_mb} MB)",
                f"ask for at most {part.max_mem_mb} MB",
            )
        if job.cpus_per_task and part.max_cpus and job.cpus_per_task > part.max_cpus:
            raise UsageError(
                f"{job.cpus_per_task} CPUs is more than any node in partition {part.name!r} "
                f"has ({part.max_cpus})",
                f"ask for at most {part.max_cpus}",
            )

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(
        self,
        req: SessionRequest,
        on_change: Callable[[Session], None] | None = None,
        owner: str = "cli",
    ) -> Session:
        """Take the lock, clean leftovers, check the request, and start the session.

        Returns once the session is submitted; ``await session.wait()`` for its end. Raises
        SessionExists, UsageError, SlurmUnavailable, StateError before anything is submitted.
        """
        state = self.state()
        if not state.try_lock():
            raise SessionExists(*describe_running(state.read() or {}))
        try:
            notes = await self.clean_leftovers(state)
            self._check_local_ports(req)
            await self._check_against_cluster(req.job)
            session = Session(self, req, state, on_change, owner)
            session.notes.extend(notes)
            await session.launch()
        except BaseException:
            state.unlock()
            raise
        return session

    async def clean_leftovers(self, state: StateDir) -> list[str]:
        """Remove what a dead supervisor left: its job, ssh master, srun, socket and record.

        Only call with the lock held (by us) or free: then nobody else owns these things.
        """
        record = state.read()
        notes: list[str] = []
        if record is None:
            return notes  # the record is written before srun starts and removed last
        # Jobs this tool submitted from this host; with the lock ours, none has a live owner.
        tag = f"{COMMENT_PREFIX}:{hostname()}:"
        for job_id, comment, job_state in await self.slurm.my_jobs():
            if comment.startswith(tag) and job_state.active:
                await self.slurm.cancel(job_id)
                notes.append(f"cancelled job {job_id} left by an earlier session")
        for what in ("ssh", "srun"):
            pid = record.get(f"{what}_pid")
            if process.signal_if_alive(pid, record.get(f"{what}_start"), signal.SIGKILL):
                notes.append(f"stopped a leftover {what} (pid {pid})")
        state.remove(CONTROL_PATH, CONTROL, RECORD, TUNNEL)
        if not notes:
            notes.append("removed the record of a session whose supervisor died")
        return notes

    def status(self) -> dict[str, Any] | None:
        """The running session's record, or None. Never touches Slurm: it is instant."""
        state = self.state()
        record = state.read()
        if not record or not state.is_locked():
            return None
        return record

    def last_ended(self) -> dict[str, Any] | None:
        """How the previous session on this host ended (phase, job, reason, times), if known."""
        return self.state().read(LAST) or None

    async def stop_running(self, timeout: float | None = None) -> str:
        """Ask the running session (started by any front end) to end, and wait until it has."""
        state = self.state()
        timeout = timeout or 4 * self.stop_timeout
        if not state.is_locked():
            notes = await self.clean_leftovers(state)
            if notes:
                return "; ".join(notes)
            raise NoSession("no session is running on this host", "start one with spunnel-notebook")
        try:
            await self.control("stop")
        except (OSError, asyncio.TimeoutError, SpunnelError):
            record = state.read() or {}
            process.signal_if_alive(
                record.get("supervisor_pid"), record.get("supervisor_start"), signal.SIGTERM
            )

        async def unlocked() -> bool:
            return not state.is_locked()

        if not await probes.wait_until(unlocked, timeout=timeout, cap=0.05):
            raise SpunnelError(
                f"the session did not end within {timeout:g} s",
                "run `spunnel-notebook stop` again; its supervisor may be hung",
            )
        return "session stopped"

    async def control(self, command: str) -> str:
        """Send one command to the running session's supervisor; return its answer."""
        state = self.state()
        if not state.is_locked():
            raise NoSession("no session is running on this host", "start one with spunnel-notebook")
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(str(state.file(CONTROL))), 5
        )
        try:
            writer.write(command.encode() + b"\n")
            await writer.drain()
            answer = (await asyncio.wait_for(reader.readline(), 30)).decode().strip()
        finally:
            writer.close()
        status, _, text = answer.partition(" ")
        if status != "ok":
            raise UsageError(text or "the session's supervisor did not answer", "")
        return text


def describe_running(record: dict[str, Any]) -> tuple[str, str]:
    job = record.get("job_id") or "?"
    where = f" on {record['node']}" if record.get("node") else ""
    url = f", {record['url']}" if record.get("url") else ""
    return (
        f"you already have a session on this host: job {job}{where}{url} "
        f"(started by {record.get('owner', 'spunnel')}, phase {record.get('phase', '?')})",
        "use it, or end it with `spunnel-notebook stop` first",
    )
