"""The bad-input suite, on the real cluster: each input gets one line saying what is wrong and what
to do, the documented exit code, and nothing is submitted (slurmctld's own count of submitted jobs
does not move) or left behind.

The REST API's share of bad inputs is in tests/http/test_api.py (run as alice by
test_http_api.py) and counted in the same way.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from .cluster import as_user, jobs_submitted, leftovers, squeue

# (arguments, exit code, words the one error line must hold)
CLI = [
    (["--port", "0"], 2, "out of range"),
    (["--port", "\u0663\u0660\u0660\u0660"], 2, "not a whole number"),
    (["--port", "8o00"], 2, "not a whole number"),
    (["-c", "0"], 2, "at least 1"),
    (["-c", "-2"], 2, "not a whole number"),
    (["-c", "\u00b2"], 2, "not a whole number"),
    (["--mem", "0"], 2, "more than 0"),
    (["--mem", "\u0664G"], 2, "invalid memory"),
    (["-t", "0"], 2, "longer than zero"),
    (["-t", "\u0661:00:00"], 2, "invalid time limit"),
    (["--tunnel", "\u00b2:8000"], 2, "malformed --tunnel pair"),
    (["--tunnel", ",".join(f"{p}:{p}" for p in range(2000, 2100))], 2, "more than 64"),
    (["--tunnel-mode", "sideways"], 2, "unknown tunnel_mode"),
    (["--idle-timeout", "-5"], 2, "not a whole number"),
    (["--idle-timeout", "99999"], 2, "out of range"),
    (["--detach", "--", "--pty"], 2, "not a terminal"),
    (["-p", "interact,nosuch"], 2, "unknown partition 'nosuch'"),
    (["-p", "debug,interact", "-t", "9:00:00"], 2, "exceeds partition 'debug'"),
    (["--", "--nodes=2"], 2, "one node"),
    (["--", "-N2"], 2, "one node"),
    (["--", "-n", "4"], 2, "one task"),
    (["--", "-n4"], 2, "one task"),
    (["--", "--ntasks=4"], 2, "one task"),
    (["--", "--ntask=4"], 2, "one task"),  # srun takes unambiguous prefixes
    (["--", "--output=F"], 2, "output"),
    (["--", "-oF"], 2, "output"),
    (["--", "--label"], 2, "labels"),
    (["--", "-ul"], 2, "labels"),
    (["--", "--jobid=1"], 2, "another job"),
    (["--", "--comment=x"], 2, "tags the job"),
    (["--", "--pty"], 2, "not a terminal"),
    (["--", "--input=none"], 2, "input"),
    (["--", "cat"], 2, "not an srun option"),
    (["--", "--gres", "gpu:1"], 2, "not an srun option"),
]


@pytest.mark.parametrize(("args", "code", "words"), CLI, ids=[" ".join(a)[:40] for a, _, _ in CLI])
def test_cli_and_passthrough(args, code, words):
    before = jobs_submitted()
    result = as_user("alice", ["spunnel-notebook", "-t", "10", *args], timeout=60)
    _assert_refused(result, code, words)
    assert jobs_submitted() == before


@pytest.fixture
def site_config_dir():
    path = Path(tempfile.mkdtemp(prefix="site-config-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


SITE = [
    ({"mem": "lots"}, ["c.SpunnelManager.mem", "jupyter_spunnel_jupyter_config.json", "memory"]),
    ({"time": "forever"}, ["c.SpunnelManager.time", "invalid time limit"]),
    ({"partition": "nosuch"}, ["unknown partition 'nosuch'", "c.SpunnelManager.partition"]),
    ({"mem": "900000"}, ["more than any node", "c.SpunnelManager.mem", "administrators"]),
    ({"srun_args": ["--nodes=3"]}, ["c.SpunnelManager.srun_args", "one node"]),
    ({"srun_args": ["--output=/dev/null"]}, ["c.SpunnelManager.srun_args", "output"]),
]


@pytest.mark.parametrize(
    ("config", "words"), SITE, ids=[next(iter(c)) + str(i) for i, (c, _) in enumerate(SITE)]
)
def test_bad_site_config_blames_the_site(config, words, site_config_dir):
    config_file = site_config_dir / "jupyter_spunnel_jupyter_config.json"
    config_file.write_text(json.dumps({"SpunnelManager": config}))
    config_file.chmod(0o644)
    before = jobs_submitted()
    # No -t here: the site's own default time limit is one of the inputs.
    result = as_user("alice", ["spunnel-notebook"], JUPYTER_CONFIG_PATH=str(site_config_dir))
    _assert_refused(result, 2, *words)
    assert jobs_submitted() == before


def _assert_refused(result: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert result.returncode == code, result
    errors = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(errors) == 1 and errors[0].startswith("spunnel-notebook: error: "), errors
    for word in words:
        assert word in errors[0], (word, errors[0])
    assert errors[0].endswith(")")  # a remedy follows the message
    assert squeue("alice") == []
    assert not leftovers("alice")
