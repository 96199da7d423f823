"""Kernels from the user's own environments (``--env PATH``, envkernels.py), no cluster needed:
the login side's checks (a directory, its Python, ipykernel importable; refused with the remedy
and nothing submitted), the kernelspecs the launcher writes in its runtime directory, Jupyter's
JUPYTER_PATH with them first while the user's own kernelspecs (``ipykernel install --user``)
stay listed, and a real kernel started from such a kernelspec running in the environment.

Real venvs: ``python -m venv --without-pip`` (no ipykernel), and one whose site-packages has a
.pth line to this Python's site-packages (where ipykernel is): its own sys.prefix, ipykernel
importable. Paths with spaces and non-ASCII letters throughout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import ipykernel
import pytest

from spunnel_jupyter import envkernels, fields
from spunnel_jupyter.errors import ExitCode, UsageError
from spunnel_jupyter.manager import SpunnelManager
from tests.fakes.cluster import FakeCluster, fetch

from .test_session_fakes import ready, run, start, token_of

SITE_PACKAGES = str(Path(ipykernel.__file__).resolve().parents[1])


def make_venv(path: Path, with_ipykernel: bool) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    if with_ipykernel:
        (site,) = path.glob("lib/python3*/site-packages")
        (site / "spunnel-test.pth").write_text(SITE_PACKAGES + "\n")
    return path


def script(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture(scope="module")
def envs(tmp_path_factory):
    root = tmp_path_factory.mktemp("envs")
    conda = root / "condä env"  # conda: bin/python3 only (here one that cannot import anything)
    (conda / "conda-meta").mkdir(parents=True)
    script(conda / "bin" / "python3", "#!/bin/sh\necho 'ModuleNotFoundError: nope' >&2\nexit 1\n")
    slow = root / "slow"
    script(slow / "bin" / "python", "#!/bin/sh\nexec sleep 30\n")
    return {
        "kernel": make_venv(root / "my env ü", with_ipykernel=True),
        "plain": make_venv(root / "plain", with_ipykernel=False),
        "conda": conda,
        "slow": slow,
        "root": root,
    }


# -- the login side: paths -----------------------------------------------------------------------
def test_paths_are_made_absolute_against_the_cwd_and_given_once(envs, monkeypatch):
    monkeypatch.chdir(envs["root"])
    kernel = str(envs["kernel"])
    assert envkernels.resolve(["my env ü", kernel + "/", "./plain"]) == [
        kernel, str(envs["plain"])
    ]  # fmt: skip
    assert envkernels.resolve([str(envs["conda"])]) == [str(envs["conda"])]  # bin/python3 only


@pytest.mark.parametrize(
    ("given", "message", "remedy"),
    [
        ("no such env", "no such directory", "top directory of a venv"),
        ("empty", "no bin/python or bin/python3", "the one holding bin/"),
        ("my env ü/bin/python", "is a Python, not an environment", "use --env "),
    ],
)
def test_a_path_that_is_no_environment_is_refused(envs, monkeypatch, given, message, remedy):
    (envs["root"] / "empty").mkdir(exist_ok=True)
    monkeypatch.chdir(envs["root"])
    with pytest.raises(UsageError, match=message) as err:
        envkernels.resolve([given])
    assert remedy in err.value.remedy and err.value.exit_code == ExitCode.USAGE
    if "Python" in message:
        assert err.value.remedy == f"use --env {envs['kernel']}"


def test_the_field_is_a_repeatable_flag_and_a_list_in_rest(envs):
    parser = argparse.ArgumentParser()
    fields.add_arguments(parser)
    args = parser.parse_args(["--env", str(envs["kernel"]), "--env", str(envs["plain"])])
    options = fields.options_from_args(args)
    assert options == {"env": [str(envs["kernel"]), str(envs["plain"])]}
    req = fields.build_request(options, {}, [])
    assert req.kernel_envs == [str(envs["kernel"]), str(envs["plain"])]
    assert fields.build_request({}, {}, []).kernel_envs == []
    for bad in (str(envs["kernel"]), [""], [3]):
        with pytest.raises(UsageError, match="env must be a list"):
            fields.build_request({"env": bad}, {}, [])
    assert "env" not in fields.json_schema({}, [])["properties"]  # the form takes no list
    with pytest.raises(UsageError, match="--env: for Jupyter, and --no-jupyter starts none"):
        fields.build_request({"env": [str(envs["kernel"])], "shell": True, "no_jupyter": True},
                             {}, [])  # fmt: skip


def test_the_site_default_list_is_used_and_a_bad_one_blamed_on_the_site(envs):
    site = {"env": [str(envs["kernel"])]}
    req = fields.build_request({}, site, [])
    assert req.kernel_envs == [str(envs["kernel"])] and "env" in req.from_site
    assert fields.build_request({"env": [str(envs["plain"])]}, site, []).kernel_envs == [
        str(envs["plain"])
    ]  # the user's list replaces the site's, as for every field
    with pytest.raises(UsageError, match=r"site's default c\.SpunnelManager\.env is invalid"):
        fields.build_request({}, {"env": ["/nonexistent/env"]}, [])


# -- the login side: ipykernel -------------------------------------------------------------------
def test_without_ipykernel_refused_with_the_remedy(envs):
    asyncio.run(envkernels.check_ipykernel([str(envs["kernel"])]))  # it imports ipykernel
    plain = str(envs["plain"])
    with pytest.raises(UsageError, match="cannot import ipykernel") as err:
        asyncio.run(envkernels.check_ipykernel([str(envs["kernel"]), plain]))
    assert err.value.message.startswith(f"--env {plain}: ")
    assert "No module named 'ipykernel'" in err.value.message
    assert err.value.remedy == f"add it with `{plain}/bin/python -m pip install ipykernel`"
    with pytest.raises(UsageError, match="cannot import ipykernel") as err:
        asyncio.run(envkernels.check_ipykernel([str(envs["conda"])]))
    assert err.value.remedy == f"add it with `conda install -p '{envs['conda']}' ipykernel`"
    kernel = str(envs["kernel"])  # a path with a space: quoted for the shell it is pasted in
    assert (
        envkernels.remedy(kernel) == f"add it with `'{kernel}/bin/python' -m pip install ipykernel`"
    )


def test_a_python_that_hangs_is_refused_within_the_timeout(envs):
    began = time.monotonic()
    with pytest.raises(UsageError, match=r"did not import ipykernel within 0\.5 s"):
        asyncio.run(envkernels.check_ipykernel([str(envs["slow"])], timeout=0.5))
    assert time.monotonic() - began < 5


# -- sessions: refused before anything is submitted, or offered on the node ----------------------
@pytest.fixture
def fake(monkeypatch):
    cluster = FakeCluster(monkeypatch)
    yield cluster
    cluster.close()


def test_an_environment_without_ipykernel_submits_nothing(fake, envs):
    m = SpunnelManager(config=fake.config())
    with pytest.raises(UsageError, match="cannot import ipykernel") as err:
        run(start(m, env=[str(envs["plain"])]))
    assert "-m pip install ipykernel" in err.value.remedy
    with pytest.raises(UsageError, match="no such directory"):
        run(start(m, env=[str(envs["root"] / "missing")]))
    assert fake.calls("srun") == [] and m.status() is None and fake.lock_free()
    site = SpunnelManager(config=fake.config(SpunnelManager={"env": [str(envs["plain"])]}))
    with pytest.raises(
        UsageError, match=r"cannot import ipykernel .*, from the site's .*\.env"
    ) as err:
        run(start(site))
    assert err.value.remedy.startswith("ask your administrators to add it with `")
    assert fake.calls("srun") == [] and fake.lock_free()


def test_the_kernels_reach_jupyter_first_on_its_path_and_the_users_own_stay(
    fake, envs, tmp_path, monkeypatch
):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("JUPYTER_DATA_DIR", raising=False)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    own = [sys.executable, "-m", "ipykernel", "install", "--user", "--name", "alice-own"]
    subprocess.run(own, check=True, capture_output=True, timeout=60)  # the user's own kernel
    m = SpunnelManager(config=fake.config())
    kernel = str(envs["kernel"])
    listing = "from jupyter_client.kernelspec import KernelSpecManager as K; " \
              "print(sorted(K().find_kernel_specs()))"  # fmt: skip

    async def scenario():
        s = await start(m, env=[kernel])
        await ready(s)
        status, body = await fetch(int(s.url.split(":")[2].split("/")[0]), "/fake/env",
                                   token_of(s.url))  # fmt: skip
        assert status == 200
        env = json.loads(body)  # the environment of Jupyter on the node (its kernels' too)
        data = env["JUPYTER_PATH"].split(os.pathsep)[0]
        spec = json.loads((Path(data) / "kernels/spunnel-env-my-env-u/kernel.json").read_text())
        names = subprocess.run([sys.executable, "-c", listing], env=env, capture_output=True,
                               text=True, timeout=60, check=True).stdout  # fmt: skip
        s.request_stop("done")
        await s.wait()
        return env, data, spec, names

    env, data, spec, names = run(scenario())
    assert data == f"{env['SPUNNEL_RUNDIR']}/data"  # in the private runtime directory
    assert env["HOME"] == str(home)  # nothing hides ~/.local/share/jupyter
    assert "'alice-own'" in names and "'spunnel-env-my-env-u'" in names
    assert spec["argv"] == [f"{kernel}/bin/python", "-m", "ipykernel_launcher", "-f",
                            "{connection_file}"]  # fmt: skip
    assert spec["display_name"] == "Python (my env ü)" and spec["language"] == "python"
    assert not Path(data).exists()  # gone with the runtime directory
    assert os.listdir(home / ".local/share/jupyter/kernels") == ["alice-own"]  # nothing added
    fake.assert_clean(m)


# -- the node side: the kernelspecs --------------------------------------------------------------
def test_names_are_unique_and_what_jupyter_allows(tmp_path):
    envs = []
    for rel in ("a/env", "proj/.venv", "Tensor Flow 2", "ü", "x/Tensor-Flow-2", "c/ml", "d/ml"):
        envs.append(str(make_venv(tmp_path / rel, with_ipykernel=False)))
    specs = envkernels.kernelspecs(envs, "/usr/bin:/bin")
    names = list(specs)
    assert names[:5] == ["spunnel-env-a-env", "spunnel-env-proj-.venv", "spunnel-env-tensor-flow-2",
                         "spunnel-env-u", "spunnel-env-tensor-flow-2-2"]  # fmt: skip
    assert len(set(names)) == 7 and all(n.startswith("spunnel-env-") for n in names[5:])
    displays = [s["display_name"] for s in specs.values()]
    assert displays == [
        "Python (a/env)",
        "Python (proj/.venv)",
        "Python (Tensor Flow 2)",
        "Python (ü)",
        "Python (Tensor-Flow-2)",
        f"Python ({tmp_path}/c/ml)",
        f"Python ({tmp_path}/d/ml)",
    ]  # one name twice: told apart by their paths
    for env, spec in zip(envs, specs.values(), strict=True):
        assert spec["env"]["PATH"] == f"{env}/bin:/usr/bin:/bin"  # as if activated
        assert spec["metadata"] == {"spunnel_env": env}


def test_install_writes_into_the_runtime_directory_only(tmp_path, envs):
    rundir = tmp_path / "spunnel.1.0"
    rundir.mkdir(mode=0o700)
    said = []
    gone = str(tmp_path / "not on this node")
    env = envkernels.install(
        rundir, [str(envs["kernel"]), gone], {"JUPYTER_PATH": "/site/share", "PATH": "/bin"},
        lambda kind, **f: said.append((kind, f["text"])),
    )  # fmt: skip
    assert env == {"JUPYTER_PATH": f"{rundir}/data:/site/share"}
    assert os.listdir(rundir / "data" / "kernels") == ["spunnel-env-my-env-u"]
    assert said == [
        ("warning", f"--env {gone}: no bin/python on this node; its kernel is left out")
    ]
    assert envkernels.install(rundir, [], {}, print) == {}  # no --env: Jupyter's path as it was


def test_a_kernel_from_the_kernelspec_runs_in_the_environment(tmp_path, envs, monkeypatch):
    from jupyter_client.manager import start_new_kernel

    rundir = tmp_path / "spunnel.2.0"
    rundir.mkdir(mode=0o700)
    kernel = str(envs["kernel"])
    monkeypatch.setenv("JUPYTER_PATH", envkernels.install(rundir, [kernel], os.environ, print)[
        "JUPYTER_PATH"])  # fmt: skip
    km, kc = start_new_kernel(kernel_name="spunnel-env-my-env-u", startup_timeout=60)
    out: list[str] = []
    try:
        kc.execute_interactive(
            "import os, sys; print(sys.prefix); print(os.environ['PATH'].split(':')[0])",
            output_hook=lambda msg: out.append(msg["content"].get("text", "")),
            timeout=60,
        )
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    assert "".join(out) == f"{kernel}\n{kernel}/bin\n"
