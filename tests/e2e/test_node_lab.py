"""No unsaved edit lost and no surprise at the time limit, on the real cluster: Debian's chromium on
the node's JupyterLab through the session's tunnel. A warning shows in that JupyterLab with the time
left in its status bar; an edit typed and not saved is on disk after `spunnel-notebook stop`, and
the terminal says what was saved and how long it took."""

from __future__ import annotations

import contextlib
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from .browser import CHROMIUM_ARGS, chromium_path
from .cluster import PROG, Session, as_user, site_config, start, state_dir, wait_clean
from .jupyter_client_util import rest

try:
    from playwright.sync_api import Page, sync_playwright
except ImportError as e:  # a missing dependency is a failure, not a skip
    raise ImportError(f"{e}: install the project's [test] extra (tests/cluster/up.sh does)") from e

NOTEBOOK = "spunnel-save-test.ipynb"
EMPTY = {"cells": [{"cell_type": "code", "source": "", "metadata": {}, "outputs": [],
                    "execution_count": None}],
         "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                     "language": "python"}},
         "nbformat": 4, "nbformat_minor": 5}  # fmt: skip


@contextlib.contextmanager
def notebook_page(s: Session, console: list[str] | None = None) -> Iterator[Page]:
    """An empty notebook put on the node, opened in chromium through the session's tunnel (the
    page's console and websockets recorded in ``console``, if given); the browser closed after."""
    code, _ = rest(s.port, s.token, "PUT", f"/api/contents/{NOTEBOOK}",
                   {"type": "notebook", "format": "json", "content": EMPTY})  # fmt: skip
    assert code in (200, 201)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            if console is not None:
                page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
                page.on(
                    "websocket", lambda ws: console.append(f"websocket: {ws.url.split('?')[0]}")
                )
            page.goto(f"http://127.0.0.1:{s.port}/lab/tree/{NOTEBOOK}?token={s.token}")
            yield page
        finally:
            browser.close()


def test_the_node_lab_warns_and_a_stop_saves_the_unsaved_edit(artifacts: Path):
    site = site_config({"SpunnelManager": {"warn_before": [2]}})
    on_disk = Path("/home/alice") / NOTEBOOK
    s = start("alice", "-t", "2", env_path=site)
    try:
        s.wait_ready()
        console: list[str] = []
        try:
            with notebook_page(s, console) as page:
                page.locator(".jp-Notebook .jp-Cell .cm-content").first.wait_for(timeout=60_000)
                warning = page.get_by_text(re.compile(r"Jupyter stops in .*time limit"))
                warning.first.wait_for(timeout=30_000)  # 2 minutes ahead: due at once
                left = page.locator('[data-testid="spunnel-time-left"]')
                left.wait_for(timeout=10_000)
                assert re.fullmatch(r"Time left 1:[0-5]\d", left.inner_text()), left.inner_text()
                page.locator(".jp-Notebook .jp-Cell .cm-content").first.click()
                page.keyboard.type("edited = 'typed, never saved by hand'")
                page.locator(".lm-TabBar-tab.jp-mod-dirty").first.wait_for(timeout=10_000)
                page.wait_for_timeout(500)
                page.screenshot(path=str(artifacts / "node-lab-warning-on-the-cluster.png"))
                assert "never saved by hand" not in on_disk.read_text()
                stopped = as_user("alice", [PROG, "stop"], timeout=60)
                assert stopped.returncode == 0, stopped
        finally:
            (artifacts / "node-lab-console.log").write_text("\n".join(console) + "\n")
        assert s.finish() == 0, s.output
    finally:
        s.close()
        shutil.rmtree(site, ignore_errors=True)
    log = (state_dir("alice") / "session.log").read_text(errors="replace")
    assert "never saved by hand" in on_disk.read_text(), s.output + log[-3000:]
    m = re.search(r"the node's JupyterLab saved 1 document\(s\) \(saved, (\d+\.\d+) s\)", s.output)
    assert m, s.output
    print(f"save before the stop: {m.group(1)} s")
    on_disk.unlink()
    _took, left_over = wait_clean("alice", timeout=15)
    assert not left_over, left_over


def test_the_time_limit_is_warned_twice_and_the_edit_saved_before_the_job_ends(artifacts: Path):
    """`-t 3`, warnings at 2 and 1 minutes: both in the terminal (with the bell) and in the node's
    JupyterLab; an edit never saved by hand is on disk before Slurm ends the job. Autosave is off
    (a user's own setting), so that only the session's save can have put it there."""
    site = site_config({"SpunnelManager": {"warn_before": [2, 1]}})
    on_disk = Path("/home/alice") / NOTEBOOK
    settings = Path("/home/alice/.jupyter/lab/user-settings/@jupyterlab/docmanager-extension")
    as_user("alice", ["mkdir", "-p", str(settings)], timeout=10)
    (settings / "plugin.jupyterlab-settings").write_text('{"autosave": false}\n')
    s = start("alice", "-t", "3", env_path=site)
    try:
        s.wait_ready()
        with notebook_page(s) as page:
            cell = page.locator(".jp-Notebook .jp-Cell .cm-content").first
            cell.wait_for(timeout=60_000)
            cell.click()
            page.keyboard.type("edited = 'typed before the time limit, never saved'")
            page.locator(".lm-TabBar-tab.jp-mod-dirty").first.wait_for(timeout=10_000)
            bell = r"\x07spunnel-notebook: job \d+ reaches its time limit in {}"
            s.wait_for(bell.format("2 minutes"), timeout=90)
            warnings = page.get_by_text(re.compile(r"Jupyter stops in .*time limit"))
            warnings.first.wait_for(timeout=30_000)
            page.wait_for_timeout(500)
            page.screenshot(path=str(artifacts / "node-lab-time-limit-2-min.png"))
            s.wait_for(bell.format("1 minute:"), timeout=90)
            deadline = time.monotonic() + 30
            while warnings.count() < 2 and time.monotonic() < deadline:
                page.wait_for_timeout(250)
            assert warnings.count() >= 2, warnings.all_inner_texts()
            page.screenshot(path=str(artifacts / "node-lab-time-limit-1-min.png"))
            assert "never saved" not in on_disk.read_text()  # autosave is off
            end_time = s.record["end_time"]
            while "never saved" not in on_disk.read_text() and time.time() < end_time + 60:
                time.sleep(0.2)
            saved_at = time.time()  # within 0.2 s of the save
            code = s.finish(timeout=150)
        assert code == 0, s.output
    finally:
        s.close()
        shutil.rmtree(site, ignore_errors=True)
        (settings / "plugin.jupyterlab-settings").unlink(missing_ok=True)
    assert re.search(r"session ended: job \d+ reached its time limit", s.output), s.output
    assert "never saved" in on_disk.read_text(), s.output
    log = (state_dir("alice") / "session.log").read_text(errors="replace")[-4000:]
    assert saved_at < end_time, (saved_at, end_time, log)  # before Slurm could send SIGTERM
    print(f"saved {end_time - saved_at:.1f} s before the time limit")
    on_disk.unlink()
    _took, left_over = wait_clean("alice", timeout=15)
    assert not left_over, left_over
