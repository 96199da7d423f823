"""REST API of the server extension: thin handlers over ``SessionHub``. Every verb authenticated.

GET    spunnel/api/config           site defaults and the cluster's partitions (for the form)
GET    spunnel/api/session          the session (404 when none; "last" says how the last ended)
POST   spunnel/api/session          start one: 201; 400 bad input; 409 one runs; 503 no Slurm
                                    ({"attach": JOBID}: a tunnel here to a detached session)
DELETE spunnel/api/session          stop it: 204 once torn down (?detach=1: only this server's
                                    tunnel to a detached session; its job runs on)
GET    spunnel/api/session/events   text/event-stream of the session view on every change
GET    spunnel/api/detached         the user's detached sessions, from any login host
"""

from __future__ import annotations

import json
from typing import Any

from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join
from tornado import web
from tornado.iostream import StreamClosedError

from .errors import SpunnelError, UsageError
from .fields import json_schema
from .hub import SessionHub

KEEPALIVE = 15.0  # seconds between SSE comments, so proxies keep the stream open
MAX_BODY = 16 * 1024  # a start request is a few hundred bytes


class SpunnelHandler(APIHandler):
    @property
    def hub(self) -> SessionHub:
        return self.settings["spunnel_hub"]  # type: ignore[no-any-return]

    def fail(self, err: SpunnelError) -> None:
        self.set_status(err.http_status)
        self.finish(json.dumps(err.to_json()))


class ConfigHandler(SpunnelHandler):
    @web.authenticated
    async def get(self) -> None:
        manager = self.hub.manager
        try:
            partitions = await manager.partitions()
        except SpunnelError as e:
            self.fail(e)
            return
        defaults = manager.defaults()
        schema = json_schema(defaults, [p.name for p in partitions])
        body = {"defaults": defaults, "partitions": [p.to_json() for p in partitions],
                "warn_before": list(manager.warn_before)}  # fmt: skip
        self.finish(json.dumps({**body, "schema": schema}))


class SessionHandler(SpunnelHandler):
    @web.authenticated
    async def get(self) -> None:
        view = self.hub.current()
        if view is None:
            self.set_status(404)
            self.finish(json.dumps({"message": "no session", "last": self.hub.last()}))
            return
        self.finish(json.dumps(view))

    @web.authenticated
    async def post(self) -> None:
        if len(self.request.body or b"") > MAX_BODY:
            self.set_status(413)
            too_big = UsageError(f"the body is over {MAX_BODY} bytes", "send the form only")
            self.finish(json.dumps(too_big.to_json()))
            return
        try:
            body: Any = json.loads(self.request.body or b"{}")
            if not isinstance(body, dict):
                raise ValueError
        except ValueError:
            self.fail(UsageError("the body must be a JSON object", "send application/json"))
            return
        try:
            view = await self.hub.start(body)
        except SpunnelError as e:
            self.fail(e)
            return
        self.set_status(201)
        self.set_header("Location", url_path_join(self.base_url, "spunnel/api/session"))
        self.finish(json.dumps(view))

    @web.authenticated
    async def delete(self) -> None:
        try:
            await self.hub.stop(detach=self.get_argument("detach", "") == "1")
        except SpunnelError as e:
            self.fail(e)
            return
        self.set_status(204)
        self.finish()


class DetachedHandler(SpunnelHandler):
    @web.authenticated
    async def get(self) -> None:
        try:
            sessions = await self.hub.detached()
        except SpunnelError as e:
            self.fail(e)
            return
        self.finish(json.dumps({"sessions": sessions}))


class EventsHandler(SpunnelHandler):
    _gone = False

    def on_connection_close(self) -> None:
        self._gone = True  # the browser went away: stop watching at the next poll

    @web.authenticated
    async def get(self) -> None:
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")
        keepalive = self.settings.get("spunnel_keepalive", KEEPALIVE)
        try:
            async for changed, view in self.hub.changes(lambda: self._gone, keepalive=keepalive):
                self.write(f"data: {json.dumps(view)}\n\n" if changed else ": keepalive\n\n")
                await self.flush()
        except StreamClosedError:
            pass  # the browser went away while we wrote


def handlers() -> list[tuple[str, type]]:
    # Paths are relative to the server's base_url; ExtensionApp prefixes it.
    return [
        (r"/spunnel/api/config", ConfigHandler),
        (r"/spunnel/api/session", SessionHandler),
        (r"/spunnel/api/session/events", EventsHandler),
        (r"/spunnel/api/detached", DetachedHandler),
    ]
