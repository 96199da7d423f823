"""What a user may ask for in a session, declared once.

Each ``Field`` names one request option: its REST/JSON name, type, help, command-line flags, the
srun option it becomes (if any) and how its value is checked. From this one table come the CLI's
argparse options (cli.py), the REST API's validation (extension.py), the srun argv
(``SessionRequest.srun_options``) and the JupyterLab form (``json_schema``, served by
``GET spunnel/api/config``). Adding a Slurm option is one entry here plus its test.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .backend import parse_mem_mb, parse_time_limit
from .envkernels import resolve as resolve_envs
from .errors import UsageError
from .passthrough import check_srun_args
from .protocol import UI_PATHS
from .tunnel import PortPair, check_port, parse_port_pairs

TUNNEL_MODES = ("auto", "forward", "reverse")


def _at_least_one(value: int) -> None:
    if value < 1:
        raise UsageError("--cpus-per-task must be at least 1", "e.g. -c 2")


def _minutes(value: int) -> None:
    if not 0 <= value <= 10080:
        raise UsageError(
            f"--idle-timeout {value} is out of range",
            "give minutes from 1 to 10080, or 0 for never",
        )


@dataclass(frozen=True)
class Field:
    name: str  # the REST/JSON name, the SpunnelManager trait (if a site default) and argparse dest
    kind: type  # str, int, bool (a flag: given or not) or list (of str: a repeatable flag)
    title: str  # the form's label
    help: str
    flags: tuple[str, ...] = ()  # command-line flags; () for none
    srun: str = ""  # the srun option this becomes ("" for none)
    choices: tuple[str, ...] = ()
    check: Callable[[Any], object] | None = None  # raises UsageError for a bad value
    site_default: bool = False  # SpunnelManager has a configurable trait of this name
    default: Any = ""
    metavar: str = ""
    example: str = ""  # an example value (the form's placeholder)
    form: bool = True  # shown in the JupyterLab form
    cli_consts: Mapping[str, Any] = field(default_factory=dict)  # e.g. --lab -> "lab"
    terminal_only: bool = False  # needs the command line's terminal: refused by the REST API


FIELDS: tuple[Field, ...] = (
    Field("partition", str, "Partition", "Slurm partition", ("-p", "--partition"),
          srun="--partition", site_default=True),
    Field("mem", str, "Memory", "memory per node, e.g. 4000 (MB) or 4G", ("--mem",),
          srun="--mem", check=parse_mem_mb, site_default=True, example="4G"),
    Field("time", str, "Time limit", "time limit, e.g. 2:00:00", ("-t", "--time"),
          srun="--time", check=parse_time_limit, site_default=True, example="2:00:00"),
    Field("cpus_per_task", int, "CPUs", "CPUs for the notebook and its kernels",
          ("-c", "--cpus-per-task"), srun="--cpus-per-task", check=_at_least_one,
          site_default=True, default=None, metavar="N"),
    Field("gpus", str, "GPUs", "GPUs, e.g. 1 or a100:1", ("-G", "--gpus"), srun="--gpus",
          example="1"),
    Field("gres", str, "Generic resources", "generic resources, e.g. gpu:1", ("--gres",),
          srun="--gres", form=False),
    Field("account", str, "Account", "account to charge", ("-A", "--account"), srun="--account"),
    Field("qos", str, "QOS", "quality of service", ("-q", "--qos"), srun="--qos", form=False),
    Field("constraint", str, "Constraint", "node features, e.g. skylake", ("-C", "--constraint"),
          srun="--constraint", form=False),
    Field("reservation", str, "Reservation", "reservation to run in", ("--reservation",),
          srun="--reservation", form=False),
    Field("job_name", str, "Job name", "the job's name in squeue", ("-J", "--job-name"),
          srun="--job-name", default="spunnel-notebook", form=False),
    Field("port", int, "Local port", "local port on this host (default: a free one)",
          ("--port",), check=lambda p: check_port(p, "--port"), default=None, form=False),
    Field("ui", str, "Interface", "the UI the URL opens", choices=tuple(UI_PATHS),
          site_default=True, cli_consts={"--lab": "lab", "--notebook": "notebook"}),
    Field("tunnels", str, "Extra tunnels",
          "also forward login port SP to node port EP, like spunnel", ("--tunnel",),
          check=parse_port_pairs, metavar="SP:EP[,SP:EP...]", example="8001:8000"),
    Field("idle_timeout", int, "Idle release (minutes)",
          "end the session after this many minutes with no busy kernel, terminal activity or "
          "open connection (0: never)", ("--idle-timeout",), check=_minutes, site_default=True,
          default=0, metavar="MIN"),
    Field("tunnel_mode", str, "Tunnel mode",
          "forward: ssh from here to the node; reverse: the node dials back here (no sshd "
          "needed on nodes); auto (default): forward, else reverse", ("--tunnel-mode",),
          choices=TUNNEL_MODES, form=False),
    Field("env", list, "Environments",
          "also offer this venv's or conda environment's Python as a kernel, for this session "
          "only (repeatable; it needs ipykernel)", ("--env",), check=resolve_envs,
          site_default=True, default=None, metavar="PATH", form=False),
    Field("shell", bool, "Shell on the node",
          "this terminal becomes a shell on the node, beside Jupyter, once the session is "
          "ready; exiting it ends the session (like `srun --pty ... bash`)", ("--shell",),
          default=False, form=False, terminal_only=True),
    Field("no_jupyter", bool, "No Jupyter",
          "with --shell: no Jupyter on the node, only the shell and the --tunnel pairs (what "
          "the spunnel plugin did)", ("--no-jupyter",), default=False, form=False,
          terminal_only=True),
)  # fmt: skip
BY_NAME = {f.name: f for f in FIELDS}
SLURM_FIELDS = tuple(f for f in FIELDS if f.srun)


@dataclass
class SessionRequest:
    """A checked request, site defaults filled in. ``slurm`` holds the srun fields by name."""

    slurm: dict[str, Any] = field(default_factory=dict)
    extra: list[str] = field(default_factory=list)  # srun options after `--`, verbatim
    port: int | None = None
    ui: str = "lab"
    tunnels: list[PortPair] = field(default_factory=list)
    tunnel_mode: str = ""  # auto, forward or reverse; empty: SshTunnel.mode
    idle_timeout: int = 0  # minutes without activity after which the session ends (0: never)
    from_site: frozenset[str] = frozenset()  # fields whose value is the site's default
    shell: bool = False  # the terminal becomes a shell on the node (cli.py runs it: shell.py)
    no_jupyter: bool = False  # with shell: no Jupyter on the node, only the --tunnel pairs
    kernel_envs: list[str] = field(default_factory=list)  # --env: absolute, checked (envkernels)

    @property
    def jupyter(self) -> bool:
        """Jupyter runs on the node (and so there is a URL, its port and its forward)."""
        return not self.no_jupyter

    def srun_options(self) -> list[str]:
        opts = [f"{f.srun}={self.slurm[f.name]}" for f in SLURM_FIELDS if self.slurm.get(f.name)]
        return [*opts, *self.extra]


def check_value(f: Field, value: Any) -> Any:
    """``value`` checked against ``f`` (type, choices, its own check); raises UsageError."""
    if isinstance(value, bool) is not (f.kind is bool) or not isinstance(value, f.kind):
        # JSON true is no int here, nor 1 a bool
        raise UsageError(f"{f.name} must be a {f.kind.__name__}", "fix the request")
    if f.choices and value not in f.choices:
        raise UsageError(f"unknown {f.name} {value!r}", f"use {' or '.join(f.choices)}")
    if f.check is not None:
        f.check(value)
    return value


def build_request(
    options: Mapping[str, Any],
    defaults: Mapping[str, Any],
    extra: list[str],
    site: Callable[[str], str] = lambda name: f"c.SpunnelManager.{name}",
) -> SessionRequest:
    """A request from user ``options`` (empty values mean "not given") over site ``defaults``;
    ``extra`` srun options pass through (passthrough.py). ``site(name)`` says where a default
    came from, so a bad one is blamed on the site configuration, not on the user.

    Raises UsageError for an unknown field or a bad value; nothing is submitted then.
    """
    unknown = sorted(set(options) - set(BY_NAME))
    if unknown:
        raise UsageError(f"unknown field(s): {', '.join(unknown)}", f"use {', '.join(BY_NAME)}")
    check_srun_args(extra)
    values: dict[str, Any] = {}
    from_site = set()
    for f in FIELDS:
        value = options.get(f.name)
        if value not in (None, ""):
            check_value(f, value)
        elif f.site_default:
            value = _site_default(f, defaults.get(f.name), site)
            if value not in (None, ""):
                from_site.add(f.name)
        values[f.name] = f.default if value in (None, "") else value
    tunnels = parse_port_pairs(values["tunnels"]) if values["tunnels"] else []
    req = SessionRequest(
        slurm={f.name: values[f.name] for f in SLURM_FIELDS},
        extra=list(extra),
        port=values["port"],
        ui=values["ui"] or "lab",
        tunnels=tunnels,
        tunnel_mode=values["tunnel_mode"] or "",
        idle_timeout=values["idle_timeout"] or 0,
        from_site=frozenset(from_site),
        shell=values["shell"],
        no_jupyter=values["no_jupyter"],
        kernel_envs=[] if values["no_jupyter"] else resolve_envs(values["env"] or []),
    )
    if req.no_jupyter:
        _check_without_jupyter(req, options)
    for pair in req.tunnels:
        if pair.local == req.port:
            raise UsageError(
                f"port {pair.local} is both --port and a --tunnel login port",
                "use different login-side ports",
            )
    return req


def _check_without_jupyter(req: SessionRequest, options: Mapping[str, Any]) -> None:
    """--no-jupyter: only with --shell, and none of the options that are about Jupyter."""
    if not req.shell:
        raise UsageError(
            "--no-jupyter needs --shell (with no Jupyter, the shell is what the session is for)",
            "add --shell, or leave --no-jupyter out",
        )
    given = [f for f in FIELDS if f.name in ("port", "ui", "idle_timeout", "env")
             and options.get(f.name) not in (None, "")]  # fmt: skip
    if given:
        flags = ", ".join(_flag(f) if f.name != "ui" else "--lab/--notebook" for f in given)
        raise UsageError(
            f"{flags}: for Jupyter, and --no-jupyter starts none",
            "leave them out, or leave --no-jupyter out",
        )


def refuse_terminal_only(options: Mapping[str, Any], where: str) -> None:
    """Fields that need the command line's terminal (--shell) are refused ``where`` (the
    REST API, the JupyterLab panel) before anything else is looked at."""
    given = [f for f in FIELDS if f.terminal_only and options.get(f.name) not in (None, "", False)]
    if given:
        raise UsageError(
            f"{', '.join(f.name for f in given)}: only in a terminal, not from {where}",
            f"run `spunnel-notebook {' '.join(_flag(f) for f in given)}` in a terminal on the "
            "login host",
        )


def _site_default(f: Field, value: Any, site: Callable[[str], str]) -> Any:
    """The site's default for ``f``, checked; a bad one is blamed on the site's configuration."""
    if value in (None, "") or (f.kind is int and value == 0):  # 0: "Slurm's default"
        return None
    try:
        return check_value(f, value)
    except UsageError as e:
        raise UsageError(
            f"the site's default {site(f.name)} is invalid: {e.message}",
            f"tell your administrators; meanwhile give {_flag(f)} yourself",
        ) from e


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command line's request options, one per field, in two groups."""
    slurm = parser.add_argument_group("Slurm (passed to srun; defaults from the site config)")
    other = parser.add_argument_group("Jupyter and tunnels")
    for f in FIELDS:
        group = slurm if f.srun else other
        if f.flags and f.kind is bool:
            group.add_argument(*f.flags, dest=f.name, action="store_true", default=None,
                               help=f.help)  # fmt: skip
        elif f.flags:
            group.add_argument(
                *f.flags, dest=f.name, default=None, action="append" if f.kind is list else "store",
                help=f.help, metavar=f.metavar or _choices(f),
            )  # fmt: skip
        if f.cli_consts:
            exclusive = group.add_mutually_exclusive_group()
            for flag, const in f.cli_consts.items():
                exclusive.add_argument(
                    flag, dest=f.name, action="store_const", const=const, help=f"{f.title}: {const}"
                )


def _flag(f: Field) -> str:
    return f.flags[-1] if f.flags else f.name


def _choices(f: Field) -> str | None:
    return "{" + ",".join(f.choices) + "}" if f.choices else None


def options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The request options given on the command line (whole numbers parsed here, not by
    argparse, so that a bad one gets the same one-line error as any other bad value)."""
    options = {f.name: getattr(args, f.name) for f in FIELDS if getattr(args, f.name) is not None}
    for f in FIELDS:
        if f.kind is int and isinstance(options.get(f.name), str):
            options[f.name] = parse_int(options[f.name], _flag(f))
    return options


def parse_int(text: str, what: str) -> int:
    """A whole number written in ASCII digits (Python's int() also takes '٣' and ' 3 ')."""
    if not re.fullmatch(r"[0-9]{1,9}", text):
        raise UsageError(f"{what} {text!r} is not a whole number", f"write digits, e.g. {what} 2")
    return int(text)


def json_schema(defaults: Mapping[str, Any], partitions: list[str]) -> dict[str, Any]:
    """The form's JSON Schema: the fields shown in JupyterLab, with the site's defaults."""
    props: dict[str, Any] = {}
    for f in FIELDS:
        if not f.form:
            continue
        prop: dict[str, Any] = {
            "type": {int: "integer", bool: "boolean"}.get(f.kind, "string"),
            "title": f.title,
            "description": f.help,
        }
        if f.kind is int and f.check is _at_least_one:
            prop["minimum"] = 1
        choices = list(f.choices) or (partitions if f.name == "partition" else [])
        if choices:
            prop["enum"] = choices
        default = defaults.get(f.name) if f.site_default else f.default
        if default not in (None, "", 0):
            prop["default"] = default
        if f.example:
            prop["examples"] = [f.example]
        props[f.name] = prop
    return {"type": "object", "title": "Jupyter on a compute node", "properties": props}
