"""Fake srun, scontrol, squeue, sinfo and scancel: the subset of their interface spunnel uses,
with what real Slurm prints, over the job files in $FAKE_SLURM_DIR (common.py).

Switches (files in $FAKE_SLURM_DIR/ctl, see cluster.py):
  controller_down   every command fails as if slurmctld did not answer
  srun_refuse       srun refuses the job: "Unable to allocate resources: <content>"
  hold              srun's job pends while the file exists; its content is the pending reason
  srun_quiet        srun says nothing about the queue (like a real immediate allocation)
  kill_wait         seconds between SIGTERM and SIGKILL when Slurm ends a step (default 2)
  srun_ignore_signals  signal names srun neither forwards nor acts on (e.g. SIGUSR1)
  munge_down        every command fails as when munged is not running (authentication error)
  job_end_lost      a job srun ends stays RUNNING: the controller (away) never heard it ended
  slurm_delay       seconds scontrol, squeue, sinfo and scancel take before they answer (a
                    slow controller, or a hung one: more than SlurmCLI.timeout)
  srun_queue_delay  seconds between srun queueing its job and saying so (and naming it)

``srun --jobid=N [--overlap] [--pty] ... CMD`` runs CMD as another step of running job N
(``Step``), ended by Slurm when the job ends (SIGTERM, SIGKILL after kill_wait), and killed at
once on SIGHUP or SIGTERM to srun ("forcing job termination", as the real one). With --pty the
step is this terminal's: CMD shares srun's stdio and process group (a real srun relays a pty on
the node in raw mode; here the node's terminal is this one), so the terminal's Ctrl-C reaches
both, and srun itself ignores Ctrl-Z as the real one, in raw mode, never sees it.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import re
import signal
import subprocess
import threading
import time
from typing import Any

from common import (
    ACTIVE,
    alive,
    all_jobs,
    eprint,
    flag,
    log_call,
    log_event,
    new_job,
    node_name,
    parse_time_limit,
    partitions,
    read_job,
    slurm_time,
    update_job,
)

SLURM_VERSION = "25.11.7"  # the fake cluster's release (the switch slurm_version changes it)
UNREACHABLE = "Unable to contact slurm controller (connect failure)"
AUTH_ERROR = "Protocol authentication error"


def munge_down(prog: str) -> bool:
    """With the munge_down switch: say what a Slurm command says without munged; True."""
    if flag("munge_down") is None:
        return False
    eprint(f'{prog}: error: Munge encode failed: Failed to access "/run/munge/munge.socket.2": '
           "No such file or directory (retrying ...)")  # fmt: skip
    eprint(f"{prog}: error: slurm_send_node_msg: auth_g_create: authentication error")
    return True


# srun options that take their value as the next word.
_VALUE_OPTIONS = {
    "-p": "partition", "-t": "time", "-c": "cpus-per-task", "-J": "job-name", "-A": "account",
    "-q": "qos", "-C": "constraint", "-G": "gpus", "-N": "nodes", "-n": "ntasks",
    "-w": "nodelist", "--partition": "partition", "--time": "time", "--mem": "mem",
    "--comment": "comment", "--job-name": "job-name", "--account": "account",
}  # fmt: skip
_SIGNALS = (signal.SIGUSR1, signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def parse_srun(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """srun's options (by long name) and the command after them."""
    opts: dict[str, str] = {}
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if arg.startswith("--") and "=" in arg:
            name, value = arg[2:].split("=", 1)
        elif arg in _VALUE_OPTIONS and i + 1 < len(argv):
            name, value = _VALUE_OPTIONS[arg], argv[i + 1]
            i += 1
        else:
            name, value = arg.lstrip("-"), ""
        opts[name] = value
        i += 1
    return opts, argv[i:]


class Srun:
    """One srun: the allocation (pending, then running) and its single task."""

    def __init__(self, opts: dict[str, str], command: list[str]) -> None:
        self.opts = opts
        self.command = command
        self.job_id = 0
        self.task: subprocess.Popen[bytes] | None = None
        self.signals: list[int] = []
        self.node = node_name()

    def on_signal(self, signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if name in (flag("srun_ignore_signals") or "").split():
            log_event("srun", "signal", sig=name, job=self.job_id, ignored=True)
            return
        if self.task is not None and self.task.poll() is None:
            os.kill(self.task.pid, signum)  # srun forwards the signal to its task
            log_event("srun", "signal", sig=name, job=self.job_id, forwarded_to=self.task.pid)
        else:
            self.signals.append(signum)
            log_event("srun", "signal", sig=name, job=self.job_id)

    def run(self) -> int:
        for sig in _SIGNALS:
            signal.signal(sig, self.on_signal)
        parts = {p["name"]: p for p in partitions()}
        name = self.opts.get("partition") or next(
            (p["name"] for p in parts.values() if p["default"]), ""
        )
        part = parts.get(name)
        if part is None:
            eprint("srun: error: Unable to allocate resources: Invalid partition name specified")
            return 1
        if not self.command:
            eprint("srun: fatal: No command given to execute.")
            return 1
        limit = parse_time_limit(self.opts.get("time", "")) or parse_time_limit(part["limit"])
        hold = flag("hold")
        job = new_job(
            state="PENDING", reason="None" if hold is None else hold or "Resources",
            user=getpass.getuser(), partition=name,
            name=self.opts.get("job-name", "srun"), comment=self.opts.get("comment", ""),
            node="", time_limit=limit, end_time=None, srun_pid=os.getpid(), task_pid=None,
        )  # fmt: skip
        self.job_id = job["job_id"]
        time.sleep(float(flag("srun_queue_delay") or 0))
        talk = hold is not None or flag("srun_quiet") is None
        if talk:
            eprint(f"srun: job {self.job_id} queued and waiting for resources")
        if not self.pend():
            eprint(f"srun: Job allocation {self.job_id} has been revoked.")
            return 1
        if talk:
            eprint(f"srun: job {self.job_id} has been allocated resources")
        return self.run_task()

    def pend(self) -> bool:
        """Wait while the test holds the queue; False if the job was revoked or cancelled."""
        while True:
            if self.signals:  # srun interrupted while waiting: it revokes its job request
                update_job(self.job_id, only_if=("PENDING",), state="CANCELLED",
                           reason="None", end_time=time.time())  # fmt: skip
                return False
            hold = flag("hold")
            now = time.time()
            if hold is None:
                limit = read_job(self.job_id) or {}
                end = now + limit["time_limit"] if limit.get("time_limit") else None
                running = update_job(
                    self.job_id, only_if=("PENDING",), state="RUNNING", reason="None",
                    node=self.node, start_time=now, end_time=end,
                )  # fmt: skip
                return running is not None  # None: scancel got there first
            job = read_job(self.job_id) or {}
            if job.get("state") != "PENDING":
                return False  # scancel'd while pending
            if job.get("reason") != (hold or "Resources"):
                update_job(self.job_id, reason=hold or "Resources")
            time.sleep(0.02)

    def run_task(self) -> int:
        n, node = self.job_id, self.node
        env = dict(
            os.environ, SLURM_JOB_ID=str(n), SLURM_JOBID=str(n), SLURM_STEP_ID="0",
            SLURM_RESTART_COUNT="0", SLURM_PROCID="0", SLURM_NODEID="0", SLURM_NODELIST=node,
            SLURMD_NODENAME=node, SLURM_JOB_PARTITION=read_job(n)["partition"],  # type: ignore[index]
        )  # fmt: skip
        try:
            # Like slurmstepd: the task is in no process group of srun's, and srun relays its
            # stdio (the task holds no descriptor of srun's: if srun dies, its pipes close).
            self.task = subprocess.Popen(
                self.command, env=env, start_new_session=True,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )  # fmt: skip
        except OSError as e:
            eprint(f"slurmstepd: error: execve(): {self.command[0]}: {e.strerror}")
            eprint(f"srun: error: {node}: task 0: Exited with exit code 2")
            update_job(n, only_if=("RUNNING",), state="FAILED", end_time=time.time())
            return 2
        assert self.task.stdin and self.task.stdout and self.task.stderr
        _relay(0, self.task.stdin.fileno(), close=True)
        out = _relay(self.task.stdout.fileno(), 1)
        err = _relay(self.task.stderr.fileno(), 2)
        update_job(n, task_pid=self.task.pid)
        log_event("srun", "task", job=n, task_pid=self.task.pid)
        for signum in self.signals:  # arrived while the task was being started
            os.kill(self.task.pid, signum)
        kill_at: float | None = None
        while self.task.poll() is None:
            now = time.time()
            job = read_job(n) or {}
            if kill_at is None and job.get("state") == "CANCELLED":  # scancel signalled the task
                eprint(f"slurmstepd: error: *** STEP {n}.0 ON {node} CANCELLED AT "
                       f"{slurm_time(now)} ***")  # fmt: skip
                kill_at = self.end_step("cancelled", signal_task=False)
            elif kill_at is None and job.get("end_time") and now >= job["end_time"]:
                if update_job(n, only_if=("RUNNING",), state="TIMEOUT") is not None:
                    eprint(f"slurmstepd: error: *** STEP {n}.0 ON {node} CANCELLED AT "
                           f"{slurm_time(now)} DUE TO TIME LIMIT ***")  # fmt: skip
                    kill_at = self.end_step("time limit")
            elif kill_at is not None and now >= kill_at:
                log_event("srun", "sigkill", job=n, task_pid=self.task.pid)
                try:
                    os.killpg(self.task.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                kill_at = float("inf")
            time.sleep(0.02)
        code = self.task.returncode
        for relay in (out, err):  # the task's last words before srun's own
            relay.join(timeout=2)
        if code < 0:
            names = {signal.SIGKILL: "Killed", signal.SIGTERM: "Terminated"}
            what = names.get(-code, signal.Signals(-code).name)
            eprint(f"srun: error: {node}: task 0: {what}")
        elif code > 0:
            eprint(f"srun: error: {node}: task 0: Exited with exit code {code}")
        if flag("job_end_lost") is not None:
            log_event("srun", "job_end_lost", job=n, exit_code=code)
            return code if code >= 0 else 128 - code
        final = "COMPLETED" if code == 0 else "FAILED"
        if update_job(n, only_if=("RUNNING",), state=final, end_time=time.time()) is None:
            update_job(n, end_time=time.time())  # CANCELLED or TIMEOUT: keep it
        update_job(n, exit_code=code)
        return code if code >= 0 else 128 - code

    def end_step(self, why: str, signal_task: bool = True) -> float:
        """What slurmstepd does to a step Slurm ends: SIGTERM now, SIGKILL after KillWait."""
        assert self.task is not None
        eprint(f"srun: Job step aborted: Waiting up to {flag('kill_wait') or 2} seconds for "
               "job step to finish.")  # fmt: skip
        log_event("srun", "end_step", job=self.job_id, why=why)
        if signal_task:
            try:
                os.kill(self.task.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        return time.time() + float(flag("kill_wait") or 2)


class Step:
    """srun --jobid=N: one more step of a running job, beside its first."""

    def __init__(self, job_id: int, opts: dict[str, str], command: list[str]) -> None:
        self.job_id, self.opts, self.command = job_id, opts, command
        self.pty = "pty" in opts
        self.task: subprocess.Popen[bytes] | None = None

    def on_signal(self, signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        forward = not (self.pty and signum == signal.SIGINT)  # the terminal's reached the task
        if signum in (signal.SIGHUP, signal.SIGTERM):
            eprint("srun: forcing job termination")
            signum = signal.SIGKILL
        if forward and self.task is not None and self.task.poll() is None:
            os.kill(self.task.pid, signum)
        log_event("srun", "step-signal", sig=name, job=self.job_id, forwarded=forward)

    def run(self) -> int:
        n = self.job_id
        job = read_job(n)
        if job is None or job.get("purged"):
            eprint(f"srun: error: Unable to create step for job {n}: Invalid job id specified")
            return 1
        if job["state"] != "RUNNING":
            eprint(f"srun: error: Unable to create step for job {n}: "
                   "Job/step already completing or completed")  # fmt: skip
            return 1
        for sig in _SIGNALS:
            signal.signal(sig, self.on_signal)
        signal.signal(signal.SIGTSTP, signal.SIG_IGN)
        env = dict(
            os.environ, SLURM_JOB_ID=str(n), SLURM_JOBID=str(n), SLURM_STEP_ID="1",
            SLURM_PROCID="0", SLURMD_NODENAME=job["node"], SLURM_NODELIST=job["node"],
        )  # fmt: skip
        self.task = subprocess.Popen(self.command, env=env, start_new_session=not self.pty)
        log_event("srun", "step", job=n, task_pid=self.task.pid, pty=self.pty,
                  overlap="overlap" in self.opts, name=self.opts.get("job-name", ""))  # fmt: skip
        kill_at: float | None = None
        while self.task.poll() is None:
            state = (read_job(n) or {}).get("state")
            if kill_at is None and state != "RUNNING":  # the job ended: Slurm ends its steps
                eprint(f"srun: Job step aborted: Waiting up to {flag('kill_wait') or 2} "
                       "seconds for job step to finish.")  # fmt: skip
                log_event("srun", "end_step", job=n, step=1)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.task.pid, signal.SIGTERM)
                kill_at = time.time() + float(flag("kill_wait") or 2)
            elif kill_at is not None and time.time() >= kill_at:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.task.pid, signal.SIGKILL)
                kill_at = float("inf")
            time.sleep(0.02)
        code = self.task.returncode
        log_event("srun", "step-exit", job=n, code=code)
        return code if code >= 0 else 128 - code


def _relay(src: int, dst: int, close: bool = False) -> threading.Thread:
    """Copy ``src`` to ``dst`` until EOF, on a thread (srun's I/O forwarding)."""

    def copy() -> None:
        try:
            while data := os.read(src, 65536):
                while data:
                    data = data[os.write(dst, data) :]
        except OSError:
            pass  # the other side went away
        finally:
            if close:
                os.close(dst)

    thread = threading.Thread(target=copy, daemon=True)
    thread.start()
    return thread


def srun(argv: list[str]) -> int:
    log_call("srun", argv)
    if flag("controller_down") is not None:
        eprint(f"srun: error: Unable to allocate resources: {UNREACHABLE}")
        return 1
    if munge_down("srun"):
        eprint(f"srun: error: Unable to allocate resources: {AUTH_ERROR}")
        return 1
    refusal = flag("srun_refuse")
    if refusal is not None:
        eprint("srun: error: Unable to allocate resources: "
               + (refusal or "Invalid partition name specified"))  # fmt: skip
        return 1
    opts, command = parse_srun(argv)
    if opts.get("jobid"):
        return Step(int(opts["jobid"]), opts, command).run()
    return Srun(opts, command).run()


def _controller_refuses(name: str, prefix: str) -> bool:
    """What a Slurm client prints when the controller is away or munge is down; True if so."""
    if flag("controller_down") is not None:
        reason = UNREACHABLE
    elif munge_down(name):
        reason = AUTH_ERROR
    else:
        return False
    eprint(f"{prefix}{reason}")
    return True


def scontrol(argv: list[str]) -> int:
    log_call("scontrol", argv)
    time.sleep(float(flag("slurm_delay") or 0))
    words = [a for a in argv if not a.startswith("-")]
    if words[:2] != ["show", "job"] or len(words) != 3 or not words[2].isdigit():
        eprint(f"fake scontrol: only `scontrol --local -o show job N`, not {argv}")
        return 2
    if _controller_refuses("scontrol", "slurm_load_jobs error: "):
        return 1
    job = read_job(int(words[2]))
    if job is None or job.get("purged"):
        eprint("slurm_load_jobs error: Invalid job id specified")
        return 1
    pending = job["state"] == "PENDING"
    limit = job.get("time_limit")
    fields = {
        "JobId": job["job_id"], "JobName": job["name"], "UserId": f"{job['user']}(0)",
        "JobState": job["state"], "Reason": job.get("reason") or "None",
        "Dependency": "(null)", "Restarts": 0, "BatchFlag": 0, "ExitCode": "0:0",
        "TimeLimit": f"{limit // 3600:02d}:{limit % 3600 // 60:02d}:{limit % 60:02d}"
        if limit else "UNLIMITED",
        "SubmitTime": slurm_time(job["submit_time"]),
        "StartTime": slurm_time(job.get("start_time")),
        "EndTime": slurm_time(job.get("end_time")),
        "Partition": job["partition"], "NodeList": "(null)" if pending else job["node"],
        "Comment": job.get("comment") or "(null)",
    }  # fmt: skip
    print(" ".join(f"{k}={v}" for k, v in fields.items()))
    return 0


def _format(fmt: str, values: dict[str, Any]) -> str:
    return re.sub(r"%\.?\d*([a-zA-Z])", lambda m: str(values.get(m.group(1), "")), fmt)


def _option(argv: list[str], *names: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg in names and i + 1 < len(argv):
            return argv[i + 1]
        for name in names:
            if name.startswith("--") and arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def squeue(argv: list[str]) -> int:
    log_call("squeue", argv)
    time.sleep(float(flag("slurm_delay") or 0))
    if _controller_refuses("squeue", "slurm_load_jobs error: "):
        return 1
    user = _option(argv, "-u", "--user")
    node = _option(argv, "-w", "--nodelist")
    ids = _option(argv, "-j", "--jobs")
    states = _option(argv, "-t", "--states")
    fmt = _option(argv, "-o", "--format") or "%i %P %j %u %T %M %N"
    for job in all_jobs():
        if job.get("purged") or (user and job["user"] != user):
            continue
        if (node and job.get("node") != node) or (ids and str(job["job_id"]) not in ids.split(",")):
            continue
        if (states or "").lower() != "all" and job["state"] not in ACTIVE:
            continue
        values = {
            "i": job["job_id"], "k": job.get("comment") or "(null)", "T": job["state"],
            "j": job["name"], "u": job["user"], "P": job["partition"],
            "N": job.get("node", ""), "R": job.get("reason") or "None",
        }  # fmt: skip
        print(_format(fmt, values))
    return 0


def sinfo(argv: list[str]) -> int:
    log_call("sinfo", argv)
    if "--version" in argv:  # local: no RPC, answered even with the controller away
        print(f"slurm {flag('slurm_version') or SLURM_VERSION}")
        return 0
    time.sleep(float(flag("slurm_delay") or 0))
    if _controller_refuses("sinfo", "slurm_load_partitions: "):
        return 1
    fmt = _option(argv, "-o", "--format") or "%P %a %l %D %N"
    for part in partitions():
        values = {
            "P": part["name"] + ("*" if part["default"] else ""), "a": part["avail"],
            "l": part["limit"], "m": part["mem"], "c": part["cpus"], "N": node_name(), "D": 1,
        }  # fmt: skip
        print(_format(fmt, values))
    return 0


def cancel_job(n: int) -> str | None:
    """What the controller does for a cancel of job ``n`` (scancel, pyslurm's Job.cancel):
    None, or the error it answers with."""
    if flag("controller_down") is not None:
        return UNREACHABLE
    if flag("munge_down") is not None:
        return AUTH_ERROR
    job = read_job(n)
    if job is None or job.get("purged"):
        return "Invalid job id specified"
    if update_job(n, only_if=ACTIVE, state="CANCELLED", end_time=time.time()) is None:
        return "Job/step already completing or completed"
    if job["state"] == "RUNNING" and alive(job.get("task_pid")):
        # slurmd ends the step: SIGTERM to every process of it (proctrack: the task and all it
        # started, whatever their session); its srun, if alive, reports it and kills after KillWait
        for pid in [job["task_pid"], *_descendants(job["task_pid"])]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    return None


def scancel(argv: list[str]) -> int:
    log_call("scancel", argv)
    time.sleep(float(flag("slurm_delay") or 0))
    code = 0
    for n in (int(a) for a in argv if a.isdigit()):
        if (error := cancel_job(n)) is not None:
            eprint(f"scancel: error: Kill job error on job id {n}: {error}")
            code = 1
    return code


def _descendants(root: int) -> list[int]:
    """Every process started by ``root``, directly or not (the step's processes, here)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError):
                with open(f"/proc/{entry}/stat", "rb") as f:
                    ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
                parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


COMMANDS = {"srun": srun, "scontrol": scontrol, "squeue": squeue, "sinfo": sinfo,
            "scancel": scancel}  # fmt: skip
