"""How a session's URL reaches Jupyter on the node: the tunnel strategies.

In every mode the session's ports are its own owner-only relays (ports.py) in front of Unix
sockets in the state directory; a link only serves those sockets.

- ``ForwardLink``: an ssh ControlMaster from this host to the node
  (``-L <state>/tunnel.sock:<node's jupyter.sock>``, ``-L <state>/port-SP.sock:localhost:EP``).
  The master connects while Jupyter starts; a lost master is rebuilt (same sockets, same URL).
- ``ReverseLink``: the launcher dials back with ``ssh -R`` (the same specs) from inside the job
  (no sshd needed on the nodes) and rebuilds it itself; this side listens to what the node says.
- ``AutoLink``: forward, falling back to reverse once if the node refuses ssh.

A link tells the session what happens by posting events (TunnelLost, TunnelUp, Failed).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from . import probes
from .backend import JobState
from .errors import SpunnelError, TunnelError, UsageError
from .machine import Event, Failed, TunnelLost, TunnelUp
from .ports import Ports
from .protocol import EXITED, TUNNEL, NodeEvent, reverse_command
from .settings import SessionSettings
from .state import CONTROL_PATH, StateDir
from .tunnel import PortPair, Tunnel


@dataclass
class LinkContext:
    """What a link needs of its session."""

    settings: SessionSettings
    state: StateDir
    ports: Ports  # the session's ports; ``ports.port`` is the URL's
    token: str
    tunnels: list[PortPair]  # the session's extra pairs (runtime forwards change this list)
    log: IO[bytes]
    post: Callable[[Event], None]
    announce: Callable[[str], None]
    send_to_node: Callable[[bytes], None]


class Link:
    """The interface every strategy implements; see the module docstring."""

    mode = ""
    runtime_forwards = False  # can forward() add a pair to the running tunnel?

    def __init__(self, ctx: LinkContext) -> None:
        self.ctx = ctx
        self.node = ""

    def node_started(self, node: str, socket: str) -> None:
        """The job runs on ``node``; Jupyter is starting behind ``socket``."""
        self.node = node

    async def connect(self, node: str, socket: str) -> None:
        """Jupyter listens on ``socket``: build the tunnel until the URL answers (TunnelError)."""
        raise NotImplementedError

    async def build(self, node: str, socket: str) -> None:
        """``connect``, then tell the session: TunnelUp, or Failed with why."""
        try:
            await self.connect(node, socket)
        except SpunnelError as e:
            self.ctx.post(Failed(e))
            return
        self.ctx.post(TunnelUp())

    def heard(self, event: NodeEvent) -> None:
        """A node event about the tunnel (reverse mode) or the launcher's exit."""

    def after_ready(self, job_id: int | None) -> None:
        """The URL was published."""

    async def change_forward(self, pair: PortPair, cancel: bool) -> None:
        """Add (or cancel) a pair on the running tunnel, and in the session's list of pairs."""
        known = pair in self.ctx.tunnels
        if cancel and not known:
            raise UsageError(f"{pair} is not forwarded", "see `spunnel-notebook status`")
        if not cancel and (known or pair.local == self.ctx.ports.port):
            raise UsageError(f"port {pair.local} is already forwarded", "pick another")
        if not self.runtime_forwards:
            raise UsageError(
                "forwards can be added at runtime in forward mode only",
                "start the session with --tunnel SP:EP instead",
            )
        ports = self.ctx.ports
        if cancel:
            await self.forward(pair, cancel)
            ports.remove(pair)
            self.ctx.tunnels.remove(pair)
            return
        ports.add(pair)  # binding is the check that the port is free: no race
        try:
            await self.forward(pair, cancel)
        except BaseException:
            ports.remove(pair)
            raise
        self.ctx.tunnels.append(pair)

    async def forward(self, pair: PortPair, cancel: bool) -> None:
        """Add (or cancel) the ssh forward of ``pair`` (links with ``runtime_forwards``)."""
        raise NotImplementedError

    async def close(self, grace: float) -> None:
        """Take the tunnel down (idempotent); the ports are the session's (ports.py)."""

    def pids(self) -> dict[str, Any]:
        return {}

    async def check_ready(self) -> None:
        """The session is ready when Jupyter answers through the tunnel; without Jupyter
        (--no-jupyter), when every pair's forward is up (ssh or sshd serves its socket: what
        answers behind it, on the node, is the user's to start)."""
        if self.ctx.ports.port:
            await self.check_url()
            return

        async def served() -> bool:
            return not self.ctx.ports.unserved()

        if not await probes.wait_until(served, timeout=self.ctx.settings.tunnel.connect_timeout):
            ports = ", ".join(map(str, self.ctx.ports.unserved()))
            raise TunnelError(
                f"the forwards of port(s) {ports} are not up", f"see {self.ctx.log.name}"
            )

    async def check_url(self) -> None:
        """Jupyter must answer through the tunnel, with the token, before anyone sees the URL."""

        async def answers() -> bool:
            try:
                status = await probes.http_status(
                    "/api/status", port=self.ctx.ports.port, timeout=5,
                    headers={"Authorization": f"token {self.ctx.token}"},
                )  # fmt: skip
            except (OSError, asyncio.TimeoutError):
                return False
            return status == 200

        if not await probes.wait_until(answers, timeout=self.ctx.settings.tunnel.connect_timeout):
            raise TunnelError(
                "Jupyter does not answer through the tunnel", f"see {self.ctx.log.name}"
            )


class ForwardLink(Link):
    mode = "forward"
    runtime_forwards = True

    def __init__(self, ctx: LinkContext) -> None:
        super().__init__(ctx)
        self.socket = ""
        self.tunnel: Tunnel | None = None
        self._tasks: list[asyncio.Future[Any]] = []
        self._master: asyncio.Future[None] | None = None

    def node_started(self, node: str, socket: str) -> None:
        # The master connects while Jupyter starts: its -L to the socket is used only once a
        # client connects, after the node said Jupyter is listening.
        self.node, self.socket = node, socket
        self._master = self._spawn(self._open_master())

    async def connect(self, node: str, socket: str) -> None:
        if self._master is None or socket != self.socket:
            self.node_started(node, socket)
        assert self._master is not None
        await self._master
        await self.check_ready()
        self._spawn(self._watch())

    def _spawn(self, coro: Any) -> asyncio.Future[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.append(task)
        return task

    async def _open_master(self) -> None:
        """Start the ControlMaster with all forwards; return once ``-O check`` says it is up."""
        forwards = self.ctx.ports.forwards(self.socket, self.ctx.tunnels)
        self.tunnel = await self.ctx.settings.tunnel.open(
            self.node, self.ctx.state.file(CONTROL_PATH), forwards, self.ctx.log
        )

    async def _watch(self) -> None:
        """Rebuild a lost master on the same port (capped backoff) or give up with Failed."""
        timeout = self.ctx.settings.tunnel.reconnect_timeout
        while self.tunnel is not None:
            lost = f"the tunnel's ssh to {self.node} exited ({await self.tunnel.proc.wait()})"
            if timeout <= 0:
                self.ctx.post(Failed(TunnelError(lost, f"see {self.ctx.log.name}")))
                return
            self.ctx.post(TunnelLost(lost))
            try:
                await self._reconnect(time.monotonic() + timeout)
            except TunnelError as e:
                self.ctx.post(Failed(e))
                return
            self.ctx.post(TunnelUp())

    async def _reconnect(self, deadline: float) -> None:
        backoff = probes.Backoff()
        while True:
            if self.tunnel is not None:
                await self.tunnel.close(grace=0.5)  # the dead master's socket and forwards
            try:
                await self._open_master()
                await self.check_ready()
                return
            except TunnelError as e:
                if time.monotonic() + backoff.delay > deadline:
                    raise TunnelError(
                        f"the tunnel to {self.node} was lost and not re-established within "
                        f"{self.ctx.settings.tunnel.reconnect_timeout:g} s ({e.message})",
                        f"see {self.ctx.log.name}; start a new session",
                    ) from e
            await backoff.sleep()

    def after_ready(self, job_id: int | None) -> None:
        self._spawn(self._warn_if_adoption_is_ambiguous(job_id))

    async def _warn_if_adoption_is_ambiguous(self, job_id: int | None) -> None:
        """pam_slurm_adopt puts an ssh into one of the user's jobs on the node: say if it has a
        choice (the tunnel may then be accounted to, and die with, another job)."""
        try:
            jobs = await self.ctx.settings.slurm.my_jobs(node=self.node)
        except SpunnelError:
            return
        others = [j for j, _, state in jobs if j != job_id and state is JobState.RUNNING]
        if others:
            self.ctx.announce(
                f"you have other jobs on {self.node} ({', '.join(map(str, others))}): on sites "
                "with pam_slurm_adopt the tunnel may be adopted into one of them and end with it"
            )

    async def forward(self, pair: PortPair, cancel: bool) -> None:
        assert self.tunnel is not None
        await self.tunnel.forward(self.ctx.ports.pair_forward(pair), cancel=cancel)

    async def close(self, grace: float) -> None:
        for task in self._tasks:
            task.cancel()
        if self.tunnel is not None:
            await self.tunnel.close(grace=grace)

    def pids(self) -> dict[str, Any]:
        if self.tunnel is None:
            return {}
        return {"ssh_pid": self.tunnel.proc.pid, "ssh_start": self.tunnel.started}


class ReverseLink(Link):
    mode = "reverse"

    def __init__(self, ctx: LinkContext) -> None:
        super().__init__(ctx)
        self._up = asyncio.Event()
        self._gave_up = asyncio.Event()
        self._said = ""  # the node's last word on the tunnel

    async def connect(self, node: str, socket: str) -> None:
        """Ask the launcher to dial back; return once Jupyter answers here."""
        self.node = node
        ssh = self.ctx.settings.tunnel
        self.ctx.ports.clear_stale()  # sshd binds our sockets: a dead ssh's must go first
        forwards = self.ctx.ports.forwards("{socket}", self.ctx.tunnels)
        self.ctx.send_to_node(reverse_command(ssh.reverse_plan(forwards)))
        up = asyncio.ensure_future(self._up.wait())
        gave_up = asyncio.ensure_future(self._gave_up.wait())
        try:
            await asyncio.wait(
                {up, gave_up}, timeout=ssh.connect_timeout + ssh.reconnect_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )  # fmt: skip
        finally:
            up.cancel()
            gave_up.cancel()
        if not self._up.is_set():
            raise TunnelError(
                f"the node could not dial back to {ssh.reverse_host}: {self._said or 'no answer'}",
                "check that the nodes can `ssh` to this host (c.SshTunnel.reverse_host)",
            )
        await self.check_ready()

    def heard(self, event: NodeEvent) -> None:
        if event.kind == EXITED:
            self._said = event.get("message") or self._said
            self._gave_up.set()
        elif event.kind == TUNNEL and event.get("state") == "up":
            if self._up.is_set():
                self.ctx.post(TunnelUp("the node re-established the reverse tunnel"))
            self._up.set()
        elif event.kind == TUNNEL and event.get("state") == "lost":
            self._said = event.get("message", "")
            self.ctx.ports.clear_stale()  # so that the node's next ssh -R can bind them
            if self._up.is_set():
                self.ctx.post(TunnelLost(f"the reverse tunnel from {self.node} was lost"))


class AutoLink(Link):
    """Forward, falling back to reverse once if ssh to the node fails."""

    def __init__(self, ctx: LinkContext) -> None:
        super().__init__(ctx)
        self.first = ForwardLink(ctx)
        self.fallback = ReverseLink(ctx)
        self.active: Link = self.first

    @property
    def mode(self) -> str:  # type: ignore[override]
        return self.active.mode

    @property
    def runtime_forwards(self) -> bool:  # type: ignore[override]
        return self.active.runtime_forwards

    def node_started(self, node: str, socket: str) -> None:
        self.first.node_started(node, socket)

    async def connect(self, node: str, socket: str) -> None:
        try:
            await self.first.connect(node, socket)
        except TunnelError as e:
            await self.first.close(grace=0.5)  # the ports stay ours: sshd serves their sockets
            self.active = self.fallback
            self.ctx.announce(
                f"{e.message}; falling back to reverse mode "
                f"(the node dials back to {self.ctx.settings.tunnel.reverse_host})"
            )
            await self.fallback.connect(node, socket)

    def heard(self, event: NodeEvent) -> None:
        self.fallback.heard(event)

    def after_ready(self, job_id: int | None) -> None:
        self.active.after_ready(job_id)

    async def forward(self, pair: PortPair, cancel: bool) -> None:
        await self.active.forward(pair, cancel)

    async def close(self, grace: float) -> None:
        await self.first.close(grace)

    def pids(self) -> dict[str, Any]:
        return self.active.pids()


LINKS: dict[str, type[Link]] = {"forward": ForwardLink, "reverse": ReverseLink, "auto": AutoLink}


def make_link(mode: str, ctx: LinkContext) -> Link:
    return LINKS[mode](ctx)
