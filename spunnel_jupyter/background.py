"""``--detach``: the session's supervisor goes on without the terminal.

The terminal's ``spunnel-notebook --detach`` starts the supervisor as a child in a session of its
own (no controlling terminal, so no SIGHUP when the terminal closes), lends it the terminal for
the progress, the URL and the laptop line, and returns the prompt once the child says the URL is
out: through a pipe, never by reading what it prints. Ctrl-C before that is passed on (the start
is undone, nothing is left); a terminal closed before that leaves the child starting alone. The
child then lets go of the terminal (stdin, stdout and stderr on /dev/null) and holds this host's
lock, ports and tunnel until the session ends; the job itself is a batch job (batch.py), which
no process of this host keeps alive.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from . import process

SUPERVISOR_FLAG = "--as-detached-supervisor"  # the child's argv marker (hidden from --help)
_READY_FD = "SPUNNEL_DETACH_FD"


def run_detached(argv: list[str]) -> int:
    """The terminal's side: 0 once the child is detached with its URL out, else its exit code."""
    ready_r, ready_w = os.pipe()
    child = subprocess.Popen(
        [*process.python_module("spunnel_jupyter.cli"), SUPERVISOR_FLAG, *argv],
        stdin=subprocess.DEVNULL,
        pass_fds=(ready_w,),
        env={**os.environ, _READY_FD: str(ready_w)},
        start_new_session=True,
    )
    os.close(ready_w)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: child.send_signal(signum))
    with os.fdopen(ready_r, "rb") as pipe:
        said = pipe.read()  # EOF: the child detached (after saying so) or ended
    if said == b"detached":
        return 0
    return child.wait()


def let_go_of_terminal() -> None:
    """The child's side, once the URL and the laptop line are printed."""
    fd = os.environ.pop(_READY_FD, "")
    if fd.isdigit():
        try:
            os.write(int(fd), b"detached")
        except OSError:
            pass  # the terminal's side is gone (the terminal closed): nobody to tell
        finally:
            os.close(int(fd))
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    devnull = os.open(os.devnull, os.O_RDWR)
    for target in (0, 1, 2):
        os.dup2(devnull, target)
    os.close(devnull)
