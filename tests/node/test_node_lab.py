"""The node side of "the time limit never surprises" and "no unsaved edit lost", without Slurm: the
real launcher (foreground: its settings line on stdin, SLURM_JOB_ID set by hand, a fake
``scontrol`` on PATH that says the job's end time) starts the real jupyter_server and JupyterLab
with the node's server extension and the built JupyterLab extension (this checkout's
``spunnel_jupyter/labextension``, through JUPYTER_PATH: nothing is installed), and Debian's
chromium, driven by Playwright, works in that JupyterLab through a small TCP relay to Jupyter's
Unix socket (a browser cannot speak HTTP over one).

Chromium, Playwright, JupyterLab or a built extension missing fails the tests; nothing skips.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import time
from pathlib import Path

from .node import FAKE_JOB, browser_page, node_session, type_into_first_cell


def cell_source(notebook: Path) -> str:
    cells = json.loads(notebook.read_text())["cells"]
    source = cells[0]["source"]
    return "".join(source) if isinstance(source, list) else source


def test_a_stop_saves_the_unsaved_edit_within_save_grace(tmp_path, artifacts):
    """SIGUSR1 (stop, Ctrl-C, the panel's Stop): the edit typed and not saved is on disk, the
    save took at most save_grace, and the launcher said so. Here scontrol fails: no end time, no
    warning, no time left shown, and nothing else changes."""
    with node_session(tmp_path, artifacts, end_in=None, warn_before=[600, 60]) as node:
        with browser_page(node, artifacts, "stop") as page:
            type_into_first_cell(page, node, "edited = 'not saved by the user'")
            assert "not saved by the user" not in cell_source(node.notebook)
            status = page.locator('[data-testid="spunnel-time-left"]')
            assert status.count() == 0 or not status.is_visible()  # no end time known
            assert node.notice() == {"end_time": None, "warnings": [], "save_seq": 0}
            # Right after a poll, so that the next is 5 s away: a save within save_grace needs
            # the push (the node extension's event on Jupyter's event bus).
            polled = node.polled()
            until(lambda: node.polled() != polled, 10)
            signalled = time.monotonic()
            node.launcher.send_signal(signal.SIGUSR1)
            assert node.launcher.wait(timeout=30) == 0
            took = time.monotonic() - signalled
        exited = node.event("exited")
    assert not node.rundir.exists()  # the launcher removed its directory
    assert "not saved by the user" in cell_source(node.notebook)
    assert exited["reason"] == "signal" and exited["signal"] == "SIGUSR1"
    assert exited["save"] == "saved" and exited["saved"] == 1, exited
    assert 0 < exited["save_s"] <= node.settings.save_grace, exited
    record(artifacts, "stop", {"save_s": exited["save_s"], "signal_to_exit_s": round(took, 3)})


def test_the_time_limit_is_warned_shown_and_saved_before(tmp_path, artifacts):
    """An end time 62 s after the launcher started, warnings at 600 and 40 s: the first at once
    (it is already past), the second while the page is open, each a JupyterLab notification; the
    status bar shows the time left; the unsaved edit reaches the disk about 30 s before the end,
    before Slurm's SIGTERM, which then ends the session after a second save."""
    with node_session(tmp_path, artifacts, end_in=62, warn_before=[600, 40]) as node:
        with browser_page(node, artifacts, "time-limit") as page:
            first = page.get_by_text(re.compile(rf"Jupyter stops in .*job {FAKE_JOB}'s time"))
            first.first.wait_for(timeout=20_000)
            status = page.locator('[data-testid="spunnel-time-left"]')
            status.wait_for(timeout=10_000)
            assert re.fullmatch(r"Time left 0:[0-5]\d", status.inner_text()), status.inner_text()
            type_into_first_cell(page, node, "edited = 'saved before the limit'")
            assert "saved before the limit" not in cell_source(node.notebook)
            second = page.get_by_text(re.compile(r"Jupyter stops in (40|39|38) s"))
            second.wait_for(timeout=node.left() * 1000)
            assert first.count() == 2  # both notifications stay until dismissed
            page.wait_for_timeout(1000)  # the notification's slide-in
            page.screenshot(path=str(artifacts / "node-time-limit-warnings.png"))
            # A launcher tab in front of the notebook: the node has no spunnel panel (no sessions
            # from sessions), and the save below does not need the notebook to be the current tab.
            page.locator(".lm-TabBar-addButton:not(.lm-mod-hidden)").first.click()
            page.locator('.jp-LauncherCard[data-category="Notebook"]').first.wait_for()
            assert page.locator(".jp-LauncherCard", has_text="compute node").count() == 0
            until(lambda: "saved before the limit" in cell_source(node.notebook), node.left())
            saved_left = node.left()
            assert 20 <= saved_left <= 32, saved_left  # about max(save_grace + 10, 30) s ahead
            assert node.launcher.poll() is None
            warnings = node.notice()["warnings"]
            node.launcher.send_signal(signal.SIGTERM)  # what Slurm sends at the limit
            assert node.launcher.wait(timeout=30) == 0
        exited = node.event("exited")
    assert not node.rundir.exists()
    assert exited["signal"] == "SIGTERM" and exited["save"] == "saved", exited
    assert exited["saved"] == 0  # nothing left unsaved by then
    ids = [w["id"] for w in warnings]
    assert ids == [f"{FAKE_JOB}-{node.end_time:.0f}-600", f"{FAKE_JOB}-{node.end_time:.0f}-40"]
    record(artifacts, "time-limit", {"saved_s_before_end": round(saved_left, 1),
                                     "sigterm_save_s": exited["save_s"]})  # fmt: skip


def test_the_node_api_is_authenticated_and_checks_what_it_is_sent(tmp_path, artifacts):
    with node_session(tmp_path, artifacts, end_in=3600, warn_before=[60]) as node:
        assert node.api("GET", "notice", token="")[0] == 403
        assert node.api("POST", "saved", {"seq": 1, "saved": []}, token="")[0] == 403
        code, body = node.api("GET", "notice")
        assert code == 200 and body["end_time"] == node.end_time and body["warnings"] == []
        assert abs(body["now"] - time.time()) < 5 and body["save_seq"] == 0
        assert node.api("POST", "saved", {"seq": "1"})[0] == 400
        assert node.api("POST", "saved", {"seq": 1, "saved": "a.ipynb"})[0] == 400
        assert node.api("POST", "saved", {"seq": 1, "saved": ["x" * 20] * 50_000})[0] == 413
        assert node.api("POST", "saved", {"seq": 1, "saved": ["a.ipynb"]}) == (204, None)
        node.launcher.send_signal(signal.SIGTERM)
        assert node.launcher.wait(timeout=30) == 0
    # The answer came before the request: stale, not taken for the browser's (which is there:
    # it polled just now, so the launcher waited its grace).
    exited = node.event("exited")
    assert not node.rundir.exists()
    assert exited["save"] == "timeout" and exited["save_s"] >= node.settings.save_grace


def until(check, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def record(artifacts: Path, name: str, figures: dict) -> None:
    """The measured figures, in artifacts/node-save-times.json (one entry per test)."""
    path = artifacts / "node-save-times.json"
    data = {}
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(path.read_text())
    data[name] = figures
    path.write_text(json.dumps(data, indent=1) + "\n")
