"""A real Jupyter client over REST and the kernel websocket, as a browser would use them."""

from __future__ import annotations

import json
import urllib.request
import uuid

import websocket  # websocket-client


def rest(
    port: int, token: str, method: str, path: str, body: dict | None = None
) -> tuple[int, dict]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"token {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            data = resp.read()
            return resp.status, json.loads(data) if data else {}
    except urllib.error.HTTPError as e:
        return e.code, {}


def execute(port: int, token: str, code: str, timeout: float = 60) -> str:
    """Start a kernel through the tunnel, run ``code``, return its stdout; shut the kernel down."""
    kernel = start_kernel(port, token)
    try:
        return execute_in(port, token, kernel, code, timeout)
    finally:
        rest(port, token, "DELETE", f"/api/kernels/{kernel}")


def start_kernel(port: int, token: str) -> str:
    """A new kernel's id (it lives until shut down, whoever connects to it)."""
    status, kernel = rest(port, token, "POST", "/api/kernels", {"name": "python3"})
    assert status == 201, f"kernel start failed: {status}"
    return str(kernel["id"])


def execute_in(port: int, token: str, kernel: str, code: str, timeout: float = 60) -> str:
    """Run ``code`` in the running kernel ``kernel``; return its stdout."""
    ws = websocket.create_connection(
        f"ws://127.0.0.1:{port}/api/kernels/{kernel}/channels",
        header=[f"Authorization: token {token}"],
        timeout=timeout,
    )
    try:
        msg_id = uuid.uuid4().hex
        ws.send(
            json.dumps(
                {
                    "header": {
                        "msg_id": msg_id,
                        "username": "test",
                        "session": uuid.uuid4().hex,
                        "msg_type": "execute_request",
                        "version": "5.3",
                        "date": "",
                    },
                    "parent_header": {},
                    "metadata": {},
                    "channel": "shell",
                    "buffers": [],
                    "content": {
                        "code": code,
                        "silent": False,
                        "store_history": False,
                        "user_expressions": {},
                        "allow_stdin": False,
                        "stop_on_error": True,
                    },
                }
            )
        )
        out = []
        while True:
            msg = json.loads(ws.recv())
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream":
                out.append(msg["content"]["text"])
            elif msg["msg_type"] == "error":
                raise AssertionError("kernel error: " + "\n".join(msg["content"]["traceback"]))
            elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                return "".join(out)
    finally:
        ws.close()
