"""The command line's subcommands other than a session's start: their arguments.

``spunnel-notebook status|stop|attach|forward|doctor|ssh-config ...``; a start (no subcommand, or
``start``) takes the request options of fields.py, parsed in cli.py.
"""

from __future__ import annotations

import argparse

from .console import PROG

SUBCOMMANDS = ("status", "stop", "start", "forward", "doctor", "attach", "ssh-config")

_DESCRIPTIONS = {
    "attach": "Follow a detached session from this host (Ctrl-C detaches).",
    "stop": "End this host's session, or a detached one (from any login host).",
    "doctor": "Check what this site and this account allow; exit 1 if something fails.",
    "forward": "Add or remove a forward in the running session (ssh -O forward/cancel).",
    "ssh-config": "Print an ssh_config Host stanza that reaches the running session's node "
    "(VS Code Remote-SSH, plain ssh, scp), through the login host.",
}


def parse_subcommand(command: str, argv: list[str]) -> argparse.Namespace | None:
    """The arguments of ``command`` (None: a start or status, parsed by cli.py)."""
    if command not in _DESCRIPTIONS:
        return None
    p = argparse.ArgumentParser(prog=f"{PROG} {command}", description=_DESCRIPTIONS[command])
    if command in ("attach", "stop", "ssh-config"):
        p.add_argument("job", nargs="?", type=int, metavar="JOBID", help="which detached session")
    if command == "attach":
        p.add_argument("--port", default=None, help="login-side port for the URL")
    if command == "doctor":
        what = "also run a one-minute test job (node's Jupyter, ssh both ways)"
        p.add_argument("--allocate", action="store_true", help=what)
    if command == "forward":
        p.add_argument("pair", nargs="*", metavar="LOGINPORT:NODEPORT")
        p.add_argument("--cancel", action="store_true", help="remove the forward")
    if command == "ssh-config":
        p.add_argument("--alias", default="", help="the Host name (default: spunnel-NODE)")
    p.add_argument("--debug", action="store_true")
    args = p.parse_args(argv)
    args.command, args.srun_extra = command, []
    return args
