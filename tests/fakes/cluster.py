"""The fake cluster as tests drive it: its directories and environment, the real code's
configuration pointing at the fakes, the switches, the calls log, and the checks that a session
left nothing behind.

Everything lives under one short directory in /tmp (Unix socket paths must stay under 107 bytes):

    /tmp/sj.XXXX/s    $FAKE_SLURM_DIR (jobs, switches, calls.log)
    /tmp/sj.XXXX/st   SpunnelManager.state_dir
    /tmp/sj.XXXX/n    SpunnelManager.runtime_base (the "node's" /tmp)
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from traitlets.config import Config

from . import common

FAKES = Path(__file__).resolve().parent
REPO = FAKES.parents[1]
BIN = FAKES / "bin"
PYLIB = FAKES / "pylib"  # the fake pyslurm
FAKE_JUPYTER = FAKES / "fake_jupyter.py"
ACTIVE = common.ACTIVE


class FakeCluster:
    def __init__(self, monkeypatch: Any, backend: str = "cli") -> None:
        self.backend = backend  # SpunnelManager.slurm_backend: "cli", or "pyslurm" (the fake one)
        self.root = Path(tempfile.mkdtemp(prefix="sj.", dir="/tmp"))
        self.slurm_dir = self.root / "s"
        self.state_dir = self.root / "st"
        self.node_tmp = self.root / "n"
        self.node_scratch = self.root / "scratch"  # made private for the fake Jupyter
        for d in (
            self.slurm_dir / "jobs",
            self.slurm_dir / "ctl",
            self.node_tmp,
            self.node_scratch,
        ):
            d.mkdir(parents=True)
        self.calls_log = self.slurm_dir / "calls.log"
        self.calls_log.touch()
        monkeypatch.setenv("FAKE_SLURM_DIR", str(self.slurm_dir))
        monkeypatch.setenv("FAKE_PYTHON", sys.executable)
        monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
        # The launcher (run by the fake srun) must import this checkout, not an installed copy;
        # the pyslurm backend's probe (a child) and this process, the fake pyslurm.
        pythonpath = os.environ.get("PYTHONPATH")
        first = [str(REPO), *([str(PYLIB)] if backend == "pyslurm" else [])]
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join([*first, *filter(None, [pythonpath])]))
        if backend == "pyslurm":
            monkeypatch.syspath_prepend(str(PYLIB))
        monkeypatch.delenv("SPUNNEL_STATE_DIR", raising=False)

    # -- configuration of the real code ------------------------------------------------------
    def config(self, **sections: dict[str, Any]) -> Config:
        """The site configuration that points spunnel at the fakes, with small timeouts;
        ``sections`` (e.g. ``SshTunnel={"mode": "reverse"}``) override it."""
        c = Config()
        c.SpunnelManager.update(
            state_dir=str(self.state_dir),
            runtime_base=str(self.node_tmp),
            launcher_command=[sys.executable, "-m", "spunnel_jupyter.launcher"],
            jupyter_command=[sys.executable, str(FAKE_JUPYTER)],
            partition="interact",
            login_host="login.example.org",
            start_timeout=10.0,
            stop_timeout=3.0,
            jupyter_stop_grace=1.0,
            pending_poll_interval=0.1,
            refresh_interval=60.0,
            slurm_backend=self.backend,
        )
        # The node here is this host: a private /tmp would hide the fakes' own state under /tmp
        # from the fake Jupyter; the real wrapper runs anyway, over a scratch directory instead.
        c.PrivateTmp.update(mounts=[str(self.node_scratch)])
        c.SlurmCLI.update(commands_dir=str(BIN), timeout=5.0)
        c.SshTunnel.update(
            ssh_command=[str(BIN / "ssh")],
            reverse_host="login1",
            connect_timeout=5.0,
            reconnect_timeout=5.0,
            adopt_retry_timeout=1.0,
        )
        for section, values in sections.items():
            c[section].update(values)
        return c

    # -- switches (see fake_slurm.py, fake_ssh.py) ---------------------------------------------
    def switch(self, name: str, text: str = "") -> None:
        (self.slurm_dir / "ctl" / name).write_text(text)

    def unswitch(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.slurm_dir / "ctl" / name).unlink()

    def hold(self, reason: str = "Resources") -> None:
        """New jobs pend (with ``reason``) until ``release``."""
        self.switch("hold", reason)

    def release(self) -> None:
        self.unswitch("hold")

    # -- jobs ----------------------------------------------------------------------------------
    def jobs(self) -> list[dict[str, Any]]:
        return common.all_jobs()

    def job(self, job_id: int) -> dict[str, Any]:
        job = common.read_job(job_id)
        assert job is not None, f"no job {job_id}"
        return job

    def active_jobs(self) -> list[dict[str, Any]]:
        return [j for j in self.jobs() if j["state"] in ACTIVE]

    def add_job(self, **fields: Any) -> dict[str, Any]:
        """A job in the queue that no fake srun owns (e.g. one a dead supervisor left)."""
        defaults = {"state": "RUNNING", "reason": "None", "user": _user(), "name": "spunnel",
                    "partition": "interact", "comment": "", "node": common.node_name(),
                    "time_limit": 3600, "start_time": time.time(),
                    "end_time": time.time() + 3600, "srun_pid": None, "task_pid": None}  # fmt: skip
        return common.new_job(**{**defaults, **fields})

    def expire(self, job_id: int) -> None:
        """The job's time limit is reached now (its fake srun ends the step as slurmstepd does)."""
        common.update_job(job_id, end_time=time.time())

    def scancel(self, job_id: int) -> subprocess.CompletedProcess[str]:
        """scancel from elsewhere (another terminal, an admin)."""
        return subprocess.run([str(BIN / "scancel"), str(job_id)], capture_output=True, text=True)

    # -- the calls log -------------------------------------------------------------------------
    def log(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.calls_log.read_text().splitlines()]

    def calls(self, prog: str | None = None) -> list[dict[str, Any]]:
        """Invocations (with their argv), in order; of ``prog`` only if given."""
        return [r for r in self.log() if "argv" in r and prog in (None, r["prog"])]

    def _pyslurm_calls(self, name: str) -> list[dict[str, Any]]:
        """pyslurm's calls of ``name`` (e.g. Job.cancel), their argv as the command's would be."""
        calls = self.calls("pyslurm")
        return [dict(c, argv=c["argv"][1:]) for c in calls if c["argv"][0] == name]

    def cancels(self) -> list[dict[str, Any]]:
        """What the login side asked Slurm to cancel or signal: scancel's calls (both backends
        signal with it), and pyslurm's Job.cancel calls (argv: the job id)."""
        both = self.calls("scancel") + self._pyslurm_calls("Job.cancel")
        return sorted(both, key=lambda c: c["t"])

    def job_queries(self) -> list[dict[str, Any]]:
        """The queries of one job's state: scontrol's, or pyslurm's Job.load."""
        return self.calls("scontrol") + self._pyslurm_calls("Job.load")

    def events(self, event: str | None = None, prog: str | None = None) -> list[dict[str, Any]]:
        return [
            r
            for r in self.log()
            if "event" in r and event in (None, r["event"]) and prog in (None, r["prog"])
        ]

    def ssh_calls(self, kind: str) -> list[dict[str, Any]]:
        """ssh invocations of one kind: master, check, exit, forward, cancel, command."""
        return [r for r in self.calls("ssh") if _ssh_kind(r["argv"]) == kind]

    # -- what must be gone after a session --------------------------------------------------
    def processes(self) -> list[str]:
        """Processes started for this cluster (they carry its FAKE_SLURM_DIR), as 'pid cmdline'."""
        marker = f"FAKE_SLURM_DIR={self.slurm_dir}".encode() + b"\0"
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    environ = f.read() + b"\0"
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if b"\0" + marker in b"\0" + environ:
                found.append(f"{entry} {cmdline.strip()}")
        return found

    def zombie_children(self) -> list[int]:
        """Our own children that exited and were never reaped."""
        zombies = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError, IndexError):
                    with open(f"/proc/{entry}/stat", "rb") as f:
                        fields = f.read().rsplit(b")", 1)[1].split()
                    if fields[0] == b"Z" and int(fields[1]) == os.getpid():
                        zombies.append(int(entry))
        return zombies

    def lock_free(self) -> bool:
        lock = self.state_dir / "lock"
        assert lock.exists(), "the session lock file was never created"
        fd = os.open(lock, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        finally:
            os.close(fd)
        return True

    def leftovers(self, manager: Any) -> list[str]:
        """Everything a session that ended must not have left behind (empty: clean)."""
        found = [f"process {p}" for p in self.processes()]
        found += [f"zombie child {pid}" for pid in self.zombie_children()]
        found += [f"active job {j['job_id']} ({j['state']})" for j in self.active_jobs()]
        found += [f"node runtime dir {p.name}" for p in self.node_tmp.iterdir()]
        found += [
            f"state file {name}"
            for name in ("session.json", "control.sock", "ctl", "tunnel.sock", "open.html")
            if (self.state_dir / name).exists()
        ]
        if not self.lock_free():
            found.append("the session lock is held")
        if manager.status() is not None:
            found.append("manager.status() still shows a session")
        return found

    def assert_clean(self, manager: Any, timeout: float = 2.0) -> None:
        """Nothing left: no process, job, node directory, state file or lock (within
        ``timeout``: the README promises everything is gone within two seconds)."""
        deadline = time.monotonic() + timeout
        while (found := self.leftovers(manager)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert found == [], f"left behind: {found}"

    def close(self) -> None:
        """Kill whatever a failed test left running, and remove the directories."""
        for line in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(line.split()[0]), signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)


def _user() -> str:
    import getpass

    return getpass.getuser()


def _ssh_kind(argv: list[str]) -> str:
    if "-O" in argv:
        return argv[argv.index("-O") + 1]
    if "-M" in argv:
        return "master"
    return "command"


# -- helpers for the async tests -------------------------------------------------------------
async def until(check: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    """Poll ``check()`` until it returns something true; return it. AssertionError on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what or check}")
        await asyncio.sleep(0.01)


def _http(port: int, method: str, target: str, headers: dict[str, str]) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, target, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


async def fetch(
    port: int, target: str, token: str | None = None, method: str = "GET"
) -> tuple[int, bytes]:
    """An HTTP request to 127.0.0.1:``port`` (with ``Authorization: token`` if given)."""
    headers = {"Authorization": f"token {token}"} if token else {}
    return await asyncio.to_thread(_http, port, method, target, headers)


def port_answers(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EchoServer:
    """A TCP service on the "node" (127.0.0.1:port) for extra tunnels: answers b'echo:' + data."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.setblocking(False)
        self.port = int(self.sock.getsockname()[1])
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> EchoServer:
        self.server = await asyncio.start_server(self._serve, sock=self.sock)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.readline()
        writer.write(b"echo:" + data)
        await writer.drain()
        writer.close()


async def echo_through(port: int, text: bytes = b"hello\n") -> bytes:
    """What the echo service says back through 127.0.0.1:``port``."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    try:
        writer.write(text)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
