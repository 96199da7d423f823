"""A private /tmp for the notebook and its kernels, on the real cluster (privatetmp.py): what a
kernel writes to /tmp stays in its session, invisible to another step of the same job, to the
login host and to other users' sessions on c1, and is gone when the session ends. Inside, the user
keeps what the cluster grants (supplementary groups, file ownership). Where the node refuses user
namespaces, TMPDIR points at the private directory instead, and the user is told once."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
from pathlib import Path

import pytest

from .cluster import PROG, as_user, cluster_env, start, uid, wait_clean
from .jupyter_client_util import execute

GROUP, SHARED = "spunnel-proj", Path("/srv/spunnel-proj")
UP = Path(__file__).parents[1] / "cluster" / "up.sh"


def probe(port: int, token: str, code: str) -> dict:
    return json.loads(execute(port, token, f"import json, os\n{code}").strip().splitlines()[-1])


@pytest.fixture
def project_group():
    """A directory readable only through alice's project group (tests/cluster/up.sh makes it)."""
    SHARED.mkdir(mode=0o750, exist_ok=True)
    (SHARED / "data.txt").write_text("for the project only\n")
    subprocess.run(["chgrp", "-R", GROUP, str(SHARED)], check=True)
    (SHARED / "data.txt").chmod(0o640)
    yield
    subprocess.run(["rm", "-rf", str(SHARED)], check=True)


def test_a_kernels_tmp_is_its_sessions_own_and_gone_afterwards(project_group):
    name = f"spunnel-private-{secrets.token_hex(4)}"
    alice = start("alice", "--mem", "500", "-t", "10")
    bob = start("bob", "--mem", "500", "-t", "10")
    try:
        alice.wait_ready()
        bob.wait_ready()
        said = probe(alice.port, alice.token, f"""
open('/tmp/{name}', 'w').write('alice')
open('/var/tmp/{name}', 'w').write('alice')
open(os.path.expanduser('~/{name}'), 'w').write('home')
st = os.stat(os.path.expanduser('~/{name}'))
print(json.dumps({{"tmp": os.listdir('/tmp'), "uid": st.st_uid, "gid": st.st_gid,
                  "shared": open('{SHARED}/data.txt').read(), "job": os.environ['SLURM_JOB_ID'],
                  "private": os.environ.get('SPUNNEL_PRIVATE_TMP', '')}}))
""")  # fmt: skip
        # Nothing of the node's /tmp, nor other jobs' files: only the kernel's own file, and the
        # session's runtime directory (Jupyter's socket: kept the same inside and out)
        assert sorted(said["tmp"]) == [name, f"spunnel.{said['job']}.0"], said
        assert (said["uid"], said["gid"]) == (uid("alice"), uid("alice")), said
        assert said["shared"] == "for the project only\n"  # a supplementary group still counts
        assert said["private"], said
        # Not on the node's (here: the login host's) /tmp or /var/tmp, nor in another step of
        # the same job, nor in bob's session on the same node.
        assert not Path("/tmp", name).exists() and not Path("/var/tmp", name).exists()
        step = as_user("alice", ["srun", f"--jobid={said['job']}", "--overlap", "-N1", "-n1",
                                 "ls", "/tmp", "/var/tmp"], timeout=60)  # fmt: skip
        assert step.returncode == 0 and name not in step.stdout, step
        theirs = probe(bob.port, bob.token, "print(json.dumps({'tmp': os.listdir('/tmp')}))")
        assert theirs["tmp"] == [f"spunnel.{bob.job_id}.0"], theirs
        private = Path(said["private"])
        assert (private / "tmp" / name).read_text() == "alice"  # from outside, as root
        assert oct(private.stat().st_mode & 0o777) == "0o700" and private.stat().st_uid == uid(
            "alice"
        )
        alice.signal(signal.SIGINT)
        bob.signal(signal.SIGINT)
        assert alice.finish() == 130 and bob.finish() == 130
        assert not private.exists()  # removed with the session, which the plugin never did
    finally:
        alice.close()
        bob.close()
        Path("/home/alice", name).unlink(missing_ok=True)
    for user in ("alice", "bob"):
        _took, left = wait_clean(user, timeout=15)
        assert not left, left


@pytest.fixture
def no_user_namespaces(cluster):
    """c1 with unprivileged user namespaces switched off (SPUNNEL_NODE_USERNS=0 up.sh: its
    slurmd in a user namespace that allows no further one), then c1 as before."""
    _up(node_userns=False)
    assert cluster_env()["NODE_USERNS"] == "0"
    try:
        yield
    finally:
        _up(node_userns=True)


def _up(node_userns: bool) -> None:
    env = dict(os.environ, SPUNNEL_NODE_USERNS="1" if node_userns else "0")
    result = subprocess.run(["bash", str(UP)], env=env, capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_without_user_namespaces_tmpdir_points_at_the_private_directory(no_user_namespaces):
    s = start("alice", "--mem", "500", "-t", "10")
    try:
        s.wait_ready()
        told = s.wait_for(r"no private /tmp namespace on this node \((.*)\): TMPDIR, TMP and "
                          r"TEMP point at (\S+) instead", timeout=10)  # fmt: skip
        assert s.output.count("no private /tmp namespace") == 1  # said once
        code = "import tempfile\nprint(json.dumps({'tmpdir': os.environ['TMPDIR'], "
        said = probe(s.port, s.token, code + "'temp': tempfile.gettempdir()}))")
        assert said == {"tmpdir": told.group(2), "temp": told.group(2)}, said
        assert Path(told.group(2)).stat().st_uid == uid("alice")
        s.signal(signal.SIGINT)
        assert s.finish() == 130
        assert not Path(told.group(2)).exists()
    finally:
        s.close()
    _took, left = wait_clean("alice", timeout=15)
    assert not left, left


def test_doctor_reports_what_the_node_gives():
    out = as_user("alice", [PROG, "doctor", "--allocate"], timeout=180)
    assert "private /tmp" in out.stdout + out.stderr, out
    line = next(x for x in (out.stdout + out.stderr).splitlines() if x.startswith("private /tmp"))
    assert "ours: a user namespace with private /var/tmp and /tmp" in line, line
