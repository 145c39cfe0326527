"""Data shards beside a page: detail that a page loads on demand, from file:// with no server.

A page `reports/{kind}-{name}.html` keeps its per-feature / per-point detail in
`reports/{kind}-{name}.data/{set}-{k}.js`, each file one call
`saeflowShard("{kind}-{name}", "{set}", k, {...})`. The page inserts a `<script>` tag for a shard
when it needs it (fetch and XHR do not work from file://), so the first load of a page does not
grow with the number of features, points or examples.

Bulk numeric columns that a page needs at once (plot coordinates) are packed as little-endian
base64 typed arrays (`pack`), about a third of the bytes of JSON numbers.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from saeflow.io import atomic_dir

DATA_SUFFIX = ".data"
# Bytes of packed columns a page may inline; the rest loads after the first draw.
INLINE_BUDGET = 1_200_000
_ITEM_BYTES = {"u8": 1, "u16": 2, "u32": 4, "f32": 4, "q16": 2}
PLOTLY_JS = "plotly.min.js"
_SRC = re.compile(r"""<(?:script|link)\b[^>]*?\b(?:src|href)="([^"]+)"[^>]*>""", re.IGNORECASE)
_EAGER = re.compile(r'<meta name="saeflow-eager" content="([^"]*)">')


def data_dir(page_path: str | os.PathLike) -> Path:
    """Folder of a page's shards: `umap-x.html` -> `umap-x.data`."""
    page_path = Path(page_path)
    return page_path.with_name(page_path.stem + DATA_SUFFIX)


def pack(values: Any, dtype: str) -> dict[str, Any]:
    """A column as {dtype, n, b64}: u8/u16/u32 integers, f32 floats (NaN = null), or q16.

    q16 quantises finite floats onto 0..65534 between their min and max (65535 = null): exact to
    (max - min) / 65534, enough for plot coordinates, at 2 bytes a value.
    """
    arr = np.asarray(values)
    n = int(arr.shape[0]) if arr.ndim else 0
    out: dict[str, Any] = {"dtype": dtype, "n": n}
    if dtype == "q16":
        f = arr.astype(np.float64)
        ok = np.isfinite(f)
        lo = float(f[ok].min()) if ok.any() else 0.0
        hi = float(f[ok].max()) if ok.any() else 0.0
        span = hi - lo if hi > lo else 1.0
        q = np.full(n, 65535, dtype="<u2")
        q[ok] = np.rint((f[ok] - lo) / span * 65534).astype("<u2")
        out.update({"lo": lo, "hi": lo + span})
        raw = q.tobytes()
    else:
        np_dtype = {"u8": "u1", "u16": "<u2", "u32": "<u4", "f32": "<f4"}[dtype]
        if dtype != "f32" and n and (arr.min() < 0 or arr.max() > np.iinfo(np_dtype).max):
            raise ValueError(f"pack: values out of range for {dtype}")
        raw = arr.astype(np_dtype).tobytes()
    out["b64"] = base64.b64encode(raw).decode("ascii")
    return out


def unpack(col: dict[str, Any]) -> np.ndarray:
    """Inverse of `pack` (null codes -> NaN), for tests and notebooks."""
    raw = base64.b64decode(col["b64"])
    if col["dtype"] == "q16":
        q = np.frombuffer(raw, dtype="<u2").astype(np.float64)
        out = col["lo"] + q * (col["hi"] - col["lo"]) / 65534
        out[q == 65535] = np.nan
        return out
    np_dtype = {"u8": "u1", "u16": "<u2", "u32": "<u4", "f32": "<f4"}[col["dtype"]]
    return np.frombuffer(raw, dtype=np_dtype)


class PageData:
    """Writer of one page's shard folder; build it with `page_data(page_path)`."""

    def __init__(self, page_path: Path, tmp: Path) -> None:
        self.page = page_path.stem
        self.base = data_dir(page_path).name
        self._tmp = tmp
        self.eager: list[str] = []
        self.bytes: dict[str, int] = {}

    @property
    def meta(self) -> dict[str, str]:
        """What the page script needs to find the shards: `saeflowLoadShard(meta, set, k)`."""
        return {"page": self.page, "base": self.base}

    def shard(self, set_name: str, k: int, data: Any, *, eager: bool = False) -> str:
        """Write shard k of `set_name`; returns its path relative to the page."""
        from saeflow.report.common import safe_json

        if not re.fullmatch(r"[a-z][a-z0-9_]*", set_name):
            raise ValueError(f"shard set name {set_name!r}: lower-case letters, digits, _")
        name = f"{set_name}-{int(k)}.js"
        text = (
            f"saeflowShard({safe_json(self.page)}, {safe_json(set_name)}, {int(k)}, "
            f"{safe_json(data)});\n"
        )
        raw = text.encode("utf-8")
        (self._tmp / name).write_bytes(raw)
        self.bytes[set_name] = self.bytes.get(set_name, 0) + len(raw)
        rel = f"{self.base}/{name}"
        if eager:
            self.eager.append(rel)
        return rel

    def items(self, set_name: str, items: Iterable[Any], per: int) -> dict[str, Any]:
        """Write a list of items, `per` to a shard; item i is in shard i // per at i % per.

        Items are consumed as a stream (one shard in memory at a time). Returns the spec the
        page script hands to `saeflowItem(meta, spec, i)`.
        """
        chunk: list[Any] = []
        count = n = 0
        for item in items:
            chunk.append(item)
            n += 1
            if len(chunk) == per:
                self.shard(set_name, count, {"items": chunk})
                chunk, count = [], count + 1
        if chunk:
            self.shard(set_name, count, {"items": chunk})
            count += 1
        return {
            "set": set_name,
            "per": int(per),
            "count": count,
            "n": n,
            "bytes": self.bytes.get(set_name, 0),
        }

    def keyed(self, set_name: str, mapping: dict[str, Any], n_shards: int) -> dict[str, Any]:
        """Split a string-keyed dict by `fnv1a(key) % n_shards` (the page computes the same)."""
        buckets: list[dict[str, Any]] = [{} for _ in range(n_shards)]
        for key in sorted(mapping):
            buckets[fnv1a(key) % n_shards][key] = mapping[key]
        for k, bucket in enumerate(buckets):
            self.shard(set_name, k, {"keys": bucket})
        return {"set": set_name, "count": n_shards}

    def columns(
        self,
        set_name: str,
        cols: dict[str, tuple[Any, str]],
        *,
        budget: int = INLINE_BUDGET,
        per: int = 50_000,
    ) -> dict[str, Any]:
        """Packed columns of equal length: as many leading rows as fit `budget` bytes go in the
        page (`head`), the rest in shards of `per` rows that the page loads after it has drawn
        (`saeflowColumns` in common.js). The first load stays under the budget at any size."""
        n = len(next(iter(cols.values()))[0]) if cols else 0
        row_bytes = sum(_ITEM_BYTES[dtype] for _, dtype in cols.values()) * 4 / 3
        head_n = min(n, int(budget // max(row_bytes, 1.0)))
        head = {k: pack(np.asarray(v)[:head_n], dt) for k, (v, dt) in cols.items()}
        count = 0
        for start in range(head_n, n, per):
            part = {k: pack(np.asarray(v)[start : start + per], dt) for k, (v, dt) in cols.items()}
            self.shard(set_name, count, {"cols": part})
            count += 1
        return {"n": n, "head_n": head_n, "head": head, "tail": {"set": set_name, "count": count}}


@contextlib.contextmanager
def page_data(page_path: str | os.PathLike) -> Iterator[PageData]:
    """Shard folder of a page, swapped in atomically when the block succeeds."""
    page_path = Path(page_path)
    with atomic_dir(data_dir(page_path)) as tmp:
        yield PageData(page_path, tmp)


def fnv1a(text: str) -> int:
    """FNV-1a 32-bit hash of the UTF-8 bytes (mirror of saeflowHash in common.js)."""
    h = 0x811C9DC5
    for b in str(text).encode("utf-8"):
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h


def first_load_bytes(html_path: str | os.PathLike) -> int:
    """Bytes a browser reads to open a page, before any on-demand shard.

    The page itself, every local script and style sheet it references, and the shards it loads at
    start (listed in its `saeflow-eager` meta tag). plotly.min.js is left out: it is shipped once
    beside all pages and cached by the browser.
    """
    path = Path(html_path)
    text = path.read_text(encoding="utf-8")
    total = path.stat().st_size
    refs = [r for r in _SRC.findall(text) if Path(r).name != PLOTLY_JS and "://" not in r]
    match = _EAGER.search(text)
    if match:
        refs += [r for r in match.group(1).split() if r]
    for ref in dict.fromkeys(refs):
        target = path.parent / ref
        if target.is_file():
            total += target.stat().st_size
    return total
