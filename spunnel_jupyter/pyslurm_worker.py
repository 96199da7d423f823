"""The pyslurm worker: the process in which the login side's pyslurm backend (pyslurm_backend.py)
imports pyslurm and makes its calls, one JSON line each way on stdin and stdout.

Why a process of its own and not a thread: importing pyslurm ends the process when Slurm's
configuration cannot be found (no exception to catch); pyslurm's calls hold the GIL while they
wait for the controller, so in a thread they would freeze the JupyterLab server's event loop with
them; and a call the controller never answers can be ended only by ending its process. One
long-lived worker still saves the fork and exec of a Slurm command for every query.

    first line out   {"version": pyslurm.__version__}
    each line in     {"call": "job" | "my_jobs" | "partitions" | "cancel", "args": [...]}
    each line out    {"ok": result} or {"error": Slurm's own text} or {"bug": what went wrong}

Standard library and pyslurm only: it starts in a fresh interpreter.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any


def job(ps: Any, job_id: int) -> dict[str, Any]:
    j = ps.Job.load(job_id)
    return {"state": j.state, "reason": j.state_reason, "nodes": j.allocated_nodes,
            "end": j.end_time, "start": j.start_time}  # fmt: skip


def my_jobs(ps: Any, uid: int, node: str) -> list[list[Any]]:
    found = []
    for j in ps.Jobs.load().values():
        if j.user_id != uid:
            continue
        if node and node not in ps.utils.helpers.nodelist_from_range_str(j.allocated_nodes or ""):
            continue
        found.append([j.id, j.comment or "", j.state])
    return found


def partitions(ps: Any) -> list[dict[str, Any]]:
    found = {
        p.name: {"name": p.name, "default": bool(p.is_default), "available": p.state == "UP",
                 "max_time": p.max_time, "max_mem_mb": 0, "max_cpus": 0, "nodes": 0}
        for p in ps.Partitions.load().values()
        if not p.is_hidden  # as sinfo: a hidden partition is not offered
    }  # fmt: skip
    for n in ps.Nodes.load().values():
        for name in n.partitions or ():
            if (part := found.get(name)) is not None:
                part["max_mem_mb"] = max(part["max_mem_mb"], int(n.real_memory or 0))
                part["max_cpus"] = max(part["max_cpus"], int(n.total_cpus or 0))
                part["nodes"] += 1
    return list(found.values())


def cancel(ps: Any, job_id: int) -> None:
    ps.Job(job_id).cancel()  # "already done", and "invalid job id" for a cancel, are no error


CALLS: dict[str, Callable[..., Any]] = {
    "job": job,
    "my_jobs": my_jobs,
    "partitions": partitions,
    "cancel": cancel,
}


def main() -> None:
    import pyslurm  # may end this process: the backend then reads why from our stderr

    def send(reply: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()

    send({"version": pyslurm.__version__})
    for line in sys.stdin:
        request = json.loads(line)
        try:
            send({"ok": CALLS[request["call"]](pyslurm, *request["args"])})
        except pyslurm.RPCError as e:
            send({"error": str(e) or f"Slurm error {getattr(e, 'errno', '?')}"})
        except Exception as e:  # pyslurm's API changed under us: say so, keep serving
            send({"bug": f"{type(e).__name__}: {e}"})


if __name__ == "__main__":
    main()
