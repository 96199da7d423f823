"""No unsaved edit lost and no surprise at the time limit, on the real cluster: Debian's chromium on
the node's JupyterLab through the session's tunnel. A warning shows in that JupyterLab with the time
left in its status bar; an edit typed and not saved is on disk after `spunnel-notebook stop`, and
the terminal says what was saved and how long it took."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from .browser import CHROMIUM_ARGS, chromium_path
from .cluster import PROG, as_user, site_config, start, state_dir, wait_clean
from .jupyter_client_util import rest

try:
    from playwright.sync_api import sync_playwright
except ImportError as e:  # a missing dependency is a failure, not a skip
    raise ImportError(f"{e}: install the project's [test] extra (tests/cluster/up.sh does)") from e

NOTEBOOK = "spunnel-save-test.ipynb"


def test_the_node_lab_warns_and_a_stop_saves_the_unsaved_edit(artifacts: Path):
    site = site_config({"SpunnelManager": {"warn_before": [2]}})
    on_disk = Path("/home/alice") / NOTEBOOK
    s = start("alice", "-t", "2", env_path=site)
    try:
        s.wait_ready()
        empty = {"cells": [{"cell_type": "code", "source": "", "metadata": {}, "outputs": [],
                            "execution_count": None}],
                 "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                             "language": "python"}},
                 "nbformat": 4, "nbformat_minor": 5}  # fmt: skip
        code, _ = rest(s.port, s.token, "PUT", f"/api/contents/{NOTEBOOK}",
                       {"type": "notebook", "format": "json", "content": empty})  # fmt: skip
        assert code in (200, 201)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            console: list[str] = []
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            page.on("websocket", lambda ws: console.append(f"websocket: {ws.url.split('?')[0]}"))
            try:
                page.goto(f"http://127.0.0.1:{s.port}/lab/tree/{NOTEBOOK}?token={s.token}")
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
                browser.close()
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
