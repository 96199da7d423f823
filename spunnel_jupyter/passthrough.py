"""Which srun options may pass through verbatim (after ``--``, and the site's ``srun_args``).

Most pass. Refused are the few that would break the session instead of shaping the job: more
than one node or task (the settings and token would go to every task), srun's own I/O handling
(the node's events travel on the task's stdout), the job's identity (another job's step, whose
teardown would cancel that job) and its tag (leftover cleanup finds jobs by it). A value must be
attached (``--name=value``, ``-Xvalue``): a word standing alone would be taken by srun as the
command to run, before our launcher. srun takes any unambiguous prefix of a long option, and so
is each refused one checked.
"""

from __future__ import annotations

from .errors import UsageError

# Long options that break the session, with the one value that is harmless (None: none is).
_REFUSED: dict[str, str | None] = {
    "nodes": "1", "ntasks": "1", "ntasks-per-node": "1", "output": None, "error": None,
    "input": None, "label": None, "pty": None, "jobid": None, "comment": None,
    "multi-prog": None, "het-group": None, "test-only": None, "no-allocate": None,
}  # fmt: skip
_SHORT = {"N": "nodes", "n": "ntasks", "o": "output", "e": "error", "i": "input", "l": "label",
          "Z": "no-allocate"}  # fmt: skip
# srun's short options that take no value, so more may follow in one cluster (-lu).
_SHORT_FLAGS = set("hHIkKlOQsuvVXZE")
_WHY = {
    "nodes": "a session runs Jupyter on one node",
    "ntasks": "a session runs one task (the settings and token would reach every task)",
    "ntasks-per-node": "a session runs one task",
    "output": "the node's events travel on the task's output",
    "error": "Jupyter's log travels on the task's error stream",
    "input": "the session's settings travel on the task's input",
    "label": "labels would garble the node's events",
    "pty": "the node's events travel on the task's output, not a terminal",
    "jobid": "a step of another job would end that job at teardown",
    "comment": "the comment tags the job for leftover cleanup",
    "multi-prog": "a session runs one program",
    "het-group": "a session is one job",
    "test-only": "a session needs a real job",
    "no-allocate": "a session needs an allocation",
}


def check_srun_args(args: list[str], where: str = "after --") -> list[str]:
    """``args`` if srun may get them as they are; UsageError naming the first that may not."""
    for arg in args:
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            _check(name, value if eq else None, arg, where)
        elif arg.startswith("-") and len(arg) > 1:
            for i, letter in enumerate(arg[1:]):
                if letter in _SHORT:
                    attached = arg[i + 2 :] if letter not in _SHORT_FLAGS else ""
                    _check(_SHORT[letter], attached or None, arg, where)
                if letter not in _SHORT_FLAGS:
                    break  # the rest is this option's value
        else:
            raise UsageError(
                f"{arg!r} {where} is not an srun option (srun would run it as the command)",
                "attach option values with '=' (e.g. --gres=gpu:1 or -wc1)",
            )
    return args


def _check(name: str, value: str | None, arg: str, where: str) -> None:
    # srun (getopt_long) takes any unambiguous prefix of a long option: --out=F is --output=F.
    name = next((full for full in _REFUSED if len(name) >= 2 and full.startswith(name)), name)
    if name in _REFUSED and (_REFUSED[name] is None or value != _REFUSED[name]):
        raise UsageError(
            f"srun option {arg!r} {where} would break the session: {_WHY[name]}",
            "leave it out; spunnel-notebook sets up the step itself",
        )
