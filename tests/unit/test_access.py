"""How a user reaches a session from elsewhere (access.py): the login host's name as reached, the
laptop line with a gateway, the ssh-config stanza, and the subcommand's arguments."""

from __future__ import annotations

import getpass
import socket

import pytest

from spunnel_jupyter import access
from spunnel_jupyter.cli import parse


def test_in_an_ssh_session_the_address_the_user_reached_names_the_host(monkeypatch):
    monkeypatch.setattr(socket, "gethostbyaddr", lambda a: ("login1.example.org", [], [a]))
    monkeypatch.setattr(access, "_resolves_to", lambda name, a: name == "login1.example.org")
    env = {"SSH_CONNECTION": "192.0.2.7 50000 198.51.100.4 22"}
    assert access.reached_host(env) == "login1.example.org"
    monkeypatch.setattr(access, "_resolves_to", lambda name, a: False)  # not forward-confirmed
    assert access.reached_host(env) == "198.51.100.4"


def test_without_ssh_the_fqdn_unless_it_is_only_localhost(monkeypatch):
    monkeypatch.setattr(socket, "gethostname", lambda: "vm")
    monkeypatch.setattr(socket, "getfqdn", lambda: "localhost")
    assert access.reached_host({}) == "vm"
    # a local ssh (loopback) says nothing about how a laptop reaches the host
    assert access.reached_host({"SSH_CONNECTION": "127.0.0.1 5 127.0.0.1 22"}) == "vm"
    monkeypatch.setattr(socket, "getfqdn", lambda: "login2.cluster.example.org")
    assert access.reached_host({}) == "login2.cluster.example.org"


@pytest.mark.parametrize(
    ("gateway", "expected"),
    [("", "ssh -N -L 8888:127.0.0.1:8888 {u}@login1"),
     ("gw.example.org", "ssh -N -J gw.example.org -L 8888:127.0.0.1:8888 {u}@login1")],
)  # fmt: skip
def test_the_laptop_line_goes_through_the_gateway_when_there_is_one(gateway, expected):
    line = access.laptop_line("login1", gateway, ["-L 8888:127.0.0.1:8888"])
    assert line == expected.format(u=getpass.getuser())


def test_the_stanza_reaches_the_node_through_the_login_host_and_the_gateway():
    u = getpass.getuser()
    stanza = access.ssh_config("c1", 812, "login1", "me@gw:2222").splitlines()
    assert stanza[2:] == ["Host spunnel-c1", "    HostName c1", f"    User {u}",
                          f"    ProxyJump me@gw:2222,{u}@login1"]  # fmt: skip
    assert stanza[0].startswith("# spunnel-notebook ssh-config: job 812 on c1")
    assert access.ssh_config("c1", 812, "login1", "", "hpc").splitlines()[2] == "Host hpc"


def test_ssh_config_takes_a_job_and_an_alias():
    args = parse(["ssh-config", "812", "--alias", "hpc"])
    assert (args.command, args.job, args.alias) == ("ssh-config", 812, "hpc")
    assert parse(["ssh-config"]).job is None
