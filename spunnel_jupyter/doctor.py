"""``spunnel-notebook doctor``: what this site and this account allow, checked as the user.

Each check prints one row (ok / warn / FAIL, what was found, what to do). With ``--allocate`` it
also runs a one-minute test job: Jupyter and ipykernel importable on the node, ssh from here to
the node (allowed, refused, or adopted into the job by pam_slurm_adopt), and the reverse path
from the node back to this host. Exit status 1 if anything failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

from . import process
from .config import PrivateTmp
from .errors import SpunnelError
from .manager import SpunnelManager
from .protocol import job_tag
from .state import filesystem_type


@dataclass
class Check:
    name: str
    status: str  # "ok", "warn", "FAIL", "skip"
    detail: str
    remedy: str = ""


# Runs on the node inside the test job: report what the node has, dial back, wait to be released.
_NODE_PROBE = """
import importlib.util as u, json, os, socket, subprocess, sys
mods = {m: bool(u.find_spec(m)) for m in ("jupyter_server", "ipykernel", "jupyterlab")}
back = subprocess.run(sys.argv[1:] + ["true"], capture_output=True, text=True, timeout=30)
tmp = subprocess.run([sys.executable, "-m", "spunnel_jupyter.privatetmp", "--probe"],
                     capture_output=True, text=True, timeout=30)
print(json.dumps({"host": socket.gethostname(), "job": os.environ.get("SLURM_JOB_ID"),
                  "python": sys.executable, "modules": mods, "reverse_rc": back.returncode,
                  "reverse_err": back.stderr.strip()[-300:],
                  "private_tmp": (tmp.stdout or tmp.stderr).strip()[-300:]}), flush=True)
sys.stdin.readline()
"""


async def run_checks(manager: SpunnelManager, allocate: bool) -> list[Check]:
    checks: list[Check] = []
    slurm, tunnel = manager.slurm, manager.tunnel
    try:
        checks.append(Check("Slurm commands", "ok", ", ".join(slurm.commands())))
    except SpunnelError as e:
        checks.append(Check("Slurm commands", "FAIL", e.message, e.remedy))
        return checks
    try:
        checks.append(Check("Slurm backend", "ok", await slurm.describe()))
    except SpunnelError as e:
        checks.append(Check("Slurm backend", "FAIL", e.message, e.remedy))
        return checks
    try:
        parts = await slurm.partitions()
        default = next((p.name for p in parts if p.default), "none")
        down = [p.name for p in parts if not p.available]
        checks.append(Check(
            "Slurm controller", "warn" if down else "ok",
            f"{len(parts)} partitions ({', '.join(p.name for p in parts)}), default {default}"
            + (f"; down: {', '.join(down)}" if down else ""),
        ))  # fmt: skip
    except SpunnelError as e:
        checks.append(Check("Slurm controller", "FAIL", e.message, e.remedy))
        return checks
    try:
        state = manager.state()
        running = "a session is running" if state.is_locked() else "no session running"
        checks.append(Check(
            "state directory", "ok",
            f"{state.path} (0700, {filesystem_type(state.path)}, {running})",
        ))  # fmt: skip
    except SpunnelError as e:
        checks.append(Check("state directory", "FAIL", e.message, e.remedy))
    ssh = shutil.which(tunnel.ssh_command[0])
    checks.append(
        Check("ssh client", "ok", ssh)
        if ssh
        else Check("ssh client", "FAIL", f"{tunnel.ssh_command[0]} not found", "install OpenSSH")
    )
    if not allocate:
        checks.append(Check(
            "test allocation", "skip", "not run",
            "`spunnel-notebook doctor --allocate` also tests a job, ssh and the node's Jupyter",
        ))  # fmt: skip
        return checks
    checks.extend(await _allocation_checks(manager))
    return checks


async def _allocation_checks(manager: SpunnelManager) -> list[Check]:
    slurm, tunnel = manager.slurm, manager.tunnel
    python = manager.launcher_command[0] if manager.launcher_command else sys.executable
    back = [*tunnel.ssh_command, "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
            *tunnel.ssh_options, tunnel.reverse_host]  # fmt: skip
    req = manager.request({"time": "2", "job_name": "spunnel-doctor"})
    started = time.monotonic()
    srun = await slurm.start_step(
        req.srun_options(), job_tag("doctor"), [python, "-c", _NODE_PROBE, *back],
        stdin=asyncio.subprocess.PIPE, env=os.environ, death_signal=signal.SIGTERM,
    )  # fmt: skip
    checks: list[Check] = []
    try:
        assert srun.stdout is not None and srun.stdin is not None
        try:
            line = await asyncio.wait_for(srun.stdout.readline(), 120)
            report: dict[str, Any] = json.loads(line)
        except (asyncio.TimeoutError, ValueError):
            err = (await _drain(srun)).strip().splitlines()
            detail = err[-1] if err else "no job started within 120 s"
            return [Check("test allocation", "FAIL", detail, "check partitions and limits")]
        node = report["host"]
        checks.append(Check(
            "test allocation", "ok",
            f"job {report['job']} on {node} in {time.monotonic() - started:.1f} s",
        ))  # fmt: skip
        missing = [m for m, found in report["modules"].items() if not found]
        checks.append(Check(
            "Jupyter on the node", "FAIL" if missing else "ok",
            f"{report['python']}: " + (f"missing {', '.join(missing)}" if missing else
                                       "jupyter_server, ipykernel, jupyterlab importable"),
            "install them in the environment the nodes use (c.SpunnelManager.launcher_command)"
            if missing else "",
        ))  # fmt: skip
        checks.append(_private_tmp(manager, report["private_tmp"]))
        checks.append(await ssh_to_node(manager, node, str(report["job"])))
        checks.append(Check(
            "reverse path to this host", "ok" if report["reverse_rc"] == 0 else "FAIL",
            f"{node} -> {tunnel.reverse_host}: "
            + ("ssh works" if report["reverse_rc"] == 0 else report["reverse_err"] or "refused"),
            "" if report["reverse_rc"] == 0 else
            "set c.SshTunnel.reverse_host to this host's name as the nodes see it",
        ))  # fmt: skip
        srun.stdin.write(b"done\n")
        await asyncio.wait_for(srun.wait(), 30)
    finally:
        if srun.returncode is None:
            for job_id, tag, _ in await slurm.my_jobs():
                if tag == job_tag("doctor"):
                    await slurm.cancel(job_id)
            await process.stop(srun, grace=5, first=None)
    return checks


def _private_tmp(manager: SpunnelManager, found: str) -> Check:
    """Which private /tmp the node gives: the site's, ours (a user namespace), or only TMPDIR."""
    if not PrivateTmp(parent=manager).enabled:
        return Check("private /tmp", "ok", f"off (c.PrivateTmp.enabled); the node: {found}")
    if found.startswith(("ours:", "the site's:")):
        return Check("private /tmp", "ok", found)
    return Check(
        "private /tmp", "warn", found or "the probe said nothing",
        "kernels share the node's /tmp except through TMPDIR: allow unprivileged user "
        "namespaces on the nodes (sysctl user.max_user_namespaces), or give jobs a private /tmp "
        "(job_container/tmpfs)",
    )  # fmt: skip


async def ssh_to_node(manager: SpunnelManager, node: str, job: str) -> Check:
    tunnel = manager.tunnel
    argv = [*tunnel.ssh_command, "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
            *tunnel.ssh_options, node, "cat", "/proc/self/cgroup"]  # fmt: skip
    try:
        result = await process.run(argv, timeout=30)
    except TimeoutError:
        return Check("ssh to the node", "FAIL", f"ssh {node}: no answer in 30 s",
                     "forward mode cannot work; use --tunnel-mode reverse")  # fmt: skip
    if result.returncode != 0:
        why = (result.stderr.strip().splitlines() or ["refused"])[-1]
        adopt = "pam_slurm_adopt" in result.stderr
        return Check(
            "ssh to the node", "warn", f"refused: {why}",
            "sessions fall back to reverse mode (or use --tunnel-mode reverse)"
            + ("; pam_slurm_adopt refusals right after a job starts are retried" if adopt else ""),
        )  # fmt: skip
    adopted = f"job_{job}" in result.stdout
    how = "allowed, adopted into the job (pam_slurm_adopt)" if adopted else "allowed"
    return Check("ssh to the node", "ok", how)


async def _drain(proc: asyncio.subprocess.Process) -> str:
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(proc.wait(), 10)
    if proc.stderr is None:
        return ""
    with contextlib.suppress(asyncio.TimeoutError):
        return (await asyncio.wait_for(proc.stderr.read(), 5)).decode(errors="replace")
    return ""


def render(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"{'check':<{width}}  result  detail", f"{'-' * width}  ------  ------"]
    for c in checks:
        lines.append(f"{c.name:<{width}}  {c.status:<6}  {c.detail}")
        if c.remedy and c.status != "ok":
            lines.append(f"{'':<{width}}          -> {c.remedy}")
    return "\n".join(lines)
