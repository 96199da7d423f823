"""``spunnel-notebook ARGS`` run against the fakes (tests/fakes/cluster.py) on a pseudo-terminal of
its own, as a user's terminal runs it; the shell step, when asked for, is fake_shell.py."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import re
import select
import subprocess
import sys
import termios
import time
from pathlib import Path
from typing import Any

from tests.fakes.cluster import FAKES, FakeCluster

FAKE_SHELL = FAKES / "fake_shell.py"


def site(fake: FakeCluster, **sections: dict[str, Any]) -> Path:
    """A site configuration directory (for JUPYTER_CONFIG_PATH) pointing at the fakes."""
    config = fake.config(
        NodeShell={"command": [sys.executable, str(FAKE_SHELL), "-l"], "stop_grace": 1.0},
        SshTunnel={"mode": "forward"},
        **sections,
    )
    path = fake.root / "site"
    path.mkdir(exist_ok=True)
    (path / "jupyter_spunnel_jupyter_config.json").write_text(json.dumps(config))
    return path


class Terminal:
    """``spunnel-notebook ARGS`` on a pseudo-terminal of its own (its controlling terminal, as
    a login shell's child would have it), TOSTOP set: a background write would stop it."""

    def __init__(self, fake: FakeCluster, *args: str, tty: bool = True, **sections: Any) -> None:
        env = {**os.environ, "JUPYTER_CONFIG_PATH": str(site(fake, **sections)),
               "JUPYTER_CONFIG_DIR": str(fake.root / "user")}  # fmt: skip
        argv = [sys.executable, "-m", "spunnel_jupyter.cli", *args]
        self.output = ""
        self.master: int | None = None
        if not tty:
            self.proc = subprocess.Popen(
                argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
            return
        self.master, slave = pty.openpty()
        modes = termios.tcgetattr(slave)
        modes[3] |= termios.TOSTOP
        termios.tcsetattr(slave, termios.TCSANOW, modes)

        def controlling_terminal() -> None:
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen(
            argv, env=env, stdin=slave, stdout=slave, stderr=slave,
            preexec_fn=controlling_terminal,
        )  # fmt: skip
        os.close(slave)

    def _read(self, timeout: float) -> str:
        fd = self.master if self.master is not None else self.proc.stdout.fileno()  # type: ignore[union-attr]
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            return ""
        try:
            return os.read(fd, 65536).decode(errors="replace")
        except OSError:  # the pty's other side is closed
            return ""

    def wait_for(self, pattern: str, timeout: float = 20) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while not (m := re.search(pattern, self.output)):
            chunk = self._read(0.1)
            self.output += chunk
            if time.monotonic() > deadline or (not chunk and self.proc.poll() is not None):
                self.output += self._read(0.2)
                if m := re.search(pattern, self.output):
                    return m
                raise AssertionError(f"{pattern!r} not seen; output:\n{self.output}")
        return m

    def type(self, text: str) -> None:
        assert self.master is not None
        os.write(self.master, text.encode())

    def finish(self, timeout: float = 20) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.output += self._read(0.1)
        assert self.proc.poll() is not None, f"still running:\n{self.output}"
        while chunk := self._read(0.1):
            self.output += chunk
        return self.proc.returncode

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.master is not None:
            with contextlib.suppress(OSError):
                os.close(self.master)
