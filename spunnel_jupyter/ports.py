"""A session's login-side ports, each answering only its owner, held for the whole session.

Every port a user can reach on the login host (the URL's, each ``--tunnel`` pair, each runtime
``forward``) is an owner-only relay (relay.py) in front of a Unix socket in the 0700 state
directory. Whatever carries the bytes to the node serves those sockets: ssh's ``-L`` in forward
mode, the login sshd's ``-R`` in reverse mode. So the ports stay bound, and ours, across ssh
reconnects and the auto mode's fallback, and no other user of the host can reach Jupyter or a
forwarded server on the node. A session without Jupyter (``--no-jupyter``) has no URL: its
``port`` is 0, and only the pairs are bound and forwarded.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import Callable
from typing import IO

from .errors import TunnelError, UsageError
from .machine import Event, Failed
from .peers import OwnerCheckUnavailable
from .relay import Relay
from .state import TUNNEL_SOCKET, StateDir
from .tunnel import PortPair


class Ports:
    def __init__(
        self, state: StateDir, port: int, log: IO[bytes], post: Callable[[Event], object]
    ) -> None:
        self.state = state
        self.port = port  # the URL's; 0: no Jupyter, no URL
        self.log = log
        self.post = post  # called on a relay's thread: must be thread-safe
        self.relays: dict[int, Relay] = {}

    def jupyter_socket(self) -> str:
        return str(self.state.file(TUNNEL_SOCKET))

    def pair_socket(self, pair: PortPair) -> str:
        return str(self.state.file(f"port-{pair.local}.sock"))

    def forwards(self, node_socket: str, pairs: list[PortPair]) -> list[str]:
        """The ssh forward specs, the same for ``-L`` (forward) and ``-R`` (reverse): each of our
        sockets -> Jupyter's socket on the node, or a port on the node's own loopback."""
        jupyter = [f"{self.jupyter_socket()}:{node_socket}"] if self.port else []
        return [*jupyter, *(self.pair_forward(p) for p in pairs)]

    def pair_forward(self, pair: PortPair) -> str:
        return f"{self.pair_socket(pair)}:localhost:{pair.remote}"

    def bind(self, pairs: list[PortPair]) -> None:
        """The URL's port and every pair's, before anything is submitted (UsageError)."""
        if self.port:
            self._bind(self.port, self.jupyter_socket(), "--port")
        for pair in pairs:
            self.add(pair, "--tunnel")

    def add(self, pair: PortPair, what: str = "forward") -> None:
        self._bind(pair.local, self.pair_socket(pair), what)

    def remove(self, pair: PortPair) -> None:
        relay = self.relays.pop(pair.local, None)
        if relay is not None:
            relay.close()
        self.state.remove(os.path.basename(self.pair_socket(pair)))

    def _bind(self, port: int, target: str, what: str) -> None:
        def refused(uid: int | None) -> None:
            who = f"uid {uid}" if uid is not None else "a user the kernel could not name"
            self.log.write(f"spunnel: refused a connection to port {port} from {who}\n".encode())

        def died(exc: BaseException) -> None:
            what = f"the listener on port {port} stopped ({exc!r})"
            self.post(Failed(TunnelError(what, "start a new session; the port no longer answers")))

        try:
            relay = Relay(port, target, on_refused=refused, on_death=died)
        except OwnerCheckUnavailable as e:
            raise TunnelError(
                f"this host's kernel does not tell who connects to a port ({e.strerror}), so "
                f"port {port} cannot be kept to you",
                "tell your administrators: spunnel-notebook needs NETLINK_SOCK_DIAG "
                "(ss -e uses it too); nothing was submitted",
            ) from e
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UsageError(
                    f"local port {port} ({what}) is already in use on this host",
                    "pick another port, or leave --port out to get a free one",
                ) from e
            raise UsageError(
                f"local port {port} ({what}) cannot be bound on this host: {e.strerror}",
                "pick another port",
            ) from e
        self.relays[port] = relay

    def clear_stale(self) -> None:
        """Remove the sockets nobody serves any more (a dead ssh's), so that the next ssh or
        sshd can bind them; a socket that still accepts is left alone."""
        for relay in self.relays.values():
            with socket.socket(socket.AF_UNIX) as probe:
                try:
                    probe.connect(relay.target)
                except ConnectionRefusedError:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(relay.target)
                except OSError:
                    pass

    def unserved(self) -> list[int]:
        """The pairs' login ports whose socket nobody serves yet (ssh's -L or sshd's -R binds
        it once the forward is up)."""
        return [
            port for port, relay in self.relays.items()
            if port != self.port and not os.path.exists(relay.target)
        ]  # fmt: skip

    def refused(self) -> int:
        return sum(relay.refused for relay in self.relays.values())

    def close(self) -> None:
        """Free the ports and remove their sockets."""
        for relay in self.relays.values():
            relay.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(relay.target)
        self.relays.clear()
