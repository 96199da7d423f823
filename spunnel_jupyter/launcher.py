"""The node side: run as the allocation's single task by srun, on the compute node.

    python -m spunnel_jupyter.launcher  < one line of settings (with the token) on stdin

It creates the private per-job runtime directory ``<base>/spunnel.<JOBID>.<RESTART>`` (0700),
starts Jupyter bound only to a Unix socket inside it, and reports on stdout, over the srun channel,
one event line (protocol.py) per event: ``started``, ``ready`` (with the socket path), ``exited``
(with why). When Jupyter exits or the task is signalled (scancel, walltime, srun interrupted) it
stops Jupyter and every process Jupyter left behind (at once when Slurm ends the step: nodestop.py),
removes the directory, and exits.

Inside the node's Jupyter it loads a small server extension of its own (node_extension.py) and the
JupyterLab plugin ``spunnel-jupyter:node``: the time left, warnings before the time limit, and a
save of every open document before a planned end (stop, Ctrl-C, scancel, the time limit), bounded
by ``save_grace`` and spent only while a browser is connected (notices.py).

The token arrives on stdin and reaches Jupyter through its environment: never on a command line.

``--detached``: run as a batch job's script (``spunnel-notebook --detach``), so that nothing on the
node depends on a process of the login host. The settings come from $SPUNNEL_SETTINGS (they hold
no token), the launcher makes the token itself and keeps it in ``<rundir>/token`` (0600, in the
0700 directory), and writes its events to ``<rundir>/events`` and Jupyter's masked log to
``<rundir>/jupyter.log``, where each attached login host's follower (follow.py) reads them.

This module uses the standard library only, so it starts fast in any Python on the node.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib.util
import json
import os
import secrets
import signal
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

from . import envkernels, privatetmp, probes
from .dialback import DialBack
from .nodehold import hold_step
from .nodestop import end_jupyter, kill_leftovers
from .notices import Notices
from .process import python_module
from .protocol import (
    EVENTS_FILE,
    JUPYTER_LOG,
    NODE_FLAG,
    RUNDIR_ENV,
    SETTINGS_ENV,
    TMP_NOTE,
    TOKEN_FILE,
    WARNING,
    LauncherSettings,
    NodeEvent,
    ProtocolError,
    VersionMismatch,
    ui_path,
)
from .rundir import hold, make_runtime_dir, private_file, read_json, remove_stale

_PR_SET_CHILD_SUBREAPER = 36
_SOCKET_PATH_MAX = 107  # sun_path is 108 bytes with the terminating NUL
_SAVE_SIGNALS = ("SIGUSR1", "SIGTERM")  # planned ends (stop, scancel, the time limit): save first


_events: Any = None  # where events go: stdout (srun's channel), or <rundir>/events (detached)


def emit(event: str, **fields: Any) -> None:
    """Report an event to the supervisor on the login host (one line)."""
    out = _events or sys.stdout
    with contextlib.suppress(OSError, ValueError):
        out.write(NodeEvent(event, fields).line())
        out.flush()


def emit_event(event: NodeEvent) -> None:
    emit(event.kind, **event.fields)


_IDLE_SHUTDOWN = b" seconds; shutting down."  # jupyter_server's shutdown_no_activity says so


def idle_args(minutes: int) -> list[str]:
    """Jupyter's own idle release: idle kernels and terminals culled (busy or connected kernels
    spared), then the server ends itself with no kernel, terminal or request left."""
    if minutes <= 0:
        return []
    seconds = minutes * 60
    return [
        f"--ServerApp.shutdown_no_activity_timeout={seconds}",
        f"--MappingKernelManager.cull_idle_timeout={seconds}",
        "--MappingKernelManager.cull_interval=30",
        "--MappingKernelManager.cull_busy=False",
        "--MappingKernelManager.cull_connected=False",
        f"--TerminalManager.cull_inactive_timeout={seconds}",
        "--TerminalManager.cull_interval=30",
    ]


def _no_nesting(rundir: Path) -> str:
    """A config dir for the node's JupyterLab: spunnel's panel hidden (no sessions from
    sessions), its node plugin (time left, warnings, saves) switched on."""
    labconfig = rundir / "config" / "labconfig"
    labconfig.mkdir(parents=True, exist_ok=True)
    page = {"disabledExtensions": {"spunnel-jupyter:plugin": True}, NODE_FLAG: True}
    (labconfig / "page_config.json").write_text(json.dumps(page))
    return str(rundir / "config")


class Launcher:
    def __init__(
        self, settings: LauncherSettings, commands: asyncio.StreamReader, detached: bool = False
    ) -> None:
        self.commands = commands
        self.detached = detached
        self.failure = ""  # why the launcher gave up (e.g. the reverse tunnel), if it did
        self.token = settings.token or secrets.token_hex(24)
        self.ui = settings.ui
        self.base = settings.runtime_base or tempfile.gettempdir()
        self.command = settings.jupyter_command or python_module("jupyter_server")
        self.args = settings.jupyter_args
        self.start_timeout = float(settings.start_timeout)
        self.stop_grace = float(settings.stop_grace)
        self.warn_before, self.save_grace = settings.warn_before, float(settings.save_grace)
        self.idle_timeout = int(settings.idle_timeout)
        self.private_tmp = bool(settings.private_tmp)
        self.tmp_base, self.tmp_mounts = settings.private_tmp_base, settings.private_tmp_mounts
        self.jupyter = settings.jupyter  # False (--no-jupyter): only hold the step (nodehold.py)
        self.kernel_envs = settings.kernel_envs  # --env: kernels of the user's environments
        self.idled = False  # Jupyter said it shut itself down for want of activity
        self.job_id = os.environ.get("SLURM_JOB_ID", "nojob")
        self.restart = os.environ.get("SLURM_RESTART_COUNT", "0")
        self.stopping = asyncio.Event()
        self.signal_name = ""

    def _on_signal(self, signum: int) -> None:
        self.signal_name = signal.Signals(signum).name
        self.stopping.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            loop.add_signal_handler(sig, self._on_signal, sig)
        ctypes.CDLL(None).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        for stale in remove_stale(self.base):  # told in the session log
            sys.stderr.write(f"spunnel: removed {stale}, left on this node by a killed launcher\n")
        rundir = make_runtime_dir(self.base, self.job_id, self.restart)
        held = hold(rundir)
        try:
            if self.detached:
                self._publish(rundir)
            return await self._serve(rundir)
        finally:
            kill_leftovers()
            if self.tmp_base:  # the private /tmp, if the site put it elsewhere
                privatetmp.cleanup(privatetmp.path_for(self.tmp_base, self.job_id, self.restart))
            privatetmp.cleanup(rundir)  # (the default private /tmp is in there)
            os.close(held)

    def _publish(self, rundir: Path) -> None:
        """Detached: the token, the events and Jupyter's log go to files in ``rundir`` for the
        followers (the token file first: a follower that sees events can read it)."""
        global _events
        private_file(rundir / TOKEN_FILE, self.token).close()
        log = private_file(rundir / JUPYTER_LOG)
        os.dup2(log.fileno(), sys.stderr.fileno())
        log.close()
        _events = private_file(rundir / EVENTS_FILE)

    async def _serve(self, rundir: Path) -> int:
        sock = rundir / "jupyter.sock"
        emit(
            "started",
            socket=str(sock),
            job_id=self.job_id,
            host=socket.gethostname(),
            runtime_dir=str(rundir),
            pid=os.getpid(),
            detached=self.detached,
            ui=self.ui,
        )
        if not self.jupyter:
            dialer = DialBack(emit_event, self._give_up, sock, rundir / "ctl")
            await hold_step(emit, self.commands, self.stopping, dialer)
            if self.failure:
                emit("exited", reason="tunnel-error", message=self.failure)
            else:
                emit("exited", reason="signal", signal=self.signal_name)
            return 0
        if len(str(sock)) > _SOCKET_PATH_MAX:
            emit("exited", reason="error", message=f"socket path too long: {sock}")
            return 1
        if self.ui == "notebook" and importlib.util.find_spec("notebook") is None:
            emit(
                "exited",
                reason="error",
                message="the 'notebook' package is not installed in the node's Python",
            )
            return 1
        notices = Notices(
            rundir, self.job_id, self.warn_before, self.save_grace, self.idle_timeout,
            on_warning=lambda text: emit(WARNING, text=text),
        )  # fmt: skip
        env = dict(os.environ)
        env.update(
            {RUNDIR_ENV: str(rundir)},
            **envkernels.install(rundir, self.kernel_envs, env, emit),  # JUPYTER_PATH
            JUPYTER_TOKEN=self.token,
            JUPYTER_RUNTIME_DIR=str(rundir / "runtime"),
            JUPYTER_CONFIG_PATH=os.pathsep.join(
                p for p in (_no_nesting(rundir), env.get("JUPYTER_CONFIG_PATH")) if p
            ),
        )
        argv = [
            *self.command,
            f"--ServerApp.sock={sock}",
            "--ServerApp.sock_mode=0600",
            "--ServerApp.open_browser=False",
            "--ServerApp.jpserver_extensions=spunnel_jupyter=False",  # no sessions from sessions
            "--ServerApp.jpserver_extensions=spunnel_jupyter.node_extension=True",  # notices
            f"--ServerApp.default_url={ui_path(self.ui)}",
            *idle_args(self.idle_timeout),
            *self.args,
        ]
        if self.private_tmp:  # Jupyter, its kernels and terminals: in a private /tmp
            base = self.tmp_base or privatetmp.default_base(str(rundir))
            argv = privatetmp.wrap(
                argv, base, self.tmp_mounts, [str(rundir)], str(rundir / TMP_NOTE)
            )
        jupyter = await asyncio.create_subprocess_exec(
            *argv,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
        relay = asyncio.ensure_future(self._relay(jupyter.stdout))
        exited = asyncio.ensure_future(jupyter.wait())
        stopping = asyncio.ensure_future(self.stopping.wait())
        ready = asyncio.ensure_future(
            probes.wait_until(lambda: self._answers(sock), timeout=self.start_timeout, cap=0.05)
        )
        listening: asyncio.Future[None] | None = None
        noticing: asyncio.Future[None] | None = None
        dialer = DialBack(emit_event, self._give_up, sock, rundir / "ctl")
        await asyncio.wait({ready, exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
        failed = ready.done() and not ready.result()
        if ready.done() and ready.result():
            tmp = read_json(rundir / TMP_NOTE)  # what the private /tmp came to
            emit("ready", socket=str(sock), tmp=tmp if isinstance(tmp, dict) else {})
            listening = asyncio.ensure_future(dialer.listen(self.commands))
            noticing = asyncio.ensure_future(notices.run())
        elif failed:
            emit(
                "exited",
                reason="error",
                message=f"Jupyter did not answer within {self.start_timeout:g} s",
            )
            self.stopping.set()
        ready.cancel()
        await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
        saving: dict[str, Any] = {}
        if noticing is not None:
            noticing.cancel()
            if self.signal_name in _SAVE_SIGNALS and jupyter.returncode is None:
                saving = await notices.save()
        how = await end_jupyter(jupyter, self.signal_name, self.stop_grace)  # nodestop.py
        if listening is not None:
            listening.cancel()
        await dialer.cancel()
        # kernels (sessions of their own) would hold Jupyter's output open
        if stuck := kill_leftovers():
            sys.stderr.write(f"spunnel: processes {stuck} did not end on SIGKILL (stuck in I/O?)\n")
        if self.signal_name:
            emit("exited", reason="signal", signal=self.signal_name, jupyter=how, **saving)
        elif self.failure:
            emit("exited", reason="tunnel-error", message=self.failure)
        elif self.idled and jupyter.returncode == 0:
            emit("exited", reason="idle", minutes=self.idle_timeout)
        elif not failed:
            emit("exited", reason="jupyter-exit", code=jupyter.returncode)
        code = 0 if how == "killed" else jupyter.returncode  # killed on purpose: a clean end
        stopping.cancel()
        await asyncio.wait({relay}, timeout=0.5)
        return 0 if code == 0 else 1

    def _give_up(self, why: str) -> None:
        self.failure = why
        self.stopping.set()

    async def _answers(self, sock: Path) -> bool:
        try:
            status = await probes.http_status(
                "/api/status",
                unix_socket=str(sock),
                timeout=2,
                headers={"Authorization": f"token {self.token}"},
            )
        except (OSError, TimeoutError, asyncio.TimeoutError):
            return False
        return status == 200

    async def _relay(self, stream: asyncio.StreamReader | None) -> None:
        """Copy Jupyter's log to our stderr (the srun channel), with the token masked.

        In chunks, whatever the line length (a kernel may print a megabyte on one line): a
        reader that stopped would leave Jupyter and its kernels blocked on a full pipe. A chunk
        that ends with the start of the token keeps that part for the next chunk, so a token split
        between two chunks is masked too; anything else (a whole line) goes out at once."""
        assert stream is not None
        token, mask = self.token.encode(), b"<token>"
        carry = b""
        while True:
            chunk = await stream.read(65536)
            data = (carry + chunk).replace(token, mask) if token else carry + chunk
            self.idled = self.idled or _IDLE_SHUTDOWN in data
            cut = next((n for n in range(len(token) - 1, 0, -1) if data.endswith(token[:n])), 0)
            carry, out = (data[-cut:], data[:-cut]) if chunk and cut else (b"", data)
            with contextlib.suppress(OSError):
                sys.stderr.buffer.write(out)
                sys.stderr.buffer.flush()
            if not chunk:
                return


async def read_settings(stdin: asyncio.StreamReader, detached: bool) -> LauncherSettings:
    """The settings: the first line on stdin, or $SPUNNEL_SETTINGS when detached."""
    if detached:
        return LauncherSettings.parse(os.environ.get(SETTINGS_ENV, ""))
    return LauncherSettings.parse(await asyncio.wait_for(stdin.readline(), 60))


async def connect_stdin() -> asyncio.StreamReader:
    stdin = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    return stdin


async def amain(argv: list[str]) -> int:
    # stdin is srun's channel from the supervisor: the settings line, then commands.
    detached = argv == ["--detached"]
    if detached:  # a batch script's stdin is /dev/null (which epoll refuses): no commands come
        stdin = asyncio.StreamReader()
        stdin.feed_eof()
    else:
        stdin = await connect_stdin()
    try:
        settings = await read_settings(stdin, detached)
    except asyncio.TimeoutError:
        emit("exited", reason="error", message="no settings on stdin: run me through spunnel")
        return 2
    except VersionMismatch as e:
        emit("exited", reason="version", message=str(e))
        return 2
    except ProtocolError as e:
        emit("exited", reason="error", message=str(e))
        return 2
    return await Launcher(settings, stdin, detached).run()


def main() -> int:
    return asyncio.run(amain(sys.argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
