"""The ssh ControlMaster that carries the notebook (and extra port pairs) to the login host.

The master runs in the foreground under our supervision (never ``-f``): its exit is how we learn the
tunnel is gone. ``-O check`` plus a real HTTP request say it is ready; ``-O exit`` closes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import time
from asyncio.subprocess import PIPE
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from traitlets import Enum, Float, Int, List, Unicode, default
from traitlets.config import LoggingConfigurable

from . import probes, process
from .errors import TunnelError, UsageError

_MIN_PORT = 1024  # privileged ports need root on the login host; refuse them up front


@dataclass(frozen=True)
class PortPair:
    """``local`` on the login host (127.0.0.1) forwards to ``remote`` on the node's loopback."""

    local: int
    remote: int

    def __str__(self) -> str:
        return f"{self.local}:{self.remote}"


def check_port(port: int, what: str) -> int:
    if not _MIN_PORT <= port <= 65535:
        raise UsageError(
            f"{what} {port} is out of range",
            f"use a port from {_MIN_PORT} to 65535; lower ones are privileged",
        )
    return port


MAX_PAIRS = 64
_PAIR = re.compile(r"\s*([0-9]{1,5}):([0-9]{1,5})\s*")


def parse_port_pairs(text: str) -> list[PortPair]:
    """Parse spunnel's ``SP:EP[,SP:EP...]`` (submit-host port : exec-host port), at most
    ``MAX_PAIRS``, in one pass."""
    items = text.split(",", MAX_PAIRS)
    if len(items) > MAX_PAIRS:
        raise UsageError(f"more than {MAX_PAIRS} --tunnel pairs", "forward fewer ports at once")
    pairs: list[PortPair] = []
    locals_: set[int] = set()
    for item in items:
        m = _PAIR.fullmatch(item)
        if not m:
            raise UsageError(
                f"malformed --tunnel pair {item.strip()[:40]!r}",
                "write LOGINPORT:NODEPORT[,...], e.g. --tunnel 8001:8000,8889:8888",
            )
        pair = PortPair(check_port(int(m[1]), "port"), check_port(int(m[2]), "port"))
        if pair.local in locals_:
            raise UsageError(
                f"login-side port {pair.local} appears twice in --tunnel",
                "give each pair its own login-side port",
            )
        pairs.append(pair)
        locals_.add(pair.local)
    return pairs


class SshTunnel(LoggingConfigurable):
    """How to run ssh between the login host and the node. One instance serves every session.

    Forward mode: the login host runs ``ssh -N -M -L <state>/tunnel.sock:<socket> node``,
    behind the session's relay on 127.0.0.1:PORT (relay.py says why). Reverse mode: the launcher
    on the node runs ``ssh -N -M -R 127.0.0.1:PORT:<socket> login-host`` inside the job, so the
    node needs no sshd (the argv is built here and sent to it over srun's stdin).
    """

    mode = Enum(
        ["auto", "forward", "reverse"],
        "auto",
        config=True,
        help="""forward: ssh from the login host to the node. reverse: the node dials back to the
        login host (for clusters whose nodes refuse inbound ssh). auto: forward, falling back to
        reverse once when ssh to the node is refused.""",
    )
    reverse_host = Unicode(
        config=True,
        help="""This login host's name or address as the compute nodes reach it (reverse mode).
        Default: this host's name.""",
    )
    ssh_command = List(
        Unicode(),
        ["ssh"],
        config=True,
        help="The ssh client command (argv list). Options are added after it.",
    )
    ssh_options = List(
        Unicode(),
        [],
        config=True,
        help="""Extra ssh options placed before the host, e.g. ["-o", "ProxyJump=gw"].
        BatchMode, ExitOnForwardFailure and the ControlMaster options are always set.""",
    )
    server_alive_interval = Int(
        15,
        config=True,
        help="Seconds between ssh keep-alives; after 3 unanswered the tunnel counts as lost.",
    )
    reconnect_timeout = Float(
        60.0,
        config=True,
        help="""If the tunnel's ssh dies while the job still runs, keep re-establishing it (same
        port, same URL; capped exponential backoff) for up to this many seconds, then end the
        session. 0 disables reconnecting: a lost tunnel ends the session at once.""",
    )
    connect_timeout = Float(
        20.0,
        config=True,
        help="Seconds to wait for the tunnel to be up (ssh connected and forwards bound).",
    )
    adopt_retry_timeout = Float(
        15.0,
        config=True,
        help="""pam_slurm_adopt refuses ssh to a node for a moment after the job starts: retry
        that refusal (short backoff) for up to this many seconds before giving up.""",
    )

    @default("reverse_host")
    def _reverse_host_default(self) -> str:
        return socket.gethostname()

    def argv(
        self, host: str, control_path: Path | str, forwards: Sequence[str], flag: str = "-L"
    ) -> list[str]:
        return [
            *self.ssh_command,
            "-N",
            "-M",
            "-S",
            str(control_path),
            "-o",
            "ControlPersist=no",
            "-o",
            "BatchMode=yes",
            "-o",
            "ExitOnForwardFailure=yes",
            "-o",
            f"ConnectTimeout={max(1, int(self.connect_timeout))}",
            "-o",
            f"ServerAliveInterval={self.server_alive_interval}",
            "-o",
            "ServerAliveCountMax=3",
            "-o",
            "StreamLocalBindUnlink=yes",  # a dead master's -L socket must not block the next
            # AES-GCM first: hardware-accelerated, ~1.5x chacha20's throughput for downloads.
            "-o",
            "Ciphers=aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com",
            *[arg for spec in forwards for arg in (flag, spec)],
            *self.ssh_options,
            "--",
            host,
        ]

    def control(self, host: str, control_path: Path | str, op: str) -> list[str]:
        return [*self.ssh_command, "-S", str(control_path), "-O", op, *self.ssh_options, host]

    def reverse_plan(self, forwards: Sequence[str]) -> dict[str, object]:
        """What the launcher needs to dial back with these ``-R`` forwards: argvs with
        ``{socket}``/``{ctl}`` for it to fill in."""
        host = self.reverse_host
        return {
            "argv": self.argv(host, "{ctl}", forwards, flag="-R"),
            "check": self.control(host, "{ctl}", "check"),
            "exit": self.control(host, "{ctl}", "exit"),
            "connect_timeout": self.connect_timeout,
            "reconnect_timeout": self.reconnect_timeout,
        }

    async def open(
        self, host: str, control_path: Path, forwards: Sequence[str], log: IO[bytes]
    ) -> Tunnel:
        """Start the master; return once ``-O check`` succeeds. Raises TunnelError.

        A pam_slurm_adopt refusal right after the job started is retried with short backoff.
        """
        deadline = time.monotonic() + self.adopt_retry_timeout
        backoff = probes.Backoff(first=0.2)
        while True:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(control_path)  # a leftover socket would make -M fail
            try:
                proc = await process.spawn(
                    self.argv(host, control_path, forwards), stdout=log, stderr=PIPE
                )
            except FileNotFoundError as e:
                raise TunnelError(f"{self.ssh_command[0]!r} not found", "install OpenSSH") from e
            tunnel = Tunnel(self, host, control_path, proc, log)
            try:
                await tunnel.wait_ready(self.connect_timeout)
                await tunnel.set_nodelay()
                return tunnel
            except asyncio.CancelledError:
                await tunnel.close(grace=0.5)  # never leave a master nobody owns
                raise
            except TunnelError:
                adopting = "pam_slurm_adopt" in " ".join(tunnel.said)
                if not adopting or time.monotonic() + backoff.delay > deadline:
                    raise
            log.write(b"spunnel: pam_slurm_adopt refused ssh (job just started?); retrying\n")
            await backoff.sleep()


class Tunnel:
    """One running ControlMaster; owned by the session that opened it."""

    def __init__(
        self,
        config: SshTunnel,
        host: str,
        control_path: Path,
        proc: asyncio.subprocess.Process,
        log: IO[bytes],
    ) -> None:
        self.config = config
        self.host = host
        self.control_path = control_path
        self.proc = proc
        self.started = process.start_time(proc.pid)  # with the pid, names this very process
        self.log = log
        self.said: deque[str] = deque(maxlen=20)  # ssh's last words, for error messages
        self._stderr = asyncio.ensure_future(self._read_stderr())

    async def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        async for raw in process.lines(self.proc.stderr):
            self.log.write(raw)
            self.said.append(raw.decode(errors="replace").strip())

    async def check(self) -> bool:
        if not self.control_path.exists():
            return False
        result = await process.run(
            self.config.control(self.host, self.control_path, "check"), timeout=5
        )
        return result.returncode == 0

    async def wait_ready(self, timeout: float) -> None:
        exited = asyncio.ensure_future(self.proc.wait())
        # check() is a stat until the control socket exists: poll it tightly.
        ready = asyncio.ensure_future(probes.wait_until(self.check, timeout=timeout, cap=0.02))
        try:
            await asyncio.wait({exited, ready}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
            exited.cancel()
        if self.proc.returncode is not None:
            await asyncio.wait({self._stderr}, timeout=1)
            why = next((line for line in reversed(self.said) if line), "")
            raise TunnelError(
                f"ssh to {self.host} failed (exit {self.proc.returncode}"
                + (f": {why})" if why else ")"),
                f"check that you can `ssh {self.host}` without a password; see the session log",
            )
        if not ready.result():
            await self.close()
            raise TunnelError(
                f"the ssh tunnel to {self.host} was not up within {timeout:g} s",
                "check ssh to the node; raise c.SshTunnel.connect_timeout if it is slow",
            )

    async def set_nodelay(self) -> None:
        """Run one short command (``true``) through the master, so that sshd sets TCP_NODELAY.

        sshd sets it when a session runs a command, which a ``-N`` master never does. Without it
        sshd holds back each small write (a kernel's reply frames) until the login side's delayed
        ACK comes, about 40 ms. Best effort: a site whose sshd refuses commands still gets a
        working, if slower, tunnel.
        """
        argv = [*self.config.ssh_command, "-S", str(self.control_path), "-T"]
        argv += ["-o", "ControlMaster=no", "-o", "BatchMode=yes"]
        argv += [*self.config.ssh_options, "--", self.host, "true"]
        try:
            result = await process.run(argv, timeout=5)
        except (OSError, TimeoutError) as e:
            result = process.Result(-1, "", str(e))
        if result.returncode != 0:
            self.log.write(
                b"spunnel: no command ran on the node (" + result.stderr.strip().encode()
                + b"); sshd keeps Nagle on: small messages may wait ~40 ms\n"
            )  # fmt: skip

    async def forward(self, spec: str, cancel: bool = False) -> None:
        """Add (``-O forward``) or remove (``-O cancel``) a -L forward on the running master."""
        op = "cancel" if cancel else "forward"
        argv = self.config.control(self.host, self.control_path, op)
        argv[-1:-1] = ["-L", spec]
        result = await process.run(argv, timeout=10)
        if result.returncode != 0:
            raise TunnelError(
                f"ssh could not {'cancel' if cancel else 'add'} the forward {spec}: "
                f"{result.stderr.strip() or result.returncode}",
                "check the ports",
            )

    async def close(self, grace: float = 1.0) -> None:
        """Close the master (``-O exit``, then signals) and remove its socket."""
        if self.proc.returncode is None and self.control_path.exists():
            with contextlib.suppress(OSError, TimeoutError):
                await process.run(
                    self.config.control(self.host, self.control_path, "exit"), timeout=grace
                )
        await process.stop(self.proc, grace=grace)
        self._stderr.cancel()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.control_path)
