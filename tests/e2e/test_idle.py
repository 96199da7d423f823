"""Idle release (--idle-timeout): a session with nothing running ends itself after about the
timeout (Jupyter's own activity tracking: its check runs each minute), freeing the allocation; a
session whose kernel is busy is left alone."""

from __future__ import annotations

import json
import re
import signal
import time
import uuid

import websocket  # websocket-client

from .cluster import squeue, start, wait_clean
from .jupyter_client_util import start_kernel


def keep_busy(port: int, token: str, seconds: int) -> None:
    """Run ``time.sleep(seconds)`` in a new kernel and hang up: a busy kernel, nobody connected."""
    kernel = start_kernel(port, token)
    ws = websocket.create_connection(
        f"ws://127.0.0.1:{port}/api/kernels/{kernel}/channels",
        header=[f"Authorization: token {token}"],
        timeout=30,
    )
    header = {"msg_id": uuid.uuid4().hex, "username": "t", "session": uuid.uuid4().hex,
              "msg_type": "execute_request", "version": "5.3", "date": ""}  # fmt: skip
    content = {"code": f"import time; time.sleep({seconds})", "silent": False,
               "store_history": False, "user_expressions": {}, "allow_stdin": False}  # fmt: skip
    ws.send(json.dumps({"header": header, "parent_header": {}, "metadata": {},
                        "channel": "shell", "content": content, "buffers": []}))  # fmt: skip
    while True:  # wait until it really runs
        msg = json.loads(ws.recv())
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "busy":
            break
    ws.close()


def test_an_idle_session_is_released_and_a_busy_one_is_left_alone():
    idle = start("alice", "-t", "10", "--idle-timeout", "1")
    busy = start("bob", "-t", "10", "--idle-timeout", "1")
    try:
        idle.wait_ready()
        busy.wait_ready()
        keep_busy(busy.port, busy.token, 600)
        began = time.monotonic()
        assert idle.finish(timeout=200) == 0, idle.output
        took = time.monotonic() - began
        print(f"--idle-timeout 1 released the idle session after {took:.0f} s")
        assert 55 <= took <= 180, took
        assert "released after 1 minutes with no busy kernel" in idle.output
        # Warned before, with the bell: a minute has no shorter warning, so one at half of it.
        warned = r"\x07spunnel-notebook: Jupyter stops in (\d+ s|1 min(?: \d+ s)?): nothing ran"
        assert re.search(warned + r".*\(--idle-timeout\)", idle.output), idle.output
        assert not re.search(r"Jupyter stops in .*--idle-timeout", busy.output), busy.output
        assert "gone from the queue" in idle.output
        time.sleep(30)  # past the busy one's own timeout and a check of Jupyter's
        assert busy.proc.poll() is None, busy.output
        assert squeue("bob") == [f"{busy.job_id} RUNNING"]
        busy.signal(signal.SIGINT)
        assert busy.finish() == 130
    finally:
        idle.close()
        busy.close()
    for user in ("alice", "bob"):
        _took, left = wait_clean(user, timeout=15)
        assert not left, left
