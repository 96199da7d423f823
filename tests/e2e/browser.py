"""A real JupyterLab run as a test user on the login side, and Debian's chromium to drive it.

No browser is downloaded: Playwright launches /usr/bin/chromium (tests/cluster/up.sh installs it).
A missing browser, Playwright or JupyterLab fails the test; nothing here skips.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .cluster import leftovers, user_env

VENV = Path("/opt/spunnel/venv")
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def chromium_path() -> str:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: tests/cluster/up.sh installs Debian's chromium",
                    pytrace=False)  # fmt: skip
    return str(CHROMIUM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Lab:
    """A running JupyterLab server."""

    proc: subprocess.Popen[bytes]
    port: int
    token: str
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/lab?token={self.token}"

    def api(self, method: str, path: str) -> tuple[int, dict | None]:
        """Call the server's REST API with the token; (status, JSON body or None)."""
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", method=method,
                                     headers={"Authorization": f"token {self.token}"})  # fmt: skip
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                body = resp.read()
                return resp.status, json.loads(body) if body else None
        except urllib.error.HTTPError as e:
            body = e.read()
            return e.code, json.loads(body) if body else None

    def output(self) -> str:
        """The server's log so far, the token masked."""
        return self.log.read_text(errors="replace").replace(self.token, "<token>")

    def leftovers(self, user: str) -> list[str]:
        """``cluster.leftovers`` of ``user``, except this server itself (it runs as that user)."""
        return [p for p in leftovers(user) if not p.startswith(f"process {self.proc.pid}:")]


@contextlib.contextmanager
def jupyterlab(user: str, artifacts: Path, timeout: float = 60) -> Iterator[Lab]:
    """``jupyter lab`` as ``user`` in their home, on a free port, with a fresh workspace.

    The token reaches the server in JUPYTER_TOKEN, never on its command line. The server's log is
    saved (token masked) to ``artifacts/jupyterlab.log``.
    """
    token = secrets.token_hex(24)
    port = free_port()
    scratch = Path(tempfile.mkdtemp(prefix="spunnel-lab-"))
    # Settings and workspaces of this run only (not the user's): no news prompt over the page.
    settings = scratch / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False})
    )
    subprocess.run(["chown", "-R", f"{user}:{user}", str(scratch)], check=True)
    log = scratch / "jupyterlab.log"
    with open(log, "wb") as out:
        # Settings and workspaces on the command line, not in the environment: srun passes the
        # environment on to the session's Jupyter on the node, which would restore this layout.
        proc = subprocess.Popen(
            [str(VENV / "bin" / "jupyter"), "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
             f"--port={port}", "--ServerApp.port_retries=0",
             f"--LabApp.user_settings_dir={scratch / 'settings'}",
             f"--LabApp.workspaces_dir={scratch / 'workspaces'}"],
            user=user, group=user, extra_groups=[], env=user_env(user, JUPYTER_TOKEN=token),
            cwd=f"/home/{user}", stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    lab = Lab(proc, port, token, log)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(f"jupyter lab exited ({proc.returncode}) at start:\n{lab.output()}")
            with contextlib.suppress(OSError):
                if lab.api("GET", "/api/status")[0] == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"jupyter lab does not answer after {timeout} s:\n{lab.output()}")
            time.sleep(0.2)
        yield lab
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        (artifacts / "jupyterlab.log").write_text(lab.output())
        subprocess.run(["rm", "-rf", str(scratch)], check=False)
