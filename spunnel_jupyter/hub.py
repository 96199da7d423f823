"""The server extension's view of sessions: the shared ``SpunnelManager`` adapted to a long-running
Jupyter server.

``SessionHub`` starts sessions owned by this server (``owner="jupyterlab"``), shows and stops any
session of this user on this host whichever front end started it (through the same state directory
and control socket), and wakes event streams when something changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from .errors import NoSession, UsageError
from .fields import refuse_terminal_only
from .manager import SpunnelManager
from .protocol import public_view
from .session import Session


class SessionHub:
    """One per server process: the current session (ours or another front end's) and its changes."""

    def __init__(self, manager: SpunnelManager) -> None:
        self.manager = manager
        self.session: Session | None = None  # the one this server owns, while it runs
        self.changed = asyncio.Event()
        self._watcher: asyncio.Future[None] | None = None

    def current(self) -> dict[str, Any] | None:
        """The live session's public view, or None."""
        if self.session is not None and self.session.outcome is None:
            return public_view(self.session.record(with_secrets=True).to_json())
        return public_view(self.manager.status())

    def last(self) -> dict[str, Any] | None:
        return public_view(self.manager.last_ended())

    def _notify(self, _session: Session | None = None) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    async def detached(self) -> list[dict[str, Any]]:
        """This user's detached sessions (from any login host) other than this host's own."""
        here = (self.current() or {}).get("job_id")
        return [j.to_json() for j in await self.manager.detached() if j.job_id != here]

    async def start(self, body: dict[str, Any]) -> dict[str, Any]:
        """Start a session from the form's ``body``; ``{"attach": JOBID}`` attaches this server
        to that detached session instead (a tunnel on this host; its job is not ours to end
        unless stopped)."""
        body = dict(body)
        attach = body.pop("attach", None)
        if attach is not None and (isinstance(attach, bool) or not isinstance(attach, int)):
            raise UsageError("attach must be a job id (a number)", "see spunnel/api/detached")
        refuse_terminal_only(body, "the REST API or the JupyterLab panel")
        req = self.manager.request(body)
        kind = "foreground" if attach is None else "attached"
        session = await self.manager.start(
            req, self._notify, owner="jupyterlab", kind=kind, job_id=attach
        )
        self.session = session
        self._watcher = asyncio.ensure_future(self._forget_when_ended(session))
        self._notify()
        view = self.current()
        assert view is not None
        return view

    async def _forget_when_ended(self, session: Session) -> None:
        await session.wait()
        if self.session is session:
            self.session = None
        self._notify()

    async def stop(self, detach: bool = False) -> None:
        """End the current session, whoever owns it (``detach``: only this server's tunnel to
        a detached session); return once it is torn down."""
        if self.session is not None and self.session.outcome is None:
            if detach:
                self.session.request_stop("detached from JupyterLab")
            else:
                self.session.request_stop("stopped from JupyterLab", ends_job=True)
            await self.session.wait()
        elif self.manager.status() is not None:
            await self.manager.stop_running()
        else:
            raise NoSession("no session is running on this host", "start one first")
        self._notify()

    async def shutdown(self) -> None:
        if self.session is not None and self.session.outcome is None:
            self.session.request_stop("the JupyterLab server stopped")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.session.wait(), 4 * self.manager.stop_timeout)

    async def changes(
        self, gone: Callable[[], bool], poll: float = 0.25, keepalive: float = 15.0
    ) -> AsyncIterator[tuple[bool, dict[str, Any] | None]]:
        """``(True, view)`` whenever the view changes (ours: at once; others': polled file), and
        ``(False, None)`` after ``keepalive`` seconds without one; ends once ``gone()``.

        A session owned by another process rewrites its record on every change; we read the local
        file four times a second, which costs little and never touches the Slurm controller.
        """
        last: Any = object()
        quiet_since = time.monotonic()
        while not gone():
            view = self.current() or self.last()
            key = {k: v for k, v in (view or {}).items() if k != "time_left"}
            if key != last:
                last, quiet_since = key, time.monotonic()
                yield True, view
            elif time.monotonic() - quiet_since >= keepalive:
                quiet_since = time.monotonic()
                yield False, None
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.changed.wait(), poll)
