"""The session manager shared by ``spunnel-notebook`` and the Jupyter server extension.

``SpunnelManager`` holds the site configuration (traitlets), validates requests against the
cluster before anything is submitted, enforces one session per user per host (the state
directory's lock), cleans up what a dead supervisor left, starts ``Session`` objects, and talks to
a running session's supervisor (whichever front end owns it) through its control socket.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

from traitlets import Bool, Float, Instance, Int, List, Type, Unicode, default
from traitlets import Enum as TEnum
from traitlets.config import LoggingConfigurable

from . import probes, process
from .access import reached_host
from .backend import Partition, SlurmBackend
from .checks import check_against_cluster
from .config import PrivateTmp, site_config_key
from .control import send
from .detached import DetachedJob, choose, detached_jobs, end_detached
from .errors import NoSession, SessionExists, SpunnelError, UsageError
from .fields import FIELDS, SessionRequest, build_request
from .leftovers import clean_leftovers
from .machine import Phase
from .passthrough import check_srun_args
from .protocol import ControlRequest
from .pyslurm_backend import SlurmPyslurm
from .session import Session
from .settings import SessionSettings
from .slurm import SlurmCLI
from .state import CONTROL, LAST, StateDir
from .tunnel import SshTunnel

T = TypeVar("T")


class SpunnelManager(LoggingConfigurable):
    """Site defaults and the machinery shared by ``spunnel-notebook`` and the server extension."""

    partition = Unicode("", config=True, help="Default partition (empty: Slurm's default).")
    mem = Unicode("", config=True, help="Default --mem, e.g. '4000' (MB) or '4G'.")
    time = Unicode("", config=True, help="Default time limit, e.g. '2:00:00'.")
    cpus_per_task = Int(0, config=True, help="Default CPUs (0: Slurm's default).")
    ui = TEnum(["lab", "notebook"], "lab", config=True, help="Default UI: 'lab' or 'notebook'.")
    idle_timeout = Int(
        0,
        config=True,
        help="""Default --idle-timeout: minutes with no busy kernel, terminal activity or open
        connection after which a session ends, freeing its allocation (0: never).""",
    )
    env = List(Unicode(), [], config=True, help="Default --env: environments offered as kernels.")
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
        help="""Seconds between job queries (scontrol) while the job is pending (for Slurm's
        reason). The start itself is reported by srun at once; this only refreshes the reason.""",
    )
    refresh_interval = Float(
        60.0,
        config=True,
        help="Seconds between job queries (scontrol) while the session runs (for the time left).",
    )
    warn_before = List(
        Int(),
        [10, 1],
        config=True,
        help="""Minutes before a session's time limit at which the user is warned (the terminal,
        the JupyterLab panel, the node's JupyterLab).""",
    )
    save_grace = Float(
        2.0,
        config=True,
        help="""Seconds a planned end (stop, Ctrl-C, the panel's Stop, the time limit) waits for
        the node's JupyterLab to save open documents with unsaved changes; spent only while a
        browser is connected to it.""",
    )
    detach = Bool(
        False,
        config=True,
        help="""Start command-line sessions detached (as --detach): the job is a batch job that
        outlives the terminal and this login host; `spunnel-notebook attach` follows it.""",
    )
    login_host = Unicode(
        config=True,
        help="Name of this login host as seen from laptops, for the printed `ssh -L` line.",
    )

    logs_kept = Int(
        5, config=True, help="How many earlier session logs to keep (session.log.1, .2, ...)."
    )
    slurm_backend = TEnum(
        ["auto", "cli", "pyslurm"],
        "auto",
        config=True,
        help="""How job and partition queries and cancels reach Slurm: 'cli' (its commands),
        'pyslurm' (its API, in a worker process; an error where it cannot be used), 'auto'
        (pyslurm where it loads and was built for this host's Slurm release, else the commands;
        `spunnel-notebook doctor` says which and why). srun starts sessions either way.""",
    )
    slurm_class = Type(
        None,
        klass=LoggingConfigurable,
        allow_none=True,
        config=True,
        help="A backend of your own (backend.SlurmBackend); when set, slurm_backend is ignored.",
    )

    slurm_impl = Instance(LoggingConfigurable)
    _live: Session | None = None  # the session this manager started, until it ends
    tunnel = Instance(SshTunnel)

    @default("login_host")
    def _login_host_default(self) -> str:
        return reached_host()

    @default("slurm_impl")
    def _slurm_default(self) -> LoggingConfigurable:
        if self.slurm_class is not None:
            return self.slurm_class(parent=self)  # type: ignore[no-any-return]
        if self.slurm_backend == "cli":
            return SlurmCLI(parent=self)
        return SlurmPyslurm(parent=self, required=self.slurm_backend == "pyslurm")

    @property
    def slurm(self) -> SlurmBackend:
        return self.slurm_impl  # type: ignore[return-value]

    def session_settings(self) -> SessionSettings:
        """A frozen copy of what a session needs: the session never reads the manager."""
        return SessionSettings(
            slurm=self.slurm, tunnel=self.tunnel, log=self.log,
            launcher_command=tuple(self.launcher_command), runtime_base=self.runtime_base,
            jupyter_command=tuple(self.jupyter_command), jupyter_args=tuple(self.jupyter_args),
            start_timeout=self.start_timeout, stop_timeout=self.stop_timeout,
            jupyter_stop_grace=self.jupyter_stop_grace,
            pending_poll_interval=self.pending_poll_interval,
            refresh_interval=self.refresh_interval, logs_kept=self.logs_kept,
            warn_before=tuple(self.warn_before), save_grace=self.save_grace,
            private_tmp=PrivateTmp(parent=self).settings(),
        )  # fmt: skip

    @default("tunnel")
    def _tunnel_default(self) -> SshTunnel:
        return SshTunnel(parent=self)

    def state(self) -> StateDir:
        return StateDir(self.state_dir or None).ensure()

    # -- requests ----------------------------------------------------------------------------
    def defaults(self) -> dict[str, Any]:
        """The site's defaults for the request fields that have one."""
        return {f.name: getattr(self, f.name) for f in FIELDS if f.site_default}

    def request(self, options: Mapping[str, Any], extra: Sequence[str] = ()) -> SessionRequest:
        """A request from the user's ``options`` (fields.py) over the site defaults, checked.

        The site's ``srun_args`` go before the user's own ``extra`` srun options.
        """
        site_args = list(self.srun_args)
        if site_args:  # only then: naming the file that sets them reads every config file
            where = site_config_key("SpunnelManager", "srun_args")
            try:
                check_srun_args(site_args, where=f"in the site's {where}")
            except UsageError as e:
                raise UsageError(e.message, "tell your administrators") from e
        req = build_request(
            options, self.defaults(), list(extra),
            site=lambda name: site_config_key("SpunnelManager", name),
        )  # fmt: skip
        req.extra[:0] = site_args
        return req

    def _check_local_ports(self, req: SessionRequest) -> None:
        for port, what in [(req.port, "--port"), *((p.local, "--tunnel") for p in req.tunnels)]:
            if port:
                probes.check_free(port, what)

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(
        self,
        req: SessionRequest,
        on_change: Callable[[Session], None] | None = None,
        owner: str = "cli",
        kind: str = "foreground",
        job_id: int | None = None,
    ) -> Session:
        """Take the lock, clean leftovers, check the request, and start the session: in the
        foreground, detached (a batch job), or attached to detached job ``job_id`` (or the only
        one; see ``attach``).

        Returns once the session is submitted; ``await session.wait()`` for its end. Raises
        SessionExists, UsageError, SlurmUnavailable, StateError before anything is submitted.
        """

        def changed(session: Session) -> None:
            if session.phase is Phase.ENDED:
                self._live = None
                self.slurm.close()  # pyslurm's worker: nothing of the session outlives it
            if on_change is not None:
                on_change(session)

        state = self.state()
        if not state.try_lock():
            record = await self._holder(state)
            if not state.try_lock():  # else the start we raced failed: go ahead
                raise SessionExists(*describe_running(record))
        try:
            notes = await clean_leftovers(self.slurm, state)
            self._check_local_ports(req)
            if kind == "attached":
                job_id = choose(await detached_jobs(self.slurm), job_id, "attach").job_id
            else:
                await check_against_cluster(self.slurm, req)
            session = Session(self.session_settings(), req, state, changed, owner, kind, job_id)
            session.notes.extend(notes)
            await session.launch()
        except BaseException:
            self.slurm.close()
            state.unlock()
            raise
        self._live = session
        return session

    async def _outside_session(self, call: Awaitable[T]) -> T:
        """``await call``, Slurm asked outside a session: pyslurm's worker then ends with it,
        unless our session uses it."""
        try:
            return await call
        finally:
            if self._live is None:
                self.slurm.close()

    async def partitions(self) -> list[Partition]:
        """The partitions this user can see (the JupyterLab form's choices)."""
        return await self._outside_session(self.slurm.partitions())

    async def _holder(self, state: StateDir) -> dict[str, Any]:
        """The record of the session holding the lock. A start we raced may not have named its
        job yet (Slurm has not answered it): wait for that, within ``stop_timeout``."""

        async def named() -> bool:
            return bool((state.read() or {}).get("job_id")) or not state.is_locked()

        await probes.wait_until(named, timeout=self.stop_timeout, cap=0.05)
        return state.read() or {}

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

    async def detached(self) -> list[DetachedJob]:
        """This user's detached sessions, started from any login host (from Slurm)."""
        return await self._outside_session(detached_jobs(self.slurm))

    async def stop_running(self, timeout: float | None = None, job_id: int | None = None) -> str:
        return await self._outside_session(self._stop_running(timeout, job_id))

    async def _stop_running(self, timeout: float | None, job_id: int | None) -> str:
        """Ask the running session (started by any front end) to end, and wait until it has;
        with no session on this host (or ``job_id`` another's), end a detached session."""
        state = self.state()
        timeout = timeout or 4 * self.stop_timeout
        held = state.read() or {}
        if not state.try_lock():
            if job_id is None or job_id == held.get("job_id"):
                return await self._stop_here(state, timeout)
            return await self._stop_detached(job_id)
        try:  # no session here: clean what a dead one left, holding the lock meanwhile
            notes = await clean_leftovers(self.slurm, state)
        finally:
            state.unlock()
        try:
            return "; ".join([*notes, await self._stop_detached(job_id)])
        except NoSession:
            if job_id is not None:
                raise
            if notes:
                return "; ".join(notes)
        raise NoSession(
            "no session is running on this host, and you have no detached session",
            "start one with spunnel-notebook",
        )

    async def _stop_detached(self, job_id: int | None) -> str:
        job = choose(await self.detached(), job_id, "stop")
        grace = self.save_grace + self.jupyter_stop_grace + self.stop_timeout
        return await end_detached(self.slurm, job, grace, self.stop_timeout)

    async def _stop_here(self, state: StateDir, timeout: float) -> str:
        async def asked() -> bool:  # a start holding the lock may serve no control socket yet
            try:
                await self.control("stop")
            except NoSession:
                return True
            except (OSError, asyncio.TimeoutError, SpunnelError):
                record = state.read() or {}
                pid, started = record.get("supervisor_pid"), record.get("supervisor_start")
                return process.signal_if_alive(pid, started, signal.SIGTERM)
            return True

        await probes.wait_until(asked, timeout=timeout, cap=0.05)

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
        verb, _, arg = command.partition(" ")
        return await send(state.file(CONTROL), ControlRequest(verb, arg))


def describe_running(record: dict[str, Any]) -> tuple[str, str]:
    if not record:  # whoever holds the lock has written no record (yet)
        return (
            "you already have a session on this host, or another spunnel-notebook of yours is "
            "starting or stopping one",
            "use it, or end it with `spunnel-notebook stop` first",
        )
    job = f"job {record['job_id']}" if record.get("job_id") else "its job not named by Slurm yet"
    where = f" on {record['node']}" if record.get("node") else ""
    url = f", {record['url']}" if record.get("url") else ""
    return (
        f"you already have a session on this host: {job}{where}{url} "
        f"(started by {record.get('owner', 'spunnel')}, phase {record.get('phase', '?')})",
        "use it, or end it with `spunnel-notebook stop` first",
    )
