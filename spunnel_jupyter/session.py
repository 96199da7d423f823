"""A session: one allocation + Jupyter on its first node + the tunnel, owned by one supervisor.

Made by ``SpunnelManager.start``; lives in the supervisor's event loop (a terminal's
``spunnel-notebook`` or a JupyterLab server). Its life is machine.py's state machine; ``handle`` is
the one place that decides what each event does in each phase. Collaborators own their state: the
node channel (channel.py), the ports (ports.py), the link (links.py), the control server
(control.py). Teardown runs whatever ended the session, exactly once, every step bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import getpass
import os
import secrets
import time
from collections.abc import Callable
from typing import Any

from . import probes, process
from .backend import JobState
from .batch import make_channel
from .control import ControlServer
from .errors import ExitCode, JupyterError, SpunnelError, StateError, UsageError
from .fields import SessionRequest
from .links import LinkContext, make_link
from .machine import (
    TRANSITIONS,
    TUNNEL_TRANSITIONS,
    Allocated,
    Event,
    Failed,
    FromNode,
    JobPolled,
    Outcome,
    Phase,
    Queued,
    SrunExited,
    StopRequested,
    TunnelLost,
    TunnelState,
    TunnelUp,
    check_move,
    keeps_job,
)
from .ports import Ports
from .protocol import (
    READY,
    STARTED,
    STOP,
    TOKEN,
    WARNING,
    ControlRequest,
    NodeEvent,
    SessionRecord,
    detached_tag,
    job_tag,
    ui_path,
)
from .settings import SessionSettings
from .state import CONTROL, CONTROL_PATH, LAST, LOG, RECORD, UNCANCELLED, StateDir, hostname
from .tunnel import PortPair, parse_port_pairs


class Session:
    """One running session. Created by SpunnelManager.start; owns its srun, ssh and the lock."""

    def __init__(
        self,
        settings: SessionSettings,
        req: SessionRequest,
        state: StateDir,
        on_change: Callable[[Session], None] | None,
        owner: str,
        kind: str = "foreground",
        job_id: int | None = None,
    ) -> None:
        self.settings = settings
        self.kind = kind  # foreground; detached (its job outlives us); attached (to job_id)
        self.log = settings.log
        self.req = req
        self.state = state
        self.on_change = on_change
        self.owner = owner
        self.id = secrets.token_hex(6)
        self.token = secrets.token_hex(24)
        self.port = (req.port or probes.free_port()) if req.jupyter else 0  # 0: no URL
        self.phase = Phase.PENDING
        self.tunnel_state = TunnelState.DOWN
        self.tunnel_mode = ""  # the link's mode once the URL answers
        self.job_id: int | None = job_id
        self.job_state = JobState.PENDING
        self.reason = ""  # Slurm's pending reason
        self.node = ""
        self.end_time: float | None = None
        self.expected_start: float | None = None  # pending: Slurm's guess, if it has one
        self.url = ""
        self.notes: list[str] = []  # things the user should be told, in order
        self.warnings: list[str] = []  # the node's warnings (an idle release ahead)
        self.times: dict[str, float] = {"submitted": time.time()}
        self.outcome: Outcome | None = None
        self.job_gone = False  # teardown saw the job leave the queue
        self.job_kept = False  # teardown left a detached session's job running, as it should
        self.tag = job_tag(self.id) if kind == "foreground" else detached_tag(self.id)
        self._identity = SessionRecord(  # what never changes: read once, not at every save
            self.id, hostname(), getpass.getuser(), owner, "", supervisor_pid=os.getpid(),
            supervisor_start=process.start_time(os.getpid()), log=str(state.file(LOG)), kind=kind,
        )  # fmt: skip
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._tasks: list[asyncio.Future[Any]] = []
        self._task: asyncio.Future[Outcome] | None = None
        self._lost_at, self._save_failed = 0.0, False
        self._log = state.open_log(LOG, keep=settings.logs_kept)
        self.channel = make_channel(kind, settings, self._log, self._post, job_id)
        loop = asyncio.get_event_loop()  # relays post from their threads
        self.ports = Ports(
            state, self.port, self._log, lambda e: loop.call_soon_threadsafe(self._post, e)
        )
        self.link = make_link(
            req.tunnel_mode or settings.tunnel.mode,
            LinkContext(settings, state, self.ports, self.token, req.tunnels, self._log,
                        self._post, self.announce, self.channel.send),
        )  # fmt: skip
        self.control = ControlServer(state.file(CONTROL), self._on_control)

    # -- public ------------------------------------------------------------------------------
    def record(self, *, with_secrets: bool = False) -> SessionRecord:
        """What session.json holds (with secrets) and what last.json keeps (without)."""
        record = dataclasses.replace(
            self._identity, phase=self.phase.value, job_id=self.job_id,
            job_state=self.job_state.value, reason=self.reason, node=self.node, port=self.port,
            tunnels=[str(p) for p in self.req.tunnels], tunnel_state=self.tunnel_state.value,
            tunnel_mode=self.tunnel_mode, notes=self.notes[-20:], end_time=self.end_time,
            warnings=self.warnings[-20:], expected_start=self.expected_start,
            times=self.times, ended_reason=self.outcome.reason if self.outcome else "",
        )  # fmt: skip
        if with_secrets:
            record.url, record.token = self.url, self.token
            for name, value in {**self.channel.pids(), **self.link.pids()}.items():
                setattr(record, name, value)
        return record

    def request_stop(
        self, reason: str, exit_code: ExitCode = ExitCode.OK, ends_job: bool = False
    ) -> None:
        """End the session (the first ending wins). Safe from signal handlers."""
        self._post(StopRequested(Outcome(reason, exit_code, ends_job=ends_job)))

    async def wait(self) -> Outcome:
        assert self._task is not None
        return await asyncio.shield(self._task)

    def announce(self, text: str) -> None:
        """Tell every front end something happened (kept in ``notes``, written to the log)."""
        self.notes.append(text)
        self._log.write(f"spunnel: {text}\n".encode())
        self._set()

    async def forward(self, pair: PortPair, cancel: bool = False) -> str:
        """Add (or cancel) a port pair on the running tunnel."""
        if self.phase is not Phase.READY:
            raise UsageError("the session is not ready yet", "try again once the URL is shown")
        await self.link.change_forward(pair, cancel)  # req.tunnels is the link's list too
        self._set()
        verb = "cancelled" if cancel else "forwarding"
        return f"{verb} 127.0.0.1:{pair.local} -> port {pair.remote} on {self.node}"

    # -- lifecycle ---------------------------------------------------------------------------
    async def launch(self) -> None:
        """Bind the port, open the control socket, submit. Nothing is left behind if it fails."""
        try:
            self.ports.bind(self.req.tunnels)  # before submitting: a taken port costs no job
            await self.control.start()
            self._save()  # before srun: a supervisor killed right now leaves enough to clean up
            options = self.req.srun_options()
            self._log.write(f"spunnel: submitting with {' '.join(options)}\n".encode())
            token = self.token if self.kind == "foreground" else ""  # detached: the node's own
            await self.channel.start(options, self.tag, self.settings.launcher(token, self.req))
            self._save()
        except BaseException:
            self.control.close()
            await self.channel.abort(self.tag)  # submitted, then interrupted or failed
            await self.link.close(grace=0.5)
            self.ports.close()
            self.channel.close()
            self.state.remove(RECORD, CONTROL)
            self._log.close()
            raise
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> Outcome:
        self._spawn(self.channel.poll_job(lambda: self.job_id))
        try:
            while self.outcome is None:
                await self.handle(await self._events.get())
        except Exception as e:  # a bug: still tear down, and say so
            self.log.exception("session failed")
            self.outcome = Outcome(f"internal error: {e!r}", ExitCode.ERROR, SpunnelError(str(e)))
        outcome = self.outcome
        self._log.write(f"session ended: {outcome.reason} (job {self.job_id})\n".encode())
        try:
            await self._teardown()
        finally:
            self._finish()
        return outcome

    async def handle(self, event: Event) -> None:
        """The one place that decides what each event does in each phase (machine.py)."""
        try:
            await self._react(event)
        except SpunnelError as e:
            self._end(Outcome.of(e))

    async def _react(self, event: Event) -> None:
        if isinstance(event, StopRequested):
            self._end(event.outcome)
        elif isinstance(event, Failed):
            raise event.error
        elif isinstance(event, SrunExited):
            ready = self.phase is Phase.READY
            self._end(await self.channel.why_ended(event.code, self.job_id, self.node, ready))
        elif isinstance(event, Queued) and self.phase is Phase.PENDING:
            self._set(job_id=event.job_id, job_state=JobState.PENDING)
        elif isinstance(event, Allocated):
            self._running(event.job_id)
        elif isinstance(event, FromNode):
            self._heard(event.event)
        elif isinstance(event, TunnelUp) and self.phase is Phase.STARTING:
            self._ready()
        elif isinstance(event, TunnelUp) and self.tunnel_state is TunnelState.RECONNECTING:
            self.times["reconnected_s"] = took = round(time.monotonic() - self._lost_at, 3)
            self._set(tunnel_state=TunnelState.UP)
            self.announce(f"{event.what} after {took:.1f} s; the URL is unchanged")
        elif isinstance(event, TunnelLost) and self.tunnel_state is TunnelState.UP:
            self._lost_at = time.monotonic()
            self._set(tunnel_state=TunnelState.RECONNECTING)
            self.announce(f"{event.message}; reconnecting")
        elif isinstance(event, JobPolled):
            if event.info.state is JobState.PENDING:
                self._set(reason=event.info.reason, expected_start=event.info.start_time)
            elif self.phase is Phase.READY and event.info.end_time:
                self._set(end_time=event.info.end_time)

    def _heard(self, event: NodeEvent) -> None:
        """What the launcher said: started (the job runs), ready (Jupyter listens), and what the
        link needs to hear (the reverse tunnel's state, the launcher's exit)."""
        self.link.heard(event)
        if event.kind == TOKEN:  # a detached launcher's own, through our follower
            self.token = self.link.ctx.token = str(event.get("token", ""))
        elif event.kind == STARTED:
            job_id = str(event.get("job_id", ""))
            self.node, self.req.ui = event.get("host", ""), event.get("ui", self.req.ui)
            self._running(int(job_id) if job_id.isdigit() else self.job_id)
            self.link.node_started(self.node, event.get("socket", ""))
        elif event.kind == WARNING:
            self._set(warnings=[*self.warnings, str(event.get("text", ""))])
        elif event.kind == READY and self.phase is Phase.STARTING:
            self.times["jupyter_ready"] = time.time()
            if (tmp := event.get("tmp") or {}).get("mode") in ("tmpdir", "none"):
                self.announce(f"on {self.node}: {tmp.get('text')}")  # said once
            self._spawn(self.link.build(self.node, event.get("socket", "")))

    def _running(self, job_id: int | None) -> None:
        if self.phase is Phase.PENDING:
            self.times.setdefault("running", time.time())
            self._set(job_id=job_id, job_state=JobState.RUNNING, reason="", phase=Phase.STARTING)
            self._spawn(self._bound_starting())

    async def _bound_starting(self) -> None:
        """STARTING ends within a bound, the tunnel and its fallback included."""
        s, ssh = self.settings, self.settings.tunnel
        bound = s.start_timeout + ssh.adopt_retry_timeout + 2 * ssh.connect_timeout
        bound += ssh.reconnect_timeout + 10.0
        await asyncio.sleep(bound)
        if self.phase is Phase.STARTING:
            self._post(Failed(JupyterError(
                f"the session did not become ready within {bound:g} s of the job starting",
                f"see {self._log.name}",
            )))  # fmt: skip

    def _ready(self) -> None:
        self.tunnel_mode = self.link.mode
        if self.req.jupyter:  # else READY means the tunnel pairs are up (links.check_ready)
            self.url = f"http://127.0.0.1:{self.port}{ui_path(self.req.ui)}?token={self.token}"
        self.times["ready"] = time.time()
        self._set(tunnel_state=TunnelState.UP, phase=Phase.READY)
        self._spawn(self._after_ready())

    async def _after_ready(self) -> None:
        """After the URL, which need not wait for them: the time left, a word on adoption."""
        if self.job_id is not None:
            info = await self.settings.slurm.job(self.job_id)
            if info.state is not JobState.UNKNOWN:
                self._set(end_time=info.end_time)
        self.link.after_ready(self.job_id)

    async def _on_control(self, request: ControlRequest) -> str:
        """Other front ends (spunnel-notebook stop/forward, the server extension) talk to us."""
        if request.verb == STOP:
            self.request_stop(
                "stopped with `spunnel-notebook stop` or from JupyterLab", ends_job=True
            )
            return "stopping"
        (pair,) = parse_port_pairs(request.arg)
        return await self.forward(pair, cancel=request.verb == "cancel")

    # -- teardown ----------------------------------------------------------------------------
    async def _teardown(self) -> None:
        """End the node's part first (its JupyterLab saves open documents through the tunnel
        meanwhile), then close the tunnel while Slurm confirms the end; every step bounded."""
        self._set(phase=Phase.ENDING)
        started = time.monotonic()
        self.control.close()
        for task in self._tasks:
            task.cancel()
        assert self.outcome is not None
        self.job_kept = keeps_job(self.kind, self.outcome, "ready" in self.times)
        close = self.link.close(grace=min(1.0, self.settings.stop_timeout))
        node = self.channel.detach() if self.job_kept else self.channel.end_step(self.job_id)
        for steps in ([node], [close, self._end_job()]):
            for result in await asyncio.gather(*steps, return_exceptions=True):
                if isinstance(result, BaseException):
                    self.log.warning("teardown step failed: %s", result)
                    self.notes.append(f"teardown: {result}")
        self.times["teardown_s"] = round(time.monotonic() - started, 3)

    async def _end_job(self) -> None:
        """Once srun (or this host's follower) ended: Slurm's side, within ``stop_timeout``.
        A job whose end the controller did not confirm is remembered (state.UNCANCELLED) for
        the next start or `stop` to cancel, and the user is told."""
        if self.job_kept:
            return
        try:
            self.job_id = await asyncio.wait_for(
                self.channel.end_job(self.job_id, self.tag), self.settings.stop_timeout + 1.0
            )
        except (SpunnelError, asyncio.TimeoutError) as e:
            with contextlib.suppress(OSError):
                self.state.write({"job_id": self.job_id, "tag": self.tag}, UNCANCELLED)
            job = f"job {self.job_id}" if self.job_id else "the job"
            raise SpunnelError(
                f"{job} may still be in the queue: Slurm did not confirm its end "
                f"({str(e) or 'no answer'}); it is cancelled at your next start or "
                "`spunnel-notebook stop`, or run scancel yourself"
            ) from e
        self.job_gone = True

    def _finish(self) -> None:
        """Last step, always: remove the record and socket files, release the lock."""
        self._set(phase=Phase.ENDED, save=False, notify=False)
        with contextlib.suppress(OSError):
            self.state.write(self.record().to_json(), LAST)
        self.ports.close()  # and their sockets
        self.state.remove(RECORD, CONTROL, CONTROL_PATH)
        self.channel.close()
        self._log.close()
        self.state.unlock()
        self._set(save=False)

    # -- bookkeeping -------------------------------------------------------------------------
    def _post(self, event: Event) -> None:
        self._events.put_nowait(event)

    def _spawn(self, coro: Any) -> None:
        self._tasks.append(asyncio.ensure_future(coro))

    def _end(self, outcome: Outcome) -> None:
        self.outcome = self.outcome or outcome

    def _set(self, save: bool = True, notify: bool = True, **changes: Any) -> None:
        if "phase" in changes:
            check_move(TRANSITIONS, self.phase, changes["phase"])
        if "tunnel_state" in changes:
            check_move(TUNNEL_TRANSITIONS, self.tunnel_state, changes["tunnel_state"])
        for name, value in changes.items():
            setattr(self, name, value)
        if save and self.phase is not Phase.ENDED:
            self._save()
        if notify and self.on_change is not None:
            try:
                self.on_change(self)
            except Exception:
                self.log.exception("on_change listener failed")

    def _save(self) -> None:
        """Rewrite session.json. Once the session runs, a failed write (a full disk) is told
        once and never stops the session or its teardown; before srun, it refuses the start."""
        try:
            self.state.write(self.record(with_secrets=True).to_json())
        except OSError as e:
            if self.channel.srun is None:
                raise StateError(
                    f"cannot write the session record in {self.state.path}: {e.strerror}",
                    "free space there, or set SPUNNEL_STATE_DIR to another private directory",
                ) from e
            if not self._save_failed:
                self._save_failed = True
                self.notes.append(f"cannot update {self.state.file(RECORD)}: {e.strerror}")
