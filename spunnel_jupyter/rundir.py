"""The launcher's private runtime directory on the node, ``<base>/spunnel.JOB.RESTART`` (0700):
made (never one someone else made), held locked for the launcher's life, found by a detached
session's followers, and removed at the next start when a killed launcher left it behind.

Standard library only, like the launcher.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any

from .privatetmp import cleanup
from .protocol import EVENTS_FILE


def private_file(path: Path, text: str = "") -> Any:
    """A new 0600 file of ours at ``path`` (never through a link), open for appending."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    out = os.fdopen(fd, "a", buffering=1)
    out.write(text)
    out.flush()
    return out


def replace_json(path: Path, data: Any) -> None:
    """Write ``data`` to ``path`` (0600) at once: a reader sees the old file or the new, whole."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(data, out)
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    """The JSON in ``path``; None if it is missing or not JSON."""
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return None


def hold(rundir: Path) -> int:
    """Lock ``rundir/.held`` for this launcher's life (the kernel drops it however we die): a
    directory whose lock is free belongs to a launcher that is gone."""
    fd = os.open(rundir / ".held", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def remove_stale(base: str) -> list[str]:
    """Remove our runtime directories whose launcher is gone (killed with SIGKILL, so it could
    not clean up: Jupyter's token file would stay behind). Returns what was removed."""
    removed = []
    for path in Path(base).glob("spunnel.*"):
        with contextlib.suppress(OSError):
            st = path.lstat()
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
                continue
            fd = os.open(path / ".held", os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # taken: its launcher is gone
            finally:
                os.close(fd)
            cleanup(path)  # (what a kernel made unreadable too)
            removed.append(str(path))
    return removed


def make_runtime_dir(base: str, job_id: str, restart: str) -> Path:
    """Create ``base/spunnel.JOB.RESTART`` (0700) or, if someone else's is there, a fresh one."""
    path = Path(base) / f"spunnel.{job_id}.{restart}"
    try:
        os.mkdir(path, 0o700)
        return path
    except FileExistsError:
        st = path.lstat()
        if path.is_dir() and not path.is_symlink() and st.st_uid == os.getuid():
            os.chmod(path, 0o700)
            return path
    # Pre-created by another user: never use it, and never fail because of it.
    fresh = Path(tempfile.mkdtemp(prefix=f"{path.name}.", dir=base))
    sys.stderr.write(f"spunnel: {path} already exists (owner uid {st.st_uid}): using {fresh}\n")
    return fresh


def find_runtime_dir(base: str, job_id: str) -> Path | None:
    """The detached launcher's directory for ``job_id``: ours, 0700, a real directory, holding
    its events (the newest restart's, if Slurm requeued the job)."""
    found = []
    for path in Path(base).glob(f"spunnel.{job_id}.*"):
        with contextlib.suppress(OSError):
            st = path.lstat()
            if (
                stat.S_ISDIR(st.st_mode)
                and st.st_uid == os.getuid()
                and stat.S_IMODE(st.st_mode) == 0o700
                and (path / EVENTS_FILE).is_file()
            ):
                found.append((st.st_mtime, path))
    return max(found)[1] if found else None


def launcher_alive(rundir: Path) -> bool:
    """The launcher holds ``.held`` locked for its whole life (launcher.hold)."""
    try:
        fd = os.open(rundir / ".held", os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # (drops the shared lock if we got it)
    return False
