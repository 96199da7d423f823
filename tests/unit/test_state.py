"""The state directory: privacy checks, the lock's dead-owner semantics, atomic records."""

from __future__ import annotations

import multiprocessing
import os
import signal
import stat

import pytest

from spunnel_jupyter.errors import StateError
from spunnel_jupyter.rundir import make_runtime_dir
from spunnel_jupyter.state import StateDir, filesystem_type


def test_created_private(tmp_path):
    sd = StateDir(tmp_path / "s").ensure()
    assert stat.S_IMODE(sd.path.stat().st_mode) == 0o700


def test_loosened_mode_is_tightened(tmp_path):
    path = tmp_path / "s"
    path.mkdir(mode=0o755)
    os.chmod(path, 0o755)
    StateDir(path).ensure()
    assert stat.S_IMODE(path.stat().st_mode) == 0o700


def test_directory_pre_created_by_another_user_is_refused(tmp_path):
    # runs as root (like the whole suite) to plant another user's directory
    path = tmp_path / "s"
    path.mkdir(mode=0o777)
    os.chown(path, 4242, 4242)
    with pytest.raises(StateError, match="belongs to uid 4242") as e:
        StateDir(path).ensure()
    assert "SPUNNEL_STATE_DIR" in e.value.remedy


def test_symlink_is_refused(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(StateError, match="not a directory"):
        StateDir(tmp_path / "link").ensure()


def test_lock_is_exclusive_even_within_one_process(tmp_path):
    a, b = StateDir(tmp_path).ensure(), StateDir(tmp_path).ensure()
    assert a.try_lock()
    assert not b.try_lock()
    assert b.is_locked()
    a.unlock()
    assert not b.is_locked()
    assert b.try_lock()
    b.unlock()


def _hold_lock(path, ready):
    StateDir(path).ensure().try_lock()
    ready.set()
    signal.pause()


def test_lock_of_a_killed_owner_is_free_at_once(tmp_path):
    ready = multiprocessing.Event()
    owner = multiprocessing.Process(target=_hold_lock, args=(tmp_path, ready))
    owner.start()
    assert ready.wait(10)
    sd = StateDir(tmp_path).ensure()
    assert sd.is_locked()
    os.kill(owner.pid, signal.SIGKILL)
    owner.join()
    assert not sd.is_locked()  # nobody deletes a file by hand


def test_record_is_atomic_and_private(tmp_path):
    sd = StateDir(tmp_path).ensure()
    assert sd.read() is None
    sd.write({"job_id": 7, "token": "t"})
    assert sd.read() == {"job_id": 7, "token": "t"}
    assert stat.S_IMODE(sd.file("session.json").stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["session.json"]  # no temp file left
    sd.file("session.json").write_text("{torn")
    assert sd.read() == {}  # unreadable: a leftover, not a crash


def test_filesystem_type_is_found():
    assert filesystem_type("/proc/self") == "proc"


def test_runtime_dir_named_like_private_tmp(tmp_path):
    path = make_runtime_dir(str(tmp_path), "12", "0")
    assert path.name == "spunnel.12.0"
    assert stat.S_IMODE(path.stat().st_mode) == 0o700


def test_runtime_dir_planted_by_another_user_is_not_used(tmp_path):
    planted = tmp_path / "spunnel.12.0"
    planted.mkdir(mode=0o777)
    os.chown(planted, 4242, 4242)
    path = make_runtime_dir(str(tmp_path), "12", "0")
    assert path != planted and path.name.startswith("spunnel.12.0.")
    assert path.stat().st_uid == os.getuid()


def _probe_forever(path, stop):
    sd = StateDir(path)
    while not stop.is_set():
        sd.is_locked()


def test_probing_the_lock_never_makes_a_start_fail(tmp_path):
    """`status` and the event stream probe the lock while a start takes it: the start must win
    every time (a probe that took the lock made 2,186 of 20,000 starts fail)."""
    StateDir(tmp_path).ensure()
    stop = multiprocessing.Event()
    prober = multiprocessing.Process(target=_probe_forever, args=(tmp_path, stop))
    prober.start()
    try:
        sd = StateDir(tmp_path)
        failures = 0
        for _ in range(5000):
            if sd.try_lock():
                sd.unlock()
            else:
                failures += 1
    finally:
        stop.set()
        prober.join()
    assert failures == 0


def _launcher_holding(base, ready):
    from spunnel_jupyter.rundir import hold

    hold(make_runtime_dir(str(base), "7", "0"))
    ready.set()
    signal.pause()


def test_a_killed_launchers_directory_is_removed_by_the_next_one(tmp_path):
    from spunnel_jupyter.rundir import remove_stale

    ready = multiprocessing.Event()
    live = multiprocessing.Process(target=_launcher_holding, args=(tmp_path, ready))
    live.start()
    assert ready.wait(10)
    killed = make_runtime_dir(str(tmp_path), "6", "0")
    (killed / ".held").touch()  # its launcher took the lock, then died with SIGKILL
    (killed / "runtime").mkdir()
    unheld = make_runtime_dir(str(tmp_path), "5", "0")  # no lock file: being made, left alone
    try:
        assert remove_stale(str(tmp_path)) == [str(killed)]
        assert not killed.exists() and (tmp_path / "spunnel.7.0").exists() and unheld.exists()
    finally:
        live.kill()
        live.join()
    assert remove_stale(str(tmp_path)) == [str(tmp_path / "spunnel.7.0")]  # now it is gone too
