"""``spunnel-notebook``: start a compute-node Jupyter session in the foreground, or manage it.

    spunnel-notebook [-p PART] [--mem MB] [-t TIME] [...] [-- SRUN ARGS]   start, stay until it ends
    spunnel-notebook status [--json]                                       show this host's session
    spunnel-notebook stop                                                  end it from anywhere

Errors print as ``spunnel-notebook: error: <what> (<what to do>)`` and exit with the codes in
``errors.ExitCode``; tracebacks only with --debug. Imports stay light so --help and status are fast.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

from . import __version__
from .errors import ExitCode, SpunnelError, UsageError

if TYPE_CHECKING:
    from .manager import SpunnelManager
    from .session import Session

PROG = "spunnel-notebook"

EPILOG = """\
commands:
  status [--json]   show this host's session (job, node, URL, time left)
  stop              end this host's session, whichever terminal or JupyterLab started it
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
"""


def build_parser() -> argparse.ArgumentParser:
    from .fields import add_arguments

    p = argparse.ArgumentParser(
        prog=PROG,
        description="Run Jupyter on a Slurm compute node and tunnel it to this login host.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage=f"{PROG} [options] [-- srun options] | {PROG} status|stop|forward",
    )
    add_arguments(p)
    other = p.add_argument_group("other")
    other.add_argument(
        "--status",
        dest="command",
        action="store_const",
        const="status",
        help="same as the status command",
    )
    other.add_argument(
        "--stop",
        dest="command",
        action="store_const",
        const="stop",
        help="same as the stop command",
    )
    other.add_argument("--json", action="store_true", help="status as JSON")
    other.add_argument("--debug", action="store_true", help="verbose log, tracebacks")
    other.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


class Console:
    """What the user sees. Progress and status go to stderr (one updating line on a terminal),
    the URL block to stdout. Writes never fail: the terminal may be gone (SIGHUP)."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self._last = ""
        self._partial = False

    def _write(self, stream: Any, text: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            stream.write(text)
            stream.flush()

    def progress(self, text: str) -> None:
        if text == self._last:
            return
        self._last = text
        if self.tty:
            self._write(sys.stderr, f"\r\x1b[K{PROG}: {text}")
            self._partial = True
        else:
            self._write(sys.stderr, f"{PROG}: {text}\n")

    def say(self, text: str, stream: Any = None) -> None:
        if self._partial:
            self._write(sys.stderr, "\r\x1b[K")
            self._partial = False
            self._last = ""
        self._write(stream or sys.stderr, text + "\n")

    def error(self, err: SpunnelError) -> None:
        self.say(f"{PROG}: error: {err.message}" + (f" ({err.remedy})" if err.remedy else ""))


def describe(session: Session) -> str:
    from .backend import format_duration
    from .machine import Phase

    if session.job_id is None:
        return "submitting the job"
    job = f"job {session.job_id}"
    if session.phase is Phase.PENDING:
        waited = format_duration(time.time() - session.times["submitted"])
        reason = f" ({session.reason})" if session.reason else ""
        return f"{job} {session.job_state.value}{reason}, waiting {waited}"
    if session.phase is Phase.STARTING:
        return f"{job} RUNNING on {session.node or '?'}, starting Jupyter"
    if session.phase is Phase.READY:
        left = session.time_left
        remaining = f", {format_duration(left)} left" if left is not None else ""
        tunnel = ", tunnel reconnecting" if session.tunnel_state == "reconnecting" else ""
        return f"{job} on {session.node}{remaining}{tunnel} (Ctrl-C to stop)"
    return f"{job} {session.phase.value}"


async def run_session(manager: SpunnelManager, args: argparse.Namespace, console: Console) -> int:
    from .fields import options_from_args
    from .machine import Phase

    req = manager.request(options_from_args(args), args.srun_extra)
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    holder: dict[str, Session] = {}
    signals = {
        signal.SIGINT: ("interrupted with Ctrl-C", ExitCode.SIGINT),
        signal.SIGTERM: ("terminated (SIGTERM)", ExitCode.SIGTERM),
        signal.SIGHUP: ("the terminal was closed (SIGHUP)", ExitCode.SIGHUP),
    }

    def on_signal(sig: signal.Signals) -> None:
        if "s" in holder:
            holder["s"].request_stop(*signals[sig])
        elif main is not None:
            main.cancel()  # nothing submitted yet: just stop

    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig)

    shown_ready = False
    told = 0

    def on_change(session: Session) -> None:
        nonlocal shown_ready, told
        for note in session.notes[told:]:
            console.say(f"{PROG}: {note}")
        told = len(session.notes)
        if session.phase is Phase.READY and not shown_ready:
            shown_ready = True
            ssh_line = f"ssh -N -L {session.port}:127.0.0.1:{session.port} " + (
                f"{os.environ.get('USER', '')}@{manager.login_host}"
            )
            console.say(
                f"{PROG}: Jupyter is running on {session.node} (job {session.job_id})\n\n"
                f"    {session.url}\n\n"
                f"  From a laptop: run  {ssh_line}\n"
                f"  there, then open the same URL. Stop with Ctrl-C or `{PROG} stop`.",
                sys.stdout,
            )
        # Nothing to show before Slurm named the job (a refusal then is one line of error).
        if session.job_id is not None and session.phase in (
            Phase.PENDING, Phase.STARTING, Phase.READY,
        ):  # fmt: skip
            console.progress(describe(session))

    try:
        session = await manager.start(req, on_change)
    except asyncio.CancelledError:
        console.say(f"{PROG}: interrupted before the session started; nothing is left running")
        return ExitCode.SIGINT
    holder["s"] = session
    on_change(session)
    ticker = asyncio.ensure_future(_tick(session, console)) if console.tty else None
    outcome = await session.wait()
    if ticker:
        ticker.cancel()
    if outcome.error is not None:
        console.error(outcome.error)
        if session.job_id is None:
            return outcome.exit_code  # refused before a job existed: nothing was left to end
    job = f"job {session.job_id} " if session.job_id else ""
    gone = f"{job}gone from the queue" if session.job_gone else "see below"
    console.say(
        f"{PROG}: session ended: {outcome.reason}; {gone}, tunnel closed "
        f"({session.times.get('teardown_s', 0):.2f} s)"
    )
    for note in session.notes[told:]:
        console.say(f"{PROG}: {note}")
    return outcome.exit_code


async def _tick(session: Session, console: Console) -> None:
    """Refresh the progress line each second (elapsed pending time, time left)."""
    while True:
        await asyncio.sleep(1)
        console.progress(describe(session))


def show_status(manager: SpunnelManager, as_json: bool, console: Console) -> int:
    from .backend import format_duration
    from .protocol import public_view

    record = manager.status()
    if record is None:
        if as_json:
            console.say(json.dumps(None), sys.stdout)
        else:
            console.say(f"{PROG}: no session is running on this host")
        return ExitCode.NO_SESSION
    if as_json:
        console.say(json.dumps(public_view(record), indent=1, sort_keys=True), sys.stdout)
        return ExitCode.OK
    left = ""
    if record.get("end_time"):
        left = f", {format_duration(record['end_time'] - time.time())} left"
    lines = [
        f"session on {record.get('host')}: {record.get('phase')} "
        f"(started from {record.get('owner')}, supervisor pid {record.get('supervisor_pid')})",
        f"  job {record.get('job_id') or '?'} {record.get('job_state', '')} "
        f"on {record.get('node') or '?'}{left}",
    ]
    if record.get("reason"):
        lines.append(f"  pending reason: {record['reason']}")
    if record.get("url"):
        lines.append(f"  URL: {record['url']}")
    if record.get("tunnels"):
        lines.append(f"  extra tunnels: {', '.join(record['tunnels'])}")
    lines.append(f"  stop it with `{PROG} stop`")
    console.say("\n".join(lines), sys.stdout)
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
    if argv and argv[0] in ("status", "stop", "start", "forward", "doctor"):
        command, argv = argv[0], argv[1:]
    if command == "doctor":
        p = argparse.ArgumentParser(
            prog=f"{PROG} doctor",
            description="Check what this site and this account allow; exit 1 if something fails.",
        )
        p.add_argument(
            "--allocate",
            action="store_true",
            help="also run a one-minute test job (node's Jupyter, ssh both ways)",
        )
        p.add_argument("--debug", action="store_true")
        args = p.parse_args(argv)
        args.command = command
        return args
    if command == "forward":
        p = argparse.ArgumentParser(
            prog=f"{PROG} forward",
            description="Add or remove a forward in the running session (ssh -O forward/cancel).",
        )
        p.add_argument("pair", nargs="*", metavar="LOGINPORT:NODEPORT")
        p.add_argument("--cancel", action="store_true", help="remove the forward")
        p.add_argument("--debug", action="store_true")
        args = p.parse_args(argv)
        args.command = command
        return args
    args = build_parser().parse_args(argv)
    args.command = command or args.command or "start"
    args.srun_extra = srun_extra
    return args


def main(argv: list[str] | None = None) -> int:
    code = _main(sys.argv[1:] if argv is None else argv)
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
            console.say(f"{PROG}: {asyncio.run(manager.stop_running())}")
            return ExitCode.OK
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
