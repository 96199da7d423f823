"""A private /tmp and /var/tmp for Jupyter and its kernels on the node, made without root.

As Slurm's private-tmpdir SPANK plugin: make ``<base>.<JOB>.<RESTART>/{tmp,var_tmp}`` (0700, ours)
and bind-mount each over its mount point in a mount namespace of our own. The plugin is root; we
are the job's user, so we make a user namespace too. Right after ``unshare(CLONE_NEWUSER |
CLONE_NEWNS)`` the caller holds every capability in it (measured, with an identity map), until it
execs: so ``unshare --map-current-user --mount`` then ``mount`` fails (EPERM, the execve of mount
drops them for a non-root uid), and the process that unshares must mount, then exec the command.
The maps are the identity, not root: files stay ours, the outside sees our real uid, the command
has no capability left. Host mounts still propagate in (MS_SLAVE, as systemd's PrivateTmp).

unshare(CLONE_NEWUSER) fails (EINVAL) in a multithreaded process such as the asyncio launcher, so
a fresh one-thread wrapper does it, then execs Jupyter (``main``)::

    python -m spunnel_jupyter.privatetmp --base B [--job J --restart R] --note FILE \\
        --mount /var/tmp --mount /tmp --keep RUNDIR -- jupyter-command...

(``--job`` and ``--restart`` default to the job's own $SLURM_JOB_ID and $SLURM_RESTART_COUNT: the
launcher's Jupyter and the ``--shell`` step of one session get the same directories.)

``--keep``: a directory under a mount point that must stay the same inside (the runtime directory,
with Jupyter's socket, under /tmp by default), bound into the private tree at its place first.
Where user namespaces are refused (kernel.unprivileged_userns_clone=0, user.max_user_namespaces=0,
AppArmor) the wrapper sets TMPDIR/TMP/TEMP to the private tmp instead. Standard library only.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import stat
import sys
from pathlib import Path

CLONE_NEWNS, CLONE_NEWUSER = 0x00020000, 0x10000000
MS_BIND, MS_REC, MS_SLAVE = 0x1000, 0x4000, 0x80000
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
TMP = "/tmp"  # noqa: S108 (a mount point we cover, not a file we make there)
DEFAULT_MOUNTS = ["/var/tmp", TMP]  # noqa: S108 (/tmp last: see _enter_now)


class PrivateTmpError(Exception):
    """No private tmp: prepare refused a path, or enter could not make the namespace."""


class NamespaceUnavailable(PrivateTmpError):
    """enter failed (user namespaces refused, or a mount): fall back to ``fallback_env``."""


def _mounts(pid: str) -> dict[str, tuple[str, ...]]:
    """Mount point -> (device, root within its filesystem, type, source) of the topmost mount."""
    out: dict[str, tuple[str, ...]] = {}
    with open(f"/proc/{pid}/mountinfo") as f:
        for line in f:
            left, right = line.split(" - ", 1)
            dev, root, point, kind, source = (
                re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)
                for field in [*left.split()[2:5], *[*right.split(), "", ""][:2]]
            )
            out[point] = (dev, root, kind, source)
    return out


def detect_site_private_tmp() -> str | None:
    """What already makes this job's /tmp private, or None. Heuristics, not proof: /tmp is private
    if its mount differs from the one pid 1 (the host's init) sees, when /proc/1/mountinfo can be
    read (hidepid hides it), else if /tmp is a bind mount of a subdirectory (root not "/"), as
    job_container/tmpfs (``BasePath/JOB/.JOB``) and private-tmpdir (``base.JOB.RESTART/tmp``)
    mount it. A tmpfs the site mounts on /tmp for everyone looks like the host's: None."""
    try:
        tmp = _mounts("self").get(TMP)
    except OSError:
        return None
    try:
        if tmp == _mounts("1").get(TMP):
            return None
    except OSError:
        if tmp is None or tmp[1] == "/":
            return None
    if tmp is None:
        return "a /tmp other than the host's"
    job = re.escape(os.environ.get("SLURM_JOB_ID") or "-")
    if re.search(rf"/{job}/\.{job}$", tmp[1]):
        return "job_container/tmpfs"
    if re.search(rf"\.{job}\.\d+/tmp$", tmp[1]):
        return "private-tmpdir (SPANK)"
    return f"a bind mount of {tmp[3]}:{tmp[1]}"


def subdir(mount: str) -> str:
    """The private directory's name for a mount point: /tmp -> tmp, /var/tmp -> var_tmp."""
    name = os.path.normpath(mount).strip("/").replace("/", "_")
    if not os.path.isabs(mount) or not name:
        raise ValueError(f"not an absolute mount point: {mount!r}")
    return name


def path_for(base: str, job_id: str, restart: str) -> Path:
    return Path(f"{os.path.abspath(base)}.{job_id}.{restart}")


def _own_dir(name: str, dir_fd: int, shown: Path) -> int:
    """``name`` in ``dir_fd``, made 0700 or found ours (never through a link), opened."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, 0o700, dir_fd=dir_fd)
    try:
        fd = os.open(name, _O_DIR, dir_fd=dir_fd)
    except OSError as e:
        raise PrivateTmpError(f"{shown} is not a directory of ours: {e.strerror}") from None
    if os.fstat(fd).st_uid != os.getuid():
        os.close(fd)
        raise PrivateTmpError(f"{shown} belongs to uid {os.stat(name, dir_fd=dir_fd).st_uid}")
    os.fchmod(fd, 0o700)
    return fd


def prepare(base: str, job_id: str, restart: str, mounts: list[str]) -> Path:
    """Make ``base.JOB.RESTART/`` and a subdirectory per mount point, all 0700 and ours. Refuse
    (PrivateTmpError) one there that is not our directory (a symlink, someone else's), or a
    directory above that others could change (not root's or ours, or writable without the
    sticky bit): they could swap it for theirs."""
    top = path_for(base, job_id, restart)
    real = top.parent.resolve()
    for above in [real, *real.parents]:
        st = os.stat(above)
        if st.st_uid not in (0, os.getuid()) or (st.st_mode & 0o022 and not st.st_mode & 0o1000):
            raise PrivateTmpError(f"{above} could be changed by others: not making {top} there")
    parent = os.open(real, _O_DIR)
    try:
        fd = _own_dir(top.name, parent, top)
        try:
            for mount in mounts:
                os.close(_own_dir(subdir(mount), fd, top / subdir(mount)))
        finally:
            os.close(fd)
    finally:
        os.close(parent)
    return top


def _call(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise NamespaceUnavailable(f"{what}: {os.strerror(err)}") from OSError(err, what)


def _enter_now(private: Path, mounts: list[str], keep: list[str]) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_void_p]
    uid, gid = os.getuid(), os.getgid()
    _call(libc.unshare(CLONE_NEWUSER | CLONE_NEWNS), "unshare(CLONE_NEWUSER|CLONE_NEWNS)")
    maps = {"uid_map": f"{uid} {uid} 1", "setgroups": "deny", "gid_map": f"{gid} {gid} 1"}
    for name, text in maps.items():  # (setgroups denied first: gid_map needs it)
        try:
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
        except OSError as e:
            raise NamespaceUnavailable(f"writing /proc/self/{name}: {e.strerror}") from e
    _call(libc.mount(b"none", b"/", None, MS_REC | MS_SLAVE, None), "mount --make-rslave /")
    # /tmp last, as the plugin's README says (the private tree may be under it); the sources are
    # opened first anyway, so reaching them does not depend on that order.
    mounts = sorted(mounts, key=private.is_relative_to)
    sources = {m: os.open(private / subdir(m), _O_DIR | os.O_PATH) for m in mounts}
    for kept in keep:
        covering = [m for m in mounts if Path(kept).is_relative_to(m)]
        if covering:
            m = max(covering, key=len)
            inside = private / subdir(m) / Path(kept).relative_to(m)
            inside.mkdir(mode=0o700, parents=True, exist_ok=True)
            flags = MS_BIND | MS_REC
            _call(libc.mount(kept.encode(), bytes(inside), None, flags, None), f"binding {kept}")
    for m, fd in sources.items():
        source = f"/proc/self/fd/{fd}".encode()
        _call(libc.mount(source, m.encode(), None, MS_BIND | MS_REC, None), f"mounting on {m}")
        os.close(fd)


def _threads() -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("Threads:")).split()[1])


def enter(private: Path, mounts: list[str], keep: list[str] | None = None) -> str:
    """Move this one-thread process into a user + mount namespace of its own where each
    ``private/subdir(m)`` is mounted on ``m``; the ``keep`` directories stay as they are.

    Tried first in a forked child: a NamespaceUnavailable leaves this process as it was, never
    half in (e.g. unshare allowed but uid_map refused, as AppArmor's userns restriction does,
    which would leave us unmapped, uid 65534, unable to create files)."""
    keep = [os.path.abspath(k) for k in keep or []]
    if _threads() != 1:
        raise NamespaceUnavailable("this process has threads: unshare(CLONE_NEWUSER) refuses")
    for m in [*mounts, *keep]:
        if not os.path.isdir(m):
            raise NamespaceUnavailable(f"{m} is not a directory")
    _trial(private, mounts, keep)
    _enter_now(private, mounts, keep)
    return f"private {' and '.join(mounts)} (user namespace)"


def _trial(private: Path, mounts: list[str], keep: list[str]) -> None:
    """Enter in a forked child, which then exits: NamespaceUnavailable if it could not."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            _enter_now(private, mounts, keep)
        except BaseException as e:
            os.write(write, (str(e) or repr(e)).encode())
            os._exit(1)
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as r:
        why = r.read().decode(errors="replace")
    if os.waitpid(pid, 0)[1] != 0:
        raise NamespaceUnavailable(why or "the trial child failed")


def probe() -> str:
    """Which of the three this node gives a job (for `doctor --allocate`): the site's own
    private /tmp, ours (a user namespace), or only TMPDIR (and why)."""
    site = detect_site_private_tmp()
    if site:
        return f"the site's: {site}"
    import tempfile

    scratch = Path(tempfile.mkdtemp(prefix="spunnel-probe."))
    try:
        private = prepare(str(scratch / "t"), "probe", "0", DEFAULT_MOUNTS)
        _trial(private, DEFAULT_MOUNTS, [])
        return "ours: a user namespace with private /var/tmp and /tmp"
    except PrivateTmpError as e:
        return f"only TMPDIR: {e}"
    finally:
        cleanup(scratch)


def default_base(runtime_dir: str) -> str:
    """Where a session's private directories go unless the site says (c.PrivateTmp.base):
    inside its runtime directory, 0700 and the user's, removed with it."""
    return os.path.join(runtime_dir, "tmp")


def wrap(command: list[str], base: str, mounts: list[str], keep: list[str], note: str,
         python: str = sys.executable) -> list[str]:  # fmt: skip
    """``command`` run through this module's wrapper (``main``) in the job's private /tmp
    (``base.$SLURM_JOB_ID.$SLURM_RESTART_COUNT``); what was done goes to ``note`` (JSON: mode
    and text). Jupyter's launcher and the --shell step both use it: they share one."""
    argv = [python, "-m", "spunnel_jupyter.privatetmp", "--base", base, "--note", note,
            *[a for m in mounts for a in ("--mount", m)],
            *[a for k in keep for a in ("--keep", k)]]  # fmt: skip
    return [*argv, "--", *command]


def fallback_env(private: Path) -> dict[str, str]:
    """No namespace: TMPDIR, TMP and TEMP at the private tmp (for the tools that heed them)."""
    tmp = str(private / "tmp" if (private / "tmp").is_dir() else private)
    return {"TMPDIR": tmp, "TMP": tmp, "TEMP": tmp}


def cleanup(private: Path) -> None:
    """Remove the private tree (from outside the namespace, after the session); no error if it is
    gone. shutil.rmtree never follows symlinks (on Linux it goes by directory fds); directories
    the user's programs made unreadable or read-only (ours) are opened up, then tried again."""

    def unlock(_func: object, path: str, _exc: object) -> None:
        with contextlib.suppress(FileNotFoundError):
            if path != str(private):
                os.chmod(os.path.dirname(path), 0o700)
            if stat.S_ISDIR(os.lstat(path).st_mode):
                os.chmod(path, 0o700)
                shutil.rmtree(path, **{handler: unlock})  # type: ignore[arg-type]
            else:
                os.unlink(path)

    handler = "onexc" if sys.version_info >= (3, 12) else "onerror"  # (onerror: deprecated)
    if os.path.lexists(private):
        shutil.rmtree(private, **{handler: unlock})  # type: ignore[arg-type]


def run_private(
    base: str, job_id: str, restart: str, mounts: list[str], keep: list[str]
) -> tuple[str, str]:
    """Give this process (and what it execs) a private /tmp: (mode, what was done), mode one of
    ``site`` (already private: left alone), ``namespace``, ``tmpdir`` (only TMPDIR) or ``none``."""
    site = detect_site_private_tmp()
    if site:
        return "site", f"{TMP} is already private ({site})"
    try:
        private = prepare(base, job_id, restart, mounts)
    except PrivateTmpError as e:
        return "none", f"no private /tmp: {e}"
    try:
        done = enter(private, mounts, keep)
    except NamespaceUnavailable as e:
        os.environ.update(fallback_env(private))
        return (
            "tmpdir",
            f"no private /tmp namespace on this node ({e}): TMPDIR, TMP and TEMP "
            f"point at {os.environ['TMPDIR']} instead",
        )
    os.environ["SPUNNEL_PRIVATE_TMP"] = str(private)
    for var in ("TMPDIR", "TMP", "TEMP"):  # e.g. a site's /tmp/job.N, hidden now
        if os.environ.get(var) and not os.path.isdir(os.environ[var]):
            os.environ[var] = TMP
    return "namespace", done


def main(argv: list[str]) -> int:
    """The wrapper: prepare, enter (or fall back to TMPDIR), then exec the command. With
    ``--probe`` alone: say which private /tmp this node gives (``probe``)."""
    if argv == ["--probe"]:
        print(probe())
        return 0
    import argparse

    parser = argparse.ArgumentParser(prog="python -m spunnel_jupyter.privatetmp")
    parser.add_argument("--base", required=True)
    parser.add_argument("--job", default=os.environ.get("SLURM_JOB_ID", "nojob"))
    parser.add_argument("--restart", default=os.environ.get("SLURM_RESTART_COUNT", "0"))
    parser.add_argument("--mount", action="append", help="default: /var/tmp then /tmp")
    parser.add_argument("--keep", action="append", default=[])
    parser.add_argument("--note", help="a file to write what was done to (one line)")
    parser.add_argument("command", nargs="+")
    args = parser.parse_args(argv)
    mounts = args.mount or DEFAULT_MOUNTS
    mode, done = run_private(args.base, args.job, args.restart, mounts, args.keep)
    sys.stderr.write(f"spunnel: {done}\n")
    if args.note:
        with contextlib.suppress(OSError), open(args.note, "w") as f:
            json.dump({"mode": mode, "text": done}, f)
    try:
        os.execvp(args.command[0], args.command)  # noqa: S606 (the command line we were given)
    except OSError as e:  # e.g. a program under /tmp: hidden now
        sys.stderr.write(f"spunnel: cannot run {args.command[0]}: {e.strerror}\n")
    return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
