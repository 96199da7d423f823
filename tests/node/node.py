"""The pieces of tests/node: the real launcher run by hand as Slurm would run it (with a fake
``scontrol`` that says the end time), a TCP relay to its Jupyter's Unix socket, and Debian's
chromium on that JupyterLab."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from spunnel_jupyter.protocol import EVENT_PREFIX, NOTICE_FILE, POLLED_FILE, LauncherSettings
from tests.e2e.browser import CHROMIUM_ARGS, chromium_path

ROOT = Path(__file__).resolve().parents[2]
BUILT = ROOT / "spunnel_jupyter" / "labextension"
INSTALLED = Path("/opt/spunnel/venv/share/jupyter/labextensions/spunnel-jupyter")
INSTALLED_HASH = Path("/opt/spunnel/.src-hash")  # written by tests/cluster/up.sh
FAKE_JOB = "4242"


def built_labextension() -> Path:
    """The built JupyterLab extension of this checkout's sources: the checkout's own build
    (``npm run build:prod``) when no source is newer, else the one tests/cluster/up.sh installed,
    when the hash of the sources it installed from is this checkout's (a clone's files are all
    new, so an install from an earlier identical clone is recognised by content, not time)."""
    sources = [p for d in ("src", "style") for p in (ROOT / "labextension" / d).rglob("*")]
    newest = max(p.stat().st_mtime for p in sources if p.is_file())
    package = BUILT / "package.json"
    if package.exists() and package.stat().st_mtime >= newest:
        return BUILT
    hasher = ["bash", str(ROOT / "tests" / "cluster" / "src-hash")]
    here = subprocess.run(hasher, capture_output=True, text=True, check=True).stdout.strip()
    with contextlib.suppress(OSError):
        if (INSTALLED / "package.json").exists() and INSTALLED_HASH.read_text().strip() == here:
            return INSTALLED
    pytest.fail(
        f"no built extension of this checkout's labextension/src: neither {BUILT} "
        f"(cd labextension && npm run build:prod) nor {INSTALLED} (bash tests/cluster/up.sh)",
        pytrace=False,
    )


@dataclass
class NodeSession:
    launcher: subprocess.Popen[bytes]
    settings: LauncherSettings
    rundir: Path
    notebook: Path
    port: int
    end_time: float | None
    events: list[dict[str, Any]] = field(default_factory=list)
    last_notice: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/lab/tree/{self.notebook.name}?token={self.settings.token}"

    def event(self, kind: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for e in self.events:
                if e["event"] == kind:
                    return e
            assert time.monotonic() < deadline, f"no {kind} event: {self.events}"
            time.sleep(0.05)

    def notice(self) -> dict[str, Any]:
        """The launcher's notice.json (kept from the last read once the directory is gone)."""
        with contextlib.suppress(OSError, ValueError):
            self.last_notice = json.loads((self.rundir / NOTICE_FILE).read_text())
        return self.last_notice

    def polled(self) -> float:
        """When the browser last asked for the notice (0: never)."""
        with contextlib.suppress(OSError):
            return (self.rundir / POLLED_FILE).stat().st_mtime
        return 0.0

    def api(
        self, method: str, name: str, body: Any = None, token: str | None = None
    ) -> tuple[int, Any]:
        """spunnel-node/api/NAME through the relay, with the token (or ``token``)."""
        token = self.settings.token if token is None else token
        headers = {"Authorization": f"token {token}"} if token else {}
        data = None if body is None else json.dumps(body).encode()
        url = f"http://127.0.0.1:{self.port}/spunnel-node/api/{name}"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                raw = resp.read()
                return resp.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as e:
            return e.code, None

    def left(self) -> float:
        assert self.end_time is not None
        return self.end_time - time.time()


def _read_events(stream: Any, into: list[dict[str, Any]]) -> None:
    for raw in stream:
        line = raw.decode(errors="replace")
        if line.startswith(EVENT_PREFIX):
            into.append(json.loads(line[len(EVENT_PREFIX) :]))


def _fake_home(tmp_path: Path) -> dict[str, str]:
    """A home, JupyterLab settings and workspaces of this test only (no news prompt), and a
    JUPYTER_PATH whose labextensions hold the built extension (it comes before the venv's)."""
    home = tmp_path / "home"
    settings = home / "lab-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False})
    )
    share = tmp_path / "share" / "jupyter"
    (share / "labextensions").mkdir(parents=True)
    (share / "labextensions" / "spunnel-jupyter").symlink_to(built_labextension())
    return {
        "HOME": str(home),
        "JUPYTER_PATH": str(share),
        "JUPYTERLAB_SETTINGS_DIR": str(home / "lab-settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(home / "lab-workspaces"),
    }


def _fake_scontrol(tmp_path: Path, end_time: float | None) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if end_time is None:
        script = "echo 'slurm_load_jobs error: Unable to contact slurm controller' >&2; exit 1\n"
    else:
        end = datetime.fromtimestamp(end_time).strftime("%Y-%m-%dT%H:%M:%S")
        script = f"echo 'JobId={FAKE_JOB} JobName=spunnel JobState=RUNNING EndTime={end} X=1'\n"
    (bin_dir / "scontrol").write_text("#!/bin/sh\n" + script)
    (bin_dir / "scontrol").chmod(0o755)
    return bin_dir


def _notebook(root: Path) -> Path:
    path = root / "edit.ipynb"
    cell = {"cell_type": "code", "execution_count": None, "id": "c1", "metadata": {},
            "outputs": [], "source": []}  # fmt: skip
    kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb = {"cells": [cell], "metadata": {"kernelspec": kernelspec}, "nbformat": 4,
          "nbformat_minor": 5}  # fmt: skip
    path.write_text(json.dumps(nb))
    return path


@contextlib.contextmanager
def node_session(
    tmp_path: Path, artifacts: Path, end_in: float | None, warn_before: list[int]
) -> Iterator[NodeSession]:
    """The launcher as srun runs it on the node, its Jupyter reachable on a local TCP port."""
    base, root = tmp_path / "node-tmp", tmp_path / "work"
    base.mkdir(mode=0o700)
    root.mkdir()
    end_time = None if end_in is None else round(time.time() + end_in)
    bin_dir = _fake_scontrol(tmp_path, end_time)
    args = [f"--ServerApp.root_dir={root}"] + (["--allow-root"] if os.getuid() == 0 else [])
    settings = LauncherSettings(
        token=secrets.token_hex(24), runtime_base=str(base), jupyter_args=args,
        start_timeout=60, stop_grace=2, warn_before=warn_before, save_grace=2.0,
    )  # fmt: skip
    env = {
        **os.environ, **_fake_home(tmp_path), "SLURM_JOB_ID": FAKE_JOB, "PYTHONPATH": str(ROOT),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    }  # fmt: skip
    log = tmp_path / "launcher.log"
    with open(log, "wb") as err:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "spunnel_jupyter.launcher"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=err, env=env, cwd=root,
        )  # fmt: skip
    assert launcher.stdin is not None and launcher.stdout is not None
    launcher.stdin.write(settings.line())
    launcher.stdin.flush()  # kept open, as srun's is
    events: list[dict[str, Any]] = []
    reader = threading.Thread(target=_read_events, args=(launcher.stdout, events), daemon=True)
    reader.start()
    relay = None
    try:
        session = NodeSession(launcher, settings, Path(), _notebook(root), 0, end_time, events)
        started = session.event("started")
        session.rundir = Path(started["runtime_dir"])
        session.event("ready", timeout=60)
        relay = TcpRelay(started["socket"])
        session.port = relay.port
        yield session
    finally:
        if launcher.poll() is None:  # the test failed half-way: the launcher cleans up on SIGTERM
            launcher.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                launcher.wait(20)
        if launcher.poll() is None:
            launcher.kill()
        launcher.wait()
        left = _kill_processes_under(tmp_path)  # Jupyter and kernels, if the launcher could not
        if relay is not None:
            relay.close()
        reader.join(5)
        (artifacts / f"node-{tmp_path.name}.log").write_text(
            log.read_text(errors="replace").replace(settings.token, "<token>")
        )
    assert not left, f"processes left behind by the launcher: {left}"


def _kill_processes_under(path: Path) -> list[str]:
    """SIGKILL every process whose command line names ``path``; what they were."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, ValueError):
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if any(str(path).encode() in arg for arg in argv) and int(proc.name) != os.getpid():
                os.kill(int(proc.name), signal.SIGKILL)
                found.append(f"{proc.name}: {b' '.join(argv)[:120].decode(errors='replace')}")
    return found


class TcpRelay:
    """127.0.0.1:PORT to a Unix socket, a thread per direction of each connection."""

    def __init__(self, unix_path: str) -> None:
        self.unix_path = unix_path
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX)
            try:
                upstream.connect(self.unix_path)
            except OSError:
                client.close()
                continue
            self.open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.server.close()
        for s in self.open:
            with contextlib.suppress(OSError):
                s.close()


@contextlib.contextmanager
def browser_page(node: NodeSession, artifacts: Path, name: str) -> Iterator[Any]:
    """Chromium on the node's JupyterLab with the notebook open, once the node plugin has asked
    for the notice (it is the node's JupyterLab's only client)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        console: list[str] = []
        page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
        try:
            page.goto(node.url)
            page.locator(".jp-Notebook .jp-Cell .cm-content").first.wait_for(timeout=60_000)
            deadline = time.monotonic() + 20
            while not (node.rundir / POLLED_FILE).exists():
                assert time.monotonic() < deadline, "the node plugin never asked for the notice"
                time.sleep(0.1)
            yield page
        except BaseException:
            with contextlib.suppress(Exception):
                page.screenshot(path=str(artifacts / f"node-{name}-failed.png"))
            raise
        finally:
            (artifacts / f"node-{name}-console.log").write_text("\n".join(console) + "\n")
            browser.close()


def type_into_first_cell(page: Any, node: NodeSession, text: str) -> None:
    """Type ``text`` into the notebook's first cell and wait until JupyterLab marks it unsaved."""
    page.locator(".jp-Notebook .jp-Cell .cm-content").first.click()
    page.keyboard.type(text)
    page.locator(".lm-TabBar-tab.jp-mod-dirty").first.wait_for(timeout=10_000)
