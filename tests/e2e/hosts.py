"""Run commands as a user on either login host of the test cluster (tests spanning login hosts).

``login`` is the first login host (the root namespaces, where pytest runs); ``login2`` the second
(tests/cluster/login2.sh: own network, UTS and mount namespaces, hostname login2, a private /tmp,
its own sshd; everything else shared). Every command goes through tests/cluster/on-host, which
enters the host's namespaces, becomes the user and sets an environment like cluster.user_env's
(plus /opt/spunnel/venv/bin on PATH). login2's test user is carol: the other e2e tests
force-clean alice and bob.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import re
import subprocess
import termios
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from .cluster import PROG, Session, files_left, force_clean, leftovers, state_dir, uid

ON_HOST = Path(__file__).resolve().parents[1] / "cluster" / "on-host"
LOGIN2_ENV = Path("/run/spunnel-login2/login2.env")
HOSTS = ("login", "login2")
# What on-host itself needs; the command gets the clean environment on-host builds.
_ON_HOST_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def login2_env() -> dict[str, str]:
    """login2's facts (login2.env); fails the test loudly when login2 is not up and healthy."""
    hint = "run `bash tests/cluster/login2.sh` as root (up.sh runs it)"
    if not LOGIN2_ENV.exists():
        pytest.fail(f"login2 is not up ({LOGIN2_ENV} missing): {hint}", pytrace=False)
    env = dict(line.split("=", 1) for line in LOGIN2_ENV.read_text().splitlines() if "=" in line)
    probe = on_host("login2", "root", ["hostname"], timeout=30)
    if probe.returncode != 0 or probe.stdout.strip() != env.get("HOST", "login2"):
        pytest.fail(
            f"login2 is not healthy (on-host login2 root hostname: {probe.returncode}, "
            f"{probe.stdout!r} {probe.stderr!r}): {hint}",
            pytrace=False,
        )
    if _login2_sshd() is None:
        pytest.fail(f"login2's sshd is not running: {hint}", pytrace=False)
    return env


def host_argv(host: str, user: str, argv: list[str], **env: str) -> list[str]:
    """The on-host command line that runs ``argv`` as ``user`` on ``host`` with ``env`` added."""
    if host not in HOSTS:
        raise ValueError(f"unknown host {host!r}: one of {HOSTS}")
    if not argv or "=" in argv[0]:
        raise ValueError(f"argv must name a command (env would take {argv[:1]!r} for a variable)")
    bad = [name for name in env if not _NAME.match(name)]
    if bad:
        raise ValueError(f"not variable names: {bad}")
    return [str(ON_HOST), host, user, *(f"{k}={v}" for k, v in env.items()), *argv]


def on_host(
    host: str, user: str, argv: list[str], timeout: float = 60, input: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as ``user`` on ``host`` (``login`` or ``login2``); wait, output captured."""
    return subprocess.run(
        host_argv(host, user, argv, **env),
        env=_ON_HOST_ENV,
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def on_login2(
    user: str, argv: list[str], timeout: float = 60, input: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as ``user`` on login2 to its end; output captured (str)."""
    return on_host("login2", user, argv, timeout=timeout, input=input, **env)


def popen_on(
    host: str,
    user: str,
    argv: list[str],
    *,
    stdin: int | None = subprocess.DEVNULL,
    stdout: int | None = subprocess.PIPE,
    stderr: int | None = subprocess.STDOUT,
    **env: str,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` as ``user`` on ``host`` in its own session and return at once.

    The Popen's pid is the command itself (on-host, nsenter, setpriv and env all exec), so
    ``proc.send_signal`` and ``os.killpg(proc.pid, ...)`` reach it. Output bytes on ``proc.stdout``.
    """
    return subprocess.Popen(
        host_argv(host, user, argv, **env),
        env=_ON_HOST_ENV,
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        start_new_session=True,
    )


def popen_login2(user: str, argv: list[str], **kwargs) -> subprocess.Popen[bytes]:
    """Start a long-running ``argv`` as ``user`` on login2 (see popen_on)."""
    return popen_on("login2", user, argv, **kwargs)


@dataclass
class HostSession(Session):
    """cluster.Session for a spunnel-notebook on either login host: its record is read from that
    host's state directory (login2's /tmp is not pytest's)."""

    host: str = "login"

    @property
    def record(self) -> dict:
        return json.loads(host_path(self.host, state_dir(self.user) / "session.json").read_text())


def start_notebook(
    host: str, user: str, *args: str, tty: bool = False, env_path: str = "", **env: str
) -> HostSession:
    """``spunnel-notebook ARGS`` as ``user`` on ``host`` in its own session, like cluster.start
    (optionally on a pty that becomes its controlling terminal; ``env_path`` is put on
    JUPYTER_CONFIG_PATH)."""
    if env_path:
        env["JUPYTER_CONFIG_PATH"] = env_path
    argv = [PROG, *args]
    if not tty:
        return HostSession(user, popen_on(host, user, argv, **env), host=host)
    master, slave = pty.openpty()
    os.fchown(slave, uid(user), -1)

    def controlling_terminal() -> None:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(
        host_argv(host, user, argv, **env),
        env=_ON_HOST_ENV,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        preexec_fn=controlling_terminal,
    )
    os.close(slave)
    return HostSession(user, proc, master_fd=master, host=host)


def _login2_sshd() -> int | None:
    """The pid of login2's sshd when it runs inside login2's mount namespace."""
    env = dict(line.split("=", 1) for line in LOGIN2_ENV.read_text().splitlines() if "=" in line)
    try:
        pid, start = Path(env["SSHD_PIDFILE"]).read_text().split()
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        if fields[0] == "Z" or fields[19] != start:
            return None
        ns = os.stat(env["MNTNS"]).st_ino
        if os.readlink(f"/proc/{pid}/ns/mnt") != f"mnt:[{ns}]":
            return None
    except (OSError, KeyError, ValueError, IndexError):
        return None
    return int(pid)


def host_path(host: str, path: str | Path) -> Path:
    """``path`` as ``host`` sees it, readable from here: login2's files through /proc/PID/root of
    its sshd (the same mount namespace), the first host's as they are."""
    path = Path(path)
    if host == "login":
        return path
    if host != "login2":
        raise ValueError(f"unknown host {host!r}")
    pid = _login2_sshd()
    if pid is None:
        pytest.fail("login2's sshd is not running: run `bash tests/cluster/login2.sh`")
    return Path(f"/proc/{pid}/root") / path.relative_to("/")


def login2_path(path: str | Path) -> Path:
    return host_path("login2", path)


def leftovers_on_login2(user: str) -> list[str]:
    """What a finished session must not leave in login2's own /tmp (cluster.leftovers looks only at
    the first host's)."""
    return files_left(user, login2_path("/"), "login2")


def leftovers_everywhere(user: str) -> list[str]:
    """cluster.leftovers (jobs, processes in any namespace, the first host's and the node's /tmp)
    plus login2's /tmp."""
    return leftovers(user) + leftovers_on_login2(user)


def wait_clean_everywhere(user: str, timeout: float) -> tuple[float, list[str]]:
    """Seconds until nothing of ``user`` is left on any host (polling every 20 ms), or the
    leftovers at ``timeout``."""
    start = time.monotonic()
    while True:
        found = leftovers_everywhere(user)
        elapsed = time.monotonic() - start
        if not found or elapsed > timeout:
            return elapsed, found
        time.sleep(0.02)


def force_clean_everywhere(user: str) -> None:
    """cluster.force_clean (jobs, every process of ``user``, the first host's /tmp), and login2's
    /tmp."""
    force_clean(user)
    owner = uid(user)
    for path in [*login2_path("/tmp").glob("spunnel.*"), login2_path(state_dir(user))]:
        with contextlib.suppress(OSError):
            if path.stat().st_uid == owner:
                subprocess.run(["rm", "-rf", str(path)], check=False)
