"""Mapper graphs: a real overlapping cover, one cycle on a noisy circle, the random baseline."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from saeflow.codes import CODES_FORMAT, Codes, write_code_shard
from saeflow.errors import ConfigError
from saeflow.geometry.mapper import (
    check_params,
    cover_elements,
    interval_bounds,
    mapper_graph,
    mapper_with_baseline,
    permute_columns,
    role_statistics,
)
from saeflow.io import write_manifest
from saeflow.report import build_mapper_page

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
CIRCLE = {"n_intervals": 8, "cluster_dims": 2, "eps": 0.15, "min_samples": 3}


def noisy_circle(n: int = 600, noise: float = 0.03, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = rng.uniform(0, 2 * np.pi, n)
    return np.c_[np.cos(t), np.sin(t)] + rng.normal(0, noise, (n, 2))


def betti1(graph) -> int:
    s = graph.summary()
    return s["n_edges"] - s["n_nodes"] + s["n_components"]


def test_circle_has_exactly_one_cycle_with_overlap():
    X = noisy_circle()
    graph = mapper_graph(X, {**CIRCLE, "overlap": 0.3})
    s = graph.summary()
    assert s["n_edges"] - s["n_nodes"] + s["n_components"] == 1
    assert s["n_components"] == 1 and s["coverage"] == 1.0
    single = mapper_graph(
        X, {**CIRCLE, "overlap": 0.3, "clusterer": "single", "distance_threshold": 0.15}
    )
    assert betti1(single) == 1
    planar = mapper_graph(X, {**CIRCLE, "overlap": 0.3, "lens_dim": 2, "n_intervals": 5})
    assert betti1(planar) == 1


def test_zero_overlap_cover_elements_share_no_points():
    X = noisy_circle()
    lens = X[:, :1]  # any 1-D lens
    elements = cover_elements(lens, 8, 0.0)
    for (_, rows_a), (_, rows_b) in zip(elements, elements[1:], strict=False):
        assert not set(rows_a) & set(rows_b)
    assert sum(len(r) for _, r in elements) == len(X)  # a partition: every point exactly once
    graph = mapper_graph(X, {**CIRCLE, "overlap": 0.0})
    assert graph.summary()["n_edges"] == 0
    # and with overlap the consecutive elements do share points
    overlapping = cover_elements(lens, 8, 0.3)
    assert all(set(a[1]) & set(b[1]) for a, b in zip(overlapping, overlapping[1:], strict=False))


def test_interval_overlap_is_the_configured_fraction():
    bounds = interval_bounds(-2.0, 6.0, 5, 0.25)
    length = bounds[0, 1] - bounds[0, 0]
    assert bounds[0, 0] == -2.0 and bounds[-1, 1] == 6.0
    shared = bounds[:-1, 1] - bounds[1:, 0]
    np.testing.assert_allclose(shared / length, 0.25)
    np.testing.assert_allclose(bounds[:, 1] - bounds[:, 0], length)
    with pytest.raises(ConfigError, match="overlap"):
        interval_bounds(0, 1, 4, 1.0)
    with pytest.raises(ConfigError, match="n_intervals"):
        interval_bounds(0, 1, 0, 0.2)
    with pytest.raises(ConfigError, match="clusterer"):
        check_params({"clusterer": "kmeans"})
    with pytest.raises(ConfigError, match="eps"):
        mapper_graph(noisy_circle(50), {"eps": "wide"})


def _sparse_codes(n: int = 400, f: int = 60, k: int = 4, seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    cols = np.argpartition(rng.random((n, f)), k, axis=1)[:, :k]
    cols.sort(axis=1)
    vals = rng.exponential(1.0, n * k).astype(np.float32)
    return sp.csr_matrix((vals, cols.ravel(), np.arange(0, n * k + 1, k)), shape=(n, f))


def test_permutation_baseline_keeps_column_marginals():
    X = _sparse_codes()
    Xb = permute_columns(X, seed=1)
    assert Xb.shape == X.shape and sp.issparse(Xb)
    for j in range(X.shape[1]):
        a, b = X[:, j].toarray().ravel(), Xb[:, j].toarray().ravel()
        assert np.array_equal(np.sort(a), np.sort(b))
    assert (Xb != X).nnz > 0
    dense = np.arange(12.0).reshape(4, 3)
    np.testing.assert_array_equal(np.sort(permute_columns(dense, 0), axis=0), dense)


def test_sparse_codes_graph_and_baseline_json():
    X = _sparse_codes()
    pos = np.tile(np.arange(20), 20)
    params = {
        "n_intervals": 5,
        "overlap": 0.3,
        "cluster_dims": 3,
        "min_samples": 3,
        "max_points": 300,
        "seed": 0,
    }
    graph, base = mapper_with_baseline(X, params, positions=pos, seq_ids=pos // 20)
    assert graph["n_points"] == base["n_points"] == 300
    assert len(graph["points"]["row"]) == 300
    for g in (graph, base):
        assert g["nodes"] and {"pos", "norm", "l0", "lens0"} <= set(g["nodes"][0]["stats"])
        for e in g["edges"]:
            a = set(g["nodes"][e["source"]]["members"])
            assert len(a & set(g["nodes"][e["target"]]["members"])) == e["shared"] > 0
    assert base["baseline"].startswith("permute")
    again, _ = mapper_with_baseline(X, params, positions=pos, seq_ids=pos // 20)
    assert json.dumps(again, sort_keys=True) == json.dumps(graph, sort_keys=True)
    page = build_mapper_page(graph, base, analysis={"name": "mp", "color_by": "l0"})
    assert 'src="plotly.min.js"' in page and "Baseline: permute" in page


class _Names(list):
    def __init__(self, **items):
        super().__init__(items.values())
        self.__dict__.update(items)


def test_mapper_script(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stdout", sys.stdout)
    monkeypatch.setattr(sys, "stderr", sys.stderr)
    X = _sparse_codes(200, 30, 3, seed=2)
    X.sort_indices()
    codes = Codes(
        np.repeat(np.arange(10), 20).astype(np.int32),
        np.tile(np.arange(20), 10).astype(np.int32),
        X.indptr.astype(np.int64),
        X.indices.astype(np.int32),
        X.data.astype(np.float16),
        30,
    )
    cdir = tmp_path / "codes"
    cdir.mkdir()
    write_code_shard(cdir / "part-00000.parquet", codes)
    manifest = write_manifest(
        cdir,
        {
            "format": CODES_FORMAT,
            "d_sae": 30,
            "parts": {"codes": "."},
            "shards": ["part-00000.parquet"],
        },
    )
    out = tmp_path / "results"
    smk = type("Snakemake", (), {})()
    smk.input = _Names(points=str(manifest))
    smk.output = _Names(
        graph=str(out / "geometry/mp/graph.json"),
        baseline=str(out / "geometry/mp/baseline.json"),
        page=str(out / "reports/geometry-mp.html"),
    )
    smk.params = _Names(
        analysis={
            "type": "mapper",
            "name": "mp",
            "model": "m",
            "dataset": "d",
            "sae": "s",
            "n_intervals": 4,
            "overlap": 0.25,
            "min_samples": 3,
        },
        runtime={"device": "cpu", "seed": 0},
    )
    smk.log = _Names(log=str(tmp_path / "logs/mp.log"))
    runpy.run_path(
        str(SCRIPTS / "mapper_graph.py"), init_globals={"snakemake": smk}, run_name="__main__"
    )
    graph = json.loads((out / "geometry/mp/graph.json").read_text())
    base = json.loads((out / "geometry/mp/baseline.json").read_text())
    assert graph["format"] == "saeflow.mapper/1" and graph["params"]["overlap"] == 0.25
    assert graph["n_points"] == 200 and base["n_points"] == 200
    assert (out / "reports/plotly.min.js").exists()


def test_role_statistics_from_tokens(tmp_path):
    import pandas as pd

    path = tmp_path / "tokens.parquet"
    pd.DataFrame(
        {"seq_id": [5, 2], "roles": [np.array([1, 2, 2], np.int8), np.array([0, 2], np.int8)]}
    ).to_parquet(path)
    stats = role_statistics(path, np.array([2, 2, 5, 5, 9, 5]), np.array([0, 1, 0, 2, 0, 7]))
    assert stats["model_role"].tolist() == [0.0, 1.0, 0.0, 1.0, 0.0, 0.0]
