"""State shared by the fake executables: one directory named by $FAKE_SLURM_DIR.

    $FAKE_SLURM_DIR/jobs/N.json   one job (state, reason, node, comment, pids, end time)
    $FAKE_SLURM_DIR/calls.log     one JSON line per invocation ({"argv": [...]}) or event
    $FAKE_SLURM_DIR/ctl/NAME      switches a test sets and clears (see README in fakebin.py)

Standard library only; imported by the fakes (as ``common``) and by the tests
(``tests.fakes.common``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from typing import Any

ACTIVE = ("PENDING", "CONFIGURING", "RUNNING", "SUSPENDED", "COMPLETING")
FIRST_JOB_ID = 1000
DEFAULT_PARTITIONS = [  # what `sinfo` shows; a test may write its own partitions.json
    {"name": "interact", "default": True, "avail": "up", "limit": "8:00:00", "mem": 8000,
     "cpus": 2},
    {"name": "debug", "default": False, "avail": "up", "limit": "1:00:00", "mem": 8000,
     "cpus": 2},
]  # fmt: skip


def root() -> str:
    return os.environ["FAKE_SLURM_DIR"]


def path(*parts: str) -> str:
    return os.path.join(root(), *parts)


def node_name() -> str:
    """The one compute node: this machine, as the launcher reports it (socket.gethostname)."""
    return socket.gethostname()


def eprint(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _append(record: dict[str, Any]) -> None:
    line = (json.dumps(record) + "\n").encode()
    fd = os.open(path("calls.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)  # one write per line with O_APPEND: lines never interleave
    finally:
        os.close(fd)


def log_call(prog: str, argv: list[str]) -> None:
    """One line per invocation of a fake: who, with what argv, when."""
    _append({"t": time.time(), "prog": prog, "pid": os.getpid(), "argv": argv})


def log_event(prog: str, event: str, **fields: Any) -> None:
    """Something a fake did (a state change, a signal forwarded, a master's exit)."""
    _append({"t": time.time(), "prog": prog, "pid": os.getpid(), "event": event, **fields})


def flag(name: str) -> str | None:
    """The content of the switch ``ctl/NAME``, or None when the test has not set it."""
    try:
        with open(path("ctl", name)) as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def locked() -> Iterator[None]:
    fd = os.open(path("lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _job_file(job_id: int) -> str:
    return path("jobs", f"{job_id}.json")


def read_job(job_id: int) -> dict[str, Any] | None:
    try:
        with open(_job_file(job_id)) as f:
            return json.load(f)  # type: ignore[no-any-return]
    except (FileNotFoundError, ValueError):
        return None


def _write_job(job: dict[str, Any]) -> None:
    tmp = _job_file(job["job_id"]) + f".{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(job, f)
    os.replace(tmp, _job_file(job["job_id"]))


def new_job(**fields: Any) -> dict[str, Any]:
    with locked():
        counter = path("next_id")
        try:
            with open(counter) as f:
                job_id = int(f.read())
        except (FileNotFoundError, ValueError):
            job_id = FIRST_JOB_ID
        with open(counter, "w") as f:
            f.write(str(job_id + 1))
        job = {"job_id": job_id, "submit_time": time.time(), **fields}
        _write_job(job)
    log_event("slurm", "state", job=job_id, state=job.get("state"))
    return job


def update_job(job_id: int, only_if: tuple[str, ...] = (), **changes: Any) -> dict[str, Any] | None:
    """Change a job under the lock (only while its state is one of ``only_if``, if given);
    None if it is not there or not in such a state. A state change is logged as an event."""
    with locked():
        job = read_job(job_id)
        if job is None or (only_if and job.get("state") not in only_if):
            return None
        before = job.get("state")
        job.update(changes)
        _write_job(job)
    if job.get("state") != before:
        log_event("slurm", "state", job=job_id, state=job["state"], was=before)
    return job


def all_jobs() -> list[dict[str, Any]]:
    jobs = []
    for name in sorted(os.listdir(path("jobs"))):
        if name.endswith(".json"):
            job = read_job(int(name[: -len(".json")]))
            if job is not None:
                jobs.append(job)
    return jobs


def partitions() -> list[dict[str, Any]]:
    try:
        with open(path("partitions.json")) as f:
            return json.load(f)  # type: ignore[no-any-return]
    except FileNotFoundError:
        return DEFAULT_PARTITIONS


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def parse_time_limit(text: str) -> int | None:
    """Seconds in a Slurm time limit (minutes, MM:SS, HH:MM:SS, D-HH[:MM[:SS]]); None: none."""
    if not text or text.upper() in ("UNLIMITED", "INFINITE"):
        return None
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:
        parts += [0] * (3 - len(parts))
        return int(days) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]
    if len(parts) == 1:
        return parts[0] * 60
    if len(parts) == 2:
        return parts[0] * 60 + parts[1]
    return parts[0] * 3600 + parts[1] * 60 + parts[2]


def slurm_time(epoch: float | None) -> str:
    """Slurm's local time format (what scontrol prints), or Unknown."""
    if epoch is None:
        return "Unknown"
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(epoch))
