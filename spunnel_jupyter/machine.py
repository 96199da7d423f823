"""A session's life as an explicit state machine: its phases, the tunnel's sub-state, the events
that move them, and the one table of allowed transitions.

    PENDING --Allocated/started--> STARTING --TunnelUp--> READY
       |                                  |                    |
       +------ SrunExited, StopRequested, Failed (any phase) --+--> ENDING --teardown--> ENDED

    the tunnel, once READY:  UP --TunnelLost--> RECONNECTING --TunnelUp--> UP

What each event does in each phase is decided in one place, ``Session.handle`` (session.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .backend import JobInfo
from .errors import ExitCode, SpunnelError
from .protocol import NodeEvent


class Phase(str, Enum):
    PENDING = "pending"  # submitted, waiting for the allocation
    STARTING = "starting"  # job running, Jupyter starting / tunnel being built
    READY = "ready"  # the URL answers through the tunnel
    ENDING = "ending"  # teardown in progress
    ENDED = "ended"


class TunnelState(str, Enum):
    DOWN = "down"  # not built yet, or closed
    UP = "up"  # the URL answers through it
    RECONNECTING = "reconnecting"  # lost while the job runs; being rebuilt on the same port


TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.PENDING: frozenset({Phase.STARTING, Phase.ENDING}),
    Phase.STARTING: frozenset({Phase.READY, Phase.ENDING}),
    Phase.READY: frozenset({Phase.ENDING}),
    Phase.ENDING: frozenset({Phase.ENDED}),
    Phase.ENDED: frozenset(),
}
TUNNEL_TRANSITIONS: dict[TunnelState, frozenset[TunnelState]] = {
    TunnelState.DOWN: frozenset({TunnelState.UP}),
    TunnelState.UP: frozenset({TunnelState.RECONNECTING, TunnelState.DOWN}),
    TunnelState.RECONNECTING: frozenset({TunnelState.UP, TunnelState.DOWN}),
}


class IllegalTransition(RuntimeError):
    """A bug: something tried a move the table does not allow."""


def check_move(table: dict, current: Enum, new: Enum) -> None:  # type: ignore[type-arg]
    if new is not current and new not in table[current]:
        raise IllegalTransition(f"{current.value} -> {new.value}")


@dataclass
class Outcome:
    """How a session ended, as the user is told: the reason, the exit code, the error if any."""

    reason: str
    exit_code: ExitCode = ExitCode.OK
    error: SpunnelError | None = None
    ends_job: bool = False  # a detached session's job ends too (`stop`), not only this host's part

    @classmethod
    def of(cls, error: SpunnelError) -> Outcome:
        return cls(error.message, error.exit_code, error)


def keeps_job(kind: str, outcome: Outcome, was_ready: bool) -> bool:
    """Whether teardown leaves the job running: a detached session's job outlives this host's
    part of it (a signal, a lost tunnel, a detach), unless `stop` ends it, or it fails before its
    first URL (nothing of it ever reached the user); an attached host never ends it on its own."""
    if kind == "foreground" or outcome.ends_job:
        return False
    return kind == "attached" or was_ready


# -- events: everything that can happen to a session, from every source -------------------------
class Event:
    """Base of the events ``Session.handle`` decides on."""


@dataclass
class Queued(Event):  # srun: the job is queued (its id is known)
    job_id: int


@dataclass
class Allocated(Event):  # srun: the job has its allocation
    job_id: int


@dataclass
class FromNode(Event):  # the launcher said something (started, ready, exited, tunnel)
    event: NodeEvent


@dataclass
class SrunExited(Event):  # srun ended with ``code`` (the node channel works out why)
    code: int


@dataclass
class StopRequested(Event):  # a signal, `spunnel-notebook stop`, JupyterLab's Stop, a server stop
    outcome: Outcome


@dataclass
class TunnelUp(Event):  # the URL answers through the tunnel (first time, or after a loss)
    what: str = "tunnel re-established"


@dataclass
class TunnelLost(Event):  # the tunnel dropped while the job runs; it is being rebuilt
    message: str


@dataclass
class Failed(Event):  # a collaborator failed for good (tunnel not built / not rebuilt, ...)
    error: SpunnelError


@dataclass
class JobPolled(Event):  # the periodic look at the job (pending reason, end time)
    info: JobInfo


ENDING_EVENTS = (SrunExited, StopRequested, Failed)
