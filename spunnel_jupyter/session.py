"""A session: one allocation + Jupyter on its first node + the tunnels, owned by one supervisor.

Made by ``SpunnelManager.start`` (manager.py). A ``Session`` runs its whole life in the
supervisor's event loop (the terminal's ``spunnel-notebook``, or the JupyterLab server):

    srun (allocation + launcher task) -> "ready" from the node -> ssh ControlMaster -> URL
    ... until the first of: stop requested, srun ended (job ended / Jupyter exited), tunnel lost
    -> teardown: close tunnel, cancel job, wait until it left the queue, remove record, unlock.

Teardown runs whatever ended the session, exactly once, every step bounded by ``stop_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import os
import re
import secrets
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import IO, TYPE_CHECKING, Any

from . import probes, process
from .errors import (
    ExitCode,
    JupyterError,
    SlurmUnavailable,
    SpunnelError,
    TunnelError,
    UsageError,
)
from .launcher import EVENT_PREFIX
from .relay import Relay
from .slurm import COMMENT_PREFIX, JobState, classify_error
from .state import CONTROL, CONTROL_PATH, LAST, LOG, RECORD, TUNNEL, StateDir, hostname
from .tunnel import PortPair, Tunnel, pair_forward, parse_port_pairs

if TYPE_CHECKING:
    from .manager import SessionRequest, SpunnelManager

# Why a job ended, as the user is told.
_ENDINGS = {
    JobState.TIMEOUT: "reached its time limit",
    JobState.CANCELLED: "was cancelled (scancel or Slurm)",
    JobState.PREEMPTED: "was preempted",
    JobState.NODE_FAIL: "lost its node (NODE_FAIL)",
    JobState.OUT_OF_MEMORY: "ran out of memory",
    JobState.DEADLINE: "reached its deadline",
}


class Phase(str, Enum):
    PENDING = "pending"  # submitted, waiting for the allocation
    STARTING = "starting"  # job running, Jupyter starting / tunnel being built
    READY = "ready"  # URL answers through the tunnel
    ENDING = "ending"  # teardown in progress
    ENDED = "ended"


@dataclass
class Outcome:
    reason: str
    exit_code: ExitCode = ExitCode.OK
    error: SpunnelError | None = None


# Variables of the login-side Jupyter (or JupyterHub) that must not reach the job: credentials
# and per-server state. The user's own JUPYTER_PATH, JUPYTER_CONFIG_DIR, ... pass through.
_NOT_FOR_THE_JOB = ("JUPYTERHUB_", "JPY_", "JUPYTER_TOKEN", "JUPYTER_RUNTIME_DIR",
                    "JUPYTERLAB_WORKSPACES_DIR", "JUPYTER_SERVER_")  # fmt: skip


def job_environment() -> dict[str, str]:
    """The environment srun exports to the job: ours, less the login server's own state."""
    return {k: v for k, v in os.environ.items() if not k.startswith(_NOT_FOR_THE_JOB)}


class Session:
    """One running session. Created by SpunnelManager.start; owns its srun, ssh and the lock."""

    def __init__(
        self,
        manager: SpunnelManager,
        req: SessionRequest,
        state: StateDir,
        on_change: Callable[[Session], None] | None,
        owner: str,
    ) -> None:
        self.manager = manager
        self.log = manager.log
        self.req = req
        self.state = state
        self.on_change = on_change
        self.owner = owner
        self.id = secrets.token_hex(6)
        self.token = secrets.token_hex(24)
        self.port = req.port or probes.free_port()
        self.phase = Phase.PENDING
        self.job_id: int | None = None
        self.job_state = JobState.PENDING
        self.reason = ""  # Slurm's pending reason
        self.node = ""
        self.end_time: float | None = None
        self.socket_path = ""
        self.url = ""
        self.notes: list[str] = []  # things the user should be told, in order
        self.tunnel_state = "down"
        self.times: dict[str, float] = {"submitted": time.time()}
        self.outcome: Outcome | None = None
        self.srun: asyncio.subprocess.Process | None = None
        self.tunnel: Tunnel | None = None
        self.relay: Relay | None = None  # forward mode: our listener on the port
        self._node_exit: dict[str, Any] = {}
        self._slurm_said: list[str] = []
        self._stop = asyncio.Event()
        self._stop_outcome: Outcome | None = None
        self._ready = asyncio.Event()
        self._node_started = asyncio.Event()
        self._node_ready_event = asyncio.Event()
        self._reverse_up = asyncio.Event()
        self._node_gave_up = asyncio.Event()
        self._reverse_said = ""
        self.tunnel_mode = ""
        self._node_url_path = ""
        self._task: asyncio.Task[Outcome] | None = None
        self._readers: list[asyncio.Future[None]] = []
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
        self._log: IO[bytes] = os.fdopen(os.open(state.file(LOG), flags, 0o600), "wb", 0)
        os.fchmod(self._log.fileno(), 0o600)  # an older log may have been looser
        self._control: asyncio.AbstractServer | None = None

    # -- public ------------------------------------------------------------------------------
    @property
    def time_left(self) -> float | None:
        return None if self.end_time is None else max(0.0, self.end_time - time.time())

    def snapshot(self, *, with_secrets: bool = False) -> dict[str, Any]:
        """What status displays, the REST API returns and session.json holds."""
        data: dict[str, Any] = {
            "version": 1,
            "session_id": self.id,
            "host": hostname(),
            "user": getpass.getuser(),
            "owner": self.owner,
            "phase": self.phase.value,
            "job_id": self.job_id,
            "job_state": self.job_state.value,
            "reason": self.reason,
            "node": self.node,
            "port": self.port,
            "tunnels": [str(p) for p in self.req.tunnels],
            "tunnel_state": self.tunnel_state,
            "tunnel_mode": self.tunnel_mode,
            "notes": self.notes[-20:],
            "end_time": self.end_time,
            "times": self.times,
            "supervisor_pid": os.getpid(),
            "supervisor_start": process.start_time(os.getpid()),
            "log": str(self.state.file(LOG)),
        }
        if self.outcome:
            data["ended_reason"] = self.outcome.reason
        if with_secrets:
            data["url"] = self.url
            data["token"] = self.token
            for name, proc in (("srun", self.srun), ("ssh", self.tunnel and self.tunnel.proc)):
                if proc is not None:
                    data[f"{name}_pid"] = proc.pid
                    data[f"{name}_start"] = process.start_time(proc.pid)
        return data

    def request_stop(self, reason: str, exit_code: ExitCode = ExitCode.OK) -> None:
        """End the session (idempotent; the first reason wins). Safe from signal handlers."""
        if self._stop_outcome is None:
            self._stop_outcome = Outcome(reason, exit_code)
        self._stop.set()

    async def wait_ready(self) -> bool:
        """Wait until the URL answers (True) or the session ended first (False)."""
        assert self._task is not None
        ready = asyncio.ensure_future(self._ready.wait())
        await asyncio.wait({ready, self._task}, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        return self._ready.is_set()

    async def wait(self) -> Outcome:
        assert self._task is not None
        return await asyncio.shield(self._task)

    # -- lifecycle ---------------------------------------------------------------------------
    async def launch(self) -> None:
        m = self.manager
        if (self.req.tunnel_mode or m.tunnel.mode) != "reverse":
            # Bound before submitting: a taken port costs no job, and stays ours from here on.
            try:
                self.relay = Relay(self.port, str(self.state.file(TUNNEL)))
            except OSError as e:
                raise UsageError(
                    f"local port {self.port} cannot be bound on this host: {e.strerror}",
                    "pick another port, or leave --port out to get a free one",
                ) from e
        try:
            await self._submit()
        except BaseException:
            self._close_relay()
            raise

    async def _submit(self) -> None:
        m = self.manager
        command = m.launcher_command or [sys.executable, "-m", "spunnel_jupyter.launcher"]
        comment = f"{COMMENT_PREFIX}:{hostname()}:{self.id}"
        argv = m.slurm.srun_argv(self.req.job, comment, command)
        self._save()  # before srun: a supervisor killed right now leaves enough to clean up
        self._log.write(f"$ {' '.join(argv)}\n".encode())
        settings = {
            "token": self.token,
            "ui": self.req.ui,
            "runtime_base": m.runtime_base,
            "jupyter_command": m.jupyter_command,
            "jupyter_args": m.jupyter_args,
            "start_timeout": m.start_timeout,
            "stop_grace": m.jupyter_stop_grace,
        }
        # srun's stdin is a pipe of ours, the settings (the token's only path) already in it: a
        # write can then never race an srun that refused the job and exited at once.
        stdin, self._to_node = os.pipe()
        os.write(self._to_node, (json.dumps(settings) + "\n").encode())
        try:
            # If we die, srun gets SIGUSR1 and forwards it to the launcher, which cleans up on the
            # node and exits, ending the job. (srun turns SIGTERM into SIGKILL for its tasks.)
            self.srun = await process.spawn(
                argv, stdin=stdin, env=job_environment(), death_signal=signal.SIGUSR1
            )
        except FileNotFoundError as e:
            os.close(self._to_node)
            raise SlurmUnavailable(f"cannot run srun: {e}", "load Slurm into your PATH") from e
        finally:
            os.close(stdin)
        self._save()
        self._control = await asyncio.start_unix_server(
            self._on_control, path=str(self.state.file(CONTROL))
        )
        os.chmod(self.state.file(CONTROL), 0o600)  # the directory is 0700; this is belt and braces
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> Outcome:
        assert self.srun is not None
        srun = self.srun
        self._readers = [
            asyncio.ensure_future(self._read_events(srun.stdout)),
            asyncio.ensure_future(self._read_srun_stderr(srun.stderr)),
        ]
        readers: list[asyncio.Future[Any]] = [
            *self._readers,
            asyncio.ensure_future(self._poll_job()),
        ]
        srun_exit = asyncio.ensure_future(srun.wait())
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            outcome = await self._supervise(srun_exit, stop)
        except SpunnelError as e:
            outcome = Outcome(e.message, e.exit_code, e)
        except Exception as e:  # a bug: still tear down, and say so
            self.log.exception("session failed")
            outcome = Outcome(f"internal error: {e!r}", ExitCode.ERROR, SpunnelError(str(e)))
        self.outcome = outcome
        self._log.write(f"session ended: {outcome.reason} (job {self.job_id})\n".encode())
        try:
            await self._teardown()
        finally:
            for task in [*readers, srun_exit, stop]:
                task.cancel()
            self._finish()
        return outcome

    async def _supervise(
        self, srun_exit: asyncio.Future[int], stop: asyncio.Future[Any]
    ) -> Outcome:
        """Wait for the first thing that ends the session; return why.

        At any time exactly one of ``building`` (the tunnel being built or rebuilt) and
        ``tunnel_exit`` (the running master's exit) is watched beside srun and the stop request.
        """
        tunnel_exit: asyncio.Future[int] | None = None
        building: asyncio.Future[None] | None = asyncio.ensure_future(self._wait_node_ready())
        try:
            while True:
                watched = {srun_exit, stop}
                for task in (building, tunnel_exit):  # none in reverse mode: the node watches
                    if task is not None:
                        watched.add(task)
                await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
                if stop.done():
                    assert self._stop_outcome is not None
                    return self._stop_outcome
                if srun_exit.done():
                    await asyncio.wait(self._readers, timeout=1)  # srun's last words
                    return await self._why_srun_ended(srun_exit.result())
                if building is not None and building.done():
                    building.result()  # raises if Jupyter or the tunnel failed
                    building = None
                    if self.tunnel is not None and self.tunnel_mode == "forward":
                        tunnel_exit = asyncio.ensure_future(self.tunnel.proc.wait())
                elif tunnel_exit is not None and tunnel_exit.done():
                    lost = f"the tunnel's ssh to {self.node} exited ({tunnel_exit.result()})"
                    if self.manager.tunnel.reconnect_timeout <= 0:
                        raise TunnelError(lost, f"see {self.state.file(LOG)}")
                    tunnel_exit = None
                    self.announce(f"{lost}; reconnecting")
                    building = asyncio.ensure_future(self._reconnect())
        finally:
            for task in (building, tunnel_exit):
                if task is not None:
                    task.cancel()

    async def _wait_node_ready(self) -> None:
        """Build the tunnel while Jupyter starts on the node; publish the URL once Jupyter
        answers through it."""
        await self._node_started.wait()
        m = self.manager
        mode = self.req.tunnel_mode or m.tunnel.mode
        # The master connects while Jupyter starts: its -L to the socket is used only once a
        # client connects, after the node said Jupyter is listening.
        master = asyncio.ensure_future(self._open_master()) if mode != "reverse" else None
        try:
            await self._node_ready_event.wait()
        finally:
            if master is not None and not self._node_ready_event.is_set():
                master.cancel()
        self.times["jupyter_ready"] = time.time()
        if master is not None:
            try:
                await master
                await self._check_url()
                mode = "forward"
            except TunnelError as e:
                if mode == "forward":
                    raise
                mode = "reverse"
                self._close_relay()  # the login host's sshd binds the port in reverse mode
                self.announce(
                    f"{e.message}; falling back to reverse mode "
                    f"(the node dials back to {m.tunnel.reverse_host})"
                )
        if mode == "reverse":
            await self._open_reverse()
        self.tunnel_mode = mode
        url_path = self._node_url_path or "/lab"
        self.url = f"http://127.0.0.1:{self.port}{url_path}?token={self.token}"
        self.times["ready"] = time.time()
        self.tunnel_state = "up"
        self._set(phase=Phase.READY)
        self._ready.set()
        # After the URL, which need not wait for them: the time left, and a word on adoption.
        info = await m.slurm.job(self.job_id) if self.job_id else None
        if info and info.state is not JobState.UNKNOWN:
            self._set(end_time=info.end_time)
        if mode == "forward":
            await self._warn_if_adoption_is_ambiguous()  # after the URL: it need not wait

    async def _open_master(self) -> None:
        """Start the ControlMaster with all forwards; return once ``-O check`` says it is up."""
        assert self.relay is not None
        forwards = [f"{self.relay.target}:{self.socket_path}"]
        forwards += [pair_forward(p) for p in self.req.tunnels]
        self.tunnel = await self.manager.tunnel.open(
            self.node, self.state.file(CONTROL_PATH), forwards, self._log
        )
        self._save()

    async def _open_tunnel(self) -> None:
        """Start the ControlMaster; return once Jupyter answers through it."""
        await self._open_master()
        await self._check_url()

    async def _warn_if_adoption_is_ambiguous(self) -> None:
        """pam_slurm_adopt puts an ssh into one of the user's jobs on the node: say if it has a
        choice (the tunnel may then be accounted to, and die with, another job)."""
        try:
            others = [
                job_id
                for job_id, _, state in await self.manager.slurm.my_jobs(node=self.node)
                if job_id != self.job_id and state is JobState.RUNNING
            ]
        except SpunnelError:
            return
        if others:
            self.announce(
                f"you have other jobs on {self.node} ({', '.join(map(str, others))}): on sites "
                "with pam_slurm_adopt the tunnel may be adopted into one of them and end with it"
            )

    async def _open_reverse(self) -> None:
        """Reverse mode: ask the launcher to dial back; return once Jupyter answers here."""
        m = self.manager
        plan = m.tunnel.reverse_plan(self.port, self.req.tunnels)
        with contextlib.suppress(BrokenPipeError):  # srun gone: the wait below says why
            os.write(self._to_node, (json.dumps({"cmd": "reverse", "plan": plan}) + "\n").encode())
        up = asyncio.ensure_future(self._reverse_up.wait())
        gave_up = asyncio.ensure_future(self._node_gave_up.wait())
        try:
            await asyncio.wait(
                {up, gave_up}, timeout=m.tunnel.connect_timeout + m.tunnel.reconnect_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )  # fmt: skip
        finally:
            up.cancel()
            gave_up.cancel()
        if not self._reverse_up.is_set():
            raise TunnelError(
                f"the node could not dial back to {m.tunnel.reverse_host}: "
                f"{self._node_exit.get('message') or self._reverse_said or 'no answer'}",
                "check that the nodes can `ssh` to this host (c.SshTunnel.reverse_host)",
            )
        await self._check_url()

    async def _check_url(self) -> None:
        """Jupyter must answer through the tunnel with the token before anyone sees the URL."""
        m = self.manager

        async def answers() -> bool:
            try:
                status = await probes.http_status(
                    "/api/status",
                    port=self.port,
                    timeout=5,
                    headers={"Authorization": f"token {self.token}"},
                )
            except (OSError, asyncio.TimeoutError):
                return False
            return status == 200

        if not await probes.wait_until(answers, timeout=m.tunnel.connect_timeout):
            raise TunnelError(
                "Jupyter does not answer through the tunnel", f"see {self.state.file(LOG)}"
            )

    async def _reconnect(self) -> None:
        """Rebuild a lost tunnel on the same port (same URL), with capped exponential backoff."""
        m = self.manager
        lost_at = time.monotonic()
        deadline = lost_at + m.tunnel.reconnect_timeout
        delay = 0.05
        self._set(tunnel_state="reconnecting")
        while True:
            if self.tunnel is not None:
                await self.tunnel.close(grace=0.5)  # the dead master's socket and forwards
            try:
                await self._open_tunnel()
                break
            except TunnelError as e:
                if time.monotonic() + delay > deadline:
                    raise TunnelError(
                        f"the tunnel to {self.node} was lost and not re-established within "
                        f"{m.tunnel.reconnect_timeout:g} s ({e.message})",
                        f"see {self.state.file(LOG)}; start a new session",
                    ) from e
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
        took = time.monotonic() - lost_at
        self.times["reconnected_s"] = round(took, 3)
        self._set(tunnel_state="up")
        self.announce(f"tunnel re-established after {took:.1f} s; the URL is unchanged")

    # -- runtime forwards --------------------------------------------------------------------
    async def forward(self, pair: PortPair, cancel: bool = False) -> str:
        """Add (or cancel) a port pair on the running master: `-O forward` / `-O cancel`."""
        if self.phase is not Phase.READY:
            raise UsageError("the session is not ready yet", "try again once the URL is shown")
        if self.tunnel is None or self.tunnel_mode != "forward":
            raise UsageError(
                "forwards can be added at runtime in forward mode only",
                "start the session with --tunnel SP:EP instead",
            )
        known = pair in self.req.tunnels
        if cancel and not known:
            raise UsageError(f"{pair} is not forwarded", "see `spunnel-notebook status`")
        if not cancel:
            if known or pair.local == self.port:
                raise UsageError(f"port {pair.local} is already forwarded", "pick another")
            if probes.port_in_use(pair.local):
                raise UsageError(
                    f"local port {pair.local} is already in use", "pick another login port"
                )
        await self.tunnel.forward(pair_forward(pair), cancel=cancel)
        if cancel:
            self.req.tunnels.remove(pair)
        else:
            self.req.tunnels.append(pair)
        self._set()
        verb = "cancelled" if cancel else "forwarding"
        return f"{verb} 127.0.0.1:{pair.local} -> port {pair.remote} on {self.node}"

    def announce(self, text: str) -> None:
        """Tell every front end something happened (kept in ``notes``, written to the log)."""
        self.notes.append(text)
        self._log.write(f"spunnel: {text}\n".encode())
        self._set()

    # -- srun's channels ---------------------------------------------------------------------
    async def _read_events(self, stream: asyncio.StreamReader | None) -> None:
        """Events from the launcher on the node (srun relays its stdout)."""
        assert stream is not None
        async for raw in stream:
            line = raw.decode(errors="replace").rstrip("\n")
            if not line.startswith(EVENT_PREFIX):
                self._log.write(raw)
                continue
            try:
                event = json.loads(line[len(EVENT_PREFIX) :])
            except ValueError:
                continue
            self._log.write(raw)
            kind = event.get("event")
            if kind == "started":
                self.times.setdefault("running", time.time())
                self.socket_path = event.get("socket", "")
                job_id = str(event.get("job_id", ""))
                self._set(
                    job_id=int(job_id) if job_id.isdigit() else self.job_id,
                    node=event.get("host", ""),
                    job_state=JobState.RUNNING,
                    reason="",
                    phase=Phase.STARTING,
                )
                self._node_started.set()
            elif kind == "ready":
                self.socket_path = event["socket"]
                self._node_url_path = event.get("url_path", "/lab")
                self._node_ready_event.set()
            elif kind == "exited":
                self._node_exit = event
                self._node_gave_up.set()
            elif kind == "tunnel":
                self._on_reverse_tunnel(event)

    _QUEUED = re.compile(r"srun: job (\d+) queued and waiting for resources")
    _ALLOCATED = re.compile(r"srun: job (\d+) has been allocated resources")
    _SLURM_SAYS = re.compile(r"(srun|slurmstepd)(-[\w.-]+)?: ")

    async def _read_srun_stderr(self, stream: asyncio.StreamReader | None) -> None:
        """srun's own messages (queue progress, errors) and Jupyter's log, masked on the node."""
        assert stream is not None
        async for raw in stream:
            self._log.write(raw)
            line = raw.decode(errors="replace").strip()
            if m := self._QUEUED.search(line):
                self._set(job_id=int(m.group(1)), job_state=JobState.PENDING)
            elif m := self._ALLOCATED.search(line):
                self.times.setdefault("running", time.time())
                self._set(
                    job_id=int(m.group(1)),
                    job_state=JobState.RUNNING,
                    reason="",
                    phase=Phase.STARTING,
                )
            elif self._SLURM_SAYS.match(line):
                self._slurm_said.append(line)

    def _on_reverse_tunnel(self, event: dict[str, Any]) -> None:
        if event.get("state") == "up":
            if self.tunnel_state == "reconnecting":
                self._set(tunnel_state="up")
                self.announce("the node re-established the reverse tunnel; the URL is unchanged")
            self._reverse_up.set()
        elif event.get("state") == "lost":
            self._reverse_said = event.get("message", "")
            if self._reverse_up.is_set():
                self._set(tunnel_state="reconnecting")
                self.announce(f"the reverse tunnel from {self.node} was lost; reconnecting")

    async def _poll_job(self) -> None:
        """Refresh Slurm's pending reason, then the end time; srun reports the start itself."""
        m = self.manager
        while True:
            running = self.job_state is not JobState.PENDING
            await asyncio.sleep(m.refresh_interval if running else m.pending_poll_interval)
            if self.job_id is None:
                continue
            info = await m.slurm.job(self.job_id)
            if info.state is JobState.UNKNOWN:
                continue  # controller unreachable: the job is not known to have ended
            if info.state is JobState.PENDING:
                self._set(reason=info.reason)
            elif self.phase is Phase.READY and info.end_time:
                self._set(end_time=info.end_time)

    async def _why_srun_ended(self, code: int) -> Outcome:
        said = " ".join(self._slurm_said)
        node = self._node_exit
        if self.job_id is None and code != 0 and "Unable to allocate" in said:
            raise classify_error(said)
        if node.get("reason") == "tunnel-error":
            raise TunnelError(str(node.get("message")), f"see {self.state.file(LOG)}")
        if node.get("reason") == "error":
            raise JupyterError(
                f"Jupyter failed on {self.node or 'the node'}: {node.get('message')}",
                f"see {self.state.file(LOG)}",
            )
        if node.get("reason") == "jupyter-exit":
            if self.phase is Phase.READY or node.get("code") == 0:
                return Outcome("Jupyter was shut down (from its own menu or API)")
            raise JupyterError(
                f"Jupyter exited on {self.node} with code {node.get('code')} before it was ready",
                f"see {self.state.file(LOG)}",
            )
        if self.job_id is None:
            raise classify_error(said or f"srun exited with code {code}")
        state = (await self.manager.slurm.job(self.job_id)).state
        if state not in _ENDINGS:  # the controller may lag or be away; Slurm's last words tell
            if "DUE TO TIME LIMIT" in said:
                state = JobState.TIMEOUT
            elif "CANCELLED" in said or node.get("reason") == "signal":
                state = JobState.CANCELLED
        if state in _ENDINGS:
            return Outcome(f"job {self.job_id} {_ENDINGS[state]}")
        return Outcome(f"job {self.job_id} ended ({state.value}; srun exit {code})")

    # -- control socket ----------------------------------------------------------------------
    async def _on_control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Other front ends (spunnel-notebook stop, the server extension) talk to us here."""
        try:
            words = (await asyncio.wait_for(reader.readline(), 5)).decode().split()
            if words == ["stop"]:
                self.request_stop("stopped with `spunnel-notebook stop` or from JupyterLab")
                reply = "ok stopping"
            elif len(words) == 2 and words[0] in ("forward", "cancel"):
                try:
                    (pair,) = parse_port_pairs(words[1])
                    reply = "ok " + await self.forward(pair, cancel=words[0] == "cancel")
                except (SpunnelError, ValueError) as e:
                    reply = f"error {e}"
            else:
                reply = "error unknown command"
            writer.write(reply.encode() + b"\n")
            await writer.drain()
        except (OSError, asyncio.TimeoutError):
            pass
        finally:
            writer.close()

    # -- teardown ----------------------------------------------------------------------------
    async def _teardown(self) -> None:
        """Close the tunnel, end the job, wait until it left the queue. Every step bounded."""
        m = self.manager
        self._set(phase=Phase.ENDING)
        started = time.monotonic()
        if self._control is not None:
            self._control.close()
        steps = []
        if self.tunnel is not None:
            steps.append(self.tunnel.close(grace=min(1.0, m.stop_timeout)))
        steps.append(self._end_job())
        results = await asyncio.gather(*steps, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                self.log.warning("teardown step failed: %s", result)
                self.notes.append(f"teardown: {result}")
        self.times["teardown_s"] = round(time.monotonic() - started, 3)

    async def _end_job(self) -> None:
        m = self.manager
        srun = self.srun
        assert srun is not None
        if srun.returncode is None:
            # srun forwards SIGUSR1 to the launcher, which stops Jupyter, cleans up and exits:
            # step and job end without the extra second Slurm may add when a running step is
            # cancelled. While the job pends, srun revokes it. scancel is the fallback.
            srun.send_signal(signal.SIGUSR1)
            try:
                await asyncio.wait_for(srun.wait(), m.jupyter_stop_grace + 1.0)
            except asyncio.TimeoutError:
                if self.job_id is not None:
                    with contextlib.suppress(SpunnelError):
                        await m.slurm.cancel(self.job_id)
                await process.stop(srun, grace=m.stop_timeout, first=None)
        if self.job_id is None:  # srun may have been granted a job it never named
            tag = f"{COMMENT_PREFIX}:{hostname()}:{self.id}"
            for job_id, comment, _ in await m.slurm.my_jobs():
                if comment == tag:
                    self.job_id = job_id
                    await m.slurm.cancel(job_id)
        if self.job_id is not None:
            job_id = self.job_id

            async def gone() -> bool:
                return not await m.slurm.in_queue(job_id)

            # squeue answers in ~5 ms: poll tightly, the user is waiting (bounded by stop_timeout)
            if not await probes.wait_until(gone, timeout=m.stop_timeout, first=0.02, cap=0.05):
                await m.slurm.cancel(job_id)
                raise SpunnelError(f"job {job_id} is still in the queue after teardown")

    def _finish(self) -> None:
        """Last step, always: remove the record and socket files, release the lock."""
        self.phase = Phase.ENDED
        with contextlib.suppress(OSError):
            self.state.write(self.snapshot(), LAST)
        self._close_relay()
        self.state.remove(RECORD, CONTROL, CONTROL_PATH, TUNNEL)
        os.close(self._to_node)
        self._log.close()
        self.state.unlock()
        self._set(phase=Phase.ENDED, save=False)

    def _close_relay(self) -> None:
        if self.relay is not None:
            self.relay.close()
            self.relay = None

    # -- bookkeeping -------------------------------------------------------------------------
    def _set(self, save: bool = True, **changes: Any) -> None:
        for name, value in changes.items():
            setattr(self, name, value)
        if save and self.phase is not Phase.ENDED:
            self._save()
        if self.on_change is not None:
            try:
                self.on_change(self)
            except Exception:
                self.log.exception("on_change listener failed")

    def _save(self) -> None:
        self.state.write(self.snapshot(with_secrets=True))
