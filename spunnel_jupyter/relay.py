"""The URL's port: 127.0.0.1:PORT on the login host, relayed to the tunnel's local Unix socket.

Why not let ssh listen on the port (``-L 127.0.0.1:PORT:<node socket>``)? OpenSSH leaves Nagle's
algorithm on for accepted connections whose target is a Unix socket, and every kernel reply then
waits ~40 ms for a delayed ACK: 48 ms per cell execution instead of 5-7 ms. So ssh forwards Unix
socket to Unix socket (``-L <state>/jupyter.fwd:<node socket>``, or ``-R`` in reverse mode) and this
relay owns the TCP port, with TCP_NODELAY on every connection. It also holds the port for the whole
session, so the URL stays valid while a lost tunnel is rebuilt.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path

from .errors import UsageError

CHUNK = 256 * 1024


class Relay:
    def __init__(self, target: Path) -> None:
        self.target = target
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self, port: int) -> int:
        """Listen on 127.0.0.1:``port`` (0: a free one); return the port."""
        try:
            self._server = await asyncio.start_server(self._accept, "127.0.0.1", port)
        except OSError as e:
            raise UsageError(
                f"local port {port} is already in use on this host ({e.strerror})",
                "pick another port, or leave --port out to get a free one",
            ) from e
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.wait(self._connections, timeout=1)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                far_reader, far_writer = await asyncio.open_unix_connection(str(self.target))
            except OSError:
                return  # the tunnel is (re)connecting: the client sees a closed connection
            await asyncio.gather(
                _pump(reader, far_writer), _pump(far_reader, writer), return_exceptions=True
            )
        finally:
            writer.close()
            self._connections.discard(task)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            if writer.can_write_eof():
                writer.write_eof()
