"""The Jupyter server extension: the same sessions as ``spunnel-notebook``, driven from JupyterLab.

``SessionHub`` adapts the shared ``SpunnelManager`` to a long-running server: it starts sessions
owned by this server (``owner="jupyterlab"``), shows and stops any session of this user on this host
whichever front end started it (through the same state directory and control socket), and wakes
event streams when something changes.

Sessions started here are torn down when this Jupyter server stops, by the same rules as a Ctrl-C in
the terminal: a session is owned by exactly one supervisor, and one that outlived its server would
keep an allocation running with nobody able to see its URL in JupyterLab.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from jupyter_server.extension.application import ExtensionApp

from .errors import NoSession, UsageError
from .manager import SpunnelManager
from .session import Session
from .tunnel import parse_port_pairs

# What a POST may set, and the type each field must have.
_FIELDS: dict[str, type] = {
    "partition": str,
    "mem": str,
    "time": str,
    "cpus_per_task": int,
    "gpus": str,
    "gres": str,
    "account": str,
    "qos": str,
    "constraint": str,
    "reservation": str,
    "tunnels": str,
    "ui": str,
    "tunnel_mode": str,
}


def public_view(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """A record as the REST API shows it: no bare token or pids, with derived durations."""
    if record is None:
        return None
    view = {k: v for k, v in record.items() if k != "token" and not k.endswith(("_pid", "_start"))}
    times = record.get("times", {})
    steps = [("queued", "submitted", "running"), ("starting", "running", "ready")]
    view["durations"] = {
        name: round(times[b] - times[a], 3) for name, a, b in steps if a in times and b in times
    }
    end = record.get("end_time")
    view["time_left"] = max(0.0, end - time.time()) if end else None
    return view


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
            return public_view(self.session.snapshot(with_secrets=True))
        return public_view(self.manager.status())

    def last(self) -> dict[str, Any] | None:
        return public_view(self.manager.last_ended())

    def _notify(self, _session: Session | None = None) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    async def start(self, body: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(body) - set(_FIELDS))
        if unknown:
            raise UsageError(f"unknown field(s): {', '.join(unknown)}", f"use {', '.join(_FIELDS)}")
        for name, value in body.items():
            if value is not None and not isinstance(value, _FIELDS[name]):
                raise UsageError(f"{name} must be a {_FIELDS[name].__name__}", "fix the request")
        options = {k: v for k, v in body.items() if v not in (None, "")}
        tunnels = parse_port_pairs(options.pop("tunnels")) if "tunnels" in options else []
        req = self.manager.request(tunnels=tunnels, **options)
        session = await self.manager.start(req, self._notify, owner="jupyterlab")
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

    async def stop(self) -> None:
        """End the current session, whoever owns it; return once it is torn down."""
        if self.session is not None and self.session.outcome is None:
            self.session.request_stop("stopped from JupyterLab")
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

    async def changes(self, poll: float = 0.25) -> Any:
        """Yield the current view whenever it changes (ours: at once; others': polled file).

        A session owned by another process rewrites its record on every change; we stat the local
        file four times a second, which costs nothing and never touches the Slurm controller.
        """
        last: Any = object()
        while True:
            view = self.current() or self.last()
            key = {k: v for k, v in (view or {}).items() if k != "time_left"}
            if key != last:
                last = key
                yield view
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.changed.wait(), poll)


class SpunnelExtension(ExtensionApp):
    """Start, watch, open and stop a compute-node notebook from JupyterLab."""

    name = "spunnel_jupyter"  # config file: jupyter_spunnel_jupyter_config.{json,py}
    load_other_extensions = True

    def initialize_settings(self) -> None:
        manager = SpunnelManager(parent=self, log=self.log)
        self.hub = SessionHub(manager)
        self.settings["spunnel_hub"] = self.hub

    def initialize_handlers(self) -> None:
        from .handlers import handlers

        self.handlers.extend(handlers())

    async def stop_extension(self) -> None:
        await self.hub.shutdown()
