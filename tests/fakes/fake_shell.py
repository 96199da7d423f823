"""A fake interactive shell for the ``--shell`` tests: what the shell step runs on the "node"
(through fake ``srun --jobid --overlap --pty``), configured as ``c.NodeShell.command``.

It says where it runs and whether it holds the terminal (its process group the terminal's
foreground group), then reads lines: ``exit N`` exits with N, anything else is answered with
``fake-shell: got LINE``. Ctrl-C (SIGINT) and Ctrl-Z (SIGTSTP) are told and survived, SIGTERM is
ignored (as an interactive bash does), SIGHUP ends it with 129, as a shell whose terminal closed.
Standard library only.
"""

from __future__ import annotations

import os
import signal
import sys


def say(text: str) -> None:
    os.write(1, (text + "\r\n").encode())


def main() -> int:
    signal.signal(signal.SIGINT, lambda *_: say("fake-shell: SIGINT"))
    signal.signal(signal.SIGTSTP, lambda *_: say("fake-shell: SIGTSTP"))
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, lambda *_: os._exit(129))
    try:
        foreground = os.tcgetpgrp(0) == os.getpgrp()
    except OSError:
        foreground = False
    env = os.environ
    say(
        f"fake-shell: job={env.get('SLURM_JOB_ID')} step={env.get('SLURM_STEP_ID')} "
        f"foreground={foreground} pid={os.getpid()} args={sys.argv[1:]}"
    )
    while line := sys.stdin.readline():
        words = line.split()
        if words[:1] == ["exit"]:
            say("fake-shell: bye")
            return int(words[1]) if len(words) > 1 else 0
        say(f"fake-shell: got {line.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
