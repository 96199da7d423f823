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
    serverapp.web_app.settings["spunnel_watch"] = asyncio.ensure_future(_watch(serverapp, rundir))


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "spunnel_jupyter.node_extension"}]
