"""The frozen settings a session runs with, taken from the site configuration once at its start.

A session never reads the manager: it gets this object (and the Slurm backend and ssh settings it
names), so changing the configuration of a running server cannot change a running session.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .backend import SlurmBackend
from .fields import SessionRequest
from .protocol import LauncherSettings
from .tunnel import SshTunnel


@dataclass(frozen=True)
class SessionSettings:
    slurm: SlurmBackend
    tunnel: SshTunnel
    log: logging.Logger | logging.LoggerAdapter  # type: ignore[type-arg]
    launcher_command: tuple[str, ...]
    runtime_base: str
    jupyter_command: tuple[str, ...]
    jupyter_args: tuple[str, ...]
    start_timeout: float
    stop_timeout: float
    jupyter_stop_grace: float
    pending_poll_interval: float
    refresh_interval: float
    logs_kept: int
    warn_before: tuple[int, ...] = (10, 1)  # minutes before the time limit
    save_grace: float = 2.0  # seconds a planned end waits for an open browser to save
    private_tmp: tuple[bool, str, tuple[str, ...]] = (True, "", ("/var/tmp", "/tmp"))  # noqa: S108

    def launcher(self, token: str, req: SessionRequest) -> LauncherSettings:
        """What the launcher on the node is told (an empty ``token``: it makes its own)."""
        return LauncherSettings(
            token=token, ui=req.ui, runtime_base=self.runtime_base,
            jupyter_command=list(self.jupyter_command), jupyter_args=list(self.jupyter_args),
            start_timeout=self.start_timeout, stop_grace=self.jupyter_stop_grace,
            idle_timeout=req.idle_timeout, warn_before=[m * 60 for m in self.warn_before],
            save_grace=self.save_grace, private_tmp=self.private_tmp[0], jupyter=req.jupyter,
            private_tmp_base=self.private_tmp[1], private_tmp_mounts=list(self.private_tmp[2]),
            kernel_envs=list(req.kernel_envs),
        )  # fmt: skip
