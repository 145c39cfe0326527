"""Atomic writes: no half-written result, no lost earlier result, no litter after a killed job."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from saeflow import io as sio


@pytest.fixture(scope="module")
def dead_pid() -> int:
    """A PID that ran on this host and has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _sibling(path: Path, kind: str, pid: int, host: str = sio._HOST) -> Path:
    return path.with_name(f".{path.name}.{kind}-{host}-{pid}")


def test_atomic_path_keeps_old_result_when_the_block_fails(tmp_path):
    out = tmp_path / "result.json"
    sio.write_json(out, {"a": 1})
    with pytest.raises(RuntimeError), sio.atomic_path(out) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert sio.read_json(out) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_atomic_dir_replaces_only_on_success(tmp_path):
    out = tmp_path / "model"
    with sio.atomic_dir(out) as tmp:
        (tmp / "w").write_text("v1")
    with pytest.raises(RuntimeError), sio.atomic_dir(out) as tmp:
        (tmp / "w").write_text("v2-partial")
        raise RuntimeError("failed")
    assert (out / "w").read_text() == "v1"
    with sio.atomic_dir(out) as tmp:
        (tmp / "w").write_text("v2")
    assert (out / "w").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_dead_writers_temporaries_are_swept(tmp_path, dead_pid):
    out = tmp_path / "result.json"
    dead_file = _sibling(out, "tmp", dead_pid)
    dead_file.write_text("half")
    dead_dir = _sibling(out, "tmp", 4_194_305)  # above Linux PID_MAX_LIMIT: never alive
    dead_dir.mkdir()
    (dead_dir / "x").write_text("half")
    live = _sibling(out, "tmp", os.getppid())  # its writer still runs: left alone
    live.write_text("in progress")
    remote = _sibling(out, "tmp", dead_pid, host="other-node")  # may run on another host
    remote.write_text("in progress")
    sio.write_json(out, {"ok": True})
    assert not dead_file.exists() and not dead_dir.exists()
    assert live.exists() and remote.exists()
    assert sio.read_json(out) == {"ok": True}


def test_result_caught_between_the_two_renames_is_restored(tmp_path, dead_pid):
    """atomic_dir moved the old result aside and was killed before renaming the new one in."""
    out = tmp_path / "sae"
    old = _sibling(out, "old", dead_pid)
    old.mkdir()
    (old / "cfg.json").write_text("{}")
    sio.sweep_dead_siblings(tmp_path)
    assert (out / "cfg.json").read_text() == "{}"
    assert not old.exists()
    # With the result in place, a dead writer's old copy is just litter.
    old.mkdir()
    sio.sweep_dead_siblings(tmp_path)
    assert not old.exists() and (out / "cfg.json").exists()


def test_a_folder_is_listed_once_per_process(tmp_path, monkeypatch):
    """A stage writing thousands of files into one folder must not list it once per file."""
    listed = []
    real_scandir = os.scandir

    def counting_scandir(path):
        listed.append(Path(path))
        return real_scandir(path)

    monkeypatch.setattr(sio.os, "scandir", counting_scandir)
    for i in range(50):
        sio.write_json(tmp_path / f"{i}.json", {"i": i})
    assert listed == [tmp_path]
