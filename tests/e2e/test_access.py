"""Reaching a session from elsewhere, on the real cluster: the laptop line names the login host as
the user reached it (never `localhost`) and goes through the site's gateway; `ssh-config` prints a
stanza with which plain ssh (as VS Code Remote-SSH does) reaches the session's node."""

from __future__ import annotations

import re
import shutil
import signal
import tempfile
from pathlib import Path

from .cluster import PROG, as_user, site_config, start, wait_clean

# Test-only: the login host's and c1's host keys are not in alice's known_hosts.
LENIENT = (
    "Host *\n    StrictHostKeyChecking no\n    UserKnownHostsFile /dev/null\n    LogLevel ERROR\n"
)


def laptop_line(output: str) -> str:
    m = re.search(r"From a laptop: run  (ssh [^\n]*)", output)
    assert m, output
    return m.group(1)


def test_the_laptop_line_names_the_host_as_reached_and_the_gateway():
    # Logged in over ssh at 10.200.0.1, whose name (/etc/hosts) is spunnel-login.
    s = start("alice", "-t", "10", SSH_CONNECTION="10.200.0.77 40000 10.200.0.1 22")
    try:
        s.wait_ready()
        line = laptop_line(s.output)
        assert line == f"ssh -N -L {s.port}:127.0.0.1:{s.port} alice@spunnel-login", line
        s.signal(signal.SIGINT)
        assert s.finish() == 130
    finally:
        s.close()
    site = site_config({"LaptopAccess": {"gateway": "gw.example.org"}})
    s = start("alice", "-t", "10", env_path=site)
    try:
        s.wait_ready()
        line = laptop_line(s.output)
        assert line.startswith("ssh -N -J gw.example.org -L "), line
        assert "@localhost" not in line, line  # this machine's FQDN is only localhost
        s.signal(signal.SIGINT)
        assert s.finish() == 130
    finally:
        s.close()
        shutil.rmtree(site, ignore_errors=True)
    _took, left = wait_clean("alice", timeout=15)
    assert not left, left


def write_stanza(alias: str = "") -> tuple[Path, str]:
    """`spunnel-notebook ssh-config` as alice (the site names the login host spunnel-login),
    written to a config file of its own: (the file, its Host)."""
    site = site_config({"SpunnelManager": {"login_host": "spunnel-login"}})
    try:
        out = as_user("alice", [PROG, "ssh-config", *(["--alias", alias] if alias else [])],
                      timeout=60, JUPYTER_CONFIG_PATH=site)  # fmt: skip
    finally:
        shutil.rmtree(site, ignore_errors=True)
    assert out.returncode == 0, out
    assert "ProxyJump alice@spunnel-login" in out.stdout, out.stdout
    host = re.search(r"^Host (\S+)$", out.stdout, re.M)
    assert host, out.stdout
    config = Path(tempfile.mkdtemp(prefix="sshcfg-", dir="/tmp")) / "config"
    config.write_text(out.stdout + "\n" + LENIENT)
    config.parent.chmod(0o755)
    config.chmod(0o644)
    return config, host.group(1)


def ssh_through_the_stanza(command: list[str], alias: str = "") -> str:
    """ssh as alice with only the stanza: what ``command`` printed on the node."""
    config, host = write_stanza(alias)
    try:
        result = as_user("alice", ["ssh", "-F", str(config), "-o", "BatchMode=yes", host,
                                   *command], timeout=60)  # fmt: skip
    finally:
        shutil.rmtree(config.parent, ignore_errors=True)
    assert result.returncode == 0, result
    return result.stdout


def test_ssh_config_reaches_the_sessions_node():
    s = start("alice", "-t", "10")
    try:
        s.wait_ready()
        assert ssh_through_the_stanza(["hostname"]).strip() == "c1"
        assert ssh_through_the_stanza(["hostname"], alias="hpc").strip() == "c1"
        s.signal(signal.SIGINT)
        assert s.finish() == 130
    finally:
        s.close()
    nothing = as_user("alice", [PROG, "ssh-config"], timeout=60)
    assert nothing.returncode == 8 and "no session is running" in nothing.stderr, nothing
    _took, left = wait_clean("alice", timeout=15)
    assert not left, left
