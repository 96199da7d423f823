"""The node side of ``--shell --no-jupyter``: no Jupyter, the step only holds the allocation.

What the spunnel plugin's ``srun --pty ... --tunnel SP:EP bash`` was: the allocation, the user's
shell (a step of its own, started from the login host) and the ``--tunnel`` pairs. The launcher
says ``ready`` at once (there is nothing to wait for), serves the supervisor's commands (the
reverse tunnel's plan) and holds the step until it is stopped, like a Jupyter session's.

Standard library only, like the launcher.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from .dialback import DialBack
from .protocol import READY


async def hold_step(
    emit: Callable[..., None],
    commands: asyncio.StreamReader,
    stopping: asyncio.Event,
    dialer: DialBack,
) -> None:
    """Say ready, then serve ``commands`` until ``stopping`` is set (a signal, or the reverse
    tunnel given up); the dial-back ssh, if any, is ended before returning."""
    emit(READY, socket=str(dialer.socket))  # as "started" said (nothing listens there)
    listening: asyncio.Future[Any] = asyncio.ensure_future(dialer.listen(commands))
    try:
        await stopping.wait()
    finally:
        listening.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listening
        await dialer.cancel()
