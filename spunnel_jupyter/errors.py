"""One exception type for everything a user should be told, and the exit codes it maps to.

A ``SpunnelError`` carries what went wrong (``message``) and what to do about it (``remedy``).
The CLI prints both as ``spunnel-notebook: error: ...`` and exits with ``exit_code``; the REST API
returns them as JSON with ``http_status``.  Anything else that escapes is a bug and is shown with a
traceback only under ``--debug``.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Exit codes of ``spunnel-notebook`` (documented in README.md)."""

    OK = 0  # the session ran and ended (stopped, Jupyter shut down, job ended)
    ERROR = 1  # an unexpected failure; rerun with --debug
    USAGE = 2  # bad input: options, ports, partition, memory, time limit
    BUSY = 3  # this user already has a session on this host
    SLURM = 4  # Slurm commands missing, controller unreachable, or Slurm refused the job
    TUNNEL = 5  # the ssh tunnel could not be established or was lost
    JUPYTER = 6  # Jupyter failed to start on the node
    STATE = 7  # the state directory is unsafe or unusable
    NO_SESSION = 8  # `status`/`stop`: there is no session
    SIGHUP = 129  # terminal closed
    SIGINT = 130  # Ctrl-C
    SIGTERM = 143  # terminated


class SpunnelError(Exception):
    """A failure the user can act on."""

    exit_code: ExitCode = ExitCode.ERROR
    http_status: int = 500

    def __init__(self, message: str, remedy: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.remedy = remedy

    def __str__(self) -> str:
        return f"{self.message} ({self.remedy})" if self.remedy else self.message

    def to_json(self) -> dict[str, str]:
        return {"message": self.message, "remedy": self.remedy, "kind": type(self).__name__}


class UsageError(SpunnelError):
    """The request cannot be satisfied as given; nothing was submitted."""

    exit_code = ExitCode.USAGE
    http_status = 400


class SessionExists(SpunnelError):
    exit_code = ExitCode.BUSY
    http_status = 409


class NoSession(SpunnelError):
    exit_code = ExitCode.NO_SESSION
    http_status = 404


class SlurmUnavailable(SpunnelError):
    """Slurm commands missing or the controller does not answer."""

    exit_code = ExitCode.SLURM
    http_status = 503


class SlurmRejected(SpunnelError):
    """Slurm refused the job for a reason that is not plainly the user's input."""

    exit_code = ExitCode.SLURM
    http_status = 502


class SlurmLost(SpunnelError):
    """srun, our handle on the job, ended while the job still ran."""

    exit_code = ExitCode.SLURM
    http_status = 502


class TunnelError(SpunnelError):
    exit_code = ExitCode.TUNNEL
    http_status = 502


class JupyterError(SpunnelError):
    exit_code = ExitCode.JUPYTER
    http_status = 502


class StateError(SpunnelError):
    exit_code = ExitCode.STATE
    http_status = 500
