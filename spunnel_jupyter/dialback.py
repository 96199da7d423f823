"""Reverse mode, on the node: keep ``ssh -R`` to the login host up, inside the job.

The supervisor sends a plan (``protocol.reverse_command``) over the step's stdin; ``DialBack``
runs it until cancelled, rebuilding it with capped exponential backoff when it dies, and gives up
(``on_failure``) if that fails for longer than the plan's ``reconnect_timeout``. Used by the
launcher (the session's own step) and by a follower (an attached login host's step).

Standard library only, like the launcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import probes, process
from .protocol import NodeEvent


def fill(value: Any, **names: str) -> Any:
    """Replace ``{name}`` placeholders in every string of a JSON-like value."""
    if isinstance(value, str):
        for name, text in names.items():
            value = value.replace("{" + name + "}", text)
        return value
    if isinstance(value, list):
        return [fill(v, **names) for v in value]
    if isinstance(value, dict):
        return {k: fill(v, **names) for k, v in value.items()}
    return value


class DialBack:
    """Listens for the supervisor's ``reverse`` command and keeps that tunnel up."""

    def __init__(
        self,
        emit: Callable[[NodeEvent], None],
        on_failure: Callable[[str], None],
        socket: Path,
        ctl: Path,
    ) -> None:
        self.emit, self.on_failure = emit, on_failure
        self.socket, self.ctl = socket, ctl
        self.task: asyncio.Future[None] | None = None

    async def listen(self, commands: asyncio.StreamReader) -> None:
        """Commands from the supervisor, one JSON object per line."""
        async for line in commands:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                command = json.loads(line)
                if command["cmd"] == "reverse" and self.task is None:
                    plan = fill(command["plan"], socket=str(self.socket), ctl=str(self.ctl))
                    self.task = asyncio.ensure_future(self._dial_back(plan))

    async def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    def _tunnel(self, **fields: Any) -> None:
        self.emit(NodeEvent("tunnel", {**fields, "mode": "reverse"}))

    async def _dial_back(self, plan: dict[str, Any]) -> None:
        ctl = Path(plan["check"][plan["check"].index("-S") + 1])
        lost_since: float | None = None
        backoff = probes.Backoff()
        while True:
            with contextlib.suppress(FileNotFoundError):
                ctl.unlink()
            ssh = await asyncio.create_subprocess_exec(
                *plan["argv"], stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            try:
                up = await self._wait_master(ssh, plan, ctl)
                if up:
                    self._tunnel(state="up", host=plan["argv"][-1])
                    lost_since = None
                    backoff.reset()
                    await ssh.wait()
                else:
                    await process.stop(ssh, grace=0.5)
            except asyncio.CancelledError:
                await process.stop(ssh, grace=0.5)
                raise
            err = (await ssh.stderr.read()).decode(errors="replace").strip() if ssh.stderr else ""
            now = asyncio.get_running_loop().time()
            if lost_since is None:
                lost_since = now
                self._tunnel(state="lost", message=err[-300:])
            if now - lost_since > float(plan["reconnect_timeout"]):
                self.on_failure(
                    f"the reverse tunnel to {plan['argv'][-1]} could not be (re-)established "
                    f"within {float(plan['reconnect_timeout']):g} s: {err[-300:] or 'no answer'}"
                )
                return
            await backoff.sleep()

    async def _wait_master(
        self, ssh: asyncio.subprocess.Process, plan: dict[str, Any], ctl: Path
    ) -> bool:
        async def checked() -> bool:
            if ssh.returncode is not None:
                return True  # stop waiting: it died
            if not ctl.exists():
                return False
            check = await asyncio.create_subprocess_exec(
                *plan["check"], stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            return await check.wait() == 0

        await probes.wait_until(checked, timeout=float(plan["connect_timeout"]), cap=0.1)
        return ssh.returncode is None and ctl.exists()
