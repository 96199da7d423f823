"""The node's own Jupyter server extension, loaded only into the Jupyter the launcher starts
(``--ServerApp.jpserver_extensions=spunnel_jupyter.node_extension=True``): it carries the
launcher's notices to the JupyterLab plugin ``spunnel-jupyter:node`` and the browser's answers
back, through files in the launcher's runtime directory ($SPUNNEL_RUNDIR; formats in protocol.py).

GET  spunnel-node/api/notice   {"end_time", "warnings", "save_seq", "now"}: the launcher's
                               notice, and this node's clock (the browser's may differ)
POST spunnel-node/api/saved    {"seq": N, "saved": [paths], "failed": [paths]}: 204

Both are authenticated like every Jupyter API. Every GET touches ``browser-polled``: the launcher
waits for a save only while a browser polled recently. The browser polls every few seconds, and
is told at once when the notice changes (a save asked for, a warning) by an event on Jupyter's
event bus (``EVENT_SCHEMA``, the socket JupyterLab keeps open anyway), so that a save is done well
within the launcher's grace, even in a background tab.

With --idle-timeout (``shutdown_no_activity_timeout``), it also works out from Jupyter's own
activity tracking when Jupyter would end itself, and keeps that in ``idle.json`` for the launcher,
which warns before it like before the time limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join
from tornado import web

from .protocol import (
    IDLE_FILE,
    NOTICE_FILE,
    POLLED_FILE,
    RUNDIR_ENV,
    SAVED_FILE,
    ProtocolError,
    empty_notice,
    saved_answer,
)
from .rundir import read_json, replace_json

EVENT_SCHEMA = "https://spunnel-jupyter.invalid/events/node-notice"
WATCH_EVERY = 0.1  # seconds between looks at the notice for a change
IDLE_EVERY = 5.0  # seconds between estimates of the idle release
MAX_BODY = 256 * 1024


def _schema() -> dict[str, Any]:
    return {
        "$id": EVENT_SCHEMA,
        "version": "1",
        "title": "spunnel-jupyter node notice changed",
        "description": "The launcher changed its notice (a warning, a save request): fetch it.",
        "type": "object",
        "properties": {"save_seq": {"type": "integer", "title": "save_seq",
                                    "description": "the notice's save request number"}},
    }  # fmt: skip


class _NodeHandler(APIHandler):
    @property
    def rundir(self) -> Path | None:
        return self.settings.get("spunnel_rundir")  # type: ignore[no-any-return]


class NoticeHandler(_NodeHandler):
    @web.authenticated
    async def get(self) -> None:
        notice = empty_notice()
        if self.rundir is not None:
            with contextlib.suppress(OSError):
                (self.rundir / POLLED_FILE).touch()
            data = read_json(self.rundir / NOTICE_FILE)
            if isinstance(data, dict):
                notice.update({k: data[k] for k in notice if k in data})
        self.finish(json.dumps({**notice, "now": time.time()}))


class SavedHandler(_NodeHandler):
    @web.authenticated
    async def post(self) -> None:
        if len(self.request.body or b"") > MAX_BODY:
            raise web.HTTPError(413, f"the body is over {MAX_BODY} bytes")
        try:
            answer = saved_answer(json.loads(self.request.body or b"null"))
        except (ValueError, ProtocolError) as e:
            raise web.HTTPError(400, str(e)) from None
        if self.rundir is None:
            raise web.HTTPError(404, "not a spunnel session's Jupyter")
        replace_json(self.rundir / SAVED_FILE, answer)
        self.set_status(204)
        self.finish()


async def _watch(serverapp: Any, rundir: Path) -> None:
    """Tell the browsers (Jupyter's event bus) as soon as the launcher changes its notice."""
    path, seen = rundir / NOTICE_FILE, None
    while True:
        with contextlib.suppress(OSError):
            stat = path.stat()
            mark = (stat.st_mtime_ns, stat.st_ino, stat.st_size)
            if seen is not None and mark != seen:
                data = read_json(path)
                seq = data.get("save_seq", 0) if isinstance(data, dict) else 0
                serverapp.event_logger.emit(schema_id=EVENT_SCHEMA, data={"save_seq": seq})
            seen = mark
        await asyncio.sleep(WATCH_EVERY)


def idle_release_at(serverapp: Any) -> float | None:
    """When Jupyter's idle release would end this server (epoch), or None: never, or not while
    a kernel is busy or connected (spared by the culling settings the launcher gives).

    An idle kernel is culled ``cull_idle_timeout`` after its last activity, and the culling
    itself counts as activity; a terminal likewise. The server then ends once nothing happened
    for ``shutdown_no_activity_timeout``. Jupyter checks every 30-60 s: the release comes up to a
    minute later than this, never earlier."""
    timeout = float(serverapp.shutdown_no_activity_timeout or 0)
    if timeout <= 0:
        return None
    km = serverapp.kernel_manager
    ends = [serverapp.web_app.last_activity().timestamp() + timeout]
    for kid in list(km.list_kernel_ids()):
        kernel = km.get_kernel(kid)
        busy = getattr(kernel, "execution_state", "") == "busy" and not km.cull_busy
        if busy or (km._kernel_connections.get(kid, 0) and not km.cull_connected):
            return None
        if hasattr(kernel, "last_activity"):
            ends.append(kernel.last_activity.timestamp() + km.cull_idle_timeout + timeout)
    terminals = serverapp.web_app.settings.get("terminal_manager")
    for term in getattr(terminals, "terminals", {}).values():
        if hasattr(term, "last_activity"):
            ends.append(term.last_activity.timestamp() + terminals.cull_inactive_timeout + timeout)
    return max(ends)


async def _watch_idle(serverapp: Any, rundir: Path) -> None:
    """Keep ``idle.json`` up to date (written only when the estimate changes)."""
    written: object = ()
    while True:
        try:
            release_at = idle_release_at(serverapp)
        except Exception as e:  # Jupyter's internals moved: no warning, the release still works
            serverapp.log.warning("spunnel_jupyter.node_extension: idle estimate: %r", e)
            return
        value = None if release_at is None else round(release_at)
        if value != written:
            with contextlib.suppress(OSError):
                replace_json(rundir / IDLE_FILE, {"release_at": value})
                written = value
        await asyncio.sleep(IDLE_EVERY)


def _load_jupyter_server_extension(serverapp: Any) -> None:
    rundir = os.environ.get(RUNDIR_ENV)
    web_app = serverapp.web_app
    web_app.settings["spunnel_rundir"] = Path(rundir) if rundir else None
    base = url_path_join(web_app.settings["base_url"], "spunnel-node", "api")
    web_app.add_handlers(".*$", [
        (url_path_join(base, "notice"), NoticeHandler),
        (url_path_join(base, "saved"), SavedHandler),
    ])  # fmt: skip
    serverapp.event_logger.register_event_schema(_schema())
    if rundir:
        serverapp.io_loop.add_callback(_start_watch, serverapp, Path(rundir))
    serverapp.log.info("spunnel_jupyter.node_extension: notices from %s", rundir or "nowhere")


def _start_watch(serverapp: Any, rundir: Path) -> None:
    watches = [asyncio.ensure_future(_watch(serverapp, rundir))]
    if serverapp.shutdown_no_activity_timeout:
        watches.append(asyncio.ensure_future(_watch_idle(serverapp, rundir)))
    serverapp.web_app.settings["spunnel_watch"] = watches


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "spunnel_jupyter.node_extension"}]
