"""The per-user, per-host state directory: the session lock and the session record.

Invariants:
- The directory is owned by the user, mode 0700, on a host-local filesystem; anything else is
  refused (a directory another user pre-created, or one on NFS where locks and sockets are
  unreliable).
- ``lock`` is held with flock(2) by the one supervisor that owns the session, for the session's
  whole life. The kernel drops it when that process dies however it dies, so a dead owner can never
  leave the lock taken; a record found while the lock is free is a leftover to clean, never a live
  session.
- ``session.json`` (0600, written atomically) describes the session; it holds the notebook token, so
  it is never written anywhere else and never logged.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import socket
import stat
import tempfile
from pathlib import Path
from typing import Any

from .errors import StateError

RECORD = "session.json"  # the running session (holds the token)
LOCK = "lock"  # flock(2)ed by the session's supervisor
CONTROL = "control.sock"  # the supervisor's control socket (stop, forward)
CONTROL_PATH = "ctl"  # the ssh ControlMaster's socket
TUNNEL_SOCKET = "tunnel.sock"  # the login end of the -L to Jupyter's socket (behind the relay)
LOG = "session.log"  # srun's, ssh's and (token-masked) Jupyter's output
LAST = "last.json"  # how the previous session ended (no secrets)
UNCANCELLED = "uncancelled.json"  # a job whose end Slurm did not confirm at teardown: retried
PAGE = "open.html"  # the page the desktop's browser opens, a redirect to the URL (browser.py)
# What a supervisor that died left behind, removed by the next start (with port-*.sock).
LEFTOVERS = (CONTROL_PATH, CONTROL, RECORD, TUNNEL_SOCKET, PAGE)
# Filesystems whose locks or Unix sockets are not host-local.
NETWORK_FS = {
    "nfs",
    "nfs4",
    "cifs",
    "smb3",
    "smbfs",
    "lustre",
    "gpfs",
    "beegfs",
    "ceph",
    "glusterfs",
    "fuse.sshfs",
    "fuse.glusterfs",
    "fuse.ceph",
    "afs",
    "9p",
    "panfs",
    "wekafs",
    "fuse.beegfs",
}


def default_state_dir() -> Path:
    """$SPUNNEL_STATE_DIR, else $XDG_RUNTIME_DIR/spunnel-jupyter, else /tmp/spunnel-jupyter-UID."""
    if os.environ.get("SPUNNEL_STATE_DIR"):
        return Path(os.environ["SPUNNEL_STATE_DIR"])
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and _owned_private_dir(Path(runtime)):
        return Path(runtime) / "spunnel-jupyter"
    return Path(tempfile.gettempdir()) / f"spunnel-jupyter-{os.getuid()}"


def _owned_private_dir(path: Path) -> bool:
    try:
        st = path.lstat()
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding ``path``, from /proc/self/mountinfo (longest prefix)."""
    best, fstype = "", "unknown"
    target = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                mount_point = left.split()[4].replace("\\040", " ")
                inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
                if inside and len(mount_point) >= len(best):
                    best, fstype = mount_point, right.split()[0]
    except OSError:
        pass
    return fstype


class StateDir:
    """A verified private directory; see the module docstring for its invariants."""

    def __init__(self, path: Path | str | None = None) -> None:
        self.path = Path(path) if path else default_state_dir()
        self._lock_fd: int | None = None

    def ensure(self) -> StateDir:
        remedy = (
            "set SPUNNEL_STATE_DIR (or c.SpunnelManager.state_dir) to a private directory on a "
            "local filesystem, or ask your administrators to remove the offending one"
        )
        with contextlib.suppress(FileExistsError):
            os.mkdir(self.path, 0o700)
        st = self.path.lstat()
        if not stat.S_ISDIR(st.st_mode):
            kind = {stat.S_IFLNK: "symbolic link", stat.S_IFSOCK: "socket"}
            what = f"{kind.get(stat.S_IFMT(st.st_mode), 'file')} of uid {st.st_uid}"
            raise StateError(f"state directory {self.path} is a {what}, not a directory", remedy)
        if st.st_uid != os.getuid():
            raise StateError(f"state directory {self.path} belongs to uid {st.st_uid}", remedy)
        if st.st_mode & 0o077:
            os.chmod(self.path, 0o700)  # ours, but loosened: tighten before trusting it
        fstype = filesystem_type(self.path)
        if fstype in NETWORK_FS:
            raise StateError(f"state directory {self.path} is on {fstype}, not host-local", remedy)
        return self

    def file(self, name: str) -> Path:
        return self.path / name

    # -- lock --------------------------------------------------------------------------------
    def try_lock(self) -> bool:
        """Take the session lock without blocking; True if we now hold it."""
        if self._lock_fd is not None:
            return True
        fd = os.open(self.file(LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def is_locked(self) -> bool:
        """True if some live process holds the session lock (possibly us).

        Asks the kernel's lock table (/proc/locks) instead of taking the lock, so that a probe
        (status, the event stream) can never make a start racing it fail."""
        if self._lock_fd is not None:
            return True
        try:
            st = os.stat(self.file(LOCK))
        except FileNotFoundError:
            return False
        key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        try:
            with open("/proc/locks", encoding="ascii", errors="replace") as f:
                return any("FLOCK" in line and key in line.split() for line in f)
        except OSError:  # no /proc: probe by taking the lock (a racing start may then fail)
            if self.try_lock():
                self.unlock()
                return False
            return True

    # -- record ------------------------------------------------------------------------------
    def read(self, name: str = RECORD) -> dict[str, Any] | None:
        try:
            with open(self.file(name), encoding="utf-8") as f:
                record = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable or torn: still a leftover to clean
        return record if isinstance(record, dict) else {}

    def write(self, record: dict[str, Any], name: str = RECORD) -> None:
        """Replace the record atomically (0600 temp file, fsync-free rename: tmpfs or local)."""
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=".session.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(record, f, indent=1, sort_keys=True)
            os.replace(tmp, self.file(name))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def open_log(self, name: str, keep: int) -> Log:
        """A new log ``name`` (0600, unbuffered); the previous ones move to ``name.1`` ...
        ``name.<keep>`` (the oldest is dropped), so a new session never erases the last one's."""
        for n in range(keep, 0, -1):
            older = self.file(f"{name}.{n - 1}" if n > 1 else name)
            with contextlib.suppress(FileNotFoundError):
                os.replace(older, self.file(f"{name}.{n}"))

        def opener(path: str, flags: int) -> int:
            return os.open(path, flags | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)

        log = Log(self.file(name), "w", opener=opener)
        os.fchmod(log.fileno(), 0o600)  # an older log may have been looser
        return log

    def remove(self, *names: str) -> None:
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.file(name))


class Log(io.FileIO):
    """A session log whose writes never raise: a full disk (ENOSPC) must not stop the readers
    of srun's output, nor a teardown. What could not be written is counted in ``dropped``."""

    dropped = 0

    def write(self, data: Any) -> int:
        try:
            return super().write(data) or 0
        except OSError:
            self.dropped += len(data)
            return 0


def hostname() -> str:
    return socket.gethostname()
