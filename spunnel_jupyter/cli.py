"""``spunnel-notebook``: start a compute-node Jupyter session in the foreground, or manage it.

    spunnel-notebook [-p PART] [--mem MB] [-t TIME] [...] [-- SRUN ARGS]   start, stay until it ends
    spunnel-notebook --detach [...]          start, print the URL, return; the session runs on
    spunnel-notebook attach [JOB]            a tunnel on this host to a detached session
    spunnel-notebook status [--json]         this host's session, and your detached ones
    spunnel-notebook stop [JOB]              end it from anywhere

Errors print as ``spunnel-notebook: error: <what> (<what to do>)`` and exit with the codes in
``errors.ExitCode``; tracebacks only with --debug. Imports stay light so --help and status are fast.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from typing import TYPE_CHECKING

from . import __version__
from .background import SUPERVISOR_FLAG
from .commands import SUBCOMMANDS, parse_subcommand
from .console import (
    AFTER_SHELL,
    AFTER_URL,
    PROG,
    Console,
    describe,
    show_status,
    started_after_waiting,
    time_left,
    time_limit_warning,
    tunnels_block,
    url_block,
)
from .errors import ExitCode, NoSession, SpunnelError, UsageError

if TYPE_CHECKING:
    from .manager import SpunnelManager
    from .session import Session
    from .shell import TerminalShell

EPILOG = """\
commands:
  status [--json]   show this host's session (job, node, URL, time left) and your detached ones
  stop [JOB]        end this host's session, whichever terminal or JupyterLab started it, or a
                    detached one (from any login host)
  attach [JOB]      follow a detached session from this host: its URL here; Ctrl-C detaches
  forward SP:EP     forward login port SP to node port EP in the running session
  forward --cancel SP:EP   remove that forward
  doctor [--allocate]      check Slurm, ssh, the node's Jupyter and this account; a table

exit codes:
  0 session ended normally   2 bad input   3 a session is already running   4 Slurm problem
  5 tunnel failed/lost       6 Jupyter failed on the node   7 unsafe state directory
  8 no session (status/stop) 129/130/143 ended by SIGHUP/Ctrl-C/SIGTERM   1 anything else

examples:
  spunnel-notebook -p interact --mem 4000 -t 2:00:00
  spunnel-notebook --tunnel 8001:8000,8889:8888 -- --exclusive
  spunnel-notebook --detach -t 8:00:00; spunnel-notebook attach   (later, from any login host)
  spunnel-notebook --shell --no-jupyter --tunnel 8001:8000,8889:8888 -p interact --mem 4000
                    (the spunnel plugin's `srun --pty ... --tunnel 8001:8000,8889:8888 bash`)
"""


def build_parser() -> argparse.ArgumentParser:
    from .desktop import add_arguments as add_desktop_arguments
    from .fields import add_arguments

    p = argparse.ArgumentParser(
        prog=PROG,
        description="Run Jupyter on a Slurm compute node and tunnel it to this login host.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage=f"{PROG} [options] [-- srun options] | {PROG} status|stop|attach|forward",
    )
    add_arguments(p)
    other = p.add_argument_group("other")
    other.add_argument(
        "--detach",
        action="store_true",
        default=None,
        help="print the URL and return the prompt; the session runs on without this terminal "
        "(or this login host); `attach` follows it, `stop` ends it",
    )
    add_desktop_arguments(other)
    other.add_argument(SUPERVISOR_FLAG, action="store_true", help=argparse.SUPPRESS)
    for command in ("status", "stop"):
        other.add_argument(f"--{command}", dest="command", action="store_const", const=command,
                           help=f"same as the {command} command")  # fmt: skip
    other.add_argument("--json", action="store_true", help="status as JSON")
    other.add_argument("--debug", action="store_true", help="verbose log, tracebacks")
    other.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


async def run_session(
    manager: SpunnelManager,
    args: argparse.Namespace,
    console: Console,
    kind: str = "foreground",
    job_id: int | None = None,
) -> int:
    from .background import let_go_of_terminal
    from .desktop import SessionDesktop
    from .fields import options_from_args
    from .machine import Phase

    req = manager.request(options_from_args(args), args.srun_extra)
    shell = _terminal_shell(manager, console) if req.shell else None
    desktop = SessionDesktop(manager, args, kind, console)  # the browser, the notification
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    holder: dict[str, Session] = {}
    signals = {
        signal.SIGINT: ("interrupted with Ctrl-C", ExitCode.SIGINT),
        signal.SIGTERM: ("terminated (SIGTERM)", ExitCode.SIGTERM),
        signal.SIGHUP: ("the terminal was closed (SIGHUP)", ExitCode.SIGHUP),
    }
    if kind == "attached":
        signals[signal.SIGINT] = ("detached with Ctrl-C", ExitCode.OK)

    def on_signal(sig: signal.Signals) -> None:
        if "s" in holder:
            holder["s"].request_stop(*signals[sig])
        elif main is not None:
            main.cancel()  # nothing submitted yet: just stop

    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig)

    shown_ready = shown_start = False
    told = warned = 0

    def on_change(session: Session) -> None:
        nonlocal shown_ready, shown_start, told, warned
        for note in session.notes[told:]:
            console.say(f"{PROG}: {note}")
        for warning in session.warnings[warned:]:  # the node's (an idle release ahead)
            console.say(f"\a{PROG}: {warning}")
        told, warned = len(session.notes), len(session.warnings)
        if session.phase is not Phase.PENDING and not shown_start:
            shown_start = True
            started = started_after_waiting(session)
            if started:  # the bell, and the desktop's notification: the user may be elsewhere
                console.say(f"\a{PROG}: {started}")
                desktop.started(started)
        if session.phase is Phase.READY and not shown_ready:
            shown_ready = True
            block = url_block(manager, session.node, session.job_id, session.url, session.port)
            block = block if session.url else tunnels_block(manager, session)
            console.say(f"{block} {AFTER_SHELL if shell else AFTER_URL[kind]}", sys.stdout)
            desktop.ready(session)
            if kind == "detached":
                let_go_of_terminal()
        if shell is not None:  # started once the URL is out; hung up once the session ends
            shell.follow(session)
        # Nothing to show before Slurm named the job (a refusal then is one line of error).
        if session.job_id is not None and session.phase in (
            Phase.PENDING, Phase.STARTING, Phase.READY,
        ):  # fmt: skip
            console.progress(describe(session))

    try:
        session = await manager.start(req, on_change, kind=kind, job_id=job_id)
    except asyncio.CancelledError:
        console.say(f"{PROG}: interrupted before the session started; nothing is left running")
        return ExitCode.SIGINT
    holder["s"] = session
    on_change(session)
    ticker = asyncio.ensure_future(_tick(session, console, list(manager.warn_before)))
    outcome = await session.wait()
    ticker.cancel()
    desktop.ended()
    if shell is not None:
        await shell.end()  # the terminal is ours again before the end lines
    if outcome.error is not None:
        console.error(outcome.error)
        if session.job_id is None:
            return outcome.exit_code  # refused before a job existed: nothing was left to end
    job = f"job {session.job_id} " if session.job_id else ""
    gone = f"{job}gone from the queue" if session.job_gone else "see below"
    if session.job_kept:
        gone = (
            f"{job}runs on, on {session.node} (`{PROG} attach` gets back to it, `{PROG} stop` "
            "ends it)"
        )
    console.say(
        f"{PROG}: session ended: {outcome.reason}; {gone}, tunnel closed "
        f"({session.times.get('teardown_s', 0):.2f} s)"
    )
    said = session.channel.node_exit
    if said is not None and said.get("save") in ("saved", "failed", "timeout"):
        console.say(
            f"{PROG}: before it ended, the node's JupyterLab saved {said.get('saved', 0)} "
            f"document(s) ({said.get('save')}, {float(said.get('save_s') or 0):.2f} s)"
        )
    for note in session.notes[told:]:
        console.say(f"{PROG}: {note}")
    return outcome.exit_code


def _terminal_shell(manager: SpunnelManager, console: Console) -> TerminalShell:
    from .shell import NodeShell, TerminalShell

    return TerminalShell(NodeShell(parent=manager), manager.session_settings(), console)


async def _tick(session: Session, console: Console, warn_before: list[int]) -> None:
    """Each second: refresh the progress line on a terminal (elapsed pending time, time left),
    and warn, with the bell, when the time limit is ``warn_before`` minutes away."""
    due = sorted(set(warn_before), reverse=True)
    while True:
        await asyncio.sleep(1)
        if console.tty:
            console.progress(describe(session))
        left = time_left(session.end_time)
        if due and left is not None and left <= due[0] * 60:
            console.say(f"\a{PROG}: {time_limit_warning(session.job_id, left)}")
            due = [minutes for minutes in due if left > minutes * 60]  # once each, even if late


def attach(manager: SpunnelManager, args: argparse.Namespace, console: Console) -> int:
    """A tunnel on this host to a detached session; or, if this host's supervisor already holds
    one to it, its URL and progress. Ctrl-C detaches either way."""
    record = manager.status()
    if record and record.get("kind") == "detached" and args.job in (None, record.get("job_id")):
        try:  # from the first word on: Ctrl-C only detaches
            block = url_block(
                manager, record["node"], record["job_id"], record["url"], record["port"]
            )
            console.say(f"{block} {AFTER_URL['attached']}", sys.stdout)
            while manager.status() is not None:
                time.sleep(1)
        except KeyboardInterrupt:
            console.say(f"{PROG}: detached; job {record['job_id']} runs on")
            return ExitCode.OK
        last = manager.last_ended() or {}
        console.say(f"{PROG}: session ended: {last.get('ended_reason', 'see its log')}")
        return ExitCode.OK
    from .fields import FIELDS

    for f in FIELDS:  # nothing to submit: only --port is the user's to choose
        setattr(args, f.name, getattr(args, f.name, None))
    return asyncio.run(run_session(manager, args, console, "attached", args.job))


def print_ssh_config(manager: SpunnelManager, args: argparse.Namespace, console: Console) -> int:
    """`ssh-config`: a Host stanza for the running session's node, once ssh to it is known to
    work from here (the node may refuse it: then why, and nothing printed)."""
    from .access import LaptopAccess, ssh_config
    from .detached import choose
    from .doctor import ssh_to_node

    record = manager.status() or {}
    if record and args.job in (None, record.get("job_id")):
        if record.get("phase") != "ready":
            raise NoSession("the session has no node yet", "run it again once the URL is shown")
        node, job = record["node"], record["job_id"]
    else:
        jobs = asyncio.run(manager.detached())
        if not jobs and args.job is None:
            raise NoSession("no session is running", f"start one, then run `{PROG} ssh-config`")
        chosen = choose(jobs, args.job, "ssh-config")
        node, job = chosen.node, chosen.job_id
    check = asyncio.run(ssh_to_node(manager, node, str(job)))
    if check.status != "ok":
        raise NoSession(
            f"{node} refuses ssh from this host ({check.detail})",
            "ask your administrators whether users may ssh to the nodes of their jobs",
        )
    stanza = ssh_config(node, job, manager.login_host, LaptopAccess(parent=manager).gateway,
                        args.alias)  # fmt: skip
    console.say(stanza, sys.stdout)
    return ExitCode.OK


def forward(manager: SpunnelManager, args: argparse.Namespace, console: Console) -> int:
    from .tunnel import parse_port_pairs

    if len(args.pair) != 1:
        raise UsageError("give one LOGINPORT:NODEPORT pair", f"e.g. {PROG} forward 8050:8050")
    parse_port_pairs(args.pair[0])  # the same checks as --tunnel, before asking the session
    verb = "cancel" if args.cancel else "forward"
    console.say(f"{PROG}: {asyncio.run(manager.control(f'{verb} {args.pair[0]}'))}")
    return ExitCode.OK


def make_manager(debug: bool) -> SpunnelManager:
    from .config import load_site_config
    from .manager import SpunnelManager

    log = logging.getLogger(PROG)
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING, format=f"{PROG}: %(message)s"
    )
    if not debug:
        # asyncio's own notes (a child reaped while a stop interrupted its spawn) are not the
        # user's concern; --debug shows them.
        logging.getLogger("asyncio").setLevel(logging.ERROR)
    manager = SpunnelManager(config=load_site_config(log))
    manager.log = log
    return manager


def parse(argv: list[str]) -> argparse.Namespace:
    srun_extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, srun_extra = argv[:cut], argv[cut + 1 :]
    command = None
    if argv and argv[0] in SUBCOMMANDS:
        command, argv = argv[0], argv[1:]
        sub = parse_subcommand(command, argv)
        if sub is not None:
            return sub
    args = build_parser().parse_args(argv)
    args.command = command or args.command or "start"
    args.srun_extra = srun_extra
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    code = _main(argv)
    from .desktop import hold_on_failure  # --hold: the desktop entry's window stays for an error

    hold_on_failure(argv, code)
    # The terminal may be gone (SIGHUP): the final flush must not turn our exit code into 120.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
    return code


def _main(argv: list[str]) -> int:
    args = parse(argv)
    console = Console()
    try:
        manager = make_manager(args.debug)
        if args.command == "forward":
            return forward(manager, args, console)
        if args.command == "doctor":
            from .doctor import render, run_checks

            checks = asyncio.run(run_checks(manager, args.allocate))
            console.say(render(checks), sys.stdout)
            return ExitCode.ERROR if any(c.status == "FAIL" for c in checks) else ExitCode.OK
        if args.command == "status":
            return show_status(manager, args.json, console)
        if args.command == "stop":
            console.say(f"{PROG}: {asyncio.run(manager.stop_running(job_id=args.job))}")
            return ExitCode.OK
        if args.command == "attach":
            return attach(manager, args, console)
        if args.command == "ssh-config":
            return print_ssh_config(manager, args, console)
        if getattr(args, "as_detached_supervisor", False):
            return asyncio.run(run_session(manager, args, console, "detached"))
        if args.shell:  # a terminal's own: in its foreground, never detached (nothing submitted)
            from .shell import check_terminal

            check_terminal(args.detach)
        if args.detach or (args.detach is None and manager.detach and not args.shell):
            from .background import run_detached

            return run_detached([a for a in argv if a != "--detach"])
        return asyncio.run(run_session(manager, args, console))
    except SpunnelError as e:
        console.error(e)
        return e.exit_code
    except KeyboardInterrupt:
        return ExitCode.SIGINT
    except Exception as e:
        if args.debug:
            raise
        console.say(f"{PROG}: error: unexpected {type(e).__name__}: {e} (rerun with --debug)")
        return ExitCode.ERROR


if __name__ == "__main__":
    sys.exit(main())
