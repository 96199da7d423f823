"""The launcher's notices to the node's JupyterLab (notices.py), without Jupyter or Slurm: the end
time from scontrol (a fake one on PATH), the warnings before it, the save before a planned end and
its bound, and the node extension's answer format (protocol.saved_answer)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from datetime import datetime
from pathlib import Path

import pytest

from spunnel_jupyter import notices
from spunnel_jupyter.notices import Notices, due_warning, parse_end_time, spell
from spunnel_jupyter.protocol import (
    NOTICE_FILE,
    POLLED_FILE,
    SAVED_FILE,
    ProtocolError,
    saved_answer,
)

JOB = "4242"


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch).strftime("%Y-%m-%dT%H:%M:%S")


def fake_scontrol(tmp_path: Path, monkeypatch, script: str) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "scontrol").write_text("#!/bin/sh\n" + script)
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_the_end_time_is_read_from_scontrols_one_line():
    end = round(time.time()) + 3600
    line = f"JobId={JOB} JobName=x UserId=alice(1000) RunTime=00:01:00 EndTime={iso(end)} X=1\n"
    assert parse_end_time(line, JOB) == end
    assert parse_end_time(line.replace(iso(end), "Unknown"), JOB) is None
    assert parse_end_time(line, "99") is None  # another job's line
    assert parse_end_time("", JOB) is None


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ('echo "JobId=4242 EndTime=$END"\n', "end"),
        ("echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1\n", None),
        ("echo 'JobId=4242 EndTime=Unknown'\n", None),
    ],
)
def test_scontrol_answers_or_fails_without_an_exception(tmp_path, monkeypatch, script, expected):
    end = round(time.time()) + 600
    monkeypatch.setenv("END", iso(end))
    fake_scontrol(tmp_path, monkeypatch, script)
    assert asyncio.run(notices.read_end_time(JOB)) == (end if expected == "end" else None)


def test_no_scontrol_on_path_is_no_end_time(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing there
    assert asyncio.run(notices.read_end_time(JOB)) is None


def test_each_warning_once_and_only_the_nearest_of_several_past():
    issued: set[int] = set()
    end = 10_000.0
    assert due_warning(end, [600, 60], issued, end - 700) is None
    assert due_warning(end, [600, 60], issued, end - 600) == 600
    assert due_warning(end, [600, 60], issued, end - 500) is None
    assert due_warning(end, [600, 60], issued, end - 59) == 60
    assert due_warning(end, [600, 60], issued, end - 10) is None
    late: set[int] = set()  # a job shorter than every warning: one, the nearest
    assert due_warning(end, [600, 60], late, end - 30) == 60
    assert late == {600, 60}
    assert due_warning(end, [600, 60], set(), end + 1) is None  # past the end: nothing to say


def test_durations_are_spelled_for_people():
    assert [spell(s) for s in (600, 100, 60, 59.6, 3600, 3900)] == [
        "10 min", "1 min 40 s", "1 min", "1 min", "1 h", "1 h 5 min",
    ]  # fmt: skip
    longest = notices.warning_text(spell(3599), "1234567890")
    assert len(longest) <= 140, longest  # what a JupyterLab notification shows
    assert notices.sane_warnings([60, "x", 600, -5, True, 60.5, 60]) == [600, 60]
    assert notices.sane_warnings(None) == []


def notice(rundir: Path) -> dict:
    return json.loads((rundir / NOTICE_FILE).read_text())


def test_warnings_follow_the_end_time_and_an_extended_limit(tmp_path):
    n = Notices(tmp_path, JOB, [600, 60], 2.0)
    assert notice(tmp_path) == {"end_time": None, "warnings": [], "save_seq": 0}
    now = time.time()
    n.next_read = now + notices.REREAD_EVERY
    n._learn(now + 100)  # already within 600 s: that warning at once
    n._tick(now)
    said = notice(tmp_path)
    assert said["end_time"] == now + 100
    assert [w["id"] for w in said["warnings"]] == [f"{JOB}-{now + 100:.0f}-600"]
    assert "1 min 40 s" in said["warnings"][0]["text"]
    assert n._until_next(now) == pytest.approx(40, abs=0.01)  # the 60 s warning is next
    n._learn(now + 7200)  # an administrator extended the limit: the old warnings are void
    n._tick(now)
    assert notice(tmp_path)["warnings"] == [] and notice(tmp_path)["end_time"] == now + 7200
    n._learn(None)  # scontrol failing later: what was known holds
    assert notice(tmp_path)["end_time"] == now + 7200


def test_a_save_is_asked_for_before_the_time_limit_once(tmp_path):
    n = Notices(tmp_path, JOB, [], 2.0)
    assert n.lead == 30.0 and Notices(tmp_path, JOB, [], 25.0).lead == 35.0
    now = time.time()
    n.next_read = now + notices.REREAD_EVERY
    n._learn(now + 31)
    n._tick(now)
    assert notice(tmp_path)["save_seq"] == 0
    assert n._until_next(now) == pytest.approx(1, abs=0.01)
    n._tick(now + 1)
    n._tick(now + 2)
    assert notice(tmp_path)["save_seq"] == 1


def test_a_planned_end_without_a_browser_spends_no_time(tmp_path):
    n = Notices(tmp_path, JOB, [600, 60], 2.0)
    start = time.monotonic()
    assert asyncio.run(n.save()) == {"save": "no-browser", "save_s": 0.0, "saved": 0}
    assert time.monotonic() - start < 0.1
    assert notice(tmp_path)["save_seq"] == 1  # asked all the same: a late browser may save


def test_a_browser_that_does_not_answer_costs_save_grace_at_most(tmp_path):
    (tmp_path / POLLED_FILE).touch()
    old = {"seq": 1, "saved": ["old.ipynb"], "failed": [], "at": time.time() - 1}
    (tmp_path / SAVED_FILE).write_text(json.dumps(old))  # stale: before the request
    n = Notices(tmp_path, JOB, [], 0.5)
    start = time.monotonic()
    said = asyncio.run(n.save())
    assert 0.5 <= time.monotonic() - start < 0.8
    assert said["save"] == "timeout" and said["saved"] == 0


def test_a_browser_that_answers_ends_the_wait(tmp_path):
    (tmp_path / POLLED_FILE).touch()
    n = Notices(tmp_path, JOB, [], 5.0)

    async def browser() -> None:
        await asyncio.sleep(0.2)
        seq = notice(tmp_path)["save_seq"]
        body = saved_answer({"seq": seq, "saved": ["a.ipynb", "b.py"], "failed": ["c.txt"]})
        (tmp_path / SAVED_FILE).write_text(json.dumps(body))

    async def both() -> dict:
        said, _ = await asyncio.gather(n.save(), browser())
        return said

    said = asyncio.run(both())
    assert said["save"] == "failed" and said["saved"] == 2 and said["failed"] == 1
    assert 0.2 <= said["save_s"] < 1.0


def test_the_browsers_answer_is_checked():
    good = saved_answer({"seq": 3, "saved": ["a.ipynb"]})
    assert good["seq"] == 3 and good["saved"] == ["a.ipynb"] and good["failed"] == []
    for bad in (None, [], {"seq": "3"}, {"seq": True}, {"seq": 1, "saved": "a"},
                {"seq": 1, "failed": [1]}):  # fmt: skip
        with pytest.raises(ProtocolError):
            saved_answer(bad)


def test_idle_warnings_come_before_the_release_and_rearm_when_it_is_pushed_back(tmp_path):
    assert notices.idle_thresholds([600, 60], 3600) == [600, 60]
    assert notices.idle_thresholds([600, 60], 60) == [30]  # none shorter: one at half of it
    said: list[str] = []
    n = Notices(tmp_path, JOB, [600, 60], 2.0, idle_minutes=1, on_warning=said.append)
    now = time.time()
    n._learn_idle({"release_at": now + 60})
    n._tick(now)
    assert said == [] and n._until_next(now) <= notices.IDLE_POLL
    n._tick(now + 31)
    assert len(said) == 1 and said[0].startswith("Jupyter stops in 29 s: nothing ran"), said
    assert notice(tmp_path)["warnings"][-1]["text"] == said[0]
    n._tick(now + 40)
    assert len(said) == 1  # once
    n._learn_idle({"release_at": now + 65})  # a little later (rounding, a late check): same one
    n._tick(now + 41)
    assert len(said) == 1
    n._learn_idle({"release_at": now + 200})  # used again: a new countdown
    n._tick(now + 171)
    assert len(said) == 2
    n._learn_idle({"release_at": None})  # a busy kernel holds it: no release, no warning
    n._tick(now + 400)
    assert len(said) == 2
    n._learn_idle("torn")  # a torn file is no release either
    assert n.idle_end is None


def test_the_idle_release_is_estimated_from_jupyters_own_activity():
    from datetime import datetime, timezone
    from types import SimpleNamespace as NS

    from spunnel_jupyter.node_extension import idle_release_at

    def at(epoch: float) -> datetime:
        return datetime.fromtimestamp(epoch, tz=timezone.utc)

    now = time.time()
    kernels: dict[str, NS] = {}
    km = NS(cull_busy=False, cull_connected=False, cull_idle_timeout=60, _kernel_connections={},
            list_kernel_ids=lambda: list(kernels), get_kernel=kernels.__getitem__)  # fmt: skip
    terms = NS(terminals={}, cull_inactive_timeout=60)
    web = NS(last_activity=lambda: at(now), settings={"terminal_manager": terms})
    app = NS(shutdown_no_activity_timeout=60, kernel_manager=km, web_app=web)
    assert idle_release_at(app) == pytest.approx(now + 60)  # nothing open
    kernels["k"] = NS(execution_state="idle", last_activity=at(now - 10))
    assert idle_release_at(app) == pytest.approx(now + 110)  # culled at +50, then 60 s more
    terms.terminals["1"] = NS(last_activity=at(now + 5))
    assert idle_release_at(app) == pytest.approx(now + 125)
    kernels["k"].execution_state = "busy"
    assert idle_release_at(app) is None  # a busy kernel is spared: no release while it runs
    kernels["k"].execution_state = "idle"
    km._kernel_connections["k"] = 1
    assert idle_release_at(app) is None  # nor while a notebook is connected to it
    app.shutdown_no_activity_timeout = 0
    assert idle_release_at(app) is None  # --idle-timeout off
