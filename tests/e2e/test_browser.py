"""The JupyterLab panel, end to end: a real JupyterLab (login side, as alice) in Debian's chromium,
the real server extension, real Slurm jobs on c1, and the notebook tab the panel opens.

Fails (never skips) when chromium, Playwright or the cluster is missing.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from .browser import CHROMIUM_ARGS, VENV, Lab, chromium_path, jupyterlab
from .cluster import as_user, squeue, start, state_dir
from .jupyter_client_util import execute

try:
    from playwright.sync_api import Page, expect, sync_playwright
except ImportError as e:  # a missing dependency is a failure, not a skip
    raise ImportError(f"{e}: install the project's [test] extra (tests/cluster/up.sh does)") from e

USER = "alice"
TILE = "Jupyter on a compute node"
WAITING = ('[data-testid="spunnel-phase"][data-phase="pending"],'
           '[data-testid="spunnel-phase"][data-phase="starting"]')  # fmt: skip
READY = '[data-testid="spunnel-phase"][data-phase="ready"]'
# The browser's notifications (granted, as a user would on first use), recorded as they are made.
RECORD_NOTIFICATIONS = """(() => {
  const Real = window.Notification;
  const made = (window.__spunnelNotifications = []);
  function Recorded(title, options) {
    made.push(`${title}: ${(options || {}).body || ''}`);
    return new Real(title, options);
  }
  Object.defineProperty(Recorded, 'permission', { get: () => Real.permission });
  Recorded.requestPermission = (...args) => Real.requestPermission(...args);
  window.Notification = Recorded;
})();"""


@dataclass
class Browser:
    """A chromium tab on the lab, and what it did that tests check."""

    lab: Lab
    page: Page
    errors: list[str] = field(default_factory=list)  # uncaught exceptions thrown in our code
    api_calls: list[str] = field(default_factory=list)  # "METHOD /path" to spunnel/api

    def open_panel(self, screenshot: Path | None = None) -> None:
        """Load JupyterLab and click the launcher tile (after a screenshot of it, if asked)."""
        self.page.goto(self.lab.url)
        tile = self.page.locator(".jp-LauncherCard", has_text=TILE)
        expect(tile).to_be_visible(timeout=60_000)
        assert tile.get_attribute("data-category") == "HPC"
        if screenshot:
            tile.scroll_into_view_if_needed()
            self.page.screenshot(path=screenshot)
        tile.click()


@pytest.fixture
def browser(cluster: dict[str, str], artifacts: Path) -> Iterator[Browser]:
    executable = chromium_path()  # before starting anything
    with jupyterlab(USER, artifacts) as lab, sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            context = chromium.new_context(
                viewport={"width": 1280, "height": 800}, permissions=["notifications"]
            )
            context.add_init_script(RECORD_NOTIFICATIONS)
            page = context.new_page()
            b = Browser(lab, page)
            # Only ours: Notebook 7.6's own pages throw one at load ("reading 'schema'").
            page.on("pageerror", lambda exc: b.errors.append(exc.stack or str(exc))
                    if "/spunnel-jupyter/" in (exc.stack or "") else None)  # fmt: skip
            page.on("request", lambda r: b.api_calls.append(f"{r.method} {urlparse(r.url).path}")
                    if "/spunnel/api/" in r.url else None)  # fmt: skip
            yield b
            assert not b.errors, f"uncaught errors in the page: {b.errors}"
        finally:
            chromium.close()


def test_labextension_is_installed() -> None:
    out = subprocess.run([str(VENV / "bin" / "jupyter"), "labextension", "list"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    text = re.sub(r"\x1b\[[0-9;]*m", "", out.stdout + out.stderr)
    assert re.search(r"spunnel-jupyter v\S+ enabled OK \(python, spunnel-jupyter\)", text), text


def test_start_open_stop_from_the_panel(
    browser: Browser, cluster: dict[str, str], artifacts: Path
) -> None:
    page, lab = browser.page, browser.lab
    browser.open_panel(screenshot=artifacts / "launcher.png")

    # The form, prefilled from the site defaults, with the cluster's partitions and their limits.
    partition = page.get_by_test_id("spunnel-partition")
    expect(partition).to_be_visible(timeout=30_000)
    page.screenshot(path=artifacts / "panel-form.png")
    options = partition.locator("option").all_inner_texts()
    assert any(o.startswith("interact (default): up to 8:00:00") for o in options), options
    assert any(o.startswith("debug: up to 1:00:00") for o in options), options
    partition.select_option("interact")
    page.get_by_test_id("spunnel-mem").fill("1000")

    # Bad input: the server's message and remedy, and nothing submitted.
    page.get_by_test_id("spunnel-time").fill("9:00:00")
    page.get_by_test_id("spunnel-start").click()
    error = page.get_by_test_id("spunnel-error")
    expect(error).to_contain_text("exceeds partition 'interact'")
    assert error.locator(".jp-SpunnelPanel-remedy").inner_text().strip(), error.inner_text()
    page.screenshot(path=artifacts / "panel-error.png")
    assert squeue(USER) == []

    page.get_by_test_id("spunnel-time").fill("10")
    started = time.monotonic()
    page.get_by_test_id("spunnel-start").click()
    expect(page.locator(WAITING)).to_be_visible(timeout=30_000)
    expect(error).to_be_hidden()
    # The POST answers at submission; the job id follows on the event stream.
    expect(page.get_by_test_id("spunnel-job-id")).to_have_text(re.compile(r"^\d+$"))
    expect(page.locator(WAITING)).to_be_visible(timeout=1)
    page.screenshot(path=artifacts / "panel-pending.png")
    job_id = page.get_by_test_id("spunnel-job-id").inner_text()
    assert any(line.startswith(f"{job_id} ") for line in squeue(USER)), squeue(USER)

    expect(page.locator(READY)).to_be_visible(timeout=120_000)
    ready_after = time.monotonic() - started
    expect(page.get_by_test_id("spunnel-node")).to_have_text(cluster["NODE"])
    expect(page.get_by_test_id("spunnel-job-id")).to_have_text(job_id)
    # The countdown runs in the browser: 10 minutes, ticking each second.
    remaining = page.get_by_test_id("spunnel-remaining")
    first = remaining.inner_text()
    assert re.fullmatch(r"(9|10):\d\d", first), first
    expect(remaining).not_to_have_text(first, timeout=3_000)
    page.screenshot(path=artifacts / "panel-ready.png")

    # Open: the notebook tab is JupyterLab served from the job on c1, through the tunnel.
    with page.context.expect_page() as popup:
        page.get_by_test_id("spunnel-open").click()
    tab = popup.value
    # Showing: JupyterLab's launcher offers the kernels the node's Jupyter server found.
    expect(tab.locator('.jp-LauncherCard[data-category="Notebook"]').first).to_be_visible(
        timeout=60_000
    )
    tab_after = time.monotonic() - started
    tab.screenshot(path=artifacts / "notebook-tab.png")
    status, session = lab.api("GET", "/spunnel/api/session")
    assert status == 200 and session is not None, (status, session)
    url = urlparse(session["url"])
    assert urlparse(tab.url).netloc == url.netloc, (tab.url, url.netloc)
    token = parse_qs(url.query)["token"][0]
    code = "import os, socket; print(os.environ['SLURM_JOB_ID'], socket.gethostname())"
    out = execute(url.port or 80, token, code)
    assert out.split() == [job_id, cluster["NODE"]], out
    print(f"\nclick Start -> ready in the panel: {ready_after:.1f} s; "
          f"-> notebook tab showing JupyterLab: {tab_after:.1f} s")  # fmt: skip
    tab.close()

    # Stop: the panel goes back to the form once the session is torn down; nothing is left.
    page.bring_to_front()
    stop_clicked = time.monotonic()
    page.get_by_test_id("spunnel-stop").click()
    expect(page.get_by_test_id("spunnel-start")).to_be_visible(timeout=30_000)
    form_after = time.monotonic() - stop_clicked
    deadline = time.monotonic() + 10
    while (left := lab.leftovers(USER)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, left
    assert squeue(USER) == []
    print(f"click Stop -> form again: {form_after:.1f} s; "
          f"-> nothing left: {time.monotonic() - stop_clicked:.1f} s")  # fmt: skip

    # The panel follows the event stream: it never polls the session.
    polls = [c for c in browser.api_calls if c == "GET /spunnel/api/session"]
    assert len(polls) <= 2, browser.api_calls


def test_panel_shows_and_stops_a_session_started_with_the_cli(
    browser: Browser, cluster: dict[str, str], artifacts: Path
) -> None:
    cli = start(USER, "-p", "interact", "--mem", "1000", "-t", "10")
    try:
        cli.wait_ready()
        browser.open_panel()
        page = browser.page
        expect(page.locator(READY)).to_be_visible(timeout=30_000)
        expect(page.get_by_test_id("spunnel-job-id")).to_have_text(str(cli.job_id))
        expect(page.get_by_test_id("spunnel-node")).to_have_text(cluster["NODE"])
        expect(page.get_by_test_id("spunnel-owner")).to_contain_text("spunnel-notebook")
        expect(page.get_by_test_id("spunnel-port")).to_have_text(str(cli.port))
        page.screenshot(path=artifacts / "panel-cli-session.png")
        page.get_by_test_id("spunnel-stop").click()
        expect(page.get_by_test_id("spunnel-start")).to_be_visible(timeout=30_000)
        assert cli.finish() == 0, cli.output
        assert squeue(USER) == []
    finally:
        cli.close()


def test_panel_attaches_to_a_detached_session_and_detaches(
    browser: Browser, cluster: dict[str, str], artifacts: Path
) -> None:
    started = as_user(USER, ["spunnel-notebook", "--detach", "-t", "10", "--mem", "300"], 120)
    assert started.returncode == 0, started
    record = json.loads((state_dir(USER) / "session.json").read_text())
    job = record["job_id"]
    os.kill(record["supervisor_pid"], signal.SIGKILL)  # as if its login host had gone away
    time.sleep(0.5)
    try:
        browser.open_panel()
        page = browser.page
        attach = page.get_by_test_id(f"spunnel-attach-{job}")
        expect(page.get_by_test_id("spunnel-detached")).to_contain_text(
            f"Job {job} RUNNING on {cluster['NODE']}", timeout=30_000
        )
        page.screenshot(path=artifacts / "panel-detached-list.png")
        attach.click()
        expect(page.locator(READY)).to_be_visible(timeout=60_000)
        expect(page.get_by_test_id("spunnel-job-id")).to_have_text(str(job))
        expect(page.get_by_test_id("spunnel-kind")).to_contain_text("attached")
        page.screenshot(path=artifacts / "panel-attached.png")
        page.get_by_test_id("spunnel-detach").click()
        expect(attach).to_be_visible(timeout=30_000)  # listed again: it runs on
        assert squeue(USER) == [f"{job} RUNNING"]
    finally:
        as_user(USER, ["spunnel-notebook", "stop", str(job)], 60)
    assert squeue(USER) == []


def test_queued_job_shows_reason_and_elapsed_and_cancels(
    browser: Browser, node_full: str, artifacts: Path
) -> None:
    page = browser.page
    browser.open_panel()
    page.get_by_test_id("spunnel-mem").fill("1000")
    page.get_by_test_id("spunnel-time").fill("10")
    page.get_by_test_id("spunnel-start").click()
    expect(page.locator('[data-testid="spunnel-phase"][data-phase="pending"]')).to_be_visible(
        timeout=30_000
    )
    expect(page.get_by_test_id("spunnel-job-id")).to_have_text(re.compile(r"^\d+$"))
    job_id = page.get_by_test_id("spunnel-job-id").inner_text()
    expect(page.get_by_test_id("spunnel-job-state")).to_have_text("PENDING")
    # Slurm's reason: Resources, or Priority when other users' jobs queue too.
    reason = page.get_by_test_id("spunnel-reason")
    expect(reason).to_have_text(re.compile(r"^(Resources|Priority)$"), timeout=10_000)
    # The elapsed time runs in the browser, without asking the server again.
    expect(page.get_by_test_id("spunnel-elapsed")).to_have_text(re.compile(r"^0:0[2-9]$"))
    page.screenshot(path=artifacts / "panel-queued.png")
    assert squeue(USER) == [f"{job_id} PENDING"]

    page.get_by_test_id("spunnel-stop").click()  # labelled Cancel while queued
    expect(page.get_by_test_id("spunnel-start")).to_be_visible(timeout=30_000)
    assert squeue(USER) == []
    state = subprocess.run(["scontrol", "show", "job", job_id, "-o"], capture_output=True,
                           text=True, timeout=30).stdout  # fmt: skip
    assert "JobState=CANCELLED" in state, state
    polls = [c for c in browser.api_calls if c == "GET /spunnel/api/session"]
    assert len(polls) <= 2, browser.api_calls


def test_the_panel_tells_of_the_start_the_time_limit_and_the_idle_release(
    browser: Browser, node_full: str, cluster: dict[str, str], artifacts: Path
) -> None:
    """A job that waited: the browser's notification when it starts. Then, in JupyterLab's own
    notifications and the panel: the time-limit warning (10 minutes, due at once) and the node's
    warning before its idle release (--idle-timeout 1: nothing runs there)."""
    page = browser.page
    browser.open_panel()
    page.get_by_test_id("spunnel-mem").fill("1000")
    page.get_by_test_id("spunnel-time").fill("10")
    page.get_by_test_id("spunnel-idle").fill("1")
    page.get_by_test_id("spunnel-start").click()
    expect(page.get_by_test_id("spunnel-job-id")).to_have_text(re.compile(r"^\d+$"), timeout=30_000)
    job_id = page.get_by_test_id("spunnel-job-id").inner_text()
    expect(page.get_by_test_id("spunnel-elapsed")).to_have_text(re.compile(r"^0:1[1-9]$"),
                                                                timeout=30_000)  # fmt: skip
    subprocess.run(["scancel", node_full], check=True)
    expect(page.locator(READY)).to_be_visible(timeout=120_000)
    made = page.evaluate("window.__spunnelNotifications")
    assert len(made) == 1 and re.fullmatch(
        rf"Jupyter on a compute node: Job {job_id} started on {cluster['NODE']} after 0:\d\d "
        r"in the queue", made[0]), made  # fmt: skip
    toast = page.locator(".Toastify__toast")
    expect(
        toast.filter(has_text=f"Job {job_id} reaches its time limit in 10 minutes")
    ).to_be_visible(timeout=10_000)
    idle = toast.filter(has_text=re.compile(r"Jupyter stops in .* \(--idle-timeout\)"))
    expect(idle).to_be_visible(timeout=90_000)
    expect(page.get_by_test_id("spunnel-notice")).to_contain_text("--idle-timeout")
    page.screenshot(path=artifacts / "panel-warnings.png")
    page.get_by_test_id("spunnel-stop").click()
    expect(page.get_by_test_id("spunnel-start")).to_be_visible(timeout=30_000)
    assert squeue(USER) == []


def test_notebook7_file_browser_has_the_panel_as_a_tab(browser: Browser) -> None:
    page, lab = browser.page, browser.lab
    page.goto(f"http://127.0.0.1:{lab.port}/tree?token={lab.token}")
    tab = page.get_by_role("tab", name="Compute node")
    expect(tab).to_be_visible(timeout=60_000)
    assert browser.api_calls == [], "the hidden tab must not connect before it is shown"
    tab.click()
    expect(page.get_by_test_id("spunnel-partition")).to_be_visible(timeout=30_000)
    expect(page.get_by_test_id("spunnel-start")).to_be_enabled()
