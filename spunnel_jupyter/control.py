"""The supervisor's control socket: how other front ends reach the process that owns a session.

Whichever front end owns the session (a terminal's ``spunnel-notebook`` or a JupyterLab server)
serves ``<state>/control.sock`` (0600 in the 0700 state directory); ``spunnel-notebook stop``,
``forward`` and the other front end send one line there (protocol.ControlRequest) and read one
line back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from .errors import SpunnelError, UsageError
from .protocol import ControlRequest, ProtocolError, parse_reply, reply

Handler = Callable[[ControlRequest], Awaitable[str]]


class ControlServer:
    """Serve control requests on ``path`` with ``handler`` (its text is the ``ok`` reply; a
    SpunnelError or ValueError it raises becomes the ``error`` reply)."""

    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        os.chmod(self.path, 0o600)  # the directory is 0700; this is belt and braces

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            try:
                answer = reply(True, await self.handler(ControlRequest.parse(line)))
            except (SpunnelError, ProtocolError, ValueError) as e:
                answer = reply(False, str(e))
            writer.write(answer)
            await writer.drain()
        except (OSError, asyncio.TimeoutError):
            pass
        finally:
            writer.close()


async def send(path: Path, request: ControlRequest, timeout: float = 30) -> str:
    """Send one request to the supervisor serving ``path``; its answer, or UsageError."""
    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 5)
    try:
        writer.write(request.line())
        await writer.drain()
        ok, text = parse_reply(await asyncio.wait_for(reader.readline(), timeout))
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    if not ok:
        raise UsageError(text or "the session's supervisor did not answer", "")
    return text
