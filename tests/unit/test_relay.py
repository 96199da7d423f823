"""The relay in front of the tunnel: TCP_NODELAY on the URL's port, bytes both ways, port held."""

from __future__ import annotations

import asyncio
import socket

import pytest

from spunnel_jupyter.errors import UsageError
from spunnel_jupyter.relay import Relay


async def _echo_server(path):
    async def echo(reader, writer):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    return await asyncio.start_unix_server(echo, path=str(path))


def test_bytes_flow_both_ways(tmp_path):
    async def go():
        server = await _echo_server(tmp_path / "fwd")
        relay = Relay(tmp_path / "fwd")
        port = await relay.start(0)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        payload = b"x" * 1_000_000
        writer.write(payload)
        await writer.drain()
        got = await reader.readexactly(len(payload))
        writer.close()
        await relay.close()
        server.close()
        return got == payload, port

    same, port = asyncio.run(go())
    assert same and port > 0


def test_nodelay_is_set_on_accepted_connections(tmp_path, monkeypatch):
    seen = []
    real = socket.socket.setsockopt

    async def go():
        server = await _echo_server(tmp_path / "fwd")
        relay = Relay(tmp_path / "fwd")
        port = await relay.start(0)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        writer.close()
        await relay.close()
        server.close()

    def spy(self, level, name, value):
        seen.append((level, name, value))
        return real(self, level, name, value)

    monkeypatch.setattr(socket.socket, "setsockopt", spy)
    asyncio.run(go())
    assert (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1) in seen


def test_no_tunnel_yet_closes_the_client_and_keeps_listening(tmp_path):
    async def go():
        relay = Relay(tmp_path / "missing")
        port = await relay.start(0)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        closed = await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        again = await asyncio.open_connection("127.0.0.1", port)  # still listening
        again[1].close()
        await relay.close()
        return closed

    assert asyncio.run(go())


def test_port_in_use_is_a_usage_error(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(UsageError, match="already in use"):
            asyncio.run(Relay(tmp_path / "fwd").start(port))
