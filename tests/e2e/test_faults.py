"""Faults on the real cluster that the CLI tests do not already cover: what the user is told, and
that nothing is left on either host (or that what must outlive the fault is cleaned next time)."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from .browser import free_port as _free_port
from .browser import jupyterlab
from .cluster import (
    Session,
    as_user,
    jobs_submitted,
    leftovers,
    procs_of,
    squeue,
    start,
    state_dir,
    uid,
    wait_clean,
)
from .jupyter_client_util import execute


def _started_event(user: str) -> dict:
    log = (state_dir(user) / "session.log").read_text()
    line = next(ln for ln in log.splitlines() if '"event": "started"' in ln)
    return json.loads(line.partition(" ")[2])


def test_launcher_killed_is_told_and_its_node_directory_goes_at_the_next_start():
    s = start("alice", "-t", "10")
    try:
        s.wait_ready()
        started = _started_event("alice")
        runtime = Path(started["runtime_dir"])
        assert (runtime / ".held").exists()
        os.kill(started["pid"], signal.SIGKILL)  # no chance to clean up on the node
        code = s.finish(timeout=30)
        assert code == 6, s.output
        assert "ended without a word (killed?)" in s.output
        assert squeue("alice") == []
    finally:
        s.close()
    assert runtime.exists()  # what a killed launcher leaves, holding Jupyter's token file
    _next_start_removes([runtime])
    log = (state_dir("alice") / "session.log").read_text()
    assert f"removed {runtime}, left on this node by a killed launcher" in log


def _node_pid(pattern: str) -> int:
    (pid,) = [pid for pid, cmd in procs_of("alice") if re.search(pattern, cmd)]
    return pid


def test_jupyter_killed_on_the_node_is_told_as_a_crash():
    s = start("alice", "-t", "10")
    try:
        s.wait_ready()
        os.kill(_node_pid(r"-m jupyter_server --ServerApp.sock="), signal.SIGKILL)  # as the OOM
        assert s.finish(timeout=30) == 6, s.output
        assert "was killed by SIGKILL" in s.output and "ask for more with --mem" in s.output
    finally:
        s.close()
    _assert_clean()


def test_srun_killed_cancels_the_job_and_says_so():
    s = start("alice", "-t", "10")
    try:
        s.wait_ready()
        os.kill(s.record["srun_pid"], signal.SIGKILL)
        assert s.finish(timeout=30) == 4, s.output
        assert "srun ended (killed by SIGKILL)" in s.output and "the job is cancelled" in s.output
    finally:
        s.close()
    left = _runtime_dirs_left()
    # With srun gone, Slurm may kill the launcher before it cleans up on the node: that directory
    # is named here, and the next start on the node removes it.
    _next_start_removes(left)


def _assert_clean() -> None:
    _, left = wait_clean("alice", timeout=5)
    assert not left, left


def _runtime_dirs_left(timeout: float = 5) -> list[Path]:
    """What is left once the rest is clean: only node runtime directories may be."""
    _, left = wait_clean("alice", timeout=timeout)
    assert all(item.startswith("runtime dir left: ") for item in left), left
    return [Path(item.split(": ", 1)[1]) for item in left]


def _ctrl_c(s: Session) -> None:
    s.signal(signal.SIGINT)
    assert s.finish() == 130, s.output


def _next_start_removes(runtime_dirs: list[Path]) -> None:
    again = start("alice", "-t", "10")
    try:
        again.wait_ready()
        assert not any(path.exists() for path in runtime_dirs), runtime_dirs
        _ctrl_c(again)
    finally:
        again.close()
    _assert_clean()


def test_a_megabyte_line_from_a_kernel_freezes_nothing():
    s = start("alice", "-t", "10")
    try:
        s.wait_ready()
        flood = "import os; os.write(1, b'x' * 1_000_000 + b'\\n' + b'y' * 100 + b'\\n' * 4000)"
        execute(s.port, s.token, flood)
        assert execute(s.port, s.token, "print(6 * 7)").strip() == "42"
        log = (state_dir("alice") / "session.log").read_text()
        assert "x" * 1_000_000 in log and s.token not in log
        s.signal(signal.SIGINT)
        assert s.finish(timeout=10) == 130
    finally:
        s.close()
    _assert_clean()


def test_status_hammering_never_makes_a_start_fail():
    stop = threading.Event()
    runs = []

    def hammer() -> None:
        while not stop.is_set():
            runs.append(as_user("alice", ["spunnel-notebook", "status"]).returncode)

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        for _ in range(3):
            s = start("alice", "-t", "10")
            try:
                s.wait_ready()
                _ctrl_c(s)
            finally:
                s.close()
    finally:
        stop.set()
        thread.join()
    assert len(runs) >= 10 and set(runs) <= {0, 8}, runs  # a session, or none: never an error
    _assert_clean()


@pytest.fixture
def full_state_dir():
    path = Path(tempfile.mkdtemp(prefix="sfull-", dir="/tmp"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k,mode=0700", "tmpfs", str(path)],
                   check=True)  # fmt: skip
    try:
        os.chown(path, uid("alice"), uid("alice"))
        fill = ["dd", "if=/dev/zero", f"of={path}/filler", "bs=4k"]
        subprocess.run(["runuser", "-u", "alice", "--", *fill], capture_output=True, check=False)
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)
        path.rmdir()


def test_a_full_state_directory_refuses_the_start_and_submits_nothing(full_state_dir):
    before = jobs_submitted()
    result = as_user(
        "alice", ["spunnel-notebook", "-t", "10"], SPUNNEL_STATE_DIR=str(full_state_dir)
    )
    assert result.returncode == 7, result
    assert "cannot write the session record" in result.stderr, result.stderr
    assert jobs_submitted() == before and squeue("alice") == []


def test_a_state_directory_pre_created_by_another_user_is_refused():
    path = state_dir("alice")
    subprocess.run(["runuser", "-u", "bob", "--", "mkdir", "-m", "0777", str(path)], check=True)
    try:
        before = jobs_submitted()
        result = as_user("alice", ["spunnel-notebook", "-t", "10"])
        assert result.returncode == 7, result
        assert f"belongs to uid {uid('bob')}" in result.stderr
        assert jobs_submitted() == before
    finally:
        subprocess.run(["rm", "-rf", str(path)], check=True)


FLOOD = """
import socket, sys
held = []
for _ in range(300):
    try:
        held.append(socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5))
    except OSError:
        pass
got = 0
for s in held:
    try:
        s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
        got += len(s.recv(100))
    except OSError:
        pass
print(len(held), got)
"""


def test_another_user_flooding_the_port_gets_nothing_and_stops_nothing():
    s = start("alice", "-t", "10")
    try:
        s.wait_ready()
        flood = as_user("bob", ["python3", "-c", FLOOD, str(s.port)], timeout=120)
        assert flood.returncode == 0, flood
        assert flood.stdout.split()[1] == "0"  # not one byte for bob
        assert execute(s.port, s.token, "print(6 * 7)").strip() == "42"  # alice's still works
        log = (state_dir("alice") / "session.log").read_text()
        assert log.count(f"from uid {uid('bob')}") >= 100
        _ctrl_c(s)
    finally:
        s.close()
    _assert_clean()


def test_ctrl_c_while_jupyter_starts():
    s = start("alice", "-t", "10")
    try:
        s.wait_for(r"RUNNING on c1, starting Jupyter", timeout=60)
        _ctrl_c(s)
        assert "interrupted with Ctrl-C" in s.output
    finally:
        s.close()
    _assert_clean()


def test_stop_racing_a_start_leaves_nothing():
    left_dirs: list[Path] = []
    for delay in (0.0, 0.3, 0.8):
        s = start("alice", "-t", "10")
        try:
            time.sleep(delay)
            asked = time.monotonic()
            stop = as_user("alice", ["spunnel-notebook", "stop"])
            assert stop.returncode in (0, 8), stop  # stopped it, or it was not there yet
            # A stop that came between the allocation and the step's launch once took 11 s (srun
            # dropped the SIGUSR1), one before the start's control socket 20 s, in vain.
            assert time.monotonic() - asked < 5, stop
            if stop.returncode == 8:
                as_user("alice", ["spunnel-notebook", "stop"])  # again, now it runs
            assert s.finish(timeout=30) in (0, 130), s.output
        finally:
            s.close()
        # A launcher stopped while it starts may be killed before it cleans the node: named here,
        # removed by the next start on the node.
        left_dirs += _runtime_dirs_left()
    _next_start_removes(left_dirs)


UP = Path(__file__).resolve().parents[1] / "cluster" / "up.sh"


def _kill_daemon(pidfile: str, sig: int = signal.SIGTERM) -> int:
    pid = int(Path(pidfile).read_text().split()[0])
    os.kill(pid, sig)
    return pid


def _daemons_back(pid: int) -> None:
    """Once the killed daemon is gone, up.sh starts whatever daemon of the test cluster is not
    running (and only that)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            break  # gone
        if state == "Z":
            break  # a zombie nobody reaps: gone for up.sh's check too
        time.sleep(0.1)
    result = subprocess.run(["bash", str(UP)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def test_slurmctld_restarted_while_running_ends_nothing():
    s = start("alice", "-t", "10")
    try:
        s.wait_ready()
        daemon = _kill_daemon("/run/slurmctld.pid")
        try:
            time.sleep(3)  # the session asks about its job meanwhile: UNKNOWN is no ending
            assert execute(s.port, s.token, "print(6 * 7)").strip() == "42"
            assert s.proc.poll() is None, s.output
        finally:
            _daemons_back(daemon)
        assert execute(s.port, s.token, "print(7 * 6)").strip() == "42"
        _ctrl_c(s)
    finally:
        s.close()
    _assert_clean()


def test_munge_stopped_during_teardown_is_told_and_cleaned_by_stop():
    s = start("alice", "-t", "10")
    try:
        s.wait_ready()
        job = s.job_id
        daemon = _kill_daemon("/run/munge/munged.pid")
        try:
            s.signal(signal.SIGINT)
            assert s.finish(timeout=60) == 130, s.output
            assert f"job {job} may still be in the queue" in s.output, s.output
            assert (state_dir("alice") / "uncancelled.json").exists()
        finally:
            _daemons_back(daemon)
    finally:
        s.close()
    stop = as_user("alice", ["spunnel-notebook", "stop"])
    assert stop.returncode == 0 and f"cancelled job {job} left by an earlier session" in stop.stderr
    _next_start_removes(_runtime_dirs_left(timeout=10))


def _jobs_ever(user: str) -> set[int]:
    """Every job of ``user`` slurmctld still knows, ended ones included (MinJobAge is 300 s):
    unlike sdiag's count of submitted jobs, other users' jobs do not move it."""
    out = subprocess.run(["squeue", "-h", "-t", "all", "-u", user, "-o", "%i"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    return {int(line) for line in out.stdout.split()}


def test_two_starts_racing_one_wins_the_other_names_it():
    before = _jobs_ever("alice")
    barrier = threading.Barrier(2)
    sessions: list[Session] = []

    def go() -> None:
        barrier.wait()
        sessions.append(start("alice", "-t", "10"))

    threads = [threading.Thread(target=go) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        # The loser waits for the winner's job to be named, then exits at once, submitting nothing.
        deadline = time.monotonic() + 30
        while all(s.proc.poll() is None for s in sessions):
            assert time.monotonic() < deadline, [s.output for s in sessions]
            time.sleep(0.05)
        (loser,) = [s for s in sessions if s.proc.poll() is not None]
        (winner,) = [s for s in sessions if s is not loser]
        winner.wait_ready()
        assert loser.finish() == 3, loser.output
        told = [ln for ln in loser.output.splitlines() if ln.strip()]
        assert told == [
            "spunnel-notebook: error: you already have a session on this host: "
            f"job {winner.job_id} on c1 (started by cli, phase starting) "
            "(use it, or end it with `spunnel-notebook stop` first)"
        ] or told == [
            "spunnel-notebook: error: you already have a session on this host: "
            f"job {winner.job_id} on c1, {winner.url} (started by cli, phase ready) "
            "(use it, or end it with `spunnel-notebook stop` first)"
        ], told
        assert _jobs_ever("alice") - before == {winner.job_id}  # the loser submitted nothing
        assert squeue("alice") == [f"{winner.job_id} RUNNING"]
        _ctrl_c(winner)
    finally:
        for s in sessions:
            s.close()
    _assert_clean()


def test_slurmctld_restarted_while_pending_then_the_job_starts(node_full):
    s = start("alice", "--mem", "1000", "-t", "10")
    try:
        job = s.wait_for(r"job (\d+) PENDING \(Resources\)", timeout=30).group(1)
        daemon = _kill_daemon("/run/slurmctld.pid")
        try:
            time.sleep(3)  # the session asks about its job meanwhile: no answer is no ending
            assert s.proc.poll() is None, s.output
        finally:
            _daemons_back(daemon)
        assert squeue("alice") == [f"{job} PENDING"]  # the restarted controller still has it
        subprocess.run(["scancel", node_full], check=True)  # the node is free
        s.wait_ready(timeout=60)
        assert s.job_id == int(job)
        assert "error" not in s.output, s.output
        assert execute(s.port, s.token, "print(6 * 7)").strip() == "42"
        _ctrl_c(s)
    finally:
        s.close()
    _assert_clean()


def _on_the_login_host(left: list[str]) -> list[str]:
    """``left`` less what is on the node c1: its processes (c1's network namespace; the test
    cluster shares one process table) and runtime directories."""
    node_net = f"net:[{os.stat('/run/netns/c1').st_ino}]"
    login = []
    for item in left:
        if item.startswith("runtime dir left: "):
            continue
        if item.startswith("process "):
            try:
                if os.readlink(f"/proc/{item.split()[1].rstrip(':')}/ns/net") == node_net:
                    continue
            except OSError:
                continue  # gone meanwhile
        login.append(item)
    return login


def test_slurmd_killed_is_a_node_failure_told_and_cleaned():
    s = start("alice", "-t", "10")
    try:
        s.wait_ready()
        job = s.job_id
        t0 = time.monotonic()
        daemon = _kill_daemon("/run/slurmd-c1.pid", signal.SIGKILL)
        try:
            # Jupyter runs on: the node is down once Slurm says so (SlurmdTimeout: ~50 s here).
            assert execute(s.port, s.token, "print(6 * 7)").strip() == "42"
            assert s.finish(timeout=90) == 0, s.output
            told = time.monotonic() - t0
            assert (
                f"session ended: job {job} lost its node (NODE_FAIL); job {job} gone from the "
                "queue, tunnel closed" in s.output
            ), s.output
            assert squeue("alice") == []
            # Nothing on the login host. On the node, with slurmd dead, the launcher and Jupyter
            # live on (on a real cluster the node itself is gone) until slurmd is back.
            _, left = wait_clean("alice", timeout=2)
            assert not _on_the_login_host(left), left
            print(f"told after {told:.1f} s; left on the node: {left}")
        finally:
            _daemons_back(daemon)  # slurmd registers again; ReturnToService=2 resumes the node
        assert _node_state() in ("idle", "mix", "alloc", "comp"), _node_state()  # in service
    finally:
        s.close()
    # The restarted slurmd ends the failed job's step on the node: the launcher cleans up (a
    # directory it could not remove would be named here and removed by the next start).
    _next_start_removes(_runtime_dirs_left(timeout=15))


def _node_state() -> str:
    out = subprocess.run(["sinfo", "-h", "-n", "c1", "-o", "%t"], capture_output=True, text=True)
    return out.stdout.strip()


LISTEN = """
import os, select, socket, sys
held = []
for path in sys.argv[1:]:
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    os.chmod(path, 0o777)
    s.listen()
    held.append(s)
print("listening", flush=True)
got = 0
while select.select([sys.stdin, *held], [], [])[0] != [sys.stdin]:
    for s in select.select(held, [], [], 0)[0]:
        conn, _ = s.accept()
        conn.settimeout(1)
        try:
            got += 1 + len(conn.recv(65536))
        except OSError:
            got += 1
print("got", got, flush=True)
"""


def _as_bob(*argv: str) -> None:
    subprocess.run(["runuser", "-u", "bob", "--", *argv], check=True, cwd="/tmp")


class _Listener:
    """bob serving Unix sockets at ``paths``: counts every connection and byte he is sent."""

    def __init__(self, paths: list[str]) -> None:
        self.proc = subprocess.Popen(
            ["runuser", "-u", "bob", "--", "python3", "-c", LISTEN, *paths],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/tmp",
        )  # fmt: skip
        assert self.proc.stdout is not None and self.proc.stdout.readline() == "listening\n"

    def received(self) -> int:
        out, _ = self.proc.communicate("end\n", timeout=10)
        return int(out.split()[-1])


def _next_job_ids(count: int) -> list[int]:
    """The ids the next jobs get: bob submits one (held) and cancels it. Other users of the
    cluster may take some ids meanwhile, hence a range."""
    out = subprocess.run(
        ["runuser", "-u", "bob", "--", "sbatch", "--parsable", "--hold", "-t", "1", "--wrap",
         "true"], capture_output=True, text=True, check=True, cwd="/tmp",
    ).stdout  # fmt: skip
    job = int(out.strip().split(";")[0])
    subprocess.run(["scancel", str(job)], check=True)
    return [job + n for n in range(1, count + 1)]


@pytest.mark.parametrize("plant", ["bob's directory", "symlink to alice's", "symlink to bob's",
                                   "bob's socket"])  # fmt: skip
def test_a_node_directory_pre_created_by_another_user_is_never_used(plant):
    """bob guesses alice's next job ids and plants what he can at her node directory's path
    (<node /tmp>/spunnel.JOB.0): she gets a fresh private directory, he gets nothing."""
    alices = Path(tempfile.mkdtemp(prefix="alice-own-", dir="/home/alice"))
    os.chown(alices, uid("alice"), uid("alice"))
    bobs = Path(tempfile.mkdtemp(prefix="bob-own-", dir="/tmp"))
    os.chown(bobs, uid("bob"), uid("bob"))
    bobs.chmod(0o777)
    planted, sockets = [], [str(bobs / "jupyter.sock")]
    ids = _next_job_ids(5)
    for job in ids:
        path = Path(f"/tmp/spunnel.{job}.0")
        planted.append(path)
        if plant == "bob's directory":
            _as_bob("mkdir", "-m", "0777", str(path))
            sockets.append(str(path / "jupyter.sock"))
        elif plant == "symlink to alice's":
            _as_bob("ln", "-s", str(alices), str(path))
        elif plant == "symlink to bob's":
            _as_bob("ln", "-s", str(bobs), str(path))
        else:
            sockets.append(str(path))
    listener = _Listener(sockets)
    s = start("alice", "-t", "10")
    try:
        _alice_runs_beside(s, ids)
    finally:
        s.close()
        got = listener.received()
        kept = [path.lstat().st_uid == uid("bob") for path in planted]
        untouched = not any(alices.iterdir()) and alices.stat().st_uid == uid("alice")
        subprocess.run(["rm", "-rf", *map(str, planted), str(alices), str(bobs)], check=True)
    assert got == 0  # not one connection, not one byte
    assert all(kept) and untouched  # bob's plants are as he left them, alice's directory too
    _assert_clean()


def _alice_runs_beside(s: Session, ids: list[int]) -> None:
    """alice's session, started with bob's plants at ``ids``: in a directory of her own."""
    s.wait_ready()
    assert s.job_id in ids, (s.job_id, ids)  # else other users took every guessed id
    used = Path(_started_event("alice")["runtime_dir"])
    assert used.parent == Path("/tmp") and used.name.startswith(f"spunnel.{s.job_id}.0.")
    st = used.lstat()
    assert st.st_uid == uid("alice") and stat.S_IMODE(st.st_mode) == 0o700
    log = (state_dir("alice") / "session.log").read_text()
    planned = f"/tmp/spunnel.{s.job_id}.0"
    assert f"spunnel: {planned} already exists (owner uid {uid('bob')}): using {used}\n" in log
    assert execute(s.port, s.token, "print(6 * 7)").strip() == "42"
    # Nor can bob reach alice's login-side sockets: they are in her 0700 state directory.
    for name in ("tunnel.sock", "control.sock"):
        sock = str(state_dir("alice") / name)
        connect = f"import socket; socket.socket(socket.AF_UNIX).connect({sock!r})"
        probe = as_user("bob", ["python3", "-c", connect])
        assert "PermissionError" in probe.stderr, probe
    _ctrl_c(s)


@pytest.mark.parametrize("plant", ["symbolic link", "socket"])
def test_a_state_directory_path_pre_created_as_a_link_or_socket_is_refused(plant):
    """bob plants, at alice's state directory's path, a symlink to a directory of hers (whose
    sockets he would then choose) or a socket of his own: she is refused, nothing submitted."""
    path = state_dir("alice")
    alices = Path(tempfile.mkdtemp(prefix="alice-own-", dir="/home/alice"))
    os.chown(alices, uid("alice"), uid("alice"))
    listener = None
    if plant == "symbolic link":
        _as_bob("ln", "-s", str(alices), str(path))
    else:
        listener = _Listener([str(path)])
    try:
        before = _jobs_ever("alice")
        result = as_user("alice", ["spunnel-notebook", "-t", "10"])
        assert result.returncode == 7, result
        assert result.stderr == (
            f"spunnel-notebook: error: state directory {path} is a {plant} of uid {uid('bob')}, "
            "not a directory (set SPUNNEL_STATE_DIR (or c.SpunnelManager.state_dir) to a private "
            "directory on a local filesystem, or ask your administrators to remove the offending "
            "one)\n"
        )
        # No new job (jobs older than MinJobAge may drop out of the controller's memory meanwhile).
        assert not _jobs_ever("alice") - before and squeue("alice") == []
        assert not any(alices.iterdir())
    finally:
        got = listener.received() if listener else 0
        subprocess.run(["rm", "-rf", str(path), str(alices)], check=True)
    assert got == 0
    _assert_clean()


def _post_session(lab, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{lab.port}/spunnel/api/session", data=json.dumps(body).encode(),
        method="POST", headers={"Authorization": f"token {lab.token}"},
    )  # fmt: skip
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.status, json.loads(resp.read())


def test_jupyterlab_server_killed_ends_its_session_and_the_next_start_names_the_rest(artifacts):
    """A session's supervisor is the JupyterLab server that started it: SIGKILLed (the OOM killer),
    srun and ssh die with it (PR_SET_PDEATHSIG), srun's SIGUSR1 ends the launcher and the job.
    Only files are left (a dead process cannot remove them); the next start names and removes
    them."""
    pair = f"{_free_port()}:8000"
    with jupyterlab("alice", artifacts) as lab:
        code, view = _post_session(lab, {"time": "10", "tunnels": pair})
        assert code == 201, view
        deadline = time.monotonic() + 60
        while view["phase"] != "ready":
            assert time.monotonic() < deadline, view
            time.sleep(0.2)
            code, view = lab.api("GET", "/spunnel/api/session")
        server = lab.proc.pid
        os.kill(server, signal.SIGKILL)  # the server only
        lab.proc.wait(10)
        killed = time.monotonic()
    sdir = state_dir("alice")
    local = pair.split(":")[0]
    files = {"session.json", "control.sock", "tunnel.sock", f"port-{local}.sock"}
    expected = {f"file left: {sdir}/{name}" for name in ("session.json", "control.sock")}
    expected |= {f"socket left: {sdir}/{name}" for name in files if name.endswith(".sock")}
    while set(left := leftovers("alice")) != expected:  # job, srun, ssh, launcher, lock: gone
        assert time.monotonic() - killed < 5, left
        time.sleep(0.05)
    print(f"job, processes and lock gone {time.monotonic() - killed:.2f} s after the SIGKILL")
    assert squeue("alice") == [] and files <= {path.name for path in sdir.iterdir()}
    again = start("alice", "-t", "10")
    try:
        again.wait_ready()
        assert (
            "spunnel-notebook: removed the record and sockets of a session whose supervisor died "
            f"(pid {server})\n" in again.output
        ), again.output
        assert not (sdir / f"port-{local}.sock").exists()  # the new session has no such pair
        _ctrl_c(again)
    finally:
        again.close()
    _assert_clean()
