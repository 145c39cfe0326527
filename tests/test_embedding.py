"""UMAP stage: notebook position sampling, hover escaping, row gathering, one deterministic fit."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch as th
from test_diffing import write_codes_dir, write_tokens

from saeflow.embedding import (
    _positions_numpy,
    approximate_knn,
    densify_if_dense,
    exact_knn,
    gather_rows,
    hover_text,
    knn_graph,
    run_umap,
    sample_positions,
)
from saeflow.errors import ConfigError, DataError
from saeflow.io import read_json

GRID = [
    (min_p, max_p, num_p)
    for min_p in (0, 1, 2, 3, 10)
    for max_p in (min_p, 9, 49, 99, 499, 2047)
    for num_p in (1, 2, 7, 20, 30, 100)
    if max_p >= min_p
]


def notebook_positions(min_p: int, max_p: int, num_p: int, do_log_scale: bool) -> list[int]:
    """canrager/dynamic_representations exp/pred_umap.py, verbatim (min_p >= 1 for log)."""
    if do_log_scale:
        log_start = th.log10(th.tensor(min_p, dtype=th.float))
        log_end = th.log10(th.tensor(max_p, dtype=th.float))
        log_steps = th.linspace(log_start, log_end, num_p)
        ps = th.round(10**log_steps).int()
    else:
        ps = th.linspace(min_p, max_p, num_p, dtype=th.int)
    return ps.tolist()


def geometry_positions(seq_len: int, num_p: int) -> list[int]:
    """exp/geometry_population.py's log grid over a sequence of seq_len tokens, verbatim."""
    log_start = th.log10(th.tensor(0, dtype=th.float) + 1)
    log_end = th.log10(th.tensor(seq_len - 1, dtype=th.float) + 1)
    log_steps = th.linspace(log_start, log_end, num_p)
    return th.round(10**log_steps - 1).long().clamp(0, seq_len - 1).tolist()


def test_positions_equal_the_notebook_formulas():
    for min_p, max_p, num_p in GRID:
        linear = sample_positions(min_p, max_p, num_p, False)
        assert linear.tolist() == notebook_positions(min_p, max_p, num_p, False)
        assert _positions_numpy(min_p, max_p, num_p, False).tolist() == linear.tolist()
        log = sample_positions(min_p, max_p, num_p, True).tolist()
        if min_p >= 1:
            assert log == notebook_positions(min_p, max_p, num_p, True)
        else:
            assert log == geometry_positions(max_p + 1, num_p)
    # not deduplicated, like the notebooks: a short log range repeats positions
    assert sample_positions(1, 10, 8, True).tolist() == [1, 1, 2, 3, 4, 5, 7, 10]
    with pytest.raises(ConfigError, match="min_p"):
        sample_positions(5, 4, 3, False)


def test_hover_escapes_dataset_text_before_markup():
    toks = ["<bos>", "<start_of_turn>", "a<script>x</script>", " &amp;", "\n", "end"]
    text = hover_text(toks, 3, 2, seq_id=7)
    assert text.startswith("Sequence: 7<br>Position: 3<br>")
    assert "a&lt;script&gt;x&lt;/script&gt;" in text and "<script>" not in text
    assert "<b> &amp;amp;</b>" in text  # current token bold, its '&' escaped
    assert "<i>&lt;start_of_turn&gt;</i>" in text  # turn markers highlighted
    assert "bos" not in text  # outside the 2-token window
    assert hover_text(toks, 5, 10, 0).endswith("\u21b5<b>end</b>")
    long = hover_text([str(i) for i in range(40)], 39, 39, 0)
    assert long.count("<br>") == 2 + 2  # header lines + one break per 15 tokens


def test_gather_rows_order_repeats_and_missing():
    first = sp.csr_matrix(np.eye(3, dtype=np.float32))
    second = sp.csr_matrix(np.full((1, 3), 5.0, np.float32))

    def blocks():
        yield np.array([0, 0, 1]), np.array([0, 1, 0]), lambda rows: first[rows]
        yield np.array([1]), np.array([1]), lambda rows: second[rows]

    rows = gather_rows(blocks(), np.array([1, 0, 1, 0]), np.array([1, 1, 1, 0]))
    assert rows.toarray().tolist() == [[5, 5, 5], [0, 1, 0], [5, 5, 5], [1, 0, 0]]
    with pytest.raises(DataError, match="seq_id 2, pos 0"):
        gather_rows(blocks(), np.array([2]), np.array([0]))

    def doubled():
        yield from blocks()
        yield from blocks()

    with pytest.raises(DataError, match="occurs twice"):
        gather_rows(doubled(), np.array([0]), np.array([1]))


def test_umap_stage_is_deterministic(
    tmp_path: Path, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
):
    """The file's only UMAP test: two runs of the stage (one numba compile) give the same bytes."""
    rng = np.random.default_rng(0)
    seqs = {i: [f"t{i}_{p}" for p in range(12)] for i in range(7)}
    seqs[3] = ["<b>short</b>"] * 5  # too short for max_p: left out
    seqs[0][4] = "<img src=x onerror=alert(1)>"
    tokens = write_tokens(tmp_path / "tokens.parquet", seqs)
    rows = {}
    for s, toks in seqs.items():
        for p in range(len(toks)):
            row = np.zeros(32, np.float32)
            row[rng.choice(32, 4, replace=False)] = rng.random(4) + 0.1
            rows[(s, p)] = row
    codes = write_codes_dir(tmp_path / "codes", rows, 32)
    analysis = {
        "type": "umap",
        "name": "u",
        "model": "chat",
        "dataset": "d",
        "sae": "s",
        "min_p": 0,
        "max_p": 9,
        "num_p": 5,
        "log_scale": False,
        "n_components": 3,
        "n_neighbors": 5,
        "n_epochs": 10,
        "hover_window": 3,
    }
    try:
        cache = request.config.cache.mkdir("saeflow-numba")
    except AttributeError:  # -p no:cacheprovider
        cache = tmp_path / "numba"
    outs = []
    caplog.set_level(logging.INFO, logger="saeflow.embedding")
    for run in ("a", "b"):
        emb, res = tmp_path / run / "embedding.parquet", tmp_path / run / "results.json"
        info = run_umap(analysis, codes, tokens, emb, res, numba_cache_dir=cache)
        outs.append((emb.read_bytes(), res.read_bytes()))
    assert outs[0] == outs[1]
    assert "kNN graph exact (scikit-learn brute force) of 30 sparse points" in caplog.text
    # dense codes go over dense; above the exact limit (forced here) the graph is approximate
    caplog.clear()
    dense_rows = {key: rng.random(32).astype(np.float32) + 0.1 for key in rows}
    dense = write_codes_dir(tmp_path / "dense", dense_rows, 32)
    approx = {**analysis, "knn": "approximate"}
    run_umap(approx, dense, tokens, tmp_path / "c.parquet", tmp_path / "c.json")
    assert (
        "kNN graph approximate (full-space candidates, exact re-ranking) of 30 dense" in caplog.text
    )
    assert info == {"n_sequences": 6, "n_positions": 5, "n_points": 30, "dims": 32}

    import pandas as pd

    df = pd.read_parquet(tmp_path / "a" / "embedding.parquet")
    assert list(df.columns) == ["seq_id", "pos", "x", "y", "z", "role", "hover"]
    assert df["seq_id"].tolist() == [s for s in (0, 1, 2, 4, 5, 6) for _ in range(5)]
    assert df["pos"].tolist() == [0, 2, 4, 6, 9] * 6
    assert "&lt;img src=x onerror=alert(1)&gt;" in df["hover"].iloc[2]
    assert "<img" not in "".join(df["hover"])
    res = read_json(tmp_path / "a" / "results.json")
    assert np.array(res["embedding"]).shape == (6, 5, 3)
    assert res["pos_indices"] == [0, 2, 4, 6, 9]
    assert np.array(res["pos_labels"]).shape == (6, 5)
    assert res["hover_texts"] == df["hover"].tolist()
    assert res["config"]["act_path"] == "codes" and res["config"]["do_log_scale"] is False
    np.testing.assert_allclose(np.array(res["embedding"]).reshape(30, 3), df[["x", "y", "z"]])


def _clustered(n: int, d: int, seed: int) -> np.ndarray:
    """Points near a few low-dimensional patches (codes have a fast-decaying spectrum)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((12, d)).astype(np.float32) * 3
    basis = rng.standard_normal((6, d)).astype(np.float32)
    local = rng.standard_normal((n, 6)).astype(np.float32) @ basis
    noise = 0.05 * rng.standard_normal((n, d)).astype(np.float32)
    return np.maximum(centres[rng.integers(0, 12, n)] + local + noise, 0)


def test_approximate_knn_recall_and_true_distances():
    X = _clustered(1500, 600, seed=1)
    idx, dst = approximate_knn(X, 10, seed=0, dims=32)
    ref_idx, ref_dst = exact_knn(X, 10, "euclidean")
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(idx, ref_idx, strict=True)])
    assert recall > 0.9
    assert (idx[:, 0] == np.arange(len(X))).all() and (dst[:, 0] == 0).all()
    true = np.linalg.norm(X[:, None, :] - X[idx], axis=2)
    np.testing.assert_allclose(dst, true, rtol=1e-3, atol=1e-3)
    assert (np.diff(dst, axis=1) >= -1e-4).all()  # sorted by distance
    again = approximate_knn(X, 10, seed=0, dims=32)
    assert np.array_equal(again[0], idx) and np.array_equal(again[1], dst)


def test_knn_switches_at_the_documented_size(monkeypatch):
    from saeflow import embedding

    X = _clustered(300, 40, seed=2)
    (_, _), how = knn_graph(X, 5, "euclidean")
    assert how.startswith("exact")
    monkeypatch.setattr(embedding, "EXACT_KNN_MAX_POINTS", 299)
    (idx, _), how = knn_graph(X, 5, "euclidean")
    assert how == "approximate (full-space candidates, exact re-ranking)"
    assert knn_graph(X, 5, "euclidean", method="exact")[1].startswith("exact")
    with pytest.raises(ConfigError, match="knn"):
        knn_graph(X, 5, "euclidean", method="fast")


def test_dense_codes_are_handed_over_dense():
    dense = sp.random(50, 40, density=0.6, format="csr", random_state=0, dtype=np.float32)
    sparse = sp.random(50, 40, density=0.05, format="csr", random_state=0, dtype=np.float32)
    out = densify_if_dense(dense)
    assert isinstance(out, np.ndarray) and np.array_equal(out, dense.toarray())
    assert sp.issparse(densify_if_dense(sparse))
