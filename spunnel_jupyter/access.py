"""How a user reaches a session from elsewhere: the laptop's ``ssh -L`` line, and an ssh_config
stanza for the session's node (``spunnel-notebook ssh-config``: VS Code Remote-SSH, ssh, scp).

Both go through the login host by the name the user reached it with (``reached_host``; the site's
``c.SpunnelManager.login_host`` wins), and through the site's gateway first where there is one
(``c.LaptopAccess.gateway``: ``ssh -J``, ``ProxyJump``), as the port-forwarding tutorial's
two-hop setup does.
"""

from __future__ import annotations

import getpass
import ipaddress
import os
import socket
from collections.abc import Mapping

from traitlets import Unicode
from traitlets.config import Configurable


class LaptopAccess(Configurable):
    gateway = Unicode(
        "",
        config=True,
        help="""A host users must go through to reach the login hosts from outside (e.g.
        gw.cluster.example.org, or user@gw:2222): the laptop line gets `-J GATEWAY`, the
        ssh-config stanza `ProxyJump GATEWAY,LOGIN`. Empty: none.""",
    )


def _loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _resolves_to(name: str, address: str) -> bool:
    try:
        return address in {a[4][0] for a in socket.getaddrinfo(name, None)}
    except OSError:
        return False


def reached_host(env: Mapping[str, str] = os.environ) -> str:
    """This login host's name as a laptop reaches it. In an ssh session ($SSH_CONNECTION), the
    address the user's ssh connected to: its name where that name leads back to it (forward-
    confirmed), else the address itself. Otherwise this host's FQDN, or its hostname where the
    FQDN is only ``localhost`` (a machine whose name resolves to 127.0.0.1)."""
    fields = env.get("SSH_CONNECTION", "").split()
    if len(fields) == 4 and not _loopback(fields[2]):
        address = fields[2]
        try:
            name = socket.gethostbyaddr(address)[0]
        except OSError:
            name = ""
        return name if name and _resolves_to(name, address) else address
    fqdn = socket.getfqdn()
    if fqdn and fqdn != "localhost" and not fqdn.startswith("localhost."):
        return fqdn
    return socket.gethostname()


def laptop_line(login_host: str, gateway: str, forwards: list[str]) -> str:
    """The laptop's command: ``ssh -N [-J GATEWAY] -L ... USER@LOGIN``."""
    jump = ["-J", gateway] if gateway else []
    return " ".join(["ssh", "-N", *jump, *forwards, f"{getpass.getuser()}@{login_host}"])


def ssh_config(node: str, job: object, login_host: str, gateway: str, alias: str = "") -> str:
    """An ssh_config ``Host`` stanza for ``node``, through the login host (and the gateway)."""
    user = getpass.getuser()
    jump = ",".join([*([gateway] if gateway else []), f"{user}@{login_host}"])
    return "\n".join([
        f"# spunnel-notebook ssh-config: job {job} on {node}; valid while the job runs. Where the",
        "# site uses pam_slurm_adopt, a connection joins that job (its limits; ended with it).",
        f"Host {alias or 'spunnel-' + node}",
        f"    HostName {node}",
        f"    User {user}",
        f"    ProxyJump {jump}",
    ])  # fmt: skip
