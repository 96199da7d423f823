"""Fake pyslurm: the subset of pyslurm 25.11's API that spunnel's pyslurm backend uses, over the
fake cluster's job files (common.py), answering as the fake commands do (fake_slurm.py).

Tests put tests/fakes/pylib first on the Python path. Like the real one, importing it may end the
process when Slurm's configuration cannot be found (the switch ``pyslurm_fatal``). Every call
appends ``{"prog": "pyslurm", "argv": [CALL, ...]}`` to calls.log and honours the switches
controller_down, munge_down and slurm_delay.
"""

from __future__ import annotations

import ctypes
import getpass
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/fakes: common, fake_slurm

import common
import fake_slurm

from . import utils  # noqa: F401

__version__ = "25.11.2"
_LIBC = ctypes.PyDLL(None)  # PyDLL: its calls keep the GIL

if common.flag("pyslurm_fatal") is not None:  # what libslurm does without a configuration
    sys.stderr.write("fatal: Could not establish a configuration source\n")
    os._exit(1)


class RPCError(Exception):
    def __init__(self, errno: int = -1, msg: str | None = None) -> None:
        self.errno, self.msg = errno, msg or f"Slurm error {errno}"
        super().__init__(self.msg)


def _rpc(call: str, *args: object) -> None:
    """Log the call, wait as a slow controller would, and fail as an unreachable one."""
    common.log_call("pyslurm", [call, *map(str, args)])
    # As the real one waits for the controller: holding the GIL (measured: a call to an
    # unreachable controller froze every other thread of the process for its 10 s).
    _LIBC.usleep(int(float(common.flag("slurm_delay") or 0) * 1e6))
    if common.flag("controller_down") is not None:
        raise RPCError(1001, fake_slurm.UNREACHABLE)
    if common.flag("munge_down") is not None:
        raise RPCError(1007, fake_slurm.AUTH_ERROR)


class Job:
    def __init__(self, job_id: int) -> None:
        self.id = job_id

    @classmethod
    def _of(cls, record: dict[str, Any]) -> Job:
        job = cls(record["job_id"])
        pending = record["state"] == "PENDING"
        job.state = record["state"]
        job.state_reason = record.get("reason") or "None"
        job.allocated_nodes = None if pending else record.get("node")
        job.comment = record.get("comment") or None
        job.user_id = os.getuid() if record["user"] == getpass.getuser() else 0
        job.end_time = int(record["end_time"]) if record.get("end_time") else None
        job.start_time = int(record["start_time"]) if record.get("start_time") else None
        return job

    @staticmethod
    def load(job_id: int) -> Job:
        _rpc("Job.load", job_id)
        record = common.read_job(int(job_id))
        if record is None or record.get("purged"):
            raise RPCError(2017, "Invalid job id specified")
        return Job._of(record)

    def cancel(self) -> None:
        _rpc("Job.cancel", self.id)
        error = fake_slurm.cancel_job(int(self.id))
        # as the real one: "already done" is no error, nor "invalid job id" for a cancel
        if error and "already completing" not in error and "Invalid job id" not in error:
            raise RPCError(msg=error)


class Jobs(dict):  # type: ignore[type-arg]
    @staticmethod
    def load() -> Jobs:
        _rpc("Jobs.load")
        jobs = Jobs()
        for record in common.all_jobs():
            if not record.get("purged"):
                jobs[record["job_id"]] = Job._of(record)
        return jobs


class Partition:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.name = spec["name"]
        self.is_default = bool(spec["default"])
        self.is_hidden = bool(spec.get("hidden"))
        self.state = "UP" if spec["avail"] == "up" else "DOWN"
        limit = common.parse_time_limit(spec["limit"])
        self.max_time = "UNLIMITED" if limit is None else limit // 60
        self.nodes = common.node_name()


class Partitions(dict):  # type: ignore[type-arg]
    @staticmethod
    def load() -> Partitions:
        _rpc("Partitions.load")
        return Partitions((p["name"], Partition(p)) for p in common.partitions())


class Node:
    def __init__(self, name: str, specs: list[dict[str, Any]]) -> None:
        self.name = name
        self.partitions = [p["name"] for p in specs]
        self.real_memory = max(int(p["mem"]) for p in specs)
        self.total_cpus = max(int(p["cpus"]) for p in specs)


class Nodes(dict):  # type: ignore[type-arg]
    @staticmethod
    def load() -> Nodes:
        _rpc("Nodes.load")
        name = common.node_name()
        return Nodes({name: Node(name, common.partitions())})
