"""Output of any line length keeps flowing, and the token stays masked across chunk boundaries."""

from __future__ import annotations

import asyncio
import glob
import io
import os
import types
from pathlib import Path

from spunnel_jupyter import process
from spunnel_jupyter.launcher import Launcher
from spunnel_jupyter.protocol import LauncherSettings

TOKEN = "f00dfeed" * 6


def _reader(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()  # the default 64 KiB limit, as for a subprocess pipe
    reader.feed_data(data)
    reader.feed_eof()
    return reader


def test_lines_of_any_length_come_through_in_order():
    data = b"short\n" + b"x" * 300_000 + b"\n" + b"y" * 400_000 + b"\nlast without newline"

    async def read() -> list[bytes]:
        return [line async for line in process.lines(_reader(data))]

    pieces = asyncio.run(read())
    assert b"".join(pieces) == data
    assert pieces[0] == b"short\n" and pieces[-1] == b"last without newline"


def test_the_launcher_masks_the_token_even_split_between_chunks(monkeypatch):
    out = io.BytesIO()
    monkeypatch.setattr("sys.stderr", types.SimpleNamespace(buffer=out))
    # The token straddles the 64 KiB read boundary, then appears in a 1 MB line and at the end.
    data = b"a" * (65536 - 10) + TOKEN.encode() + b"\n"
    data += b"b" * 1_000_000 + TOKEN.encode() + b"c" * 5 + b"\n" + TOKEN.encode()

    async def relay() -> None:
        await Launcher(LauncherSettings(token=TOKEN), asyncio.StreamReader())._relay(_reader(data))

    asyncio.run(relay())
    assert out.getvalue() == data.replace(TOKEN.encode(), b"<token>")
    assert TOKEN.encode() not in out.getvalue()


def _children() -> list[int]:
    me = str(os.getpid())
    found = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me:
            found.append(int(stat.split("/")[2]))
    return found


def test_a_cancelled_run_leaves_no_child():
    """A teardown that gives up on a slow scontrol must not leave it running unsupervised."""

    async def cancel_a_run() -> tuple[list[int], list[int]]:
        task = asyncio.ensure_future(process.run(["sleep", "30"], timeout=60))
        await asyncio.sleep(0.3)
        children = _children()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.sleep(0.2)
        return children, [p for p in children if process.alive(p, process.start_time(p))]

    children, alive = asyncio.run(cancel_a_run())
    assert children and not alive
