"""The two Slurm backends side by side, on the real Slurm 25.11 cluster, in one run:

    bash tests/benchmarks/backends.sh [--reps N] [--window S] [--out DIR]

(backends.sh brings the cluster up on Slurm 25.11 with pyslurm 25.11 built against it, creates the
benchmark users, and runs this file as root.) Each round runs one session per backend, in
alternating order, as its own benchmark user (bench03: the command line, bench04: pyslurm), both
with the same site configuration but ``c.SpunnelManager.slurm_backend``:

- controller RPCs per second while the job pends (on a dependency on bench12's job) and while it
  runs, counted by slurmctld for the user (sdiag), over WINDOW seconds each; the session asks Slurm
  every 2 s in both (``pending_poll_interval``, and ``refresh_interval`` set to 2 s here so that the
  running window measures the cost of one job query, not the 60 s default's rarity);
- job RUNNING after pending -> the session's record says so (Slurm's own allocation time, from
  slurmctld's log with milliseconds);
- login-side memory while running: RSS and PSS of every process of the user on the login host;
- `spunnel-notebook status` wall time while running, and `spunnel-notebook stop` with no session
  (one query of the user's jobs: squeue, or the pyslurm worker started for it).

Writes DIR/backends.md and DIR/backends.json (default: tests/benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import bench
from bench import (
    JOB_ARGS,
    PROG,
    SlurmLog,
    Tool,
    login_procs,
    machine,
    memory,
    rpc_rate,
    say,
    stats,
)

from tests.e2e import cluster as C

USERS = {"cli": "bench03", "pyslurm": "bench04"}
BLOCKER = "bench12"
FIGURES = [  # key, what, unit
    ("rpc_pending", "Slurm controller RPCs per second, job pending (sdiag, this user)", "/s"),
    ("rpc_running", "Slurm controller RPCs per second, job running (a query every 2 s)", "/s"),
    ("noticed", "job RUNNING after pending -> the session's record says so", "s"),
    ("rss", "login-side memory while running, RSS of all the user's processes there", "MB"),
    ("pss", "login-side memory while running, PSS of all the user's processes there", "MB"),
    ("procs", "processes of the user on the login host while running", ""),
    ("status", "`spunnel-notebook status` wall time, session running", "s"),
    ("stop", "`spunnel-notebook stop` wall time, no session (one query of the user's jobs)", "s"),
]


def site(kind: str) -> str:
    return C.site_config({"SpunnelManager": {"slurm_backend": kind, "refresh_interval": 2.0}})


def timed(user: str, argv: list[str], config: str) -> float:
    t0 = time.monotonic()
    C.as_user(user, argv, timeout=60, JUPYTER_CONFIG_PATH=config)
    return time.monotonic() - t0


def one_session(kind: str, config: str, window: float, log: SlurmLog) -> dict[str, float]:
    user = USERS[kind]
    for name in (user, BLOCKER):
        C.force_clean(name)
    blocker = C.as_user(BLOCKER, ["sbatch", "--parsable", "-o", "/dev/null", "-J", "bench-blocker",
                                  "--mem", "100", "-t", "10", "--wrap", "sleep 600"])  # fmt: skip
    blocker_job = int(blocker.stdout.strip().split(";")[0])
    tool = Tool(user, [*JOB_ARGS, "--", f"--dependency=afterany:{blocker_job}"],
                env={"JUPYTER_CONFIG_PATH": config}).start()  # fmt: skip
    out: dict[str, float] = {}
    with tool.watched(
        f"{kind} session", *(partial(C.force_clean, name) for name in (user, BLOCKER))
    ):
        assert tool.out is not None
        tool.out.wait(r"job \d+ PENDING", 60)
        time.sleep(2.5)  # past the start-up queries (sinfo, the allocation request)
        out["rpc_pending"] = rpc_rate(user, window)
        subprocess.run(["scancel", str(blocker_job)], check=True, timeout=30)
        tool.wait_url()
        job = int(tool.record["job_id"])
        allocated = log.find(rf"sched: Allocate JobId={job} ")
        if allocated is None:
            raise RuntimeError(f"no allocation of job {job} in slurmctld's log")
        out["noticed"] = tool.record["times"]["running"] - allocated
        time.sleep(1.0)
        out["rpc_running"] = rpc_rate(user, window)
        pids = login_procs(user)
        mem = [memory(pid) for pid in pids]
        out["rss"] = sum(m["rss_mb"] for m in mem)
        out["pss"] = sum(m["pss_mb"] for m in mem)
        out["procs"] = len(pids)
        out["status"] = min(timed(user, [PROG, "status"], config) for _ in range(3))
        assert tool.proc is not None
        tool.proc.send_signal(signal.SIGINT)
        tool.finish()
        _, left = C.wait_clean(user, 10)
        if left:
            raise RuntimeError(f"{kind}: left after Ctrl-C: {left}")
        out["stop"] = timed(user, [PROG, "stop"], config)
    return out


def fmt(v: dict[str, Any], unit: str) -> str:
    if not v.get("n"):
        return "-"
    scale, u = (1000.0, "ms") if unit == "s" and v["median"] < 0.1 else (1.0, unit)
    med, lo, hi = (v[k] * scale for k in ("median", "min", "max"))
    digits = 0 if unit == "" else (2 if med < 10 else 1)
    space = " " if u and u != "/s" else ""
    return f"{med:.{digits}f}{space}{u} ({lo:.{digits}f}-{hi:.{digits}f}, n={v['n']})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--window", type=float, default=10.0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    env = C.cluster_env()
    release = env.get("SLURM_RELEASE")
    bench.SLURMCTLD_LOG = Path(env.get("SLURMCTLD_LOG", bench.SLURMCTLD_LOG))  # 25.11's own
    if release != "25.11":
        sys.exit(f"backends: the cluster runs Slurm {release}; run tests/benchmarks/backends.sh")
    configs = {kind: site(kind) for kind in USERS}
    samples: dict[str, dict[str, list[float]]] = {kind: {} for kind in USERS}
    t0 = time.monotonic()
    log = SlurmLog()
    for i in range(args.reps):
        for kind in ("cli", "pyslurm") if i % 2 == 0 else ("pyslurm", "cli"):
            say(f"round {i + 1}/{args.reps}: {kind}")
            for key, value in one_session(kind, configs[kind], args.window, log).items():
                samples[kind].setdefault(key, []).append(value)
    took = time.monotonic() - t0
    summary = {kind: {k: stats(v) for k, v in s.items()} for kind, s in samples.items()}
    m = machine()
    lines = [
        f"Measured {m['date']} on {m['cpu']} ({m['cores']} cores), {m['os']}, {m['slurm']}, "
        f"pyslurm {pyslurm_version()}, Python {m['python']}; spunnel-jupyter at {m['commit']}; "
        f"{args.reps} rounds, RPC windows of {args.window:g} s; took {took:.0f} s.",
        "",
        "| figure | command line (`cli`) | pyslurm (`pyslurm`) | pyslurm / cli |",
        "|---|---|---|---|",
    ]
    for key, what, unit in FIGURES:
        a, b = summary["cli"].get(key, {}), summary["pyslurm"].get(key, {})
        ratio = f"{b['median'] / a['median']:.2f}x" if a.get("median") and b.get("n") else ""
        lines.append(f"| {what} | {fmt(a, unit)} | {fmt(b, unit)} | {ratio} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "backends.md").write_text(text)
    (out / "backends.json").write_text(
        json.dumps({"machine": m, "samples": samples, "summary": summary}, indent=1) + "\n"
    )
    return 0


def pyslurm_version() -> str:
    result = subprocess.run(
        ["/opt/spunnel/venv/bin/python", "-c", "import pyslurm; print(pyslurm.__version__)"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    return result.stdout.strip() or "?"


if __name__ == "__main__":
    sys.exit(main())
