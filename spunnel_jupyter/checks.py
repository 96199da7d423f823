"""Refuse before submitting anything what Slurm would refuse, or leave pending forever: unknown
or down partitions, and a time limit, memory or CPUs no node of the partition can give. A value
that is the site's default is blamed on the site's configuration (its file and key), not the user.
"""

from __future__ import annotations

from .backend import Partition, SlurmBackend, format_duration, parse_mem_mb, parse_time_limit
from .config import site_config_key
from .envkernels import check_ipykernel
from .errors import UsageError
from .fields import SessionRequest


async def check_against_cluster(slurm: SlurmBackend, req: SessionRequest) -> None:
    """Refuse what Slurm would refuse (or leave pending forever) before submitting anything.

    With several partitions (``-p a,b``) each must exist, and the job is refused only if none
    of them can take it (Slurm runs it in whichever can). Each --env must import ipykernel.
    """
    try:
        await check_ipykernel(req.kernel_envs)
    except UsageError as e:
        if "env" not in req.from_site:
            raise
        where = site_config_key("SpunnelManager", "env")
        raise UsageError(
            f"{e.message}, from the site's {where}", f"ask your administrators to {e.remedy}"
        ) from e
    partitions = await slurm.partitions()
    names = ", ".join(p.name for p in partitions) or "none"
    by_name = {p.name: p for p in partitions}
    asked = [n for n in str(req.slurm.get("partition") or "").split(",") if n]
    for name in asked:
        if name not in by_name:
            raise _blame(req, "partition", f"unknown partition {name!r}", f"choose one of: {names}")
    wanted = [by_name[n] for n in asked] or [p for p in partitions if p.default]
    if not wanted:
        return  # no default partition visible: let Slurm decide
    refusals = [_refusal(part, req, names) for part in wanted]
    if refusals[0] is not None and all(refusals):
        field, message, remedy = refusals[0]
        raise _blame(req, field, message, remedy)


def _blame(req: SessionRequest, field: str, message: str, remedy: str) -> UsageError:
    """The cluster's refusal of ``field``: the user's to fix, or the site's when its value
    is the site's default (then naming the file and key)."""
    if field not in req.from_site:
        return UsageError(message, remedy)
    where = site_config_key("SpunnelManager", field)
    return UsageError(
        f"{message}, from the site's {where}",
        f"tell your administrators; meanwhile give your own ({remedy})",
    )


def _refusal(part: Partition, req: SessionRequest, names: str) -> tuple[str, str, str] | None:
    """Why partition ``part`` cannot run the request: (the field, message, remedy), or None."""
    time, mem = req.slurm.get("time"), req.slurm.get("mem")
    cpus = req.slurm.get("cpus_per_task")
    if not part.available:
        return "partition", f"partition {part.name!r} is down", f"choose one of: {names}"
    if time and part.max_time is not None:
        limit = parse_time_limit(time)
        if limit is None or limit > part.max_time:
            return (
                "time",
                f"time limit {time} exceeds partition {part.name!r}'s maximum "
                f"{format_duration(part.max_time)}",
                "ask for less time or choose another partition",
            )
    if mem and part.max_mem_mb and parse_mem_mb(mem) > part.max_mem_mb:
        return (
            "mem",
            f"--mem {mem} is more than any node in partition {part.name!r} has "
            f"({part.max_mem_mb} MB)",
            f"ask for at most {part.max_mem_mb} MB",
        )
    if cpus and part.max_cpus and cpus > part.max_cpus:
        return (
            "cpus_per_task",
            f"{cpus} CPUs is more than any node in partition {part.name!r} has ({part.max_cpus})",
            f"ask for at most {part.max_cpus}",
        )
    return None
