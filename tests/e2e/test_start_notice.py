"""Told when it starts: a job that waited in the queue rings the terminal's bell when it starts,
and a desktop session gets a notification; while it waits, Slurm's expected start is shown."""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from spunnel_jupyter.console import STARTED_AFTER

from .cluster import site_config, start, wait_clean


def test_a_start_after_waiting_rings_the_bell_and_tells_the_desktop(node_full):
    # A stand-in for libnotify's notify-send (the real one, under Xvfb and a D-Bus session, is
    # the desktop tests'): what the command would show on the user's desktop.
    bindir = Path(tempfile.mkdtemp(prefix="notify-", dir="/tmp"))
    said = bindir / "said"
    (bindir / "notify-send").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" >> {said}\n')
    (bindir / "notify-send").chmod(0o755)
    bindir.chmod(0o777)
    s = start(
        "alice", "--mem", "1000", "-t", "10", tty=True,
        DISPLAY=":77", PATH=f"{bindir}:/usr/local/bin:/usr/bin:/bin",
    )  # fmt: skip
    try:
        # Slurm's backfill pass (every 30 s by default) computes when the job should start.
        s.wait_for(r"job \d+ PENDING \(Resources\), waiting 0:0\d:\d\d, expected to start at "
                   r"\d\d:\d\d", timeout=75)  # fmt: skip
        # and it has waited long enough in the queue to be worth a bell (the backfill pass can
        # come within seconds of the submission)
        time.sleep(max(1.0, s.started + STARTED_AFTER + 3 - time.monotonic()))
        subprocess.run(["scancel", node_full], check=True)
        started = r"\x07spunnel-notebook: (job (\d+) started after 0:0\d:\d\d in the queue)"
        m = s.wait_for(started, 60)
        s.wait_ready()
        assert said.read_text().splitlines() == [
            "--app-name=spunnel-notebook",
            "Jupyter on a compute node",
            f"{m.group(1)}; Jupyter is starting",
        ]
        s.signal(signal.SIGINT)
        assert s.finish() == 130
    finally:
        s.close()
        shutil.rmtree(bindir, ignore_errors=True)
    _took, left = wait_clean("alice", timeout=15)
    assert not left, left


def test_the_terminal_warns_before_the_time_limit(tmp_path):
    site = site_config({"SpunnelManager": {"warn_before": [2, 1]}})
    s = start("alice", "-t", "2", env_path=site)
    try:
        s.wait_ready()
        began = time.monotonic()
        first = (
            r"\x07spunnel-notebook: job (\d+) reaches its time limit in 2 minutes: save your work"
        )
        s.wait_for(first, timeout=30)  # due as soon as the end time is known
        s.wait_for(r"\x07spunnel-notebook: job \d+ reaches its time limit in 1 minute:", 90)
        assert 40 <= time.monotonic() - began <= 90
        s.signal(signal.SIGINT)
        assert s.finish() == 130
    finally:
        s.close()
        shutil.rmtree(site, ignore_errors=True)
    _took, left = wait_clean("alice", timeout=15)
    assert not left, left
