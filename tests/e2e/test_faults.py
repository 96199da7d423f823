"""Faults on the real cluster that the CLI tests do not already cover: what the user is told, and
that nothing is left on either host (or that what must outlive the fault is cleaned next time)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from .cluster import squeue, start, state_dir, wait_clean


def _started_event(user: str) -> dict:
    log = (state_dir(user) / "session.log").read_text()
    line = next(ln for ln in log.splitlines() if '"event": "started"' in ln)
    return json.loads(line.partition(" ")[2])


def test_launcher_killed_is_told_and_its_node_directory_goes_at_the_next_start():
    s = start("alice", "-t", "10")
    try:
        s.wait_ready()
        started = _started_event("alice")
        runtime = Path(started["runtime_dir"])
        assert (runtime / ".held").exists()
        os.kill(started["pid"], signal.SIGKILL)  # no chance to clean up on the node
        code = s.finish(timeout=30)
        assert code == 6, s.output
        assert "ended without a word (killed?)" in s.output
        assert squeue("alice") == []
    finally:
        s.close()
    assert runtime.exists()  # what a killed launcher leaves, holding Jupyter's token file
    again = start("alice", "-t", "10")
    try:
        again.wait_ready()
        assert not runtime.exists()
        log = (state_dir("alice") / "session.log").read_text()
        assert f"removed {runtime}, left on this node by a killed launcher" in log
        again.signal(signal.SIGINT)
        assert again.finish() == 130
    finally:
        again.close()
    _, left = wait_clean("alice", timeout=5)
    assert not left, left
