"""What the launcher tells the node's JupyterLab: the job's end time, warnings before it, and
requests to save every open document before a planned end.

The launcher keeps ``notice.json`` in its runtime directory; the node's Jupyter server extension
(node_extension.py) serves it to the JupyterLab plugin ``spunnel-jupyter:node``, writes the
browser's answer to a save request to ``saved.json``, and touches ``browser-polled`` whenever a
browser asks for the notice (formats in protocol.py).

- **End time**: ``scontrol -o show job $SLURM_JOB_ID``, asked on the node once Jupyter is ready
  and again every 5 minutes (an administrator may extend the limit). If scontrol is missing or
  fails, there is no end time and no warning; nothing else changes.
- **Warnings**: at each of ``warn_before`` seconds before the end, once per end time; if several
  are already past (a short job, a limit cut), only the nearest one.
- **Idle release** (--idle-timeout): node_extension.py keeps in ``idle.json`` when Jupyter
  would end itself for want of activity; the same warnings are given before it (those shorter
  than the timeout; with none, one at half of it), re-armed whenever activity pushes it back,
  and each is passed to the login side (``on_warning``) for the terminal and the Lab panel.
- **Saves**: ``save`` raises ``save_seq`` and, only while a browser polled within the last
  ``BROWSER_WITHIN`` seconds, waits up to ``save_grace`` for its answer; with none it spends no
  time. Before the time limit a save is asked for ``lead`` seconds ahead, unprompted, so that it
  happens before Slurm's SIGTERM.

Standard library only, like the launcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from . import process
from .protocol import IDLE_FILE, NOTICE_FILE, POLLED_FILE, SAVED_FILE
from .rundir import read_json, replace_json

REREAD_EVERY = 300.0  # seconds between scontrol calls for the end time
BROWSER_WITHIN = 15.0  # a browser that polled this recently is connected (it polls every 5 s)
ANSWER_POLL = 0.02  # seconds between looks at saved.json while a save is awaited
IDLE_POLL = 5.0  # seconds between looks at idle.json (node_extension.py rewrites it every 5 s)
IDLE_SLACK = 30.0  # a release pushed back by more than this is a new one: its warnings re-armed
_KEY_VALUE = re.compile(r"(?:^|\s)([A-Za-z:]+)=(\S*)")  # `scontrol -o show job` fields


def parse_end_time(text: str, job_id: str) -> float | None:
    """The EndTime of ``job_id`` in ``scontrol -o show job`` output (epoch), or None."""
    fields = dict(_KEY_VALUE.findall(text))
    if fields.get("JobId") != job_id:
        return None
    try:
        parsed = datetime.strptime(fields.get("EndTime", ""), "%Y-%m-%dT%H:%M:%S")
    except ValueError:
        return None  # Unknown, or an unlimited job
    return time.mktime(parsed.timetuple())


async def read_end_time(job_id: str, timeout: float = 10.0) -> float | None:
    """Ask Slurm for the job's end time; None if scontrol is missing, fails or says none."""
    env = {**os.environ, "SLURM_TIME_FORMAT": "standard"}
    try:
        result = await process.run(["scontrol", "-o", "show", "job", job_id], timeout=timeout,
                                   env=env)  # fmt: skip
    except (OSError, TimeoutError):
        return None
    return parse_end_time(result.stdout, job_id) if result.returncode == 0 else None


def spell(seconds: float) -> str:
    """``seconds`` for a person: 1 h 5 min, 10 min, 1 min 40 s, 30 s."""
    s = max(0, round(seconds))
    h, m, s = s // 3600, s // 60 % 60, s % 60
    if h:
        return f"{h} h {m} min" if m else f"{h} h"
    if m:
        return f"{m} min {s} s" if s else f"{m} min"
    return f"{s} s"


def warning_text(left: str, job_id: str) -> str:
    """A warning as JupyterLab shows it (a notification shows 140 characters at most)."""
    return (f"Jupyter stops in {left} (job {job_id}'s time limit). Open documents are saved "
            "just before it: save your work and finish what runs.")  # fmt: skip


def idle_warning_text(left: str, minutes: int) -> str:
    return (f"Jupyter stops in {left}: nothing ran and no one used it for {minutes} min "
            "(--idle-timeout). Use it to keep it.")  # fmt: skip


def idle_thresholds(warn_before: list[int], timeout: int) -> list[int]:
    """The warnings (seconds before) that make sense before an idle release ``timeout`` seconds
    after the last activity: those shorter than it, else one at half of it."""
    return [w for w in warn_before if w < timeout] or ([timeout // 2] if timeout >= 2 else [])


def due_warning(
    end_time: float, warn_before: list[int], issued: set[int], now: float
) -> int | None:
    """The warning (seconds before the end) to give at ``now``, recorded in ``issued``; of
    several past at once only the nearest, the farther ones counted as given."""
    passed = [w for w in warn_before if w not in issued and now >= end_time - w]
    if not passed or now >= end_time:
        return None
    nearest = min(passed)
    issued.update(w for w in warn_before if w >= nearest)
    return nearest


def sane_warnings(values: Any) -> list[int]:
    """``warn_before`` as given in the settings: positive whole seconds, largest first."""
    if not isinstance(values, list):
        return []
    good = {int(v) for v in values if type(v) in (int, float) and v > 0}
    return sorted(good, reverse=True)


class Notices:
    def __init__(
        self,
        rundir: Path,
        job_id: str,
        warn_before: Any,
        save_grace: float,
        idle_minutes: int = 0,
        on_warning: Callable[[str], None] = lambda text: None,
    ) -> None:
        self.rundir = rundir
        self.job_id = job_id
        self.warn_before = sane_warnings(warn_before)
        self.save_grace = max(0.0, float(save_grace))
        self.lead = max(self.save_grace + 10.0, 30.0)  # the unprompted save before the limit
        self.end_time: float | None = None
        self.warnings: list[dict[str, Any]] = []
        self.issued: set[int] = set()
        self.save_seq = 0
        self.asked_at = 0.0  # when the last save was asked for (answers before it are stale)
        self.presaved: float | None = None  # the end time an unprompted save was asked for
        self.next_read = 0.0
        self.idle_minutes = max(0, int(idle_minutes))
        self.idle_warn = idle_thresholds(self.warn_before, self.idle_minutes * 60)
        self.idle_end: float | None = None  # when Jupyter would release itself, if it would
        self.idle_issued: set[int] = set()
        self.on_warning = on_warning
        self.write()

    def write(self) -> None:
        data = {"end_time": self.end_time, "warnings": self.warnings, "save_seq": self.save_seq}
        try:
            replace_json(self.rundir / NOTICE_FILE, data)
        except OSError as e:  # a full /tmp: no notices, the session goes on
            sys.stderr.write(f"spunnel: cannot write {NOTICE_FILE}: {e}\n")

    async def run(self) -> None:
        """Learn the end time, give the warnings and the save before it, until cancelled."""
        while True:
            try:
                if time.time() >= self.next_read:
                    self.next_read = time.time() + REREAD_EVERY
                    self._learn(await read_end_time(self.job_id))
                if self.idle_minutes:
                    self._learn_idle(read_json(self.rundir / IDLE_FILE))
                self._tick(time.time())
            except Exception as e:  # never let a notice end the session
                sys.stderr.write(f"spunnel: notices: {e!r}\n")
            await asyncio.sleep(self._until_next(time.time()))

    def _learn(self, end_time: float | None) -> None:
        """A new end time (an extended limit): the warnings of the old one no longer hold."""
        if end_time is None or end_time == self.end_time:
            return  # unknown now (scontrol failing): what was known holds
        self.end_time, self.issued, self.warnings = end_time, set(), []
        self.write()

    def _learn_idle(self, data: Any) -> None:
        at = data.get("release_at") if isinstance(data, dict) else None
        release = float(at) if isinstance(at, (int, float)) and not isinstance(at, bool) else None
        if release is None or self.idle_end is None or release > self.idle_end + IDLE_SLACK:
            self.idle_issued = set()  # held, or pushed back by activity: a new countdown
        self.idle_end = release

    def _warn(self, text: str, key: str, now: float, left: str) -> None:
        self.warnings.append({"id": f"{self.job_id}-{key}", "text": text, "at": now})
        self.warnings = self.warnings[-20:]
        sys.stderr.write(f"spunnel: warned: {left} left\n")
        self.write()

    def _tick(self, now: float) -> None:
        if self.idle_end is not None:
            warning = due_warning(self.idle_end, self.idle_warn, self.idle_issued, now)
            if warning is not None:
                left = spell(self.idle_end - now)
                text = idle_warning_text(left, self.idle_minutes)
                self._warn(text, f"idle-{self.idle_end:.0f}-{warning}", now, left)
                self.on_warning(text)
        end = self.end_time
        if end is None:
            return
        warning = due_warning(end, self.warn_before, self.issued, now)
        if warning is not None:
            left = spell(end - now)
            self._warn(warning_text(left, self.job_id), f"{end:.0f}-{warning}", now, left)
        if now >= end - self.lead and self.presaved != end and now < end:
            self.presaved = end
            sys.stderr.write(f"spunnel: {spell(end - now)} left: asking the browser to save\n")
            self.request_save()

    def _until_next(self, now: float) -> float:
        times = [self.next_read] + ([now + IDLE_POLL] if self.idle_minutes else [])
        if self.end_time is not None:
            times += [self.end_time - w for w in self.warn_before if w not in self.issued]
            if self.presaved != self.end_time:
                times.append(self.end_time - self.lead)
        return min(max(0.05, min(times) - now), 60.0)  # a minute at most: the clock may jump

    def request_save(self) -> int:
        self.save_seq += 1
        self.asked_at = time.time()
        self.write()
        return self.save_seq

    def browser_connected(self) -> bool:
        with contextlib.suppress(OSError):
            return time.time() - (self.rundir / POLLED_FILE).stat().st_mtime <= BROWSER_WITHIN
        return False

    def answer(self, seq: int) -> dict[str, Any] | None:
        """The browser's answer to save request ``seq`` (or a later one), if it came."""
        data = read_json(self.rundir / SAVED_FILE)
        if not isinstance(data, dict) or not isinstance(data.get("at"), (int, float)):
            return None
        fresh = data["at"] >= self.asked_at
        return data if fresh and isinstance(data.get("seq"), int) and data["seq"] >= seq else None

    async def save(self) -> dict[str, Any]:
        """Before a planned end: ask the browser to save, wait for its answer (bounded), and say
        what happened (fields of the ``exited`` event)."""
        seq = self.request_save()
        if not self.browser_connected():
            return {"save": "no-browser", "save_s": 0.0, "saved": 0}
        start = time.monotonic()
        while (answer := self.answer(seq)) is None:
            if time.monotonic() - start >= self.save_grace:
                waited = round(time.monotonic() - start, 3)
                sys.stderr.write(f"spunnel: the browser did not save within {waited:g} s\n")
                return {"save": "timeout", "save_s": waited, "saved": 0}
            await asyncio.sleep(ANSWER_POLL)
        took = round(time.monotonic() - start, 3)
        saved, failed = len(answer.get("saved", [])), len(answer.get("failed", []))
        sys.stderr.write(f"spunnel: the browser saved {saved} document(s) in {took:g} s"
                         + (f", {failed} failed\n" if failed else "\n"))  # fmt: skip
        fields = {"save": "failed" if failed else "saved", "save_s": took, "saved": saved}
        return {**fields, "failed": failed} if failed else fields
