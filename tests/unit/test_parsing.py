"""Parsing and validation of user input: the pure functions, no cluster needed."""

from __future__ import annotations

import pytest

from spunnel_jupyter.backend import JobState, format_duration, parse_mem_mb, parse_time_limit
from spunnel_jupyter.channel import _SLURM_SAYS
from spunnel_jupyter.errors import ExitCode, SlurmRejected, SlurmUnavailable, UsageError
from spunnel_jupyter.fields import build_request
from spunnel_jupyter.slurm import classify_error
from spunnel_jupyter.tunnel import PortPair, parse_port_pairs


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30", 1800),
        ("5:30", 330),
        ("2:00:00", 7200),
        ("1-0", 86400),
        ("1-2", 93600),
        ("1-2:30", 95400),
        ("1-02:30:15", 95415),
        ("UNLIMITED", None),
        ("infinite", None),
    ],
)
def test_slurm_time_limits(text, seconds):
    assert parse_time_limit(text) == seconds


@pytest.mark.parametrize("text", ["2x", "", "1:2:3:4", "-5", "0", "0:00", "1-", "2h"])
def test_bad_time_limits_name_the_accepted_forms(text):
    with pytest.raises(UsageError) as e:
        parse_time_limit(text)
    assert "HH:MM:SS" in e.value.remedy or "HH:MM:SS" in e.value.message
    assert e.value.exit_code == ExitCode.USAGE and e.value.http_status == 400


def test_format_duration_round_trips():
    for text in ("0:00:01", "2:00:00", "3-4:05:06"):
        assert format_duration(parse_time_limit(text)) == text
    assert format_duration(None) == "UNLIMITED"
    assert format_duration(-3) == "0:00:00"


@pytest.mark.parametrize(
    ("text", "mb"), [("4000", 4000), ("4G", 4096), ("4g", 4096), ("512M", 512), ("1T", 1048576)]
)
def test_memory(text, mb):
    assert parse_mem_mb(text) == mb


@pytest.mark.parametrize("text", ["lots", "4GiB", "-1", "1.5G"])
def test_bad_memory(text):
    with pytest.raises(UsageError, match="invalid memory"):
        parse_mem_mb(text)


def test_port_pairs_like_spunnel():
    assert parse_port_pairs("8001:8000,8889:8888") == [PortPair(8001, 8000), PortPair(8889, 8888)]
    assert parse_port_pairs("8001:8000, 8002:8000") == [PortPair(8001, 8000), PortPair(8002, 8000)]
    assert [str(p) for p in parse_port_pairs("2000:3000")] == ["2000:3000"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("8001", "malformed"),
        ("8001:", "malformed"),
        ("a:b", "malformed"),
        ("8001:8000,", "malformed"),
        ("8001:8000,8001:8002", "appears twice"),
        ("8001:8000,8001:8000", "appears twice"),
        ("80:8000", "out of range"),
        ("8001:22", "out of range"),
        ("70000:8000", "out of range"),
    ],
)
def test_bad_port_pairs(text, message):
    with pytest.raises(UsageError, match=message):
        parse_port_pairs(text)


def test_srun_options_map_one_to_one():
    options = {"partition": "interact", "mem": "4000", "time": "2:00:00", "cpus_per_task": 2,
               "gpus": "1", "account": "lab", "qos": "high"}  # fmt: skip
    req = build_request(options, {}, ["--exclusive"])
    assert req.srun_options() == [
        "--partition=interact",
        "--mem=4000",
        "--time=2:00:00",
        "--cpus-per-task=2",
        "--gpus=1",
        "--account=lab",
        "--qos=high",
        "--job-name=spunnel-notebook",
        "--exclusive",
    ]


@pytest.mark.parametrize(
    ("stderr", "kind", "text"),
    [
        (
            "srun: error: Unable to allocate resources: Invalid partition name specified",
            UsageError,
            "unknown partition",
        ),
        (
            "srun: error: Memory specification can not be satisfied\nsrun: error: Unable to "
            "allocate resources: Requested node configuration is not available",
            UsageError,
            "no node can satisfy",
        ),
        ("srun: error: Invalid --time specification", UsageError, "invalid time limit"),
        (
            "sinfo: error: slurm_load_partitions: Unable to contact slurm controller (connect "
            "failure)",
            SlurmUnavailable,
            "does not answer",
        ),
        ("srun: unrecognized option '--frob'", SlurmRejected, "unrecognized option '--frob'"),
    ],
)
def test_slurm_errors_become_clear_messages(stderr, kind, text):
    err = classify_error(stderr)
    assert type(err) is kind
    assert text in err.message
    assert err.remedy


def test_unknown_never_counts_as_ended():
    assert JobState.UNKNOWN.active
    assert JobState.parse("CANCELLED by 1001") is JobState.CANCELLED
    assert JobState.parse("") is JobState.UNKNOWN
    assert not JobState.GONE.active and not JobState.TIMEOUT.active


STEP_END = "*** STEP 36.0 ON c1 CANCELLED AT 2026-12-03T19:49:35 DUE TO TIME LIMIT ***"


@pytest.mark.parametrize(
    ("line", "slurms"),
    [
        ("srun: error: Unable to allocate resources: Invalid partition name specified", True),
        (f"slurmstepd: error: {STEP_END}", True),  # Slurm 22.05
        (f"slurmstepd-c1: error: {STEP_END}", True),
        (f"[2026-12-03T19:49:35.007] error: {STEP_END}", True),  # Slurm 25.11
        ("[I 2026-12-03 19:49:35.007 ServerApp] Jupyter Server is running", False),
        ("[W 19:49:35.007 LabApp] something", False),
    ],
)
def test_slurms_own_lines_on_sruns_stderr_are_told_from_jupyters(line, slurms):
    """why_ended() reads the time limit from Slurm's step message, which 25.11 timestamps."""
    assert bool(_SLURM_SAYS.match(line)) is slurms
