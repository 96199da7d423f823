"""Small readiness probes: an HTTP status over TCP or a Unix socket, port checks, backoff.

Standard library only: the launcher uses it on the node.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Awaitable, Callable

from .errors import UsageError


async def http_status(
    path: str,
    *,
    port: int | None = None,
    unix_socket: str | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 5.0,
) -> int:
    """GET ``path`` on 127.0.0.1:``port`` or on ``unix_socket``; return the status code.

    Raises OSError (connection refused, no such socket) or TimeoutError.
    """

    async def get() -> int:
        if unix_socket is not None:
            reader, writer = await asyncio.open_unix_connection(unix_socket)
        else:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port or 80}", "Connection: close"]
            lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
            await writer.drain()
            status_line = await reader.readline()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        parts = status_line.split()
        if len(parts) < 2 or not parts[1].isdigit():
            raise ConnectionError(f"not an HTTP answer: {status_line[:80]!r}")
        return int(parts[1])

    return await asyncio.wait_for(get(), timeout)


def port_in_use(port: int) -> bool:
    """True if 127.0.0.1:``port`` cannot be bound (checked the way ssh binds: SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def check_free(port: int, what: str) -> None:
    """UsageError unless 127.0.0.1:``port`` can be bound (``what``: the option that names it)."""
    if port_in_use(port):
        raise UsageError(
            f"local port {port} ({what}) is already in use on this host",
            "pick another port, or leave --port out to get a free one",
        )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Backoff:
    """Capped exponential delays (``first``, doubling, at most ``cap``): the one retry pacing."""

    def __init__(self, first: float = 0.05, cap: float = 2.0) -> None:
        self.first, self.cap = first, cap
        self.delay = first

    def reset(self) -> None:
        self.delay = self.first

    def next(self) -> float:
        """The delay to wait now; the following one doubles, up to ``cap``."""
        delay = self.delay
        self.delay = min(delay * 2, self.cap)
        return delay

    async def sleep(self, limit: float | None = None) -> None:
        delay = self.next()
        await asyncio.sleep(delay if limit is None else max(0.0, min(delay, limit)))


async def wait_until(
    check: Callable[[], Awaitable[bool]],
    *,
    timeout: float,
    first: float = 0.01,
    cap: float = 0.2,
) -> bool:
    """Await ``check()`` with exponential backoff until it is true or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    backoff = Backoff(first, cap)
    while True:
        if await check():
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        await backoff.sleep(remaining)
