"""spunnel-notebook end to end on the real cluster, as the users alice and bob."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from .cluster import (
    as_user,
    cluster_env,
    leftovers,
    procs_of,
    site_config,
    squeue,
    start,
    state_dir,
    wait_clean,
)
from .jupyter_client_util import execute, rest

TEARDOWN_LIMIT = 2.0  # seconds, from the issue


def test_kernel_runs_inside_the_job_on_c1_and_token_stays_secret():
    s = start("alice", "-p", "interact", "--mem", "1000", "-t", "10")
    try:
        s.wait_ready()
        job = s.job_id
        assert "ssh -N -L" in s.output and f"{s.port}:127.0.0.1:{s.port}" in s.output
        status, _ = rest(s.port, s.token, "GET", "/api/status")
        assert status == 200
        out = execute(
            s.port,
            s.token,
            "import os, socket; print(os.environ['SLURM_JOB_ID'], socket.gethostname())",
        )
        assert out.split() == [str(job), "c1"]
        # The port is the supervisor's own listener (the relay that sets TCP_NODELAY in front of
        # ssh's Unix-socket -L), and a command ran through the master so sshd turned Nagle off.
        listeners = subprocess.run(
            ["ss", "-Hltnp", f"sport = :{s.port}"], capture_output=True, text=True, check=True
        ).stdout
        assert f"pid={s.record['supervisor_pid']}," in listeners, listeners
        assert "Nagle" not in (state_dir("alice") / "session.log").read_text()
        # Without the token the server refuses: the tunnel is no open door.
        assert rest(s.port, "wrong", "GET", "/api/contents")[0] == 403
        # The token is on no command line, of any user, on either host (one machine here).
        for entry in glob.glob("/proc/[0-9]*/cmdline"):
            try:
                cmdline = Path(entry).read_bytes()
            except OSError:
                continue
            assert s.token.encode() not in cmdline, f"token on the command line of {entry}"
        # ... and in no log: the session log, Jupyter's output, the Slurm daemons' logs.
        logs = [
            state_dir("alice") / "session.log",
            *Path("/run/spunnel-test").glob("*"),
            *Path("/var/log/slurm").glob("*"),
        ]
        for log in logs:
            if log.is_file():
                assert s.token not in log.read_text(errors="replace"), f"token in {log}"
        # The state directory and its files are private.
        assert state_dir("alice").stat().st_mode & 0o777 == 0o700
        assert (state_dir("alice") / "session.json").stat().st_mode & 0o777 == 0o600
        assert (state_dir("alice") / "control.sock").stat().st_mode & 0o777 == 0o600
        # The node's private runtime directory (named in the launcher's "started" event) is 0700
        # while the session runs, and gone after it.
        log = (state_dir("alice") / "session.log").read_text()
        started = next(line for line in log.splitlines() if '"event": "started"' in line)
        runtime = Path(json.loads(started.partition(" ")[2])["runtime_dir"])
        assert runtime.stat().st_mode & 0o777 == 0o700
        s.signal(signal.SIGINT)
        elapsed, left = wait_clean("alice", timeout=10)
        assert not left, left
        assert not runtime.exists()
        assert elapsed <= TEARDOWN_LIMIT
        assert s.finish() == 130
        assert "interrupted with Ctrl-C" in s.output
        assert f"job {job}" in s.output
    finally:
        s.close()


def _kill_ssh(s):
    os.kill(s.record["ssh_pid"], signal.SIGKILL)


ENDINGS = {
    # name: (trigger, exit code, what the user is told)
    "ctrl-c": (lambda s: s.signal(signal.SIGINT), 130, "interrupted with Ctrl-C"),
    "sigterm": (lambda s: s.signal(signal.SIGTERM), 143, "terminated (SIGTERM)"),
    "terminal-closed": (lambda s: s.close_terminal(), 129, "the terminal was closed"),
    "stop-command": (
        lambda s: as_user("alice", ["spunnel-notebook", "stop"], timeout=30),
        0,
        "stopped with `spunnel-notebook stop`",
    ),
    "scancel": (
        lambda s: subprocess.run(["scancel", str(s.job_id)], check=True),
        0,
        "was cancelled",
    ),
    "jupyter-file-shutdown": (
        lambda s: rest(s.port, s.token, "POST", "/api/shutdown"),
        0,
        "Jupyter was shut down",
    ),
    "tunnel-ssh-dies": (_kill_ssh, 5, "the tunnel's ssh"),
}


@pytest.mark.parametrize("how", list(ENDINGS))
def test_every_ending_tears_everything_down_within_2s(how):
    trigger, code, told = ENDINGS[how]
    # A lost tunnel is re-established by default (see test_tunnel_*); here it must end the session.
    no_reconnect = site_config({"SshTunnel": {"reconnect_timeout": 0}})
    s = start("alice", "-t", "10", tty=(how == "terminal-closed"), env_path=no_reconnect)
    try:
        s.wait_ready()
        job = s.job_id
        log = state_dir("alice") / "session.log"
        trigger(s)
        t0 = time.monotonic()
        elapsed, left = wait_clean("alice", timeout=10)
        assert not left, f"after {how}: {left}"
        assert elapsed <= TEARDOWN_LIMIT, f"{how}: teardown took {elapsed:.2f} s"
        assert s.finish() == code, s.output
        said = s.output if how != "terminal-closed" else log.read_text()
        assert told in said, said
        assert str(job) in said
        assert time.monotonic() - t0 < 15
    finally:
        s.close()


def test_walltime_ends_the_session():
    s = start("alice", "-t", "1")
    try:
        s.wait_ready()
        s.wait_for(r"session ended: job \d+ reached its time limit", timeout=180)
        _, left = wait_clean("alice", timeout=TEARDOWN_LIMIT)
        assert not left, left
        assert s.finish() == 0
    finally:
        s.close()


def test_one_session_per_user_per_host_and_other_users_unaffected():
    a = start("alice", "-t", "10")
    b = None
    try:
        a.wait_ready()
        second = as_user("alice", ["spunnel-notebook", "-t", "10"])
        assert second.returncode == 3, second
        assert f"job {a.job_id} on c1" in second.stderr
        assert "spunnel-notebook stop" in second.stderr
        assert len(squeue("alice")) == 1  # nothing submitted
        status = as_user("alice", ["spunnel-notebook", "status"])
        assert status.returncode == 0 and a.url in status.stdout and "c1" in status.stdout
        b = start("bob", "-t", "10")
        b.wait_ready()
        assert b.port != a.port
        assert execute(b.port, b.token, "import os; print(os.environ['USER'])").strip() == "bob"
        assert execute(a.port, a.token, "import os; print(os.environ['USER'])").strip() == "alice"
        assert as_user("bob", ["spunnel-notebook", "status"]).stdout.count(b.url) == 1
    finally:
        for s in (a, b):
            if s is not None:
                s.signal(signal.SIGINT)
                s.finish()
                s.close()
    assert not leftovers("alice") and not leftovers("bob")
    assert as_user("alice", ["spunnel-notebook", "status"]).returncode == 8


def test_supervisor_killed_with_sigkill_leaves_nothing_for_long_and_next_start_recovers():
    s = start("alice", "-t", "10")
    try:
        s.wait_ready()
        children = [s.record["ssh_pid"], s.record["srun_pid"]]
        s.signal(signal.SIGKILL)
        s.proc.wait()
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{p}").exists() for p in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        alive = [
            p
            for p in children
            if Path(f"/proc/{p}/stat").exists()
            and Path(f"/proc/{p}/stat").read_text().split(") ")[1][0] != "Z"
        ]
        assert not alive, "ssh/srun outlived the supervisor"
    finally:
        s.close()
    again = start("alice", "-t", "10")
    try:
        again.wait_ready()
        assert execute(again.port, again.token, "print(6*7)").strip() == "42"
        again.signal(signal.SIGINT)
        assert again.finish() == 130
    finally:
        again.close()
    _, left = wait_clean("alice", timeout=TEARDOWN_LIMIT)
    assert not left, left


@pytest.fixture
def served():
    """A directory of alice's for the node-side test servers to serve; removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="served-", dir="/home/alice"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_two_tunnel_pairs_reach_servers_on_the_node(served):
    p1, p2 = _free_port(), _free_port()
    s = start("alice", "-t", "10", "--tunnel", f"{p1}:8000,{p2}:8001")
    servers = []
    try:
        s.wait_ready()
        for port, text in ((8000, "first"), (8001, "second")):
            home = served / str(port)
            home.mkdir()
            (home / "who.txt").write_text(text)
            os.chown(home, 1001, 1001)
            servers.append(
                subprocess.Popen(
                    [
                        "srun",
                        f"--jobid={s.job_id}",
                        "--overlap",
                        "-n1",
                        "python3",
                        "-m",
                        "http.server",
                        str(port),
                        "--bind",
                        "127.0.0.1",
                        "--directory",
                        str(home),
                    ],
                    user="alice",
                    group="alice",
                    extra_groups=[],
                    cwd="/home/alice",
                    env={
                        "PATH": "/usr/local/bin:/usr/bin:/bin",
                        "HOME": "/home/alice",
                        "USER": "alice",
                    },
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        import urllib.request

        for local, text in ((p1, "first"), (p2, "second")):
            deadline = time.monotonic() + 20
            while True:
                try:
                    with urllib.request.urlopen(
                        f"http://127.0.0.1:{local}/who.txt", timeout=5
                    ) as r:
                        assert r.read().decode() == text
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
        # The node's ports are not reachable from the login side except through the tunnel.
        with pytest.raises(OSError):
            socket.create_connection(("10.200.0.2", 8000), timeout=2)
        s.signal(signal.SIGINT)
        assert s.finish() == 130
    finally:
        s.close()
        for p in servers:
            p.kill()
            p.wait()
    _, left = wait_clean("alice", timeout=TEARDOWN_LIMIT)
    assert not left, left


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def busy_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.fixture
def unreachable_slurm_conf():
    """A slurm.conf (readable by the test users) naming a controller port nobody listens on."""
    text = Path(cluster_env()["SLURM_CONF"]).read_text()  # the running release's
    lines = [ln for ln in text.splitlines() if not ln.startswith("SlurmctldPort")]
    lines.insert(0, "SlurmctldPort=6999")
    path = Path(tempfile.mkdtemp(prefix="slurm-conf-", dir="/tmp"))
    path.chmod(0o755)
    (path / "slurm.conf").write_text("\n".join(lines) + "\n")
    (path / "slurm.conf").chmod(0o644)
    yield str(path / "slurm.conf")
    shutil.rmtree(path, ignore_errors=True)


BAD = [
    (["--tunnel", "8001"], 2, "malformed --tunnel pair"),
    (["--tunnel", "8001:8000,8001:8002"], 2, "appears twice"),
    (["--tunnel", "80:8000"], 2, "out of range"),
    (["--tunnel", "9001:0"], 2, "out of range"),
    (["--port", "70000"], 2, "out of range"),
    (["--port", "BUSY"], 2, "already in use"),
    (["--tunnel", "BUSY:8000"], 2, "already in use"),
    (["-p", "nosuch"], 2, "unknown partition 'nosuch'"),
    (["--mem", "9000"], 2, "more than any node"),
    (["--mem", "lots"], 2, "invalid memory"),
    (["-t", "2x"], 2, "invalid time limit"),
    (["-t", "9:00:00"], 2, "exceeds partition 'interact'"),
    (["-c", "64"], 2, "more than any node"),
    (["--", "--no-such-srun-option"], 4, "Slurm refused the request"),
    ([], 4, "not on PATH"),  # PATH without Slurm
    ([], 4, "controller does not answer"),  # SLURM_CONF pointing at a dead port
]


@pytest.mark.parametrize(("args", "code", "message"), BAD, ids=[m for _, _, m in BAD])
def test_bad_input_is_refused_with_one_clear_line_and_submits_nothing(
    args, code, message, busy_port, unreachable_slurm_conf
):
    args = [a.replace("BUSY", str(busy_port)) for a in args]
    env = {}
    if message == "not on PATH":  # the venv's bin alone: /usr/local/bin has Slurm 25.11's links
        env["PATH"] = f"{cluster_env()['VENV']}/bin"
    if message == "controller does not answer":
        env["SLURM_CONF"] = unreachable_slurm_conf
    result = as_user("alice", ["spunnel-notebook", "-t", "10", *args], timeout=120, **env)
    assert result.returncode == code, result
    errors = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(errors) == 1 and errors[0].startswith("spunnel-notebook: error: "), errors
    assert message in errors[0]
    assert "(" in errors[0]  # a remedy follows the message
    assert squeue("alice") == []
    assert not leftovers("alice")
    assert not [p for p in procs_of("alice")]


def test_pending_shows_job_and_reason_and_ctrl_c_cancels_it(node_full):
    s = start("alice", "--mem", "1000", "-t", "10", tty=True)
    try:
        m = s.wait_for(r"job (\d+) PENDING \((\w+)\)", timeout=30)
        job = m.group(1)
        assert m.group(2) == "Resources"
        assert squeue("alice") == [f"{job} PENDING"]
        status = as_user("alice", ["spunnel-notebook", "status"])
        assert status.returncode == 0 and f"job {job} PENDING" in status.stdout
        s.wait_for(r"waiting 0:00:0[2-9]", timeout=10)  # the line keeps updating
        s.signal(signal.SIGINT)
        elapsed, left = wait_clean("alice", timeout=10)
        assert not left, left
        assert elapsed <= TEARDOWN_LIMIT
        assert s.finish() == 130
        assert "interrupted with Ctrl-C" in s.output
        state = subprocess.run(
            ["scontrol", "show", "job", job, "-o"], capture_output=True, text=True
        ).stdout
        assert "JobState=CANCELLED" in state
    finally:
        s.close()


def test_notebook_ui_and_status_json():
    s = start("alice", "--notebook", "-t", "10")
    try:
        s.wait_ready()
        assert "/tree?token=" in s.url
        import urllib.request

        with urllib.request.urlopen(s.url, timeout=30) as page:
            assert page.status == 200
            assert b"notebookVersion" in page.read()  # Notebook 7, not JupyterLab
        status = as_user("alice", ["spunnel-notebook", "status", "--json"])
        import json

        record = json.loads(status.stdout)
        assert record["phase"] == "ready" and record["node"] == "c1"
        assert record["job_id"] == s.job_id and "token" not in record
        s.signal(signal.SIGTERM)
        assert s.finish() == 143
    finally:
        s.close()


def test_site_defaults_come_from_the_shared_traitlets_config():
    """jupyter_spunnel_jupyter_config.json on Jupyter's config path sets the CLI's defaults."""
    config = {"SpunnelManager": {"partition": "debug", "time": "7", "mem": "700"}}
    s = start("alice", env_path=site_config(config))
    try:
        s.wait_ready()
        fields = subprocess.run(
            ["squeue", "-h", "-j", str(s.job_id), "-o", "%P %l %m"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert fields == ["debug", "7:00", "700M"]
        s.signal(signal.SIGINT)
        assert s.finish() == 130
    finally:
        s.close()


def test_tunnel_ssh_killed_is_reconnected_on_the_same_url_and_kernels_keep_working():
    s = start("alice", "-t", "10")
    try:
        s.wait_ready()
        url_before = s.url
        os.kill(s.record["ssh_pid"], signal.SIGKILL)
        t0 = time.monotonic()
        s.wait_for(r"tunnel re-established after [\d.]+ s", timeout=10)
        assert time.monotonic() - t0 < 3.0
        assert (
            execute(s.port, s.token, "import socket; print(socket.gethostname())").strip() == "c1"
        )
        assert as_user("alice", ["spunnel-notebook", "status"]).stdout.count(url_before) == 1
        s.signal(signal.SIGINT)
        assert s.finish() == 130
    finally:
        s.close()
    assert not wait_clean("alice", timeout=TEARDOWN_LIMIT)[1]


def test_tunnel_not_re_established_within_the_bound_ends_the_session_cleanly():
    cfg = site_config({"SshTunnel": {"reconnect_timeout": 2}})
    s = start("alice", "-t", "10", env_path=cfg)
    try:
        s.wait_ready()
        job = s.job_id
        stop_c1_sshd()
        try:
            os.kill(s.record["ssh_pid"], signal.SIGKILL)
            assert s.finish(timeout=20) == 5
        finally:
            restart_c1_sshd()  # fmt: skip
        assert "not re-established within 2 s" in s.output
        assert f"job {job}" in s.output
    finally:
        s.close()
    assert not wait_clean("alice", timeout=TEARDOWN_LIMIT)[1]


def test_forwards_added_and_cancelled_at_runtime(served):
    s = start("alice", "-t", "10")
    server = None
    try:
        s.wait_ready()
        local = _free_port()
        added = as_user("alice", ["spunnel-notebook", "forward", f"{local}:8050"])
        assert added.returncode == 0 and f"forwarding 127.0.0.1:{local}" in added.stderr
        again = as_user("alice", ["spunnel-notebook", "forward", f"{local}:8050"])
        assert again.returncode == 2 and "already forwarded" in again.stderr
        home = served
        (home / "who.txt").write_text("dash")
        server = subprocess.Popen(
            ["srun", f"--jobid={s.job_id}", "--overlap", "-n1", "python3", "-m", "http.server",
             "8050", "--bind", "127.0.0.1", "--directory", str(home)],
            user="alice", group="alice", extra_groups=[], cwd="/home/alice",
            env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/home/alice", "USER": "alice"},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        import urllib.request

        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{local}/who.txt", timeout=5) as r:
                    assert r.read() == b"dash"
                    break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert f"{local}:8050" in as_user("alice", ["spunnel-notebook", "status"]).stdout
        cancel = as_user("alice", ["spunnel-notebook", "forward", "--cancel", f"{local}:8050"])
        assert cancel.returncode == 0, cancel
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{local}/who.txt", timeout=5)
        s.signal(signal.SIGINT)
        assert s.finish() == 130
    finally:
        s.close()
        if server is not None:
            server.kill()
            server.wait()
    assert not wait_clean("alice", timeout=TEARDOWN_LIMIT)[1]


def stop_c1_sshd() -> None:
    """Stop c1's sshd listener (live connections stay), as on nodes that refuse inbound ssh."""
    pid = int(Path("/run/spunnel-test/sshd-c1.pid").read_text().split()[0])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while as_user("alice", ["ssh", "-o", "BatchMode=yes", "c1", "true"]).returncode == 0:
        assert time.monotonic() < deadline, "c1's sshd does not stop"
        time.sleep(0.1)


def restart_c1_sshd() -> None:
    up = Path(__file__).parents[1] / "cluster" / "up.sh"
    subprocess.run(["bash", str(up)], check=True, capture_output=True, timeout=300)


@pytest.fixture
def no_sshd_on_c1():
    stop_c1_sshd()
    yield
    restart_c1_sshd()


def _cgroup_of(pid: int) -> str:
    return Path(f"/proc/{pid}/cgroup").read_text()


def test_reverse_mode_needs_no_sshd_on_the_node(no_sshd_on_c1):
    p1 = _free_port()
    s = start("alice", "-t", "10", "--tunnel-mode", "reverse", "--tunnel", f"{p1}:8000")
    try:
        s.wait_ready()
        assert "falling back" not in s.output
        job = s.job_id
        out = execute(s.port, s.token, "import os, socket; print(os.environ['SLURM_JOB_ID'], "
                      "socket.gethostname())")  # fmt: skip
        assert out.split() == [str(job), "c1"]
        record = json.loads(as_user("alice", ["spunnel-notebook", "status", "--json"]).stdout)
        assert record["tunnel_mode"] == "reverse" and record["tunnel_state"] == "up"
        # The ssh that carries the tunnel runs on the node, inside the job (Slurm accounts for it
        # and kills it with the job): no ssh of alice's runs on the login side.
        ssh = [(pid, cmd) for pid, cmd in procs_of("alice") if cmd.startswith("ssh ")]
        assert len(ssh) == 1 and "-R" in ssh[0][1] and "spunnel-login" in ssh[0][1], ssh
        env = dict(
            line.split("=", 1) for line in Path("/run/spunnel-test/cluster.env").read_text().split()
        )
        if env.get("PROCTRACK") == "cgroup":
            assert f"job_{job}" in _cgroup_of(ssh[0][0])
        # Killing it: the node dials back again, same URL.
        os.kill(ssh[0][0], signal.SIGKILL)
        s.wait_for(r"re-established the reverse tunnel", timeout=10)
        assert execute(s.port, s.token, "print(1+1)").strip() == "2"
        s.signal(signal.SIGINT)
        assert s.finish() == 130
    finally:
        s.close()
    elapsed, left = wait_clean("alice", timeout=10)
    assert not left, left
    assert elapsed <= TEARDOWN_LIMIT


def test_auto_mode_falls_back_to_reverse_when_the_node_refuses_ssh(no_sshd_on_c1):
    s = start("alice", "-t", "10")
    try:
        s.wait_ready()
        assert s.output.count("falling back to reverse mode") == 1
        assert "Connection refused" in s.output
        assert (
            execute(s.port, s.token, "import socket; print(socket.gethostname())").strip() == "c1"
        )
        s.signal(signal.SIGINT)
        assert s.finish() == 130
    finally:
        s.close()
    assert not wait_clean("alice", timeout=TEARDOWN_LIMIT)[1]


def test_doctor_on_a_healthy_cluster():
    result = as_user("alice", ["spunnel-notebook", "doctor", "--allocate"], timeout=180)
    assert result.returncode == 0, result
    rows = {line[:27].strip(): line[27:] for line in result.stdout.splitlines()[2:]}
    for check in ("Slurm commands", "Slurm controller", "state directory", "ssh client",
                  "test allocation", "Jupyter on the node", "ssh to the node",
                  "reverse path to this host"):  # fmt: skip
        assert rows[check].startswith("ok"), (check, result.stdout)
    assert "on c1" in rows["test allocation"]
    assert "c1 -> spunnel-login: ssh works" in rows["reverse path to this host"]
    assert squeue("alice") == []


def test_doctor_on_a_broken_cluster(unreachable_slurm_conf):
    dead = as_user("alice", ["spunnel-notebook", "doctor"], timeout=120,
                   SLURM_CONF=unreachable_slurm_conf)  # fmt: skip
    assert dead.returncode == 1
    assert re.search(r"Slurm controller\s+FAIL\s+the Slurm controller does not answer", dead.stdout)
    assert "-> try again in a minute" in dead.stdout
    stop_c1_sshd()
    try:
        refused = as_user("alice", ["spunnel-notebook", "doctor", "--allocate"], timeout=180)
    finally:
        restart_c1_sshd()
    assert re.search(r"ssh to the node\s+warn\s+refused: .*Connection refused", refused.stdout)
    assert "fall back to reverse mode" in refused.stdout
    assert squeue("alice") == []
