"""Atomic writes, manifests and hashing shared by every stage.

Every output is written under a temporary sibling name and renamed into place, so a killed job
never leaves a file that could pass for a result, and an earlier result is only replaced once the
new one is complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
from collections.abc import Container, Iterator
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
PROGRESS = ".progress.json"

log = logging.getLogger("saeflow.io")


_HOST = socket.gethostname().replace("/", "_")
_SIBLING = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<host>.+)-(?P<pid>\d+)$")
_SWEPT: set[Path] = set()


def tmp_sibling(path: Path, kind: str = "tmp") -> Path:
    """Hidden sibling `.name.tmp-HOST-PID`: never mistaken for a result, owner identifiable."""
    return path.with_name(f".{path.name}.{kind}-{_HOST}-{os.getpid()}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def sweep_dead_siblings(folder: str | os.PathLike) -> None:
    """Tidy what killed writers left in `folder`, and put back a result caught mid-swap.

    Only siblings of this host whose process no longer runs are touched: on a shared filesystem
    another host's writer may still be running. `atomic_dir` moves the old result to
    `.NAME.old-HOST-PID` before renaming the new one in; a kill between the two renames leaves no
    NAME, so the old result is renamed back (old siblings sort before tmp ones).
    """
    folder = Path(folder)
    try:
        names = [e.name for e in os.scandir(folder)]
    except FileNotFoundError:
        return
    for entry in sorted(names, key=lambda n: (".tmp-" in n, n)):
        m = _SIBLING.match(entry)
        if not m or m["host"] != _HOST:
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or _pid_alive(pid):
            continue
        sibling, result = folder / entry, folder / m["name"]
        if m["kind"] == "old" and not result.exists():
            os.replace(sibling, result)
            log.warning("restored %s from %s, left by a killed job", result, entry)
        else:
            _remove(sibling)
            log.info("removed %s, left by a killed job", entry)


def _sweep_once(folder: Path) -> None:
    """Sweep each folder once per process: a stage writing many files there pays one listing."""
    key = folder.resolve()
    if key not in _SWEPT:
        _SWEPT.add(key)
        sweep_dead_siblings(folder)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_once(path.parent)
    tmp = tmp_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory; swap it in for `path` (replacing any old one) on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_once(path.parent)
    tmp = tmp_sibling(path)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        old = tmp_sibling(path, "old")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def dumps_json(obj: Any) -> str:
    """Canonical, strict JSON: sorted keys (the same content gives the same bytes), NaN and
    infinities written as null (JSON has no NaN)."""
    from saeflow.verify import json_safe

    obj = json_safe(obj)
    return json.dumps(obj, sort_keys=True, indent=2, allow_nan=False, default=_json_default) + "\n"


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write canonical JSON atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(dumps_json(obj))


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def config_hash(*parts: Any) -> str:
    """Stable short hash of JSON-able config slices (and input fingerprints)."""
    blob = json.dumps(parts, sort_keys=True, default=_json_default).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    """Write `manifest.json` last: its presence marks the directory as complete."""
    path = Path(directory) / MANIFEST
    write_json(path, manifest)
    return path


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """Read a sharded output's manifest; a directory without one is incomplete."""
    directory = Path(directory)
    if directory.name == MANIFEST:
        directory = directory.parent
    path = directory / MANIFEST
    if not path.exists():
        from saeflow.errors import DataError

        raise DataError(f"{directory}: no {MANIFEST}, so the output is incomplete (rerun its rule)")
    return read_json(path)


def shard_name(index: int, ext: str) -> str:
    return f"part-{index:05d}.{ext}"


def load_progress(directory: str | os.PathLike, chash: str) -> dict[str, Any]:
    """Resume state of a sharded writer, `{"config_hash": chash, "shards": {name: record}}`.

    Finished shards are only reusable under the config hash that made them, so progress recorded
    under another hash (or an unreadable file) starts over empty.
    """
    progress: dict[str, Any] = {"config_hash": chash, "shards": {}}
    path = Path(directory) / PROGRESS
    if path.exists():
        try:
            old = read_json(path)
        except ValueError:
            old = {}
        if old.get("config_hash") == chash:
            progress = old
        elif old:
            log.info(
                "config hash changed (%s -> %s): discarding old shards",
                old.get("config_hash"),
                chash,
            )
    return progress


def remove_stale_shards(
    folder: str | os.PathLike, keep: Container[str], *, drop_manifest: bool = True
) -> int:
    """Delete what an earlier run left in `folder` that a resumed run must not trust.

    That is `part-*` files not in `keep`, atomic-write temporaries and (with `drop_manifest`) the
    manifest, which the resumed run rewrites last. Returns how many `part-*` files went.
    """
    removed = 0
    for f in Path(folder).iterdir():
        stale = f.name.startswith("part-") and f.name not in keep
        leftover = f.name.startswith(".") and ".tmp-" in f.name
        manifest = drop_manifest and f.name == MANIFEST
        if (stale or leftover or manifest) and f.is_file():
            f.unlink()
            removed += stale
    return removed
