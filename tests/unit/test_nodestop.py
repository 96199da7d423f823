"""nodestop.kill_leftovers: every child left is killed and reaped, and a child that SIGKILL cannot
end (a kernel in uninterruptible I/O on a hung filesystem; stood in for by a child whose kill is
never sent) holds the launcher no longer than its bound. Each in a process of its own, as the
launcher is: it ends every child of the process it runs in."""

from __future__ import annotations

import json
import subprocess
import sys

CHILD = """
import json, os, subprocess, sys, time
from spunnel_jupyter import nodestop
procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(3)]
if sys.argv[1] == "stuck":
    real_kill, os.kill = os.kill, lambda pid, sig: None  # the kill has no effect
began = time.monotonic()
left = nodestop.kill_leftovers(within=0.5)
took = time.monotonic() - began
if sys.argv[1] == "stuck":
    for p in procs:
        real_kill(p.pid, 9)
        p.wait()
print(json.dumps({"left": left, "pids": [p.pid for p in procs], "took": took,
                  "in_proc": [p.pid for p in procs if os.path.exists(f"/proc/{p.pid}")]}))
"""


def run(how: str) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, how], capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_every_child_left_is_killed_and_reaped():
    said = run("killable")
    assert said["left"] == [] and said["in_proc"] == []  # killed, and reaped: gone from /proc
    assert said["took"] < 1.0


def test_a_child_sigkill_cannot_end_holds_it_only_for_its_bound():
    said = run("stuck")
    assert sorted(said["left"]) == sorted(said["pids"])
    assert 0.5 <= said["took"] < 1.5
