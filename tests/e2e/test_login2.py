"""The second login host of the test cluster (tests/cluster/login2.sh) is a host of its own.

As carol (the other e2e tests force-clean alice and bob): login2 has its own hostname and /tmp,
shares /home, runs Slurm's client commands against the one controller, reaches c1 with ssh and is
reached from c1 (reverse tunnels), and runs spunnel-notebook, alongside a session of the same user
on the first login host. A login2 that is not up fails every test here (hosts.login2_env).
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from .cluster import procs_of, squeue, state_dir
from .hosts import (
    ON_HOST,
    force_clean_everywhere,
    host_path,
    login2_env,
    on_host,
    on_login2,
    start_notebook,
    wait_clean_everywhere,
)

USER = "carol"
READY = 180  # seconds: other tests' jobs may hold the node for a while
SSH = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]


@pytest.fixture(scope="module")
def login2(cluster: dict[str, str]) -> dict[str, str]:
    return login2_env()


@pytest.fixture(autouse=True)
def clean(cluster: dict[str, str], login2: dict[str, str]):
    """Overrides conftest's ``clean``, which force-cleans alice and bob (whom other tests use at
    the same time): here only carol, on both login hosts."""
    force_clean_everywhere(USER)
    yield
    force_clean_everywhere(USER)


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stdout!r} {proc.stderr!r}"
    return proc.stdout


def http_status(host: str, url: str) -> str:
    """The HTTP status ``url`` answers with from inside ``host`` ("000": no answer)."""
    out = on_host(
        host, USER, ["curl", "-s", "-o", "/dev/null", "-m", "10", "-w", "%{http_code}", url]
    )
    return out.stdout.strip()


def job_field(job: int | str, key: str) -> str:
    out = subprocess.run(
        ["scontrol", "show", "job", str(job), "-o"], capture_output=True, text=True, check=True
    ).stdout
    m = re.search(rf"\b{key}=(\S*)", out)
    assert m, out
    return m[1]


def test_login2_has_its_own_hostname_and_network_address():
    assert ok(on_login2(USER, ["hostname"])).strip() == "login2"
    assert ok(on_host("login", USER, ["hostname"])).strip() == socket.gethostname()
    addrs = ok(on_login2(USER, ["ip", "-4", "-o", "addr", "show"]))
    assert " 10.200.1.2/24 " in addrs and "10.200.0.1/" not in addrs, addrs
    # The name resolves to that address on both login hosts and on the node.
    assert ok(on_host("login", USER, ["getent", "hosts", "login2"])).split()[0] == "10.200.1.2"
    assert ok(on_login2(USER, ["getent", "hosts", "login2"])).split()[0] == "10.200.1.2"


def test_tmp_is_private_to_each_host_and_home_is_shared():
    name = f"login2-probe-{uuid.uuid4().hex}"
    try:
        ok(on_login2(USER, ["sh", "-c", f"echo two > /tmp/{name}.l2 && echo two > ~/{name}"]))
        ok(on_host("login", USER, ["sh", "-c", f"echo one > /tmp/{name}.l1"]))
        # Each /tmp has only its own file ...
        assert ok(on_login2(USER, ["cat", f"/tmp/{name}.l2"])) == "two\n"
        assert on_login2(USER, ["test", "-e", f"/tmp/{name}.l1"]).returncode == 1
        assert not Path(f"/tmp/{name}.l2").exists()
        assert Path(f"/tmp/{name}.l1").exists()
        # ... and spunnel's default state directory is per host too.
        assert ok(on_login2(USER, ["stat", "-c", "%d:%i", "/tmp"])) != ok(
            on_host("login", USER, ["stat", "-c", "%d:%i", "/tmp"])
        )
        # /home is one: what carol writes on login2 is in her home on the first host.
        assert Path(f"/home/{USER}/{name}").read_text() == "two\n"
    finally:
        Path(f"/tmp/{name}.l1").unlink(missing_ok=True)
        Path(f"/home/{USER}/{name}").unlink(missing_ok=True)
        on_login2(USER, ["rm", "-f", f"/tmp/{name}.l2"])


def test_slurm_client_commands_work_on_login2():
    out = ok(on_login2(USER, ["srun", "-N1", "-t", "1", "hostname"], timeout=READY))
    assert out.splitlines()[-1] == "c1", out
    batch = ["sbatch", "--parsable", "-t", "2", "-o", "/dev/null", "--wrap", "sleep 300"]
    job = ok(on_login2(USER, batch)).strip()
    assert job.isdigit(), job
    # (scontrol's AllocNode says "localhost" for jobs from either login host: the one munged,
    # in the root namespace, stamps every credential with its own address.)
    assert ok(on_login2(USER, ["squeue", "-h", "-j", job, "-o", "%i %u"])).split() == [job, USER]
    assert f"JobId={job} " in ok(on_login2(USER, ["scontrol", "show", "job", job]))
    ok(on_login2(USER, ["scancel", job]))
    deadline = time.monotonic() + 30
    while squeue(USER):
        assert time.monotonic() < deadline, squeue(USER)
        time.sleep(0.2)


def test_ssh_from_login2_to_the_node_and_back_from_the_node_to_login2():
    # Forward tunnels: login2 -> c1, no prompt (BatchMode fails on an unknown host key).
    assert ok(on_login2(USER, [*SSH, "c1", "hostname"], timeout=30)).strip() == "c1"
    # Reverse tunnels: from inside a job step on c1, back to login2's own sshd.
    out = ok(
        on_login2(
            USER,
            ["srun", "-N1", "-t", "1", *SSH, "login2", "hostname; ls -d /tmp/spunnel* || true"],
            timeout=READY,
        )
    )
    assert out.splitlines()[0] == "login2", out
    # And from the first login host.
    assert ok(on_host("login", USER, [*SSH, "login2", "hostname"], timeout=30)).strip() == "login2"


def test_notebook_on_login2_is_ready_served_there_only_and_ctrl_c_ends_it():
    s = start_notebook("login2", USER, "-t", "5")
    try:
        s.wait_ready(READY)
        assert http_status("login2", s.url) == "200", s.output
        # The URL is login2's loopback: on the first host the port is not this server.
        assert http_status("login", s.url) != "200"
        # The session is login2's: its record is in login2's /tmp, not the first host's, and
        # the job is tagged with login2.
        assert host_path("login2", state_dir(USER) / "session.json").exists()
        assert not (state_dir(USER) / "session.json").exists()
        assert ":login2:" in job_field(s.job_id, "Comment"), job_field(s.job_id, "Comment")
        s.signal(signal.SIGINT)
        assert s.finish(60) == 130, s.output
        _, left = wait_clean_everywhere(USER, timeout=15)
        assert left == [], left
        assert squeue(USER) == []
    finally:
        s.close()


def test_reverse_tunnel_from_the_node_lands_on_login2():
    s = start_notebook("login2", USER, "-t", "5", "--tunnel-mode", "reverse")
    try:
        s.wait_ready(READY)
        assert http_status("login2", s.url) == "200", s.output
        # The node dialled back to login2 (its site config names login2, not the first host).
        dial = [cmd for _, cmd in procs_of(USER) if re.search(r"\bssh .*-R ", cmd)]
        assert dial and all(cmd.endswith("-- login2") for cmd in dial), dial
        s.signal(signal.SIGINT)
        assert s.finish(60) == 130, s.output
        _, left = wait_clean_everywhere(USER, timeout=15)
        assert left == [], left
    finally:
        s.close()


def test_one_session_per_user_per_host_on_both_login_hosts_at_once():
    first = start_notebook("login", USER, "-t", "5")
    second = start_notebook("login2", USER, "-t", "5")
    third = None
    try:
        first.wait_ready(READY)
        second.wait_ready(READY)
        assert first.job_id != second.job_id
        assert sorted(squeue(USER)) == sorted(
            [f"{first.job_id} RUNNING", f"{second.job_id} RUNNING"]
        )
        assert http_status("login", first.url) == "200"
        assert http_status("login2", second.url) == "200"
        # Still one per host: a second start on login2 is refused while login2's session runs.
        third = start_notebook("login2", USER, "-t", "5")
        assert third.finish(60) == 3, third.output
        assert len(squeue(USER)) == 2
        for s in (first, second):
            s.signal(signal.SIGINT)
        assert first.finish(60) == 130, first.output
        assert second.finish(60) == 130, second.output
        _, left = wait_clean_everywhere(USER, timeout=15)
        assert left == [], left
    finally:
        for s in (first, second, third):
            if s is not None:
                s.close()


def test_on_host_refuses_an_unknown_host_loudly():
    out = subprocess.run([str(ON_HOST), "nowhere", USER, "true"], capture_output=True, text=True)
    assert out.returncode == 2 and "unknown host 'nowhere'" in out.stderr, out
