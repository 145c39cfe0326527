"""The pages' JavaScript under node (`node --test tests/js/`): pure functions and the shard
loader, on shards and packed columns written by the Python side."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from saeflow.report.geometry_pages import token_index
from saeflow.report.shards import fnv1a, pack, page_data

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "src" / "saeflow" / "report" / "assets"


def write_fixtures(directory: Path) -> None:
    """Packed columns with their values, hashes, and shards of items, columns and tokens."""
    values = {
        "u8": [0, 1, 255],
        "u16": [0, 65535, 7],
        "u32": [0, 131071, 4294967295],
        "f32": [0.5, None, -1.25e-3],
        "q16": [-3.0, 0.1, None, 7.5],
        "axis0": [0.1, 0.2],
        "axis1": [1.0, 2.0],
        "axis2": [-5.0, 5.0],
    }
    dtypes = {"axis0": "f32", "axis1": "f32", "axis2": "f32"}
    packed = {
        k: pack(
            np.array([np.nan if x is None else x for x in v], dtype=np.float64), dtypes.get(k, k)
        )
        if dtypes.get(k, k) in ("f32", "q16")
        else pack(np.array(v, dtype=np.int64), k)
        for k, v in values.items()
    }
    page = directory / "geometry-x.html"
    index = pd.DataFrame(
        {
            "feature_id": [0, 1, 2],
            "top_tokens": [[" king", "queen"], ["talking"], ["king", "kingdom"]],
            "top_token_counts": [[2, 1], [2], [1, 1]],
        }
    )
    with page_data(page) as data:
        items = data.items("items", ({"i": i, "text": f"item {i} <b>"} for i in range(10)), per=4)
        columns = data.columns("cols", {"v": (np.arange(1000), "u32")}, budget=400, per=100)
        tokens = data.keyed("tok", token_index(index), 3)
        meta = data.meta
    texts = ["", "king", " king", "ü", "日本語", "<b>&</b>", "a" * 100]
    fixture = {
        "values": values,
        "packed": packed,
        "hashes": [[t, fnv1a(t)] for t in texts],
        "shards": {
            "meta": meta,
            "items": items,
            "columns": columns,
            "n_rows": 1000,
            "tokens": tokens,
        },
    }
    (directory / "fixture.json").write_text(json.dumps(fixture))


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_page_javascript_under_node(tmp_path):
    write_fixtures(tmp_path)
    out = subprocess.run(
        ["node", "--test", str(ROOT / "tests" / "js")],
        capture_output=True,
        text=True,
        timeout=120,
        env={
            "SAEFLOW_ASSETS": str(ASSETS),
            "SAEFLOW_FIXTURES": str(tmp_path),
            "PATH": "/usr/bin:/bin",
        },
    )
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert "# fail 0" in out.stdout
