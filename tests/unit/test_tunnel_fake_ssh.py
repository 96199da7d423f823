"""SshTunnel at its process boundary: a scripted fake `ssh` stands in for OpenSSH."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from spunnel_jupyter.errors import TunnelError
from spunnel_jupyter.tunnel import SshTunnel

# Behaves like `ssh -N -M -S ctl ... host` (creates the control socket, stays up), like
# `ssh -S ctl -O check host` and like `ssh -S ctl host CMD` (a command through the master, logged
# to $FAKE_SSH_RAN; exits $FAKE_SSH_CMD_EXIT); refuses the first $FAILS masters the way
# pam_slurm_adopt does.
FAKE_SSH = """#!/usr/bin/env python3
import os, socket, sys, time
args = sys.argv[1:]
ctl = args[args.index("-S") + 1]
if "-O" in args:
    sys.exit(0 if os.path.exists(ctl) else 255)
if "-M" not in args:
    with open(os.environ["FAKE_SSH_RAN"], "a") as f:
        f.write(" ".join(args[args.index("--") + 1:]) + "\\n")
    code = int(os.environ.get("FAKE_SSH_CMD_EXIT", "0"))
    if code:
        print("exec request failed on channel 0", file=sys.stderr)
    sys.exit(code if os.path.exists(ctl) else 255)
count_file = os.environ["FAKE_SSH_COUNT"]
n = int(open(count_file).read() or 0) + 1 if os.path.exists(count_file) else 1
open(count_file, "w").write(str(n))
if n <= int(os.environ.get("FAKE_SSH_FAILS", "0")):
    print(os.environ.get("FAKE_SSH_SAYS", "Access denied by pam_slurm_adopt: you have no "
          "active jobs on this node"), file=sys.stderr)
    sys.exit(255)
s = socket.socket(socket.AF_UNIX)
s.bind(ctl)
time.sleep(60)
"""


@pytest.fixture
def fake_ssh(tmp_path, monkeypatch):
    path = tmp_path / "ssh"
    path.write_text(FAKE_SSH)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("FAKE_SSH_COUNT", str(tmp_path / "count"))
    monkeypatch.setenv("FAKE_SSH_RAN", str(tmp_path / "ran"))
    return path


def _open(tunnel: SshTunnel, tmp_path: Path):
    async def go():
        with open(tmp_path / "log", "wb") as log:
            t = await tunnel.open("c1", tmp_path / "ctl", ["127.0.0.1:1:/x"], log)
            await t.close(grace=0.5)

    asyncio.run(go())


def test_pam_slurm_adopt_refusal_is_retried_until_admitted(fake_ssh, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_SSH_FAILS", "2")
    _open(SshTunnel(ssh_command=[str(fake_ssh)], adopt_retry_timeout=10), tmp_path)
    assert (tmp_path / "count").read_text() == "3"
    assert (tmp_path / "log").read_text().count("retrying") == 2


def test_a_command_runs_through_the_master_so_sshd_sets_nodelay(fake_ssh, tmp_path):
    _open(SshTunnel(ssh_command=[str(fake_ssh)]), tmp_path)
    assert (tmp_path / "ran").read_text() == "c1 true\n"
    assert "Nagle" not in (tmp_path / "log").read_text()


def test_a_refused_command_is_only_logged(fake_ssh, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_SSH_CMD_EXIT", "1")
    _open(SshTunnel(ssh_command=[str(fake_ssh)]), tmp_path)  # the tunnel still opens
    log = (tmp_path / "log").read_text()
    assert "exec request failed on channel 0" in log and "~40 ms" in log


def test_pam_slurm_adopt_refusal_gives_up_after_the_bound(fake_ssh, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_SSH_FAILS", "1000")
    with pytest.raises(TunnelError, match="pam_slurm_adopt"):
        _open(SshTunnel(ssh_command=[str(fake_ssh)], adopt_retry_timeout=0.5), tmp_path)
    assert 2 <= int((tmp_path / "count").read_text()) <= 5


def test_other_refusals_are_not_retried(fake_ssh, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_SSH_FAILS", "1000")
    monkeypatch.setenv("FAKE_SSH_SAYS", "ssh: connect to host c1 port 22: Connection refused")
    with pytest.raises(TunnelError, match="Connection refused"):
        _open(SshTunnel(ssh_command=[str(fake_ssh)], adopt_retry_timeout=10), tmp_path)
    assert (tmp_path / "count").read_text() == "1"
    assert not os.path.exists(tmp_path / "ctl")
