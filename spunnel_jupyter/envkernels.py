"""Kernels from the user's own environments (``--env PATH``), for one session only.

Login side, before anything is submitted: ``resolve`` makes each path absolute (against this
process's working directory: the node's may differ) and checks that it is a directory with
``bin/python`` (a venv) or ``bin/python3`` (a conda environment); ``check_ipykernel`` runs that
Python (no shell, a timeout) to import ipykernel. The login host and the nodes are assumed to share
the filesystem, as on HPC clusters: what is checked here is what the node runs.

Node side, in the launcher: ``install`` writes one kernelspec per environment into the private
runtime directory (``<rundir>/data/kernels/spunnel-env-NAME/kernel.json``) and returns the
``JUPYTER_PATH`` that puts that data directory first. Nothing is written in the user's
``~/.local/share/jupyter``, and the kernels go with the runtime directory. The user's own
kernelspecs (``ipykernel install --user``) stay listed: HOME, XDG_DATA_HOME and JUPYTER_DATA_DIR
pass through to Jupyter untouched.

Standard library only: the launcher imports it on the node.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import unicodedata
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .errors import UsageError
from .protocol import WARNING

PREFIX = "spunnel-env-"  # kernel names: spunnel-env-<the environment's directory name>
CHECK_TIMEOUT = 30.0  # s the login side waits for `ENV/bin/python -c "import ipykernel"`
_GENERIC = {"venv", ".venv", "env", ".env", "virtualenv", ".virtualenv"}  # named by their parent


def python_of(env: str) -> str | None:
    """The environment's Python: ``bin/python`` (a venv), else ``bin/python3`` (conda)."""
    for name in ("python", "python3"):
        path = os.path.join(env, "bin", name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def resolve(paths: Any) -> list[str]:
    """The environments' absolute paths (each once, in order), checked; UsageError otherwise."""
    if not isinstance(paths, list) or not all(isinstance(p, str) and p.strip() for p in paths):
        raise UsageError("env must be a list of paths", 'e.g. {"env": ["/home/me/envs/myenv"]}')
    envs: list[str] = []
    for given in paths:
        env = os.path.normpath(os.path.join(os.getcwd(), os.path.expanduser(given)))
        if os.path.isfile(env) and os.path.basename(env).startswith("python"):
            top = os.path.dirname(os.path.dirname(env))
            raise UsageError(f"--env {given} is a Python, not an environment", f"use --env {top}")
        if not os.path.isdir(env):
            raise UsageError(
                f"--env {given}: no such directory",
                "give the top directory of a venv or conda environment (the one holding bin/)",
            )
        if python_of(env) is None:
            raise UsageError(
                f"--env {given}: no bin/python or bin/python3 in {env}",
                "give the top directory of a venv or conda environment (the one holding bin/)",
            )
        if env not in envs:
            envs.append(env)
    return envs


def remedy(env: str) -> str:
    """How to add ipykernel to ``env``: conda's way in a conda environment, pip's otherwise."""
    if os.path.isdir(os.path.join(env, "conda-meta")):
        return f"add it with `conda install -p {shlex.quote(env)} ipykernel`"
    python = python_of(env) or os.path.join(env, "bin", "python")
    return f"add it with `{shlex.quote(python)} -m pip install ipykernel`"


async def check_ipykernel(envs: list[str], timeout: float = CHECK_TIMEOUT) -> None:
    """Each environment's Python imports ipykernel (all tried at once); UsageError otherwise."""
    problems = await asyncio.gather(*(_import_problem(env, timeout) for env in envs))
    for env, problem in zip(envs, problems, strict=True):
        if problem:
            raise UsageError(f"--env {env}: {problem}", remedy(env))


async def _import_problem(env: str, timeout: float) -> str:
    """Why ``env``'s Python cannot import ipykernel ("" if it can)."""
    python = python_of(env)
    if python is None:
        return "no bin/python or bin/python3 in it"
    try:
        proc = await asyncio.create_subprocess_exec(
            python, "-c", "import ipykernel", cwd="/", stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
    except OSError as e:
        return f"cannot run {python}: {e.strerror or e}"
    try:
        _, err = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        return f"{python} did not import ipykernel within {timeout:g} s"
    if proc.returncode == 0:
        return ""
    last = (err.decode(errors="replace").strip().splitlines() or [f"exit {proc.returncode}"])[-1]
    return f"its Python cannot import ipykernel ({last})"


# -- the node side ----------------------------------------------------------------------------
def _label(env: str) -> str:
    name = os.path.basename(env)
    if name in _GENERIC:  # project/.venv: "project/.venv", not ".venv"
        return f"{os.path.basename(os.path.dirname(env))}/{name}" if os.path.dirname(env) else name
    return name


def kernel_name(label: str) -> str:
    """``spunnel-env-`` and ``label`` in what Jupyter allows in a kernel name ([a-z0-9._-])."""
    ascii_label = unicodedata.normalize("NFKD", label).encode("ascii", "ignore").decode()
    return PREFIX + (re.sub(r"[^a-z0-9._-]+", "-", ascii_label.lower()).strip("-.") or "env")


def kernelspecs(envs: list[str], path: str) -> dict[str, dict[str, Any]]:
    """Kernel name -> kernel.json of each environment (names and display names unique).
    ``path``: the PATH the kernel gets after the environment's bin/ (as if activated)."""
    labels = [_label(env) for env in envs]
    specs: dict[str, dict[str, Any]] = {}
    for env, label in zip(envs, labels, strict=True):
        python = python_of(env) or os.path.join(env, "bin", "python")
        if labels.count(label) > 1:
            label = env  # two environments of one name: told apart by their paths
        name, n = kernel_name(label), 1
        while name in specs:
            n += 1
            name = f"{kernel_name(label)}-{n}"
        bin_dir = os.path.join(env, "bin")
        specs[name] = {
            "argv": [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": f"Python ({label})",
            "language": "python",
            "env": {"PATH": os.pathsep.join(p for p in (bin_dir, path) if p)},
            "metadata": {"spunnel_env": env},
        }
        if os.pathsep in bin_dir:  # it would split PATH: leave PATH alone
            del specs[name]["env"]
    return specs


def install(
    rundir: Path, envs: list[str], environ: Mapping[str, str], emit: Callable[..., None]
) -> dict[str, str]:
    """Write the kernelspecs of ``envs`` under ``rundir`` and return what Jupyter's environment
    needs for them ({} without any): JUPYTER_PATH with their data directory first. An environment
    whose Python the node does not have (a filesystem not shared) is left out, with a warning."""
    if not envs:
        return {}
    present = [env for env in envs if python_of(env)]
    for env in (env for env in envs if env not in present):
        emit(WARNING, text=f"--env {env}: no bin/python on this node; its kernel is left out")
    data = rundir / "data"
    for name, spec in kernelspecs(present, environ.get("PATH", "")).items():
        spec_dir = data / "kernels" / name
        spec_dir.mkdir(parents=True, exist_ok=True)
        (spec_dir / "kernel.json").write_text(json.dumps(spec, indent=1), encoding="utf-8")
    paths = (str(data), environ.get("JUPYTER_PATH"))
    return {"JUPYTER_PATH": os.pathsep.join(p for p in paths if p)}
