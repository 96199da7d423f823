"""Benchmark spunnel-notebook on the real test cluster, each figure next to its floor.

    bash tests/benchmarks/run.sh [--quick] [--reps N] [--scale N] [--window S] [--out DIR]

(run.sh brings the cluster up, creates the users bench01..bench12, then runs this file with
/opt/spunnel/venv/bin/python as root.) Prints a markdown table and writes it, and every sample, to
DIR/latest.md and DIR/latest.json (default: tests/benchmarks/results).

Sessions run as the benchmark's own users, never alice or bob, with a clean environment from their
home, as a user would run them. Floors are measured in the same run, interleaved with the figures:

- start-up: srun on the same partition starting Jupyter (the launcher's command line) on the node,
  until it answers on its Unix socket on the node (nodeclient.py floor);
- Slurm's own start time of a job: the slurmctld log line (ms timestamps) that allocates it;
- teardown: scancel alone until the job leaves squeue (the floor job above, Jupyter running);
- CLI wall time: `python -c pass` with the same interpreter;
- round trips and bulk download: the same client run on the node in the job (srun --overlap) against
  Jupyter's Unix socket, instead of through the tunnel on the login host;
- the owner check per accepted connection: the same relay with the check taken out (local
  connections through it, alternating), and the netlink query alone;
- `attach` on the second login host (login2, tests/cluster/login2.sh): `attach` on this one.

With a browser: chromium (Playwright, /usr/bin/chromium) shows a notebook through the tunnel with an
edit never saved, and Ctrl-C times the save before the stop (the launcher's own figure).

The token is read from the session record as root and handed to clients in their environment; it is
never printed (tool output is shown only with the token masked).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import http.client
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.e2e import cluster as C  # noqa: E402  (the e2e helpers: users, processes, leftovers)

VENV_PY = "/opt/spunnel/venv/bin/python"
PROG = "/usr/local/bin/spunnel-notebook"
HELPER_DIR = Path("/opt/spunnel/bench")
HELPER = HELPER_DIR / "nodeclient.py"
SLURMCTLD_LOG = Path("/var/log/slurm/slurmctld.log")
BIG_FILE = "bench-100M.bin"
BIG_SIZE = 100 * 1000 * 1000
PARTITION = "interact"
MEM = "500"
JOB_ARGS = ["-p", PARTITION, "--mem", MEM]
URL_RE = re.compile(r"http://127\.0\.0\.1:(\d+)/(?:lab|tree)\?token=[0-9a-f]+")
OURS = re.compile(r"ssh .*-M|srun |spunnel_jupyter|jupyter|nodeclient")


def say(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


def mask(text: str) -> str:
    return re.sub(r"token=[0-9a-f]+", "token=<hidden>", text)


def users(n: int) -> list[str]:
    return [f"bench{i:02d}" for i in range(1, n + 1)]


# -- running things as a benchmark user ------------------------------------------------------------
def popen_as(user: str, argv: list[str], **env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        argv,
        user=user,
        group=user,
        extra_groups=[],
        env=C.user_env(user, **env),
        cwd=f"/home/{user}",
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def json_as(user: str, argv: list[str], timeout: float, **env: str) -> dict[str, Any]:
    result = C.as_user(user, argv, timeout=timeout, **env)
    if result.returncode != 0:
        raise RuntimeError(
            f"{argv[:4]} as {user}: exit {result.returncode}: {result.stderr[-500:]}"
        )
    return json.loads(result.stdout.strip().splitlines()[-1])


class Output:
    """A child's output lines, each stamped (monotonic, epoch) as it arrives, read by a thread."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.lines: list[tuple[float, float, str]] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with self._cond:
                self.lines.append((time.monotonic(), time.time(), raw.decode(errors="replace")))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def text(self) -> str:
        return mask("".join(line for _, _, line in self.lines))

    def wait(self, pattern: str, timeout: float) -> tuple[float, float, re.Match[str]]:
        """(monotonic, epoch) of the first line matching ``pattern``, and the match."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        seen = 0
        with self._cond:
            while True:
                for mono, epoch, line in self.lines[seen:]:
                    if m := regex.search(line):
                        return mono, epoch, m
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._thread.is_alive()):
                    raise RuntimeError(
                        f"{pattern!r} not seen (exit {self.proc.poll()}); output:\n{self.text()}"
                    )
                self._cond.wait(min(left, 0.5))


# -- the cluster -----------------------------------------------------------------------------------
class SlurmLog:
    """New lines of slurmctld's log (ISO 8601 timestamps with ms, local time)."""

    STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3})\] (.*)")

    def __init__(self) -> None:
        self.ok = SLURMCTLD_LOG.exists()
        self.offset = SLURMCTLD_LOG.stat().st_size if self.ok else 0
        self.lines: list[tuple[float, str]] = []

    def _more(self) -> None:
        if not self.ok:
            return
        with open(SLURMCTLD_LOG, "rb") as f:
            if os.fstat(f.fileno()).st_size < self.offset:
                self.offset = 0  # rotated or restarted
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        for raw in data[:end].decode(errors="replace").splitlines():
            if m := self.STAMP.match(raw):
                stamp = dt.datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S.%f").timestamp()
                self.lines.append((stamp, m.group(2)))

    def find(self, pattern: str, timeout: float = 3.0) -> float | None:
        """Epoch of the first line matching ``pattern`` (waiting for the log to be written)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            self._more()
            for stamp, text in self.lines:
                if regex.search(text):
                    return stamp
            if time.monotonic() > deadline:
                return None
            time.sleep(0.05)


def job_start_time(job: int) -> float | None:
    """Slurm's StartTime of the job (scontrol, one-second resolution)."""
    out = subprocess.run(
        ["scontrol", "show", "job", str(job), "-o"], capture_output=True, text=True, timeout=30
    ).stdout
    m = re.search(r"StartTime=(\S+)", out)
    try:
        return dt.datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S").timestamp() if m else None
    except ValueError:
        return None


def squeue_state(job: int) -> str:
    out = subprocess.run(
        ["squeue", "-h", "-j", str(job), "-o", "%T"], capture_output=True, text=True, timeout=30
    )
    return out.stdout.strip()


def scancel_until_gone(jobs: list[int], timeout: float = 60) -> float:
    """The floor of every teardown: seconds from `scancel` until the jobs left squeue."""
    t0 = time.monotonic()
    subprocess.run(["scancel", *map(str, jobs)], check=True, timeout=30)
    while any(squeue_state(j) for j in jobs) and time.monotonic() - t0 < timeout:
        time.sleep(0.003)
    return time.monotonic() - t0


def user_jobs(user: str) -> list[int]:
    return [int(line.split()[0]) for line in C.squeue(user) if line.split()]


def idle_cpus() -> int:
    out = subprocess.run(
        ["sinfo", "-h", "-n", "c1", "-o", "%C"], capture_output=True, text=True, timeout=30
    ).stdout.strip()  # allocated/idle/other/total
    parts = out.split("/")
    return int(parts[1]) if len(parts) == 4 and parts[1].isdigit() else 0


def other_jobs() -> list[str]:
    out = subprocess.run(
        ["squeue", "-h", "-o", "%u %T %C"], capture_output=True, text=True, timeout=30
    ).stdout
    return [line for line in out.splitlines() if line and not line.startswith("bench")]


def rpc_counts() -> dict[str, int]:
    """slurmctld's own per-user RPC counters (sdiag)."""
    out = subprocess.run(["sdiag"], capture_output=True, text=True, timeout=30, check=True).stdout
    section = out.split("statistics by user", 1)[-1].split("Pending RPC", 1)[0]
    return {
        m.group(1): int(m.group(2))
        for m in re.finditer(r"^\s+(\S+)\s+\(\s*\d+\)\s+count:(\d+)", section, re.M)
    }


def rpc_rate(user: str, window: float) -> float:
    """Controller RPCs per second of ``user`` over the next ``window`` seconds (sdiag)."""
    before = rpc_counts()
    time.sleep(window)
    return (rpc_counts().get(user, 0) - before.get(user, 0)) / window


def lock_free(user: str) -> bool:
    lock = C.state_dir(user) / "lock"
    try:
        f = open(lock)
    except FileNotFoundError:
        return True
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
        return True


def port_closed(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        try:
            s.connect(("127.0.0.1", port))
        except OSError:
            return True
    return False


def our_procs(user: str) -> list[str]:
    return [cmd for _, cmd in C.procs_of(user) if OURS.search(cmd)]


def polled(user: str) -> bool:
    """The node's JupyterLab of the user's session asked for its notice (a browser is there)."""
    return any((d / "browser-polled").exists() for d in runtime_dirs(user))


def runtime_dirs(user: str) -> list[Path]:
    owner = C.uid(user)
    found = []
    for path in Path("/tmp").glob("spunnel.*"):  # the launcher's spunnel.JOB.RESTART
        with contextlib.suppress(OSError):
            if path.stat().st_uid == owner:
                found.append(path)
    return found


def memory(pid: int) -> dict[str, float]:
    """Resident and proportional set size of a process, in MB."""
    out = {"rss_mb": 0.0, "pss_mb": 0.0}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out["rss_mb"] = int(line.split()[1]) / 1024
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                out["pss_mb"] = int(line.split()[1]) / 1024
    return out


def http_get(port: int, token: str, path: str = "/api/status") -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Authorization": f"token {token}"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def first_seen(
    checks: dict[str, Any], t0: float, timeout: float
) -> tuple[dict[str, float], list[str]]:
    """Seconds after ``t0`` (monotonic) at which each check first held, polled every 3 ms until
    all did or ``timeout``; and the names of those that never did."""
    seen: dict[str, float] = {}
    deadline = t0 + timeout
    while len(seen) < len(checks) and time.monotonic() < deadline:
        for name, check in checks.items():
            if name not in seen and check():
                seen[name] = time.monotonic() - t0
        time.sleep(0.003)
    return seen, sorted(set(checks) - set(seen))


def wait_gone(
    user: str,
    port: int | None,
    jobs: list[int],
    t0: float,
    timeout: float = 20,
    proc: subprocess.Popen[bytes] | None = None,
) -> dict[str, Any]:
    """Seconds after ``t0`` (monotonic) at which each part of a session was first seen gone."""
    checks = {
        "supervisor": lambda: proc is None or proc.poll() is not None,
        "tunnel": lambda: port is None or port_closed(port),
        "job": lambda: all(not squeue_state(j) for j in jobs),
        "lock": lambda: lock_free(user),
        "processes": lambda: not our_procs(user),
        "runtime_dir": lambda: not runtime_dirs(user),
    }
    seen, left = first_seen(checks, t0, timeout)
    return {**seen, "all": max(seen.values()) if not left else None, "left": left}


def save_phase(user: str) -> dict[str, Any]:
    """The save before the end, as the launcher reported it in its `exited` event: what happened
    (saved, no-browser, timeout) and how long it took."""
    log = (C.state_dir(user) / "session.log").read_text(errors="replace")
    exits = re.findall(r'@spunnel (\{"event": "exited".*\})', log)
    said = json.loads(exits[-1]) if exits else {}
    return {"save": said.get("save", "none"), "save_s": float(said.get("save_s") or 0.0)}


# Asks from login2 until 127.0.0.1:PORT there answers (PORT and the token on stdin); prints when.
_PROBE = """
import http.client, sys, time
port, token = sys.stdin.readline().split()
deadline = time.monotonic() + 30
while True:
    try:
        c = http.client.HTTPConnection("127.0.0.1", int(port), timeout=5)
        c.request("GET", "/api/status", headers={"Authorization": "token " + token})
        if c.getresponse().status == 200:
            break
    except (OSError, http.client.HTTPException):
        pass
    if time.monotonic() > deadline:
        sys.exit("127.0.0.1:" + port + " does not answer on login2")
    time.sleep(0.005)
print(time.time())
"""
SAVE_NOTEBOOK = "bench-save.ipynb"
SAVE_EDIT = "typed, never saved by hand"
EMPTY_NOTEBOOK = {
    "cells": [{"cell_type": "code", "source": "", "metadata": {}, "outputs": [],
               "execution_count": None}],
    "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                "language": "python"}},
    "nbformat": 4, "nbformat_minor": 5,
}  # fmt: skip


# -- one session of the tool -----------------------------------------------------------------------
@dataclass
class Tool:
    user: str
    args: list[str]
    t0: float = 0.0  # monotonic, just before the command was started
    t0_epoch: float = 0.0
    proc: subprocess.Popen[bytes] | None = None
    out: Output | None = None
    port: int = 0
    url_at: float = 0.0
    answered_at: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    def start(self) -> Tool:
        self.t0, self.t0_epoch = time.monotonic(), time.time()
        self.proc = popen_as(self.user, [PROG, *self.args], **self.env)
        self.out = Output(self.proc)
        return self

    @property
    def record(self) -> dict[str, Any]:
        return json.loads((C.state_dir(self.user) / "session.json").read_text())

    def last(self) -> dict[str, Any]:
        with contextlib.suppress(OSError, ValueError):
            return json.loads((C.state_dir(self.user) / "last.json").read_text())
        return {}

    def token(self) -> str:
        return str(self.record["token"])

    def wait_url(self, timeout: float = 120) -> Tool:
        assert self.out is not None
        self.url_at, _, m = self.out.wait(URL_RE.pattern, timeout)
        self.port = int(m.group(1))
        token = self.token()
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError):
                if http_get(self.port, token) == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the URL of {self.user}'s session does not answer")
            time.sleep(0.005)
        self.answered_at = time.monotonic()
        return self

    def socket_path(self) -> str:
        log = (C.state_dir(self.user) / "session.log").read_text(errors="replace")
        m = re.search(r'@spunnel \{"event": "ready", "socket": "([^"]+)"', log)
        if not m:
            raise RuntimeError("no ready event in the session log")
        return m.group(1)

    def pids(self) -> dict[str, int]:
        rec = self.record
        return {k: rec[f"{k}_pid"] for k in ("supervisor", "srun", "ssh") if rec.get(f"{k}_pid")}

    def memory(self) -> dict[str, dict[str, float]]:
        return {name: memory(pid) for name, pid in self.pids().items()}

    def finish(self, timeout: float = 30) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    @contextlib.contextmanager
    def watched(self, what: str, *cleanup: Callable[[], object]) -> Iterator[Tool]:
        """The tool's run: if it fails, its output is said (token masked); whatever happens, it
        is killed if still running, then each cleanup runs."""
        try:
            yield self
        except Exception:
            say(f"{what} failed; its output:\n{mask(self.out.text()) if self.out else ''}")
            raise
        finally:
            if self.proc and self.proc.poll() is None:
                self.proc.kill()
            for step in cleanup:
                step()


def timeline(tool: Tool, times: dict[str, float]) -> dict[str, float]:
    """The tool's own timestamps, relative to the command's start."""
    out = {k: round(v - tool.t0_epoch, 3) for k, v in times.items()}
    out["url_printed"] = round(tool.url_at - tool.t0, 3)
    out["answering"] = round(tool.answered_at - tool.t0, 3)
    return out


# -- the measurements ------------------------------------------------------------------------------
class Bench:
    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts = opts
        self.log = SlurmLog()
        self.samples: dict[str, list[Any]] = {}
        self.notes: list[str] = []

    def attempt(self, what: str, fn: Any, *args: Any, tries: int = 3) -> Any:
        """Run one measurement; on a failure (the shared test machine may be reinstalling the
        project or killing test users' jobs) clean up, say so, and try again."""
        for i in range(tries):
            try:
                return fn(*args)
            except Exception as e:
                if i == tries - 1:
                    raise
                self.notes.append(f"{what}: attempt {i + 1} failed ({type(e).__name__}), retried")
                say(f"{what} failed: {mask(str(e))[:300]}; retrying in 5 s")
                time.sleep(5)
        return None

    def add(self, name: str, value: Any) -> None:
        self.samples.setdefault(name, []).append(value)

    def clean(self, *names: str) -> None:
        for user in names:
            C.force_clean(user)  # scancel, SIGKILL every process of the user, remove leftovers
            for path in Path("/tmp").glob("bench-floor.*"):  # what a cancelled floor job left
                with contextlib.suppress(OSError):
                    if path.stat().st_uid == C.uid(user):
                        shutil.rmtree(path, ignore_errors=True)

    # start-up floor and scancel floor, one job
    def floor(self, user: str) -> None:
        self.clean(user)
        token = secrets.token_hex(24)
        t0 = time.monotonic()
        proc = popen_as(
            user,
            ["srun", "-N1", "-n1", *JOB_ARGS, "-J", "bench-floor", VENV_PY, str(HELPER), "floor"],
            BENCH_TOKEN=token,
        )
        out = Output(proc)
        try:
            t_ready, _, _ = out.wait(r"^READY ", 120)
            self.add("start_floor_s", t_ready - t0)
            jobs = user_jobs(user)
            self.add("scancel_floor_s", scancel_until_gone(jobs))
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
            self.clean(user)
        # Slurm alone: the same scancel of a job that runs only `sleep`.
        proc = popen_as(
            user, ["srun", "-N1", "-n1", *JOB_ARGS, "-J", "bench-floor", "sleep", "300"]
        )
        try:
            deadline = time.monotonic() + 60
            while not any(
                c.startswith("/usr/bin/sleep") or c.startswith("sleep")
                for c in [cmd for _, cmd in C.procs_of(user)]
            ):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the sleep floor job did not start")
                time.sleep(0.01)
            jobs = user_jobs(user)
            self.add("scancel_floor_sleep_s", scancel_until_gone(jobs))
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
            self.clean(user)

    def tool_session(self, user: str, end: str, extras: bool) -> None:
        """One session on the idle cluster: time to URL, detection, memory, then end it."""
        self.clean(user)
        tool = Tool(user, JOB_ARGS).start()
        with tool.watched(f"session of {user}", lambda: self.clean(user)):
            tool.wait_url()
            self.add("time_to_url_s", tool.answered_at - tool.t0)
            rec = tool.record
            job = int(rec["job_id"])
            slurm_start = self.log.find(rf"_slurm_rpc_allocate_resources JobId={job} NodeList=c1")
            if slurm_start is not None and "running" in rec["times"]:
                self.add("detect_immediate_s", rec["times"]["running"] - slurm_start)
            self.add("timeline", timeline(tool, rec["times"]))
            self.add("supervisor_rss_mb", tool.memory()["supervisor"]["rss_mb"])
            if extras:
                self.cli_times(user)
                self.transfer(tool, job)
            t1 = time.monotonic()
            assert tool.proc is not None and tool.out is not None
            if end == "ctrl-c":
                tool.proc.send_signal(signal.SIGINT)
            else:
                subprocess.run(["scancel", str(job)], check=True, timeout=30)
            gone = wait_gone(user, tool.port, [job], t1, proc=tool.proc)
            told, _, _ = tool.out.wait(r"session ended: ", 20)
            gone["told"] = told - t1
            gone["exit_code"] = tool.finish()
            gone["job_id"] = job
            gone["teardown_s_reported"] = tool.last().get("times", {}).get("teardown_s")
            gone.update(save_phase(user))
            self.add(f"end_{end}", gone)
            if gone["all"] is None:
                self.notes.append(f"{end}: left after 20 s: {gone['left']}")

    def without_private_tmp(self, user: str) -> None:
        """Time to URL with the private /tmp switched off by the site (its start-up cost is the
        difference from time_to_url_s, measured in the same rounds)."""
        self.clean(user)
        site = HELPER_DIR / "no-private-tmp"
        site.mkdir(mode=0o755, exist_ok=True)
        (site / "jupyter_spunnel_jupyter_config.json").write_text(
            json.dumps({"PrivateTmp": {"enabled": False}})
        )
        tool = Tool(user, JOB_ARGS, env={"JUPYTER_CONFIG_PATH": str(site)}).start()
        with tool.watched(f"session of {user}", lambda: self.clean(user)):
            tool.wait_url()
            self.add("time_to_url_no_private_tmp_s", tool.answered_at - tool.t0)
            log = (C.state_dir(user) / "session.log").read_text(errors="replace")
            if "user namespace" in log:
                raise RuntimeError("the site's PrivateTmp.enabled = False was not honoured")

    def detached_session(self, user: str) -> None:
        """`--detach` until the prompt is back; `attach` after the supervisor that held the
        tunnel was SIGKILLed (a crash of the login side) until the URL answers again, Ctrl-C
        (detaches); then `stop` until everything is gone."""
        self.clean(user)
        t0 = time.monotonic()
        done = C.as_user(user, [PROG, "--detach", *JOB_ARGS], timeout=120)
        self.add("detach_prompt_s", time.monotonic() - t0)
        if done.returncode != 0 or not URL_RE.search(done.stdout):
            raise RuntimeError(f"--detach failed: {mask(done.stdout + done.stderr)[-500:]}")
        try:
            record = json.loads((C.state_dir(user) / "session.json").read_text())
            job, supervisor = int(record["job_id"]), int(record["supervisor_pid"])
            os.kill(supervisor, signal.SIGKILL)
            while Path(f"/proc/{supervisor}").exists():
                time.sleep(0.005)
            tool = Tool(user, ["attach"]).start()
            tool.wait_url()
            self.add("attach_s", tool.answered_at - tool.t0)
            assert tool.proc is not None
            tool.proc.send_signal(signal.SIGINT)
            if tool.finish() != 0 or squeue_state(job) != "RUNNING":
                raise RuntimeError("Ctrl-C of attach did not leave the job running")
            t1 = time.monotonic()
            stopped = C.as_user(user, [PROG, "stop"], timeout=60)
            gone = wait_gone(user, None, [job], t1)
            if stopped.returncode != 0:
                raise RuntimeError(f"stop failed: {mask(stopped.stdout + stopped.stderr)}")
            self.add("stop_detached", gone)
        finally:
            self.clean(user)

    def attach_elsewhere(self, user: str) -> None:
        """`--detach` on this login host, then `attach` on the second one (login2 of
        tests/cluster/login2.sh: its own network namespace and /tmp, as tests/e2e/
        test_login2_attach.py uses it) until the URL answers there, asked from there; then Ctrl-C
        (detaches) and `stop` on this host."""
        from tests.e2e import hosts

        hosts.login2_env()  # up and healthy, or a clear failure
        hosts.force_clean_everywhere(user)
        done = C.as_user(user, [PROG, "--detach", *JOB_ARGS], timeout=120)
        if done.returncode != 0 or not URL_RE.search(done.stdout):
            raise RuntimeError(f"--detach failed: {mask(done.stdout + done.stderr)[-500:]}")
        # Started first, waiting on stdin for the port and token: its start-up is not counted.
        probe = hosts.popen_on("login2", user, [VENV_PY, "-c", _PROBE], stdin=subprocess.PIPE,
                               stderr=subprocess.PIPE)  # fmt: skip
        attach: subprocess.Popen[bytes] | None = None
        try:
            t0_epoch = time.time()
            attach = hosts.popen_on("login2", user, [PROG, "attach"])
            out = Output(attach)
            _, _, m = out.wait(URL_RE.pattern, 120)
            token = re.search(r"token=([0-9a-f]+)", m.group(0)).group(1)  # type: ignore[union-attr]
            answered, err = probe.communicate(f"{m.group(1)} {token}\n".encode(), timeout=60)
            if probe.returncode != 0:
                raise RuntimeError(f"the URL does not answer on login2: {err.decode()[-300:]}")
            self.add("attach_login2_s", float(answered.split()[-1]) - t0_epoch)
            attach.send_signal(signal.SIGINT)  # detaches: the job runs on
            if attach.wait(30) != 0:
                raise RuntimeError(f"attach on login2 ended badly: {mask(out.text())[-500:]}")
            stopped = C.as_user(user, [PROG, "stop"], timeout=60)
            if stopped.returncode != 0:
                raise RuntimeError(f"stop failed: {mask(stopped.stdout + stopped.stderr)}")
        finally:
            for proc in (probe, attach):
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.wait()
            hosts.force_clean_everywhere(user)

    def save_with_browser(self, user: str) -> None:
        """Chromium (Playwright, Debian's /usr/bin/chromium, as tests/e2e/browser.py) shows a
        notebook through the tunnel, with an edit typed and never saved; Ctrl-C: the save before
        the stop, as the launcher timed it, and everything gone."""
        from playwright.sync_api import sync_playwright

        from tests.e2e.browser import CHROMIUM_ARGS, chromium_path
        from tests.e2e.jupyter_client_util import rest

        self.clean(user)
        on_disk = Path(f"/home/{user}/{SAVE_NOTEBOOK}")
        tool = Tool(user, JOB_ARGS).start()
        cleanup = (lambda: on_disk.unlink(missing_ok=True), lambda: self.clean(user))
        with tool.watched(f"session of {user}", *cleanup):
            tool.wait_url()
            token, job = tool.token(), int(tool.record["job_id"])
            code, _ = rest(
                tool.port,
                token,
                "PUT",
                f"/api/contents/{SAVE_NOTEBOOK}",
                {"type": "notebook", "format": "json", "content": EMPTY_NOTEBOOK},
            )
            if code not in (200, 201):
                raise RuntimeError(f"PUT of the notebook: {code}")
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
                try:
                    page = browser.new_page(viewport={"width": 1280, "height": 800})
                    page.goto(
                        f"http://127.0.0.1:{tool.port}/lab/tree/{SAVE_NOTEBOOK}?token={token}"
                    )
                    cell = page.locator(".jp-Notebook .jp-Cell .cm-content").first
                    cell.wait_for(timeout=60_000)
                    cell.click()
                    page.keyboard.type(f"edited = '{SAVE_EDIT}'")
                    page.locator(".lm-TabBar-tab.jp-mod-dirty").first.wait_for(timeout=10_000)
                    deadline = time.monotonic() + 15
                    while not polled(user):  # the launcher saves only for a browser it heard
                        if time.monotonic() > deadline:
                            raise RuntimeError("the node's JupyterLab never asked for its notice")
                        time.sleep(0.05)
                    if SAVE_EDIT in on_disk.read_text():
                        raise RuntimeError("the edit was saved before the stop")
                    assert tool.proc is not None
                    t1 = time.monotonic()
                    tool.proc.send_signal(signal.SIGINT)
                    gone = wait_gone(user, tool.port, [job], t1, proc=tool.proc)
                finally:
                    browser.close()
            gone.update(save_phase(user))
            gone["edit_on_disk"] = SAVE_EDIT in on_disk.read_text()
            self.add("save_browser", gone)

    def cli_times(self, user: str, reps: int = 5) -> None:
        for _ in range(reps):
            for name, argv in (
                ("python_pass_s", [VENV_PY, "-c", "pass"]),
                ("status_s", [PROG, "status"]),
                ("help_s", [PROG, "--help"]),
            ):
                t0 = time.perf_counter()
                result = C.as_user(user, argv, timeout=30)
                self.add(name, time.perf_counter() - t0)
                if name == "status_s" and result.returncode != 0:
                    raise RuntimeError(f"status failed: {result.stdout} {result.stderr}")

    def transfer(self, tool: Tool, job: int) -> None:
        """Round trips and the bulk download, through the tunnel and on the node directly."""
        user, token, sock = tool.user, tool.token(), tool.socket_path()
        node = ["srun", f"--jobid={job}", "--overlap", "-N1", "-n1", VENV_PY, str(HELPER)]
        login = [VENV_PY, str(HELPER)]
        sides = [("tunnel", login, ["--port", str(tool.port)]), ("direct", node, ["--unix", sock])]
        if len(self.samples.get("rtt_tunnel", [])) % 2:
            sides.reverse()  # alternate which side goes first
        # ssh alone: the same master's -L socket, without the relay in front of it
        ssh_only = ("ssh", login, ["--unix", str(C.state_dir(user) / "tunnel.sock")])
        for side, cmd, where in [*sides, ssh_only]:
            self.add(f"rtt_{side}", json_as(user, [*cmd, "rtt", *where], 120, BENCH_TOKEN=token))
        for side, cmd, where in [*sides, ssh_only]:
            self.add(
                f"download_{side}",
                json_as(
                    user,
                    [*cmd, "download", *where, "--path", f"/files/{BIG_FILE}"],
                    120,
                    BENCH_TOKEN=token,
                ),
            )
        control = str(C.state_dir(user) / "ctl")
        home_file = f"/home/{user}/{BIG_FILE}"
        self.add(
            "ssh_stream",
            json_as(user, [*login, "ssh-stream", "--control", control, "--path", home_file], 120),
        )

    def pending_session(self, user: str, blocker_user: str, rpc_window: float) -> None:
        """A session that pends behind another user's job, then starts when that one ends."""
        self.clean(user, blocker_user)
        blocker = C.as_user(
            blocker_user,
            [
                *("sbatch", "--parsable", "-o", "/dev/null", "-J", "bench-blocker"),
                *("--mem", "100", "-t", "10", "--wrap", "sleep 600"),
            ],
            timeout=30,
        )
        blocker_job = int(blocker.stdout.strip().split(";")[0])
        tool = Tool(user, [*JOB_ARGS, "--", f"--dependency=afterany:{blocker_job}"]).start()
        with tool.watched(f"pending session of {user}", lambda: self.clean(user, blocker_user)):
            assert tool.out is not None
            tool.out.wait(r"job \d+ PENDING", 60)
            if rpc_window:
                time.sleep(2.5)  # past the start-up queries (sinfo, srun's allocation request)
                self.add("rpc_pending_per_s", rpc_rate(user, rpc_window))
            subprocess.run(["scancel", str(blocker_job)], check=True, timeout=30)
            tool.wait_url()
            rec = tool.record
            job = int(rec["job_id"])
            allocated = self.log.find(rf"sched: Allocate JobId={job} ")
            if allocated is None:
                allocated = job_start_time(job)
                self.notes.append("pending start taken from scontrol StartTime (1 s resolution)")
            _, running_epoch, _ = tool.out.wait(rf"job {job} RUNNING", 5)
            self.add(
                "detect_pending",
                {
                    "record_s": rec["times"]["running"] - allocated,
                    "output_s": running_epoch - allocated,
                    "scontrol_start": job_start_time(job),
                    "log_start": allocated,
                },
            )
            if rpc_window:
                time.sleep(1.0)
                self.add("rpc_running_per_s", rpc_rate(user, rpc_window))
                self.add("supervisor_rss_mb", tool.memory()["supervisor"]["rss_mb"])
            assert tool.proc is not None
            tool.proc.send_signal(signal.SIGINT)
            tool.finish()

    def rpc_costs(self, user: str) -> dict[str, float]:
        """Controller RPCs (sdiag, per user) that one call of each Slurm command costs."""
        self.clean(user)
        sub = C.as_user(
            user,
            [
                "sbatch",
                "--parsable",
                "-o",
                "/dev/null",
                "-t",
                "5",
                "--mem",
                "100",
                "--wrap",
                "sleep 60",
            ],
            timeout=30,
        )
        job = sub.stdout.strip().split(";")[0]
        commands = {
            "squeue -h -t all -j JOB -o ...": [
                *("squeue", "-h", "-t", "all", "-j", job, "-o", "%i|%T|%r|%N|%e"),
            ],
            "squeue --local -h -t all -j JOB -o ...": [
                *("squeue", "--local", "-h", "-t", "all", "-j", job, "-o", "%i|%T|%r|%N|%e"),
            ],
            "scontrol --local -o show job JOB (job state, used now)": [
                *("scontrol", "--local", "-o", "show", "job", job),
            ],
            "sinfo -h -N -o ... (partition check at start)": [
                *("sinfo", "-h", "-N", "-o", "%P|%a|%l|%m|%c"),
            ],
            "squeue --local -h -u USER -o ... (leftover check)": [
                *("squeue", "--local", "-h", "-u", user, "-o", "%i|%k|%T"),
            ],
        }
        costs = {}
        try:
            for name, argv in commands.items():
                before = rpc_counts().get(user, 0)
                for _ in range(3):
                    C.as_user(user, argv, timeout=30)
                costs[name] = (rpc_counts().get(user, 0) - before) / 3
        finally:
            self.clean(user)
        return costs

    def scale_floor(self, names: list[str]) -> dict[str, Any]:
        """The floor of the scale run: N floor jobs (srun starting Jupyter) at once."""
        self.clean(*names)
        procs = []
        t0 = time.monotonic()
        for user in names:
            argv = ["srun", "-N1", "-n1", *JOB_ARGS, "-J", "bench-floor", VENV_PY, str(HELPER)]
            procs.append(popen_as(user, [*argv, "floor"], BENCH_TOKEN=secrets.token_hex(24)))
        outs = [Output(p) for p in procs]
        try:
            ready = [out.wait(r"^READY ", 300)[0] - t0 for out in outs]
            jobs = [j for user in names for j in user_jobs(user)]
            return {"all_answering_s": max(ready), "scancel_all_gone_s": scancel_until_gone(jobs)}
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
            self.clean(*names)

    def scale(self, names: list[str]) -> dict[str, Any]:
        """N sessions of N users started at once on this login host."""
        self.clean(*names)
        deadline = time.monotonic() + 60
        while idle_cpus() < len(names) and time.monotonic() < deadline:
            time.sleep(1)
        free = idle_cpus()
        if free < len(names):
            self.notes.append(f"scale: only {free} idle CPUs on c1 for {len(names)} sessions")
        tools = [Tool(u, JOB_ARGS) for u in names]
        t0 = time.monotonic()
        for tool in tools:
            tool.start()
        try:
            for tool in tools:
                tool.wait_url(timeout=300)
            all_urls = max(t.url_at for t in tools) - t0
            all_answering = max(t.answered_at for t in tools) - t0
            mems = [t.memory() for t in tools]
            per_session = [
                {
                    "supervisor_rss_mb": m["supervisor"]["rss_mb"],
                    "login_rss_mb": sum(p["rss_mb"] for p in m.values()),
                    "login_pss_mb": sum(p["pss_mb"] for p in m.values()),
                }
                for m in mems
            ]
            jobs = [int(t.record["job_id"]) for t in tools]
            t1 = time.monotonic()
            for tool in tools:
                assert tool.proc is not None
                tool.proc.send_signal(signal.SIGINT)
            gone = [
                wait_gone(t.user, t.port, [j], t1, timeout=60, proc=t.proc)
                for t, j in zip(tools, jobs)
            ]
            for tool in tools:
                tool.finish()
            all_gone = (
                max(g["all"] for g in gone) if all(g["all"] is not None for g in gone) else None
            )
            return {
                "sessions": len(names),
                "idle_cpus_before": free,
                "all_urls_s": all_urls,
                "all_answering_s": all_answering,
                "per_session_url_s": [round(t.url_at - t0, 3) for t in tools],
                "per_session": per_session,
                "ctrl_c_all_gone_s": all_gone,
                "ctrl_c_gone": gone,
            }
        except Exception:
            for tool in tools:
                say(f"{tool.user}:\n{tool.out.text() if tool.out else ''}")
            raise
        finally:
            for tool in tools:
                if tool.proc and tool.proc.poll() is None:
                    tool.proc.kill()
            self.clean(*names)


# -- setup, summary, table -------------------------------------------------------------------------
def install_helper(names: list[str]) -> None:
    HELPER_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    shutil.copyfile(Path(__file__).with_name("nodeclient.py"), HELPER)
    HELPER.chmod(0o644)
    for user in names:  # a 100 MB file in each home (the shared filesystem), for the download
        path = Path(f"/home/{user}") / BIG_FILE
        if not path.exists() or path.stat().st_size != BIG_SIZE:
            with open(path, "wb") as f:
                for _ in range(BIG_SIZE // 10**6):
                    f.write(os.urandom(10**6))
            shutil.chown(path, user, user)
            path.chmod(0o600)


def machine() -> dict[str, Any]:
    def cmd(*argv: str) -> str:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
            return (r.stdout or r.stderr).strip().splitlines()[0]
        return "?"

    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    dirty = subprocess.run(
        [
            "git",
            "-C",
            str(REPO),
            "status",
            "--porcelain",
            "--",
            "spunnel_jupyter",
            "pyproject.toml",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout.strip()
    mem_kb = 0
    with contextlib.suppress(OSError, IndexError, ValueError):
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "os": "Debian " + Path("/etc/debian_version").read_text().strip()
        if Path("/etc/debian_version").exists()
        else platform.platform(),
        "python": platform.python_version(),
        "slurm": cmd("srun", "--version"),
        "openssh": cmd("ssh", "-V"),
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "commit": cmd("git", "-C", str(REPO), "rev-parse", "--short", "HEAD")
        + (" + uncommitted changes" if dirty else ""),
    }


def stats(values: list[float]) -> dict[str, Any]:
    values = [v for v in values if v is not None]
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
    }


def summarize(s: dict[str, list[Any]], scale: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One row per figure: the figure, its floors, the target, the result, met or not."""

    def col(name: str, key: str | None = None) -> list[float]:
        values = [x[key] if key else x for x in s.get(name, [])]
        return [v for v in values if v is not None]

    def floor(values: list[float], what: str) -> dict[str, Any]:
        return stats(values) | {"what": what}

    rows: list[dict[str, Any]] = []

    def within(values: list[float], limit: float) -> tuple[str, bool | str]:
        """A latency target: met when every run is within it, partly when the median is."""
        k = sum(v <= limit for v in values)
        met: bool | str = k == len(values) or (
            "partly" if statistics.median(values) <= limit else False
        )
        return f"{k}/{len(values)} runs within", met

    def row(figure: str, unit: str, value: dict[str, Any], floors: list[dict[str, Any]],
            target: str, result: str = "", met: bool | None = None) -> None:  # fmt: skip
        if value.get("n"):
            rows.append(
                {"figure": figure, "unit": unit, "value": value, "floors": floors}
                | {"target": target, "result": result, "met": met}
            )

    def paired() -> str:
        """Each session was measured right after a floor run: the median of those differences."""
        tool, base = col("time_to_url_s"), col("start_floor_s")
        if len(tool) != len(base) or not tool:
            return ""
        return f"; paired median {statistics.median(t - b for t, b in zip(tool, base)):.2f} s"

    url, start_floor = stats(col("time_to_url_s")), stats(col("start_floor_s"))
    if url["n"] and start_floor["n"]:
        over, ratio = url["median"] - start_floor["median"], url["median"] / start_floor["median"]
        row(
            "command start -> URL printed and answering through the tunnel (idle cluster)",
            "s",
            url,
            [start_floor | {"what": "srun starting Jupyter on the node until it answers there"}],
            "overhead <= 0.5 s or <= 1.15x floor",
            f"overhead {over:.2f} s, {ratio:.2f}x" + paired(),
            over <= 0.5 or ratio <= 1.15,
        )
    without = stats(col("time_to_url_no_private_tmp_s"))
    if url["n"] and without["n"]:
        row(
            "command start -> URL answering, private /tmp switched off (c.PrivateTmp)", "s",
            without, [start_floor | {"what": "srun starting Jupyter"}], "(reported)",
            f"the private /tmp costs {url['median'] - without['median']:+.2f} s at start-up",
        )  # fmt: skip
    slurm_start = [{"what": "Slurm's own start time of the job (slurmctld log, ms)"}]
    for values, what in (
        (col("detect_pending", "record_s"), "job RUNNING after pending -> tool notices (record)"),
        (col("detect_pending", "output_s"), "job RUNNING after pending -> tool tells the user"),
        (col("detect_immediate_s"), "job RUNNING at once (idle) -> tool notices (record)"),
    ):
        if values:
            row(what, "s", stats(values), slurm_start, "<= 0.5 s", *within(values, 0.5))
    scancel_floors = [
        floor(
            col("scancel_floor_s"), "scancel alone until the job leaves squeue, same Jupyter job"
        ),
        floor(col("scancel_floor_sleep_s"), "the same for a job running only `sleep`"),
    ]
    for end, what, key in (
        ("ctrl-c", "Ctrl-C -> tunnel closed, job gone from squeue, lock free, all processes "
         "and files gone", "all"),
        ("scancel", "job ends on its own (scancel elsewhere) -> user told", "told"),
        ("scancel", "job ends on its own (scancel elsewhere) -> everything gone", "all"),
    ):  # fmt: skip
        values = col(f"end_{end}", key)
        if values:
            row(what, "s", stats(values), scancel_floors, "<= 1 s", *within(values, 1.0))
    saves = col("end_ctrl-c", "save_s")
    ctrl_c = next((r for r in rows if r["figure"].startswith("Ctrl-C ->")), None)
    if saves and ctrl_c:
        kinds = sorted(set(col("end_ctrl-c", "save")))
        ctrl_c["result"] += (
            f"; of which the save before it: {statistics.median(saves) * 1000:.0f} ms "
            f"({', '.join(kinds)}: no browser here; with one, the next row)"
        )
    browser = s.get("save_browser", [])
    if browser:
        saved = sum(bool(r.get("save") == "saved" and r.get("edit_on_disk")) for r in browser)
        gone = stats(col("save_browser", "all"))
        row(
            "Ctrl-C with chromium showing a notebook through the tunnel, one edit never saved "
            "-> the save before the stop (the launcher's own timing)",
            "s", stats(col("save_browser", "save_s")),
            [{"what": "its bound, save_grace: 2 s (spent only while a browser is connected)"}],
            "(reported)",
            f"{saved}/{len(browser)} runs: the edit on disk; Ctrl-C -> everything gone: "
            + fmt(gone, "s"),
        )  # fmt: skip
    for key, what in (
        ("detach_prompt_s", "`--detach` -> prompt back, URL printed and answering"),
        ("attach_s", "`attach` after the login side's supervisor was killed -> URL answering"),
    ):
        row(what, "s", stats(col(key)), [start_floor | {"what": "srun starting Jupyter"}],
            "(reported)")  # fmt: skip
    attached = stats(col("attach_s"))
    row(
        "`attach` on another login host (login2) to a session started with `--detach` on this "
        "one -> URL answering there", "s", stats(col("attach_login2_s")),
        [attached | {"what": "`attach` on the same host, supervisor killed (above)"}]
        if attached["n"] else [], "(reported)",
    )  # fmt: skip
    values = col("stop_detached", "all")
    if values:
        row("`stop` of a detached session -> job gone, tunnel closed, lock free, nothing left",
            "s", stats(values), scancel_floors, "<= 1 s", *within(values, 1.0))  # fmt: skip
    py = stats(col("python_pass_s"))
    for name, what in (("status_s", "`spunnel-notebook status` wall time"), ("help_s", "`--help`")):
        v = stats(col(name))
        if v["n"] and py["n"]:
            over = v["median"] - py["median"]
            row(
                what,
                "s",
                v,
                [py | {"what": "`python -c pass`, same interpreter"}],
                "<= 150 ms over the floor",
                f"{over * 1000:.0f} ms over",
                over <= 0.150,
            )
    v = stats(col("supervisor_rss_mb"))
    row("supervisor resident memory, session running", "MB", v, [], "<= 50 MB", "", None)
    if v["n"]:
        rows[-1]["met"] = v["max"] <= 50
    for name, what in (
        ("rpc_pending_per_s", "Slurm controller RPCs per second, session pending"),
        ("rpc_running_per_s", "Slurm controller RPCs per second, session running"),
    ):
        v = stats(col(name))
        row(
            what, "/s", v, [{"what": "slurmctld's own count (sdiag, this user)"}], "<= 1 per second"
        )
        if v["n"]:
            rows[-1]["met"] = v["max"] <= 1
    for key, what in (
        ("http_keepalive_s", "HTTP round trip (GET /api/status, kept-alive connection)"),
        ("http_new_connection_s", "HTTP round trip, new connection each (extra)"),
        ("kernel_execute_s", "kernel execute round trip (websocket, `pass` until idle)"),
    ):
        t, d = stats(col("rtt_tunnel", key)), stats(col("rtt_direct", key))
        ssh = stats(col("rtt_ssh", key))
        if t["n"] and d["n"]:
            ratio = t["median"] / d["median"]
            floors = [d | {"what": "same client on the node, Unix socket"}]
            if ssh["n"]:
                floors.append(ssh | {"what": "ssh alone: the master's own -L socket, no relay"})
            row(
                what,
                "s",
                t,
                floors,
                "<= 1.3x",
                f"{ratio:.2f}x"
                + (f" ({t['median'] / ssh['median']:.2f}x of ssh alone)" if ssh["n"] else ""),
                ratio <= 1.3,
            )
    owner = s.get("owner_check", [])
    if owner:
        o = owner[-1]
        extra = stats(o["extra_us"])
        row(
            "owner check per accepted connection (one netlink sock_diag query), timed in the "
            f"supervisor's relay; {o['n']} loopback connections a run to it and as many to the "
            "same relay without the check, in turn (each: connect, 1 byte there and back, close)",
            "µs", stats(o["check_us"]),
            [stats(o["with_us"]) | {"what": "a whole connection with the check"},
             stats(o["without_us"]) | {"what": "without it"},
             stats([o["query_us"]]) | {"what": "the query alone, 5000 in a loop (hot)"}],
            "(reported)",
            f"with - without: {fmt(extra, 'µs')} a connection, once per connection (not per "
            "request); round trips with it on: every tunnel figure of both tables",
        )  # fmt: skip
    t, d = stats(col("download_tunnel", "mb_per_s")), stats(col("download_direct", "mb_per_s"))
    if t["n"] and d["n"]:
        ratio = t["median"] / d["median"]
        floors = [d | {"what": "same download on the node directly"}]
        alone = stats(col("download_ssh", "mb_per_s"))
        if alone["n"]:
            floors.append(alone | {"what": "ssh alone: the master's own -L socket, no relay"})
        ssh = stats(col("ssh_stream", "mb_per_s"))
        if ssh["n"]:
            floors.append(ssh | {"what": "ssh's own ceiling: `cat` through the same master"})
        row(
            "bulk download through the tunnel (100 MB, /files/)",
            "MB/s",
            t,
            floors,
            ">= 0.8x throughput",
            f"{ratio:.2f}x"
            + (f" ({t['median'] / alone['median']:.2f}x of ssh alone)" if alone["n"] else ""),
            ratio >= 0.8,
        )
    if scale:
        n, per = scale["sessions"], scale["per_session"]
        sf = scale.get("floor") or {}
        sf_start = [stats([sf["all_answering_s"]]) | {"what": f"{n} floor jobs at once, all "
                    "answering on the node"}] if sf else []  # fmt: skip
        row(f"scale: {n} users start at once -> all URLs printed and answering", "s",
            stats([scale["all_answering_s"]]), sf_start, "(reported)")  # fmt: skip
        row(f"scale: login-side memory per session, PSS of supervisor+srun+ssh ({n} sessions)",
            "MB", stats([p["login_pss_mb"] for p in per]), [], "(reported)")  # fmt: skip
        row(f"scale: login-side memory per session, RSS of supervisor+srun+ssh ({n} sessions)",
            "MB", stats([p["login_rss_mb"] for p in per]), [], "(reported)")  # fmt: skip
        if scale.get("ctrl_c_all_gone_s") is not None:
            sf_end = [stats([sf["scancel_all_gone_s"]]) | {"what": f"scancel of the {n} floor "
                      "jobs until all left squeue"}] if sf else []  # fmt: skip
            row(f"scale: Ctrl-C to all {n} at once -> everything gone", "s",
                stats([scale["ctrl_c_all_gone_s"]]), sf_end, "(reported)")  # fmt: skip
    return rows


def fmt(v: dict[str, Any], unit: str) -> str:
    if not v.get("n"):
        return v.get("what", "")
    scale, u = (1000.0, "ms") if unit == "s" and v["median"] < 0.1 else (1.0, unit)
    med, lo, hi = v["median"] * scale, v["min"] * scale, v["max"] * scale
    digits = 2 if med < 10 else (1 if med < 100 else 0)
    if u == "s":
        digits = 2
    text = f"{med:.{digits}f} {u}".replace(" /s", "/s")
    if v["n"] > 1:
        text += f" ({lo:.{digits}f}-{hi:.{digits}f}, n={v['n']})"
    return f"{v['what']}: {text}" if v.get("what") else text


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| figure | median (min-max, n) | floor measured beside it | target | result | met |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        met = {None: "", True: "yes", False: "**no**"}.get(r["met"], str(r["met"]))
        floors = "; ".join(fmt(f, r["unit"]) for f in r["floors"])
        lines.append(
            f"| {r['figure']} | {fmt(r['value'], r['unit'])} | {floors} | {r['target']} "
            f"| {r['result']} | {met} |"
        )
    return "\n".join(lines)


def derived_notes(s: dict[str, list[Any]], costs: dict[str, float]) -> list[str]:
    notes = []
    phases = ("submitted", "running", "jupyter_ready", "ready", "url_printed")
    tl = {k: statistics.median(t[k] for t in s["timeline"] if k in t) for k in phases
          if any(k in t for t in s.get("timeline", []))}  # fmt: skip
    if tl:
        notes.append(
            "start-up timeline, medians from the command's start (the tool's own timestamps): "
            + ", ".join(f"{k} {v:.2f} s" for k, v in tl.items())
        )
    if costs:
        notes.append(
            "controller RPCs per call (sdiag): "
            + "; ".join(f"`{k}`: {v:g}" for k, v in costs.items())
        )
    return notes


# -- the owner check's cost per accepted connection (relay.py + peers.py) -------------------------
# The upstream end of the relay (the ssh master's -L socket in a session): a one-thread echo server
# in a process of its own, so that only the relay's thread runs in the benchmark's process.
_ECHO = """
import os, selectors, socket, sys
path = sys.argv[1]
server = socket.socket(socket.AF_UNIX)
server.bind(path)
server.listen(512)
sel = selectors.DefaultSelector()
sel.register(server, selectors.EVENT_READ)
print("listening", flush=True)
while True:
    for key, _ in sel.select():
        if key.fileobj is server:
            conn, _ = server.accept()
            sel.register(conn, selectors.EVENT_READ)
            continue
        data = key.fileobj.recv(4096)
        if data:
            key.fileobj.sendall(data)
        else:
            sel.unregister(key.fileobj)
            key.fileobj.close()
"""
# The client, in a process of its own too: N connections one after the other, each connect, one
# byte there and back through the relay, close; the seconds each took, as JSON.
_CONNECT = """
import json, socket, sys, time
ports, n = [int(p) for p in sys.argv[1].split(",")], int(sys.argv[2])
took = {p: [] for p in ports}
for i in range(n * len(ports)):
    port = ports[i % len(ports)]
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as c:
        c.sendall(b"x")
        assert c.recv(1) == b"x"
    took[port].append(time.perf_counter() - t0)
print(json.dumps([took[p] for p in ports]))
"""


def owner_check_cost(rounds: int, n: int = 1000) -> dict[str, Any]:
    """Per accepted connection: a Relay (the supervisor's, this checkout's) with its owner check
    and the same Relay with the check taken out, both running, the client's connections going to
    one and the other in turn (so that both see the same moment of a shared machine); ``rounds``
    runs of ``n`` connections to each. And the sock_diag query alone, timed in a loop."""
    from spunnel_jupyter.peers import PeerOwner
    from spunnel_jupyter.relay import Relay

    class Unchecked(Relay):
        def _owned(self, client: socket.socket, peer: tuple[str, int]) -> bool:
            return True

    spent: list[float] = []

    class Timed(Relay):  # the check itself, timed where it runs (the relay's thread, per accept)
        def _owned(self, client: socket.socket, peer: tuple[str, int]) -> bool:
            t0 = time.perf_counter()
            try:
                return super()._owned(client, peer)
            finally:
                spent.append(time.perf_counter() - t0)

    work = Path(tempfile.mkdtemp(prefix="bench-owner-"))
    target = str(work / "upstream.sock")
    echo = subprocess.Popen([VENV_PY, "-c", _ECHO, target], stdout=subprocess.PIPE)
    out: dict[str, Any] = {"with_us": [], "without_us": [], "extra_us": [], "check_us": [],
                           "n": n}  # fmt: skip
    try:
        assert echo.stdout is not None and echo.stdout.readline().strip() == b"listening"
        for r in range(rounds):
            relays = [Timed(free_port(), target), Unchecked(free_port(), target)]
            spent.clear()
            order = relays if r % 2 == 0 else relays[::-1]  # which goes first, in turn
            try:
                ports = ",".join(str(relay.port) for relay in order)
                done = subprocess.run(
                    [VENV_PY, "-c", _CONNECT, ports, str(n)],
                    capture_output=True,
                    text=True,
                    timeout=300,
                    check=True,
                )
            finally:
                for relay in relays:
                    relay.close()
            took = dict(zip([id(x) for x in order], json.loads(done.stdout)))
            checked, unchecked = (statistics.median(took[id(x)]) * 1e6 for x in relays)
            out["with_us"].append(checked)
            out["without_us"].append(unchecked)
            out["extra_us"].append(checked - unchecked)
            out["check_us"].append(statistics.median(spent) * 1e6)
        # the query alone: the kernel's answer for an established loopback connection
        with socket.create_server(("127.0.0.1", 0)) as listener:
            local = listener.getsockname()
            with socket.create_connection(local):
                accepted, peer = listener.accept()
                with accepted:
                    owner = PeerOwner()
                    try:
                        owner.uid(peer, local)
                        t0 = time.perf_counter()
                        for _ in range(5000):
                            owner.uid(peer, local)
                        out["query_us"] = (time.perf_counter() - t0) / 5000 * 1e6
                    finally:
                        owner.close()
    finally:
        echo.kill()
        echo.wait()
        shutil.rmtree(work, ignore_errors=True)
    return out


# -- side by side: what users would pick instead (issue 15) ----------------------------------------
PEERS_VENV = Path("/opt/spunnel/peers-venv")
FORWARD = PEERS_VENV / "bin" / "jupyter-forward"
JUPYTER = "/opt/spunnel/venv/bin/jupyter"  # the cluster's Python environment, on the node
LOGIN_SSHD = "127.0.0.1:2222"  # the test cluster's login sshd (tests/cluster/up.sh)
HAND_POLL_S = 1.0  # the by-hand user (or a site's wrapper script) looks at the log once a second
PEERS = ("ours", "hand", "forward")
PEER_USERS = {"ours": "bench07", "hand": "bench08", "forward": "bench09"}
PEER_NAMES = {
    "ours": "spunnel-notebook",
    "hand": "by hand (srun + ssh -L)",
    "forward": "jupyter-forward",
}
PEERS_NOTES = [
    "spunnel-notebook: `spunnel-notebook -p interact --mem 500`, Ctrl-C = SIGINT to the command "
    "(as in the floor table below)",
    "by hand: `srun -N1 -n1 -p interact --mem 500 jupyter lab --no-browser --ip=127.0.0.1 "
    "--port=N > LOG 2>&1` (Jupyter on the node's loopback, so that only the ssh tunnel reaches it; "
    "`--ip=<node>` would open it to every host of the cluster, token only), the user reads the URL "
    "and token from LOG once a second (a person, or a site's wrapper script polling with "
    "`sleep 1`; the median wait is half of that), then `ssh -N -L P:127.0.0.1:N c1` from the "
    "login host; Ctrl-C = SIGINT to ssh's process group, then twice to srun's (0.2 s apart: srun "
    "and Jupyter each ask for a second one), with no human delay between the terminals",
    'jupyter-forward 2022.9.10: `jupyter-forward --port P --launch-command "srun -N1 -n1 -p '
    "interact --mem 500\" 127.0.0.1:2222` (the login sshd), its README's Slurm use; the user's "
    "~/.bash_profile puts /opt/spunnel/venv/bin on PATH (no conda on the cluster). The latest "
    "release, 2025.1.16, cannot run without a conda env: after `which jupyter` succeeds it says "
    "'Could not activate environment' and exits 1 before submitting anything "
    "(tests/benchmarks/results/peers-jupyter-forward-2025.1.16.txt). Its URL is printed 3 s after "
    "the forward is set up (a fixed sleep in its code); Ctrl-C = SIGINT to its process group",
    "the same checks for all three: login-side memory = every process of the user in the login "
    "host's network namespace (the node's processes excluded; sshd's root-owned privileged "
    "process for jupyter-forward's connection not counted); gone = the commands exited, the local "
    "port closed, no job of the user in squeue, no process of the user on the login host or the "
    "node; files left = new files or directories of the user in their home and /tmp, once all is "
    "gone (~/.ipython, ~/.npm and an empty ~/.local/share/jupyter aside: any Jupyter kernel or "
    "JupyterLab makes them)",
]


# Files any Jupyter leaves in a home, whatever started it: the kernel's IPython profile, npm's logs
# of JupyterLab's build check, and the data directory ~/.local/share/jupyter that `jupyter lab`
# makes at start-up (the directories only: what is put in them counts). Not a tool's leftovers.
ANY_JUPYTER = re.compile(r"/home/[^/]+/((\.ipython|\.npm)(/|$)|\.local(/share(/jupyter)?)?$)")


GENERIC = re.compile(r"(?<=jupyter-)[0-9a-f]{8}(?=\.log)|(?<=[-_.])[0-9][0-9T-]*[0-9]")


def has_token(path: str, token: str) -> bool:
    with contextlib.suppress(OSError):
        if os.path.isfile(path) and not os.path.islink(path):
            return token.encode() in Path(path).read_bytes()[: 1 << 20]
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def login_netns() -> str:
    return os.readlink("/proc/self/ns/net")  # the benchmark runs on the login host


def login_procs(user: str) -> list[int]:
    """The user's processes on the login host (the node's share this /proc, in c1's network
    namespace)."""
    ns, found = login_netns(), []
    for pid, _ in C.procs_of(user):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/ns/net") == ns:
                found.append(pid)
    return found


def user_files(user: str) -> set[str]:
    """Every file and directory of the user in their home and in /tmp (the 100 MB file aside)."""
    owner, found = C.uid(user), set()
    for root in (Path(f"/home/{user}"), Path("/tmp")):
        for dirpath, dirnames, filenames in os.walk(root):
            for name in [*dirnames, *filenames]:
                path = os.path.join(dirpath, name)
                with contextlib.suppress(OSError):
                    if os.lstat(path).st_uid == owner and not path.endswith(BIG_FILE):
                        found.add(path)
            if root == Path("/tmp"):
                dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) in found]
    return found


def peer_gone(user: str, port: int, procs: list[subprocess.Popen[bytes]], t0: float,
              timeout: float = 20) -> dict[str, Any]:  # fmt: skip
    """Seconds after ``t0`` at which each part was first seen gone, the same checks for every tool:
    the commands the user started, the local port, the user's jobs in squeue, every process of the
    user (login host and node)."""
    checks = {
        "commands": lambda: all(p.poll() is not None for p in procs),
        "tunnel": lambda: port_closed(port),
        "job": lambda: not C.squeue(user),
        "processes": lambda: not C.procs_of(user),
    }
    seen, left = first_seen(checks, t0, timeout)
    detail = []
    if "job" in left:
        detail += [f"job in squeue: {line}" for line in C.squeue(user)]
    if "processes" in left:
        detail += [f"process: {cmd[:100]}" for _, cmd in C.procs_of(user)]
    return {**seen, "all": max(seen.values()) if not left else None, "left": left,
            "left_detail": detail}  # fmt: skip


def answering(port: int, token: str, timeout: float = 30) -> float:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, http.client.HTTPException):
            if http_get(port, token) == 200:
                return time.monotonic()
        if time.monotonic() > deadline:
            raise RuntimeError(f"127.0.0.1:{port} does not answer")
        time.sleep(0.005)


class Peers:
    """spunnel-notebook, the by-hand recipe and jupyter-forward, one session each per round, each
    as its own benchmark user, measured the same way."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench

    def session(self, kind: str) -> None:
        user = PEER_USERS[kind]
        self.bench.clean(user)
        profile = Path(f"/home/{user}/.bash_profile")
        if kind == "forward":
            # jupyter-forward runs `jupyter` from the login shell's PATH (its README: a conda env or
            # a module); the cluster's environment is a venv, so the user's profile puts it there.
            profile.write_text("export PATH=/opt/spunnel/venv/bin:$PATH\n")
            shutil.chown(profile, user, user)
        before = user_files(user)
        procs: list[subprocess.Popen[bytes]] = []
        outs: list[Output] = []
        try:
            start = {"ours": self.start_ours, "hand": self.start_hand,
                     "forward": self.start_forward}[kind]  # fmt: skip
            t0 = time.monotonic()
            port, token, stop = start(user, procs, outs)
            self.bench.add(f"peer_{kind}_url_s", time.monotonic() - t0)
            mem = [memory(pid) for pid in login_procs(user)]
            self.bench.add(
                f"peer_{kind}_login_mem",
                {
                    "rss_mb": sum(m["rss_mb"] for m in mem),
                    "pss_mb": sum(m["pss_mb"] for m in mem),
                    "processes": len(mem),
                },
            )
            self.bench.add(
                f"peer_{kind}_rtt",
                json_as(user, [VENV_PY, str(HELPER), "rtt", "--port", str(port)], 120,
                        BENCH_TOKEN=token),
            )  # fmt: skip
            t1 = time.monotonic()
            stop()
            gone = peer_gone(user, port, procs, t1)
            time.sleep(0.2)
            left = sorted(f for f in user_files(user) - before if not ANY_JUPYTER.search(f))
            gone["files_left"] = left
            gone["files_with_token"] = [f for f in left if has_token(f, token)]
            self.bench.add(f"peer_{kind}_end", gone)
        except Exception:
            for out in outs:
                say(f"{kind} session of {user} failed; output:\n{out.text()[-3000:]}")
            raise
        finally:
            for proc in procs:
                if proc.poll() is None:
                    with contextlib.suppress(OSError):
                        os.killpg(proc.pid, signal.SIGKILL)
            self.bench.clean(user)
            for path in sorted(user_files(user) - before, key=len, reverse=True):
                with contextlib.suppress(OSError):
                    (os.rmdir if os.path.isdir(path) else os.unlink)(path)
            profile.unlink(missing_ok=True)

    def pending_rpc(self, kind: str, window: float) -> None:
        """Controller RPCs per second of the user while the job waits on a dependency on another
        benchmark user's job: the same blocker and the same count (sdiag) for all three."""
        user, blocker_user = PEER_USERS[kind], "bench12"
        self.bench.clean(user, blocker_user)
        profile = Path(f"/home/{user}/.bash_profile")
        if kind == "forward":
            profile.write_text("export PATH=/opt/spunnel/venv/bin:$PATH\n")
            shutil.chown(profile, user, user)
        before = user_files(user)
        sub = C.as_user(
            blocker_user,
            ["sbatch", "--parsable", "-o", "/dev/null", "-J", "bench-blocker", "--mem", "100",
             "-t", "10", "--wrap", "sleep 600"],
            timeout=30,
        )  # fmt: skip
        dep = f"--dependency=afterany:{int(sub.stdout.strip().split(';')[0])}"
        srun = f"srun {dep} -N1 -n1 {' '.join(JOB_ARGS)}"
        argv = {
            "ours": [PROG, *JOB_ARGS, "--", dep],
            "hand": ["sh", "-c", f"exec {srun} {JUPYTER} lab --no-browser --ip=127.0.0.1 "
                     f"--port={9000 + secrets.randbelow(900)} > jupyter-pending.log 2>&1"],
            "forward": [str(FORWARD), "--port", str(free_port()), "--launch-command", srun,
                        LOGIN_SSHD],
        }[kind]  # fmt: skip
        proc = popen_as(user, argv, COLUMNS="300", BROWSER="true")
        out = Output(proc)
        try:
            deadline = time.monotonic() + 60
            while not any(line.split()[1] == "PENDING" for line in C.squeue(user)):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"{kind}: no pending job; output:\n{out.text()[-2000:]}")
                time.sleep(0.1)
            time.sleep(2.5)  # past the start-up queries, as for the floor table's figure
            self.bench.add(f"peer_{kind}_rpc_pending_per_s", rpc_rate(user, window))
        finally:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            self.bench.clean(user, blocker_user)
            for path in sorted(user_files(user) - before, key=len, reverse=True):
                with contextlib.suppress(OSError):
                    (os.rmdir if os.path.isdir(path) else os.unlink)(path)
            profile.unlink(missing_ok=True)

    def start_ours(self, user: str, procs: list[Any], outs: list[Output]) -> tuple[int, str, Any]:
        tool = Tool(user, JOB_ARGS).start()
        assert tool.proc is not None and tool.out is not None
        procs.append(tool.proc)
        outs.append(tool.out)
        tool.wait_url()

        def stop() -> None:
            assert tool.proc is not None
            tool.proc.send_signal(signal.SIGINT)  # as the rest of this benchmark does

        return tool.port, tool.token(), stop

    def start_hand(self, user: str, procs: list[Any], outs: list[Output]) -> tuple[int, str, Any]:
        """The recipe HPC sites document: srun Jupyter on the node's loopback, read the URL from
        its log, ssh -N -L from the login host to the node, open localhost."""
        node_port = 9000 + secrets.randbelow(900)
        log = f"jupyter-{secrets.token_hex(4)}.log"
        srun = popen_as(
            user,
            ["sh", "-c", f"exec srun -N1 -n1 {' '.join(JOB_ARGS)} {JUPYTER} lab --no-browser "
             f"--ip=127.0.0.1 --port={node_port} > {log} 2>&1"],
        )  # fmt: skip
        procs.append(srun)
        url = re.compile(r"http://127\.0\.0\.1:(\d+)/lab\?token=([0-9a-f]+)")
        deadline = time.monotonic() + 120
        while True:  # the user looks at the log once a second
            time.sleep(HAND_POLL_S)
            with contextlib.suppress(OSError):
                if m := url.search(Path(f"/home/{user}/{log}").read_text(errors="replace")):
                    break
            if time.monotonic() > deadline or srun.poll() is not None:
                raise RuntimeError(f"no URL in the by-hand Jupyter's log (srun {srun.poll()})")
        node_port, token = int(m.group(1)), m.group(2)
        port = free_port()
        ssh = popen_as(
            user,
            ["ssh", "-N", "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes",
             "-L", f"{port}:127.0.0.1:{node_port}", "c1"],
        )  # fmt: skip
        procs.append(ssh)
        outs.append(Output(ssh))
        answering(port, token)

        def stop() -> None:  # Ctrl-C in each terminal: first ssh's, then srun's (twice, as
            os.killpg(ssh.pid, signal.SIGINT)  # srun and Jupyter both ask for it)
            with contextlib.suppress(subprocess.TimeoutExpired):
                ssh.wait(10)
            os.killpg(srun.pid, signal.SIGINT)
            time.sleep(0.2)
            with contextlib.suppress(OSError):
                os.killpg(srun.pid, signal.SIGINT)

        return port, token, stop

    def start_forward(
        self, user: str, procs: list[Any], outs: list[Output]
    ) -> tuple[int, str, Any]:
        """jupyter-forward as its README shows for Slurm: --launch-command "srun ...", through the
        login host's sshd."""
        port = free_port()
        argv = [str(FORWARD), "--port", str(port), "--launch-command",
                f"srun -N1 -n1 {' '.join(JOB_ARGS)}", LOGIN_SSHD]  # fmt: skip
        proc = popen_as(user, argv, COLUMNS="300", BROWSER="true")
        procs.append(proc)
        out = Output(proc)
        outs.append(out)
        _, _, m = out.wait(r"http://localhost:\d+/\?token=([0-9a-f]+)", 120)
        answering(port, m.group(1))

        def stop() -> None:  # Ctrl-C in its terminal
            os.killpg(proc.pid, signal.SIGINT)

        return port, m.group(1), stop


def peers_rows(s: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """One row per figure, one column per tool, and the ratio of spunnel-notebook to each."""

    def col(name: str, key: str | None = None) -> list[Any]:
        return [x[key] if key else x for x in s.get(name, []) if (x[key] if key else x) is not None]

    figures = [
        ("command -> URL answering through the tunnel", "s", "url_s", None),
        ("Ctrl-C -> command(s) exited, port closed, job gone, no process of the user left", "s",
         "end", "all"),
        ("HTTP round trip (GET /api/status, kept-alive connection)", "s", "rtt",
         "http_keepalive_s"),
        ("HTTP round trip, new connection each", "s", "rtt", "http_new_connection_s"),
        ("kernel execute round trip (websocket, `pass` until idle)", "s", "rtt",
         "kernel_execute_s"),
        ("login-side memory while running, RSS of all the user's processes there", "MB",
         "login_mem", "rss_mb"),
        ("login-side memory while running, PSS of all the user's processes there", "MB",
         "login_mem", "pss_mb"),
        ("processes of the user on the login host while running", "", "login_mem", "processes"),
        ("Slurm controller RPCs per second while pending (sdiag, this user)", "/s",
         "rpc_pending_per_s", None),
    ]  # fmt: skip
    rows = []
    for figure, unit, name, key in figures:
        values = {k: stats(col(f"peer_{k}_{name}", key)) for k in PEERS}
        if not any(v["n"] for v in values.values()):
            continue
        ratios = {
            k: values["ours"]["median"] / values[k]["median"]
            for k in PEERS[1:]
            if values["ours"]["n"] and values[k]["n"] and values[k]["median"]
        }
        rows.append({"figure": figure, "unit": unit, "values": values, "ratios": ratios})
    ends = {k: col(f"peer_{k}_end") for k in PEERS}
    if any(ends.values()):
        left = {}
        for k, runs in ends.items():
            files = sorted({GENERIC.sub("N", f) for r in runs for f in r.get("files_left", [])})
            per_run = stats([len(r.get("files_left", [])) for r in runs])
            gone = sum(r["all"] is not None for r in runs)
            text = f"{gone}/{len(runs)} runs all gone within 20 s"
            secret = sorted(
                {GENERIC.sub("N", f) for r in runs for f in r.get("files_with_token", [])}
            )
            if files:
                text += f"; files left per run: {count(per_run)}: {', '.join(files)}"
            else:
                text += "; no new file left in home or /tmp"
            text += "; with the token in them: " + (", ".join(secret) if secret else "none")
            left[k] = text
        rows.append({"figure": "what is left after Ctrl-C (home and /tmp, new files)", "unit": "",
                     "text": left})  # fmt: skip
    return rows


def peers_table(rows: list[dict[str, Any]]) -> str:
    names = [PEER_NAMES[k] for k in PEERS]
    lines = [
        "| figure | "
        + " | ".join(names)
        + " | spunnel-notebook / "
        + " | spunnel-notebook / ".join(names[1:])
        + " |",
        "|---|" + "---|" * (len(names) * 2 - 1),
    ]
    for r in rows:
        if "text" in r:
            cells = [r["text"].get(k, "") for k in PEERS] + [""] * (len(PEERS) - 1)
        else:
            unit = r["unit"]
            cells = [fmt(r["values"][k], unit) if unit else count(r["values"][k]) for k in PEERS]
            cells += [f"{r['ratios'][k]:.2f}x" if k in r["ratios"] else "" for k in PEERS[1:]]
        lines.append(f"| {r['figure']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def count(v: dict[str, Any]) -> str:
    if not v.get("n"):
        return ""
    text = f"{v['median']:g}"
    return text + (f" ({v['min']:g}-{v['max']:g}, n={v['n']})" if v["n"] > 1 else "")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 repetitions, 8 s windows, 4 sessions")
    p.add_argument("--reps", type=int, default=0, help="repetitions per figure (default 5)")
    p.add_argument("--scale", type=int, default=0, help="sessions in the scale run (default 10)")
    p.add_argument("--window", type=float, default=0, help="RPC counting window, s (default 20)")
    p.add_argument("--out", default=str(Path(__file__).with_name("results")))
    p.add_argument(
        "--skip",
        default="",
        help="parts to skip, comma-separated: idle,pending,scale,peers; of idle's: login2,browser",
    )
    opts = p.parse_args()
    reps = opts.reps or (3 if opts.quick else 5)
    n_scale = opts.scale or (4 if opts.quick else 10)
    window = opts.window or (8.0 if opts.quick else 20.0)
    peer_window = min(window, 10.0)  # side by side: one such window per tool and round
    skip = set(filter(None, opts.skip.split(",")))
    if os.geteuid() != 0:
        raise SystemExit("bench: run as root (bash tests/benchmarks/run.sh)")
    # Started in the background (`cmd &`, nohup), the benchmark ignores SIGINT and SIGQUIT, and
    # every tool it starts would inherit that: the peers' Ctrl-C would do nothing. Defaults again.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)
    if not 1 <= n_scale <= 12:
        raise SystemExit("bench: --scale must be 1-12 (users bench01..bench12)")
    C.cluster_env()
    names = users(12)
    install_helper(names[:1])
    bench = Bench(opts)
    info = machine()
    info["other_jobs_at_start"] = other_jobs()
    info["loadavg_at_start"] = os.getloadavg()
    say(f"{reps} repetitions, RPC window {window:g} s, scale {n_scale}; on {info['cpu']}")
    started = time.monotonic()
    costs: dict[str, float] = {}
    if "idle" not in skip:
        for i in range(reps):
            say(f"idle cluster, round {i + 1}/{reps}")
            bench.attempt("floor", bench.floor, "bench03")
            bench.attempt("session", bench.tool_session, "bench01", "ctrl-c", True)
            bench.attempt("floor", bench.floor, "bench03")
            bench.attempt("session", bench.tool_session, "bench01", "scancel", False)
            bench.attempt("detached session", bench.detached_session, "bench04")
            bench.attempt("session", bench.without_private_tmp, "bench05")
            if "login2" not in skip:
                bench.attempt("attach on login2", bench.attach_elsewhere, "bench10")
            if "browser" not in skip:
                bench.attempt("save with a browser", bench.save_with_browser, "bench11")
        say("owner check: relay with and without it")
        bench.add("owner_check", bench.attempt("owner check", owner_check_cost, reps, 1000))
    if "pending" not in skip:
        costs = bench.attempt("RPC costs", bench.rpc_costs, "bench06")
        for i in range(reps):
            say(f"pending, then running, round {i + 1}/{reps}")
            w = window if i == 0 else 0
            bench.attempt("pending session", bench.pending_session, "bench02", "bench12", w)
    if "peers" not in skip:
        peers = Peers(bench)
        kinds = PEERS if FORWARD.exists() else PEERS[:2]
        if not FORWARD.exists():
            bench.notes.append(
                f"jupyter-forward not measured: {FORWARD} missing (as root: /usr/bin/python3 "
                f"-m venv "
                f"{PEERS_VENV} && {PEERS_VENV}/bin/pip install jupyter-forward==2022.9.10)"
            )
        for i in range(reps):
            say(f"side by side, round {i + 1}/{reps}")
            order = kinds[i % len(kinds) :] + kinds[: i % len(kinds)]  # each goes first in turn
            for kind in order:
                bench.attempt(f"{kind} session", peers.session, kind)
            if "pending" not in skip:  # one window per tool in every round
                t = time.monotonic()
                for kind in order:
                    bench.attempt(f"{kind} pending", peers.pending_rpc, kind, peer_window)
                bench.add("peer_rpc_cost_s", time.monotonic() - t)
    scale = None
    if "scale" not in skip:
        say(f"scale: {n_scale} users at once")
        scale_floor = bench.attempt("scale floor", bench.scale_floor, names[:n_scale])
        scale = bench.attempt("scale", bench.scale, names[:n_scale])
        scale["floor"] = scale_floor
    info["loadavg_at_end"] = os.getloadavg()
    info["other_jobs_at_end"] = other_jobs()
    info["duration_s"] = round(time.monotonic() - started, 1)
    rows = summarize(bench.samples, scale)
    header = (
        f"Measured {info['date']} on {info['cpu']} ({info['cores']} cores, "
        f"{info['memory_gb']} GB RAM), {info['os']}, kernel {info['kernel']}, {info['slurm']}, "
        f"{info['openssh'].split(',')[0]}, Python {info['python']}; spunnel-jupyter at "
        f"{info['commit']}; {reps} repetitions "
        f"(scale run: {n_scale} sessions); took {info['duration_s']:g} s. Load average "
        f"{info['loadavg_at_start'][0]:.1f} at the start, {info['loadavg_at_end'][0]:.1f} at the "
        f"end; other users' jobs in the queue at the start: {len(info['other_jobs_at_start'])}."
    )
    if "pending" not in skip:
        bench.notes.append(
            f"RPC windows: {window:g} s while pending (the job waits on a dependency on another "
            f"benchmark user's job), {window:g} s while running; RPCs counted by slurmctld for "
            "the session's user"
        )
    notes = list(dict.fromkeys(bench.notes + derived_notes(bench.samples, costs)))
    side = peers_rows(bench.samples)
    text = f"{header}\n\n"
    if side:
        text += f"Side by side (each tool's own user, interleaved rounds):\n\n{peers_table(side)}\n"
        peer_notes = PEERS_NOTES[:]
        if costs_rpc := bench.samples.get("peer_rpc_cost_s"):
            peer_notes.append(
                f"controller RPCs while pending: one {peer_window:g} s window per tool in each "
                f"round ({len(costs_rpc)} per tool), the job waiting on a dependency on another "
                "benchmark user's job, counted by slurmctld for the user; these windows cost "
                f"{sum(costs_rpc):.0f} s of the run"
            )
        text += "".join(f"\n- {n}" for n in peer_notes) + "\n\nAgainst the floors:\n\n"
    text += f"{table(rows)}\n" + "".join(f"\n- {n}" for n in notes) + "\n"
    print(text)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.md").write_text(text)
    result = {
        "machine": info,
        "options": {"reps": reps, "scale": n_scale, "window_s": window, "quick": opts.quick},
        "rows": rows,
        "side_by_side": side,
        "samples": bench.samples,
        "scale": scale,
        "rpc_costs": costs,
        "notes": notes,
    }
    (out / "latest.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    say(f"written {out / 'latest.md'} and {out / 'latest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
