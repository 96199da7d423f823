"""Every wire format of spunnel-jupyter, defined once.

- **Settings** (``LauncherSettings``): the one JSON line the supervisor writes to srun's stdin
  for the launcher on the node, token included; then commands (``reverse_command``).
- **Node events** (``NodeEvent``): ``@spunnel {json}`` lines the launcher prints on stdout.
- **Control verbs** (``ControlRequest``): one line on the supervisor's control socket
  (``stop``, ``forward SP:EP``, ``cancel SP:EP``), answered ``ok TEXT`` or ``error TEXT``.
- **Session record** (``SessionRecord``): ``session.json`` (0600; holds the token) and
  ``last.json``; ``public_view`` is what ``status --json``, the REST API and the event stream show.
- **Job tag**: the ``--comment`` that marks the jobs of this tool (``job_tag``); a detached
  session's job has its own prefix (``detached_tag``), so that no host's cleanup of leftovers
  takes it for one.
- **Detached sessions**: the files the launcher keeps in its runtime directory for followers
  (``TOKEN_FILE``, ``EVENTS_FILE``, ``JUPYTER_LOG``) and the environment variable that carries
  its settings (``SETTINGS_ENV``).
- **Notices** (``NOTICE_FILE``, ``SAVED_FILE``, ``POLLED_FILE``): what the launcher tells the
  node's JupyterLab (end time, warnings, save requests) and what it answers, through the node's
  server extension (node_extension.py), in files of the runtime directory (``RUNDIR_ENV``).

Standard library only: the launcher imports it on the node, in any Python.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any

# Bumped whenever a format here changes incompatibly: a launcher of another version refuses.
VERSION = 3
EVENT_PREFIX = "@spunnel "
TAG_PREFIX = "spunnel-jupyter"  # jobs are tagged --comment=spunnel-jupyter:<host>:<session>
DETACHED_PREFIX = "spunnel-jupyter-detached"  # ... and detached ones with this prefix instead
SETTINGS_ENV = "SPUNNEL_SETTINGS"  # a detached launcher's settings (no token in them)
TOKEN_FILE, EVENTS_FILE, JUPYTER_LOG = "token", "events", "jupyter.log"  # in the runtime dir
TMP_NOTE = "private-tmp.json"  # in the runtime dir: {"mode", "text"} of Jupyter's private /tmp


UI_PATHS = {"lab": "/lab", "notebook": "/tree"}  # the UI a session opens, and its URL path


def ui_path(ui: str) -> str:
    """The URL path of a UI ("lab" -> /lab, "notebook" -> /tree)."""
    return UI_PATHS.get(ui, "/lab")


def job_tag(session_id: str = "", host: str = "") -> str:
    """The job's --comment; with no ``session_id`` the prefix every job of this host has."""
    return f"{TAG_PREFIX}:{host or socket.gethostname()}:{session_id}"


def detached_tag(session_id: str, host: str = "") -> str:
    """The --comment of a detached session's job (started on ``host``)."""
    return f"{DETACHED_PREFIX}:{host or socket.gethostname()}:{session_id}"


def parse_detached_tag(comment: str) -> str | None:
    """The login host a detached session was started on, or None if ``comment`` is not one."""
    prefix, _, rest = comment.partition(":")
    host, _, session_id = rest.partition(":")
    return host if prefix == DETACHED_PREFIX and host and session_id else None


FOLLOWER_PREFIX = "spunnel-attach@"


def follower_name(host: str = "") -> str:
    """The name of an attached host's step in a detached job: where its tunnels are."""
    return FOLLOWER_PREFIX + (host or socket.gethostname())


class ProtocolError(ValueError):
    """A line that is not what the protocol says it should be."""


class VersionMismatch(ProtocolError):
    """The other side speaks another version of this protocol."""


# -- settings: login side -> launcher ------------------------------------------------------------
@dataclass(frozen=True)
class LauncherSettings:
    token: str
    ui: str = "lab"
    runtime_base: str = ""
    jupyter_command: list[str] = field(default_factory=list)
    jupyter_args: list[str] = field(default_factory=list)
    start_timeout: float = 300.0
    stop_grace: float = 1.0
    idle_timeout: int = 0  # minutes; Jupyter ends itself after that long without activity
    warn_before: list[int] = field(default_factory=lambda: [600, 60])  # s before the time limit
    save_grace: float = 2.0  # s a planned end waits for the browser to save (if one is there)
    private_tmp: bool = False  # Jupyter in a private /tmp (privatetmp.py; on by site default)
    private_tmp_base: str = ""  # "": in the runtime directory
    private_tmp_mounts: list[str] = field(default_factory=lambda: ["/var/tmp", "/tmp"])  # noqa: S108
    jupyter: bool = True  # False (--no-jupyter): no Jupyter, the step holds the allocation
    kernel_envs: list[str] = field(default_factory=list)  # --env: environments offered as kernels
    version: int = VERSION

    def line(self) -> bytes:
        return (json.dumps(dataclasses.asdict(self)) + "\n").encode()

    @classmethod
    def parse(cls, line: bytes | str) -> LauncherSettings:
        """The settings in ``line``; ProtocolError if malformed or of another version."""
        try:
            data = json.loads(line)
            version = data.get("version", 1)
        except (ValueError, AttributeError) as e:
            raise ProtocolError("no settings on stdin: run me through spunnel-notebook") from e
        if version != VERSION:
            raise VersionMismatch(
                f"the login host speaks spunnel protocol {version}, the launcher on the node "
                f"{VERSION}"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except TypeError as e:
            raise ProtocolError(f"malformed settings: {e}") from e


def reverse_command(plan: dict[str, Any]) -> bytes:
    """The supervisor's command to the launcher: dial back to the login host with ``plan``."""
    return (json.dumps({"cmd": "reverse", "plan": plan}) + "\n").encode()


# -- events: launcher -> login side --------------------------------------------------------------
STARTED, READY, EXITED, TUNNEL = "started", "ready", "exited", "tunnel"
WARNING = "warning"  # {"text"}: a warning the node gave (idle release ahead) for every front end
TOKEN = "token"  # noqa: S105 (an event: a follower says Jupyter's token first, never logged)
EXIT_REASONS = ("error", "signal", "tunnel-error", "jupyter-exit", "version", "idle")


@dataclass(frozen=True)
class NodeEvent:
    """One event from the node. ``fields`` holds the event's own data (socket, host, code...)."""

    kind: str
    fields: dict[str, Any]

    def get(self, name: str, default: Any = None) -> Any:
        return self.fields.get(name, default)

    def line(self) -> str:
        return EVENT_PREFIX + json.dumps({"event": self.kind, **self.fields}) + "\n"

    @classmethod
    def parse(cls, line: str) -> NodeEvent | None:
        """The event in ``line``, or None if the line is not an event (Jupyter's log, srun's)."""
        if not line.startswith(EVENT_PREFIX):
            return None
        try:
            data = json.loads(line[len(EVENT_PREFIX) :])
            kind = data.pop("event")
        except (ValueError, KeyError, TypeError, AttributeError):
            return None
        return cls(str(kind), data)


# -- notices: launcher <-> the node's JupyterLab, as files in the launcher's runtime directory --
RUNDIR_ENV = "SPUNNEL_RUNDIR"  # in Jupyter's environment: where the files below are
NODE_FLAG = "spunnelNode"  # page config option set on the node: the node plugin runs there only
# notice.json (the launcher writes it): {"end_time": epoch or null, "warnings": [{"id", "text",
# "at"}...], "save_seq": N}; a save is asked for by raising save_seq.
# saved.json (node_extension.py writes the browser's answer): {"seq": N, "saved": [paths],
# "failed": [paths], "at": epoch}. browser-polled: touched on every GET of the notice.
# idle.json (node_extension.py writes it, with --idle-timeout): {"release_at": epoch or null}, when
# Jupyter would end itself for want of activity (null: a busy or connected kernel holds it).
NOTICE_FILE, SAVED_FILE, POLLED_FILE = "notice.json", "saved.json", "browser-polled"
IDLE_FILE = "idle.json"
MAX_PATHS = 1000  # paths kept in a saved answer


def empty_notice() -> dict[str, Any]:
    return {"end_time": None, "warnings": [], "save_seq": 0}


def saved_answer(body: Any) -> dict[str, Any]:
    """The browser's answer to save request ``seq``, checked; ProtocolError if malformed."""
    if not isinstance(body, dict) or type(body.get("seq")) is not int:
        raise ProtocolError('expected {"seq": N, "saved": [paths], "failed": [paths]}')
    lists = {}
    for name in ("saved", "failed"):
        paths = body.get(name, [])
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise ProtocolError(f"{name} must be a list of paths")
        lists[name] = paths[:MAX_PATHS]
    return {"seq": body["seq"], **lists, "at": time.time()}


# -- control verbs: front end -> supervisor ------------------------------------------------------
STOP, FORWARD, CANCEL = "stop", "forward", "cancel"


@dataclass(frozen=True)
class ControlRequest:
    verb: str
    arg: str = ""

    def line(self) -> bytes:
        return f"{self.verb} {self.arg}".strip().encode() + b"\n"

    @classmethod
    def parse(cls, line: bytes) -> ControlRequest:
        words = line.decode(errors="replace").split()
        if words == [STOP]:
            return cls(STOP)
        if len(words) == 2 and words[0] in (FORWARD, CANCEL):
            return cls(words[0], words[1])
        raise ProtocolError("unknown command")


def reply(ok: bool, text: str) -> bytes:
    return f"{'ok' if ok else 'error'} {text}".encode() + b"\n"


def parse_reply(line: bytes) -> tuple[bool, str]:
    status, _, text = line.decode(errors="replace").strip().partition(" ")
    return status == "ok", text


# -- the session record ------------------------------------------------------------------------
SECRET = ("token", "srun_pid", "srun_start", "ssh_pid", "ssh_start", "supervisor_start")


@dataclass
class SessionRecord:
    """What ``session.json`` holds. ``public_view`` drops what only the supervisor needs."""

    session_id: str
    host: str
    user: str
    owner: str  # "cli" or "jupyterlab"
    phase: str
    kind: str = "foreground"  # or "detached" (its job outlives this host's part), "attached"
    job_id: int | None = None
    job_state: str = "PENDING"
    reason: str = ""
    node: str = ""
    port: int = 0
    tunnels: list[str] = field(default_factory=list)
    tunnel_state: str = "down"
    tunnel_mode: str = ""
    notes: list[str] = field(default_factory=list)
    end_time: float | None = None
    warnings: list[str] = field(default_factory=list)  # the node's warnings (idle release ahead)
    expected_start: float | None = None  # pending: when Slurm expects to start the job
    times: dict[str, float] = field(default_factory=dict)
    supervisor_pid: int = 0
    supervisor_start: int | None = None
    log: str = ""
    url: str = ""
    ended_reason: str = ""
    token: str = ""
    srun_pid: int | None = None
    srun_start: int | None = None
    ssh_pid: int | None = None
    ssh_start: int | None = None
    version: int = VERSION

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SessionRecord | None:
        """The record in ``data``, or None if it is torn or of an unknown shape."""
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except TypeError:
            return None


def public_view(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """A record as every front end shows it: no bare token or pids; durations and time left."""
    if not record:
        return None
    view = {k: v for k, v in record.items() if k not in SECRET}
    times = record.get("times") or {}
    steps = [("queued", "submitted", "running"), ("starting", "running", "ready")]
    view["durations"] = {
        name: round(times[b] - times[a], 3) for name, a, b in steps if a in times and b in times
    }
    end = record.get("end_time")
    view["time_left"] = max(0.0, end - time.time()) if end else None
    return view
