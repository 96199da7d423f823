"""Drive the real test cluster from tests: run spunnel-notebook as a test user, inspect leftovers.

The cluster is the one tests/cluster/up.sh starts (real slurmctld/slurmd with munge, exec node c1
in its own network namespace, sshd on c1). Nothing here is faked.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import re
import select
import signal
import subprocess
import tempfile
import termios
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CLUSTER_ENV = Path("/run/spunnel-test/cluster.env")
URL_RE = re.compile(r"(http://127\.0\.0\.1:(\d+)/(lab|tree)\?token=([0-9a-f]+))")
PROG = "spunnel-notebook"


def cluster_env() -> dict[str, str]:
    """The running cluster's facts; fails the test loudly when the cluster is not up."""
    if not CLUSTER_ENV.exists():
        pytest.fail(
            f"the test cluster is not up ({CLUSTER_ENV} missing): run `bash tests/cluster/up.sh` "
            "as root (tests/run.sh does it)",
            pytrace=False,
        )
    env = dict(line.split("=", 1) for line in CLUSTER_ENV.read_text().splitlines() if "=" in line)
    ping = subprocess.run(
        ["sinfo", "-h", "-n", env.get("NODE", "c1"), "-o", "%t"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    # idle, mixed, allocated or completing (another job's end): all fine to run tests on.
    # A state's suffix flags are not its health: 25.11 adds "-" (planned by backfill), "mix-".
    if ping.returncode != 0 or ping.stdout.strip().rstrip("*~#-") not in (
        "idle",
        "mix",
        "alloc",
        "comp",
    ):
        pytest.fail(f"the test cluster is not healthy: sinfo says {ping.stdout!r} {ping.stderr!r}")
    return env


def user_env(user: str, **extra: str) -> dict[str, str]:
    env = {
        "HOME": f"/home/{user}",
        "USER": user,
        "LOGNAME": user,
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
    }
    env.update(extra)
    return env


def uid(user: str) -> int:
    import pwd

    return pwd.getpwnam(user).pw_uid


def state_dir(user: str) -> Path:
    return Path(f"/tmp/spunnel-jupyter-{uid(user)}")


def as_user(
    user: str, argv: list[str], timeout: float = 60, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        user=user,
        group=user,
        extra_groups=[],
        env=user_env(user, **env),
        cwd=f"/home/{user}",
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def squeue(user: str) -> list[str]:
    out = subprocess.run(
        ["squeue", "-h", "-u", user, "-o", "%i %T"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return out.stdout.splitlines()


def procs_of(user: str) -> list[tuple[int, str]]:
    """(pid, cmdline) of every live process of ``user``."""
    found = []
    me = uid(user)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            if os.stat(f"/proc/{entry}").st_uid != me:
                continue
            with open(f"/proc/{entry}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            found.append((int(entry), cmd))
    return found


def leftovers(user: str) -> list[str]:
    """Everything a finished session must not leave behind, described; empty when clean."""
    problems = [f"job in squeue: {line}" for line in squeue(user)]
    for pid, cmd in procs_of(user):
        if re.search(r"ssh .*-M|srun |spunnel_jupyter|jupyter", cmd):
            problems.append(f"process {pid}: {cmd[:120]}")
    return problems + files_left(user, Path("/"))


def files_left(user: str, root: Path, host: str = "") -> list[str]:
    """The state directory's and /tmp's leftovers of ``user`` in the filesystem seen at ``root``
    (``/``, or another login host's root seen from here), described as on ``host``."""
    on = f" on {host}" if host else ""
    sdir = root / state_dir(user).relative_to("/")
    problems = [
        f"file left{on}: {state_dir(user) / name}"
        for name in ("session.json", "ctl", "control.sock", "uncancelled.json", "open.html")
        if (sdir / name).exists()
    ]
    problems += [f"socket left{on}: {state_dir(user) / path.name}" for path in sdir.glob("*.sock")]
    lock = sdir / "lock"
    if lock.exists():
        with open(lock) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(f, fcntl.LOCK_UN)
            except BlockingIOError:
                problems.append(f"the session lock{on} is still held")
    owner = uid(user)
    for path in (root / "tmp").glob("spunnel.*"):
        with contextlib.suppress(OSError):
            if path.stat().st_uid == owner:
                problems.append(f"runtime dir left{on}: /tmp/{path.name}")
    return problems


def wait_clean(user: str, timeout: float) -> tuple[float, list[str]]:
    """Seconds until nothing is left (polling every 20 ms), or the leftovers at ``timeout``."""
    start = time.monotonic()
    while True:
        found = leftovers(user)
        elapsed = time.monotonic() - start
        if not found or elapsed > timeout:
            return elapsed, found
        time.sleep(0.02)


def force_clean(user: str) -> None:
    """Between tests: make sure nothing of ``user`` survives, whatever the test did."""
    subprocess.run(["scancel", "-u", user], timeout=30, check=False)
    subprocess.run(["pkill", "-KILL", "-u", user], check=False)
    deadline = time.monotonic() + 30
    while squeue(user) and time.monotonic() < deadline:
        time.sleep(0.2)
    for path in [*Path("/tmp").glob("spunnel.*"), state_dir(user)]:
        with contextlib.suppress(OSError):
            if path.stat().st_uid == uid(user):
                subprocess.run(["rm", "-rf", str(path)], check=False)


@dataclass
class Session:
    """A running ``spunnel-notebook`` in the foreground, as a user would have it."""

    user: str
    proc: subprocess.Popen[bytes]
    master_fd: int | None = None  # the pty's master side when run on a terminal
    output: str = ""
    url: str = ""
    port: int = 0
    token: str = ""
    started: float = field(default_factory=time.monotonic)
    ready_after: float = 0.0

    @property
    def record(self) -> dict:
        with open(state_dir(self.user) / "session.json") as f:
            return json.load(f)

    @property
    def job_id(self) -> int:
        return int(self.record["job_id"])

    def _read(self, timeout: float) -> str:
        if self.master_fd is not None:
            fds = [self.master_fd]
        elif self.proc.stdout is not None:
            fds = [self.proc.stdout.fileno()]
        else:  # terminal closed: nothing more to read
            time.sleep(timeout)
            return ""
        ready, _, _ = select.select(fds, [], [], timeout)
        if not ready:
            return ""
        try:
            chunk = os.read(fds[0], 65536)
        except OSError:  # pty closed
            return ""
        return chunk.decode(errors="replace")

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.output)
            if m:
                return m
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{pattern!r} not seen within {timeout} s; output:\n{self.output}"
                )
            chunk = self._read(min(0.5, max(0.01, deadline - time.monotonic())))
            self.output += chunk
            if not chunk and self.proc.poll() is not None:
                self.output += self._drain()
                if not re.search(pattern, self.output):
                    raise AssertionError(
                        f"{PROG} exited ({self.proc.returncode}) before {pattern!r}:\n{self.output}"
                    )

    def wait_ready(self, timeout: float = 90) -> Session:
        m = self.wait_for(URL_RE.pattern, timeout)
        self.ready_after = time.monotonic() - self.started
        self.url, self.port, self.token = m.group(1), int(m.group(2)), m.group(4)
        return self

    def _drain(self) -> str:
        text = ""
        while chunk := self._read(0.05):
            text += chunk
        return text

    def finish(self, timeout: float = 30) -> int:
        """Wait for the command to exit; collect everything it printed."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.output += self._read(0.2)
        if self.proc.poll() is None:
            raise AssertionError(f"{PROG} still running after {timeout} s:\n{self.output}")
        self.output += self._drain()
        return self.proc.returncode

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def close_terminal(self) -> None:
        """Close the pty's master side: the kernel sends SIGHUP, as when a terminal is closed."""
        assert self.master_fd is not None
        os.close(self.master_fd)
        self.master_fd = None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.master_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.master_fd)
            self.master_fd = None


def start(user: str, *args: str, tty: bool = False, env_path: str = "", **env: str) -> Session:
    """Start ``spunnel-notebook ARGS`` as ``user`` in its own session (optionally on a pty).

    ``env_path``: a directory put on Jupyter's config path (site configuration).
    """
    argv = [PROG, *args]
    if env_path:
        env["JUPYTER_CONFIG_PATH"] = env_path
    common = dict(
        user=user, group=user, extra_groups=[], env=user_env(user, **env), cwd=f"/home/{user}"
    )
    if not tty:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **common,
        )
        return Session(user, proc)
    master, slave = pty.openpty()
    os.fchown(slave, uid(user), -1)

    def controlling_terminal() -> None:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(
        argv, stdin=slave, stdout=slave, stderr=slave, preexec_fn=controlling_terminal, **common
    )
    os.close(slave)
    return Session(user, proc, master_fd=master)


__all__ = ["signal"]


def jobs_submitted() -> int:
    """slurmctld's count of submitted jobs (sdiag), which any srun, even a refused one, moves."""
    out = subprocess.run(["sdiag"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"Jobs submitted:\s*(\d+)", out)
    assert match, out
    return int(match[1])


def site_config(config: dict) -> str:
    """A directory for JUPYTER_CONFIG_PATH holding jupyter_spunnel_jupyter_config.json.

    Under /tmp itself, not pytest's tmp_path: the test users must be able to read it.
    """
    path = Path(tempfile.mkdtemp(prefix="site-config-", dir="/tmp"))
    path.chmod(0o755)
    (path / "jupyter_spunnel_jupyter_config.json").write_text(json.dumps(config))
    (path / "jupyter_spunnel_jupyter_config.json").chmod(0o644)
    return str(path)
