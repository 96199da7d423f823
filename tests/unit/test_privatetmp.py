"""privatetmp: the private tree's safety and cleanup, and the wrapper for real, as a non-root uid
(setpriv) making its own user + mount namespace, and where user namespaces are refused."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from spunnel_jupyter import privatetmp
from spunnel_jupyter.privatetmp import (
    NamespaceUnavailable,
    PrivateTmpError,
    cleanup,
    enter,
    fallback_env,
    prepare,
    subdir,
)

ROOT = Path(__file__).resolve().parents[2]
OTHER = 4242  # a uid with no account: "another user", or the job's user under setpriv
MOUNTS = ["/var/tmp", "/tmp"]
# The suite runs as root (tests/run.sh): a precondition missing is a failure, never a skip.
root_only = pytest.mark.usefixtures("as_root")


@pytest.fixture
def as_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root (chown, setpriv), as tests/run.sh runs it", pytrace=False)


def owner_and_mode(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_uid, stat.S_IMODE(st.st_mode)


def test_subdir_names_like_the_plugin():
    assert [subdir(m) for m in ("/tmp", "/var/tmp", "/dev/shm/")] == ["tmp", "var_tmp", "dev_shm"]
    for bad in ("tmp", "/", ""):
        with pytest.raises(ValueError):
            subdir(bad)


def test_prepare_makes_a_private_tree(tmp_path):
    top = prepare(str(tmp_path / "slurm"), "100", "0", MOUNTS)
    assert top == tmp_path / "slurm.100.0"
    assert sorted(os.listdir(top)) == ["tmp", "var_tmp"]
    for path in (top, top / "tmp", top / "var_tmp"):
        assert owner_and_mode(path) == (os.getuid(), 0o700)


def test_prepare_again_takes_ours_and_tightens_it(tmp_path):
    top = prepare(str(tmp_path / "slurm"), "100", "0", MOUNTS)
    (top / "tmp" / "f").write_text("kept")
    os.chmod(top, 0o755)
    assert prepare(str(tmp_path / "slurm"), "100", "0", MOUNTS) == top
    assert owner_and_mode(top)[1] == 0o700
    assert (top / "tmp" / "f").read_text() == "kept"


@root_only
@pytest.mark.parametrize("where", ["slurm.100.0", "slurm.100.0/tmp"])
def test_another_users_directory_is_refused(tmp_path, where):
    (tmp_path / where).mkdir(parents=True, mode=0o777)
    os.chown(tmp_path / where, OTHER, OTHER)
    with pytest.raises(PrivateTmpError, match=f"belongs to uid {OTHER}"):
        prepare(str(tmp_path / "slurm"), "100", "0", MOUNTS)
    assert owner_and_mode(tmp_path / where)[0] == OTHER  # left alone


@pytest.mark.parametrize("where", ["slurm.100.0", "slurm.100.0/var_tmp"])
def test_a_symlink_is_refused_and_not_followed(tmp_path, where):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o755)
    (tmp_path / where).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    (tmp_path / where).symlink_to(elsewhere)
    with pytest.raises(PrivateTmpError, match="is not a directory of ours"):
        prepare(str(tmp_path / "slurm"), "100", "0", MOUNTS)
    assert list(elsewhere.iterdir()) == []
    assert owner_and_mode(elsewhere)[1] == 0o755


def test_a_file_in_the_way_is_refused(tmp_path):
    (tmp_path / "slurm.100.0").write_text("")
    with pytest.raises(PrivateTmpError, match="Not a directory"):
        prepare(str(tmp_path / "slurm"), "100", "0", MOUNTS)


def test_a_parent_others_can_change_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)  # anyone could rename our directory away and plant theirs
    with pytest.raises(PrivateTmpError, match="could be changed by others"):
        prepare(str(shared / "slurm"), "100", "0", MOUNTS)
    os.chmod(shared, 0o1777)  # sticky, like /tmp: fine
    assert prepare(str(shared / "slurm"), "100", "0", MOUNTS).is_dir()


@root_only
def test_a_parent_owned_by_another_user_is_refused(tmp_path):
    os.chown(tmp_path, OTHER, OTHER)
    with pytest.raises(PrivateTmpError, match="could be changed by others"):
        prepare(str(tmp_path / "slurm"), "100", "0", MOUNTS)


def test_cleanup_does_not_follow_links_and_ignores_a_missing_tree(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("x")
    top = prepare(str(tmp_path / "slurm"), "100", "0", MOUNTS)
    (top / "tmp" / "dir-link").symlink_to(outside)
    (top / "tmp" / "file-link").symlink_to(outside / "precious")
    (top / "var_tmp" / "a" / "b").mkdir(parents=True)
    cleanup(top)
    assert not top.exists()
    assert (outside / "precious").read_text() == "x"
    cleanup(top)  # gone already: fine


def test_fallback_env_points_at_the_private_tmp(tmp_path):
    top = prepare(str(tmp_path / "slurm"), "100", "0", MOUNTS)
    assert fallback_env(top) == dict.fromkeys(("TMPDIR", "TMP", "TEMP"), str(top / "tmp"))


def test_refused_unshare_raises_and_leaves_this_process_alone(tmp_path, monkeypatch):
    # a libc whose unshare says EPERM, as with kernel.unprivileged_userns_clone=0
    refusing = SimpleNamespace(unshare=lambda _flags: -1, mount=SimpleNamespace())
    monkeypatch.setattr(privatetmp.ctypes, "CDLL", lambda *_args, **_kwargs: refusing)
    monkeypatch.setattr(privatetmp.ctypes, "get_errno", lambda: errno.EPERM)
    monkeypatch.setattr(privatetmp, "_threads", lambda: 1)  # other tests' threads may linger
    top = prepare(str(tmp_path / "slurm"), "100", "0", MOUNTS)
    userns = os.readlink("/proc/self/ns/user"), os.readlink("/proc/self/ns/mnt")
    with pytest.raises(NamespaceUnavailable, match=r"unshare.*Operation not permitted"):
        enter(top, MOUNTS)
    assert (os.readlink("/proc/self/ns/user"), os.readlink("/proc/self/ns/mnt")) == userns
    assert fallback_env(top)["TMPDIR"] == str(top / "tmp")


def test_enter_refuses_a_multithreaded_process(tmp_path):
    top = prepare(str(tmp_path / "slurm"), "100", "0", MOUNTS)
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        with pytest.raises(NamespaceUnavailable, match="threads"):
            enter(top, MOUNTS)
    finally:
        stop.set()
        thread.join()


def test_detect_names_the_site_mechanisms(monkeypatch):
    def mounts(tmp_root):
        host = {"/tmp": ("254:0", "/", "ext4", "/dev/vda")}
        return lambda pid: host if pid == "1" else {"/tmp": ("254:0", tmp_root, "ext4", "/dev/vda")}

    monkeypatch.setenv("SLURM_JOB_ID", "100")
    for root, said in [
        ("/", None),
        ("/var/spool/slurm/tmpfs/100/.100", "job_container/tmpfs"),
        ("/tmp/slurm.100.0/tmp", "private-tmpdir (SPANK)"),
        ("/scratch/x", "a bind mount of /dev/vda:/scratch/x"),
    ]:
        monkeypatch.setattr(privatetmp, "_mounts", mounts(root))
        assert privatetmp.detect_site_private_tmp() == said


def test_detect_says_none_here():
    assert privatetmp.detect_site_private_tmp() is None


# --- the wrapper, for real ---------------------------------------------------------------------


def world_usable(path: str) -> bool:
    real = Path(os.path.realpath(path))
    return all(os.stat(p).st_mode & 0o001 for p in [real, *real.parents])


PYTHON = next((p for p in (sys.executable, "/usr/bin/python3") if world_usable(p)), "")


def as_user(uid: int, argv: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    setpriv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    return subprocess.run(setpriv + argv, capture_output=True, text=True, timeout=60, **kwargs)


def userns_for(uid: int) -> bool:
    if os.geteuid() != 0 or not shutil.which("setpriv") or not PYTHON:
        return False
    return as_user(uid, ["unshare", "--user", "true"]).returncode == 0


real = pytest.mark.usefixtures("user_namespaces")


@pytest.fixture(scope="module")
def user_namespaces() -> None:
    """Root, setpriv and unprivileged user namespaces, as on the test machines (checked once,
    when a test needs them, not at import)."""
    if not userns_for(OTHER):
        pytest.fail("needs root, setpriv and unprivileged user namespaces", pytrace=False)


@pytest.fixture
def shared():
    """A root-owned 1777 directory, like /tmp, for the user's runtime directory."""
    path = Path(tempfile.mkdtemp(prefix="spunnel-ptmp-", dir="/tmp"))
    os.chmod(path, 0o1777)
    yield path
    shutil.rmtree(path)


def runtime_dir(shared: Path, uid: int) -> Path:
    path = shared / "spunnel.100.0"
    path.mkdir(mode=0o700)
    os.chown(path, uid, uid)
    return path


def wrapper(rundir: Path, command: list[str]) -> list[str]:
    args = ["--base", str(rundir / "tmp"), "--job", "100", "--restart", "0", "--keep", str(rundir)]
    return [PYTHON, "-m", "spunnel_jupyter.privatetmp", *args, "--", *command]


ENV = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "TMPDIR": "/tmp/job.100"}


@real
@pytest.mark.parametrize("uid", [OTHER, 65534])
def test_wrapper_gives_private_tmp_and_var_tmp(shared, uid):
    rundir = runtime_dir(shared, uid)
    marker = f"spunnel-test-{uuid.uuid4().hex}"
    script = (
        f"touch /tmp/{marker} /var/tmp/{marker} && ls -A /tmp && echo == && ls -A /var/tmp"
        " && echo == && cat /proc/self/uid_map /proc/self/gid_map && echo == && echo $TMPDIR"
        " && grep CapEff /proc/self/status && ls -la /tmp"
    )
    started = time.monotonic()
    done = as_user(uid, wrapper(rundir, ["sh", "-c", script]), env=ENV, cwd="/")
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert "spunnel: private /var/tmp and /tmp (user namespace)" in done.stderr
    tmp, var_tmp, maps, rest = done.stdout.split("==\n")
    assert set(tmp.split()) == {marker, shared.name}  # and the kept runtime dir's way in
    assert var_tmp.split() == [marker]
    assert [line.split() for line in maps.splitlines()] == [[str(uid), str(uid), "1"]] * 2
    assert rest.splitlines()[0] == "/tmp"  # the job's TMPDIR, hidden now, was replaced
    assert rest.splitlines()[1].split() == ["CapEff:", "0000000000000000"]
    private = rundir / "tmp.100.0"
    for where in ("tmp", "var_tmp"):
        assert owner_and_mode(private / where / marker) == (uid, 0o644)
    assert not Path("/tmp", marker).exists()
    assert not Path("/var/tmp", marker).exists()
    assert elapsed < 10
    cleanup(private)
    assert sorted(os.listdir(rundir)) == []


@real
def test_runtime_dir_and_its_socket_stay_shared(shared):
    """Jupyter's socket, made inside in the kept runtime directory, answers outside; and a
    process inside sees its /tmp as private (no wrapper in a wrapper)."""
    rundir = runtime_dir(shared, OTHER)
    sock = rundir / "jupyter.sock"
    inside = (
        "import socket, sys\n"
        "from spunnel_jupyter.privatetmp import detect_site_private_tmp\n"
        "print('site:', detect_site_private_tmp(), flush=True)\n"
        "s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(1); s.settimeout(30)\n"
        "print('got:', s.accept()[0].recv(16).decode())\n"
    )
    argv = ["setpriv", f"--reuid={OTHER}", f"--regid={OTHER}", "--clear-groups"]
    argv += wrapper(rundir, [PYTHON, "-c", inside, str(sock)])
    with subprocess.Popen(argv, env=ENV, cwd="/", stdout=subprocess.PIPE, text=True) as proc:
        deadline = time.monotonic() + 30
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(sock))
            client.sendall(b"hello")
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert "got: hello" in out
    assert "site: a bind mount of" in out


# tests/cluster/no-userns.py: a user namespace (every id mapped to itself) that allows no further
# one, as a node with unprivileged user namespaces switched off; then the user, with setpriv.
NO_USERNS = Path(__file__).parents[1] / "cluster" / "no-userns.py"


@real
def test_wrapper_falls_back_to_tmpdir_when_user_namespaces_are_refused(shared):
    rundir = runtime_dir(shared, OTHER)
    script = 'echo "$TMPDIR $TMP $TEMP"; touch "$TMPDIR/f"; cat /proc/self/uid_map'
    as_other = ["setpriv", f"--reuid={OTHER}", f"--regid={OTHER}", "--clear-groups"]
    argv = [PYTHON, str(NO_USERNS), *as_other, *wrapper(rundir, ["sh", "-c", script])]
    done = subprocess.run(argv, env=ENV, cwd="/", capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    private_tmp = str(rundir / "tmp.100.0" / "tmp")
    assert "No space left on device" in done.stderr  # ENOSPC: user.max_user_namespaces=0
    assert f"TMPDIR, TMP and TEMP point at {private_tmp} instead" in done.stderr
    assert done.stdout.splitlines()[0] == f"{private_tmp} {private_tmp} {private_tmp}"
    assert done.stdout.splitlines()[1].split() == ["0", "0", "4294967295"]  # not a new one
    assert owner_and_mode(Path(private_tmp, "f"))[0] == OTHER


@real
def test_cleanup_as_the_user_opens_up_locked_directories(shared):
    top = runtime_dir(shared, OTHER) / "tmp.100.0"
    script = (
        f"mkdir -p {top}/tmp/locked/deep && touch {top}/tmp/locked/deep/f"
        f" && ln -s /etc {top}/tmp/etc && chmod 500 {top}/tmp/locked/deep"
        f" && chmod 000 {top}/tmp/locked"
        f" && {PYTHON} -c 'import sys; from pathlib import Path;"
        f" from spunnel_jupyter.privatetmp import cleanup; cleanup(Path(sys.argv[1]))' {top}"
    )
    done = as_user(OTHER, ["sh", "-c", script], env=ENV, cwd="/")
    assert done.returncode == 0, done.stderr
    assert not top.exists()
    assert Path("/etc/passwd").exists()
