"""Similarity: centred cosine matrices equal a plain numpy computation; stage output layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from test_diffing import write_codes_dir, write_tokens

from saeflow.errors import ConfigError, DataError
from saeflow.io import read_json
from saeflow.similarity import cosine_similarity_matrix, run_similarity


def reference(x_LD: np.ndarray, center: bool = True) -> np.ndarray:
    """The notebook: centre on the sequence's own mean, x / (||x|| + 1e-8), then x x^T."""
    if center:
        x_LD = x_LD - x_LD.mean(axis=0, keepdims=True)
    x_norm = x_LD / (np.linalg.norm(x_LD, axis=-1, keepdims=True) + 1e-8)
    return x_norm @ x_norm.T


def codes_matrix(seed: int, length: int = 9, width: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((length, width)) * (rng.random((length, width)) < 0.2)).astype(np.float32)


def test_sparse_and_dense_equal_numpy():
    X = codes_matrix(0)
    X[2] = 0.0  # an all-zero row
    for center in (True, False):
        want = reference(X.astype(np.float64), center)
        np.testing.assert_allclose(cosine_similarity_matrix(X, center), want, atol=1e-9)
        got = cosine_similarity_matrix(sp.csr_matrix(X), center)
        np.testing.assert_allclose(got, want, atol=1e-9)


def test_similarity_stage(tmp_path: Path):
    lengths = {0: 9, 1: 6, 5: 3}
    seqs = {s: [f"<{s}:{p}>" for p in range(n)] for s, n in lengths.items()}
    tokens = write_tokens(tmp_path / "tokens.parquet", seqs)
    mats = {s: codes_matrix(s, n) for s, n in lengths.items()}
    rows = {(s, p): mats[s][p] for s, n in lengths.items() for p in range(n)}
    codes = write_codes_dir(tmp_path / "codes", rows, 40)
    out = tmp_path / "similarity" / "sim" / "manifest.json"
    analysis = {"type": "similarity", "name": "sim", "sequences": [1, 0], "start": 1}
    manifest = run_similarity(analysis, codes, tokens, out)
    assert read_json(out) == manifest
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "0.parquet",
        "1.parquet",
        "manifest.json",
    ]
    for s in (0, 1):
        df = pd.read_parquet(out.parent / f"{s}.parquet")
        assert list(df.columns) == [str(i) for i in range(lengths[s])]
        got = df.to_numpy(np.float64)
        assert np.isnan(got[0]).all() and np.isnan(got[:, 0]).all()  # before `start`
        stored = mats[s].astype(np.float16).astype(np.float64)  # codes are stored as float16
        np.testing.assert_allclose(got[1:, 1:], reference(stored[1:]), atol=1e-6)
    assert manifest["files"]["1"] == {"file": "1.parquet", "length": 6, "start": 1}

    with pytest.raises(DataError, match="seq_id 9"):
        run_similarity({"name": "x", "sequences": [9]}, codes, tokens, out)
    with pytest.raises(ConfigError, match="sequences"):
        run_similarity({"name": "x", "sequences": []}, codes, tokens, out)
    with pytest.raises(ConfigError, match="temporal"):
        run_similarity({"name": "x", "sequences": [0], "codes": "pred"}, codes, tokens, out)


def test_similarity_of_activations(tmp_path: Path):
    """`codes: activations` reads an activations directory (cache_activations layout)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from saeflow.io import write_manifest

    acts = np.random.default_rng(3).normal(size=(5, 6)).astype(np.float32)
    tokens = write_tokens(tmp_path / "tokens.parquet", {4: [str(p) for p in range(5)]})
    layer = tmp_path / "acts" / "layer_1"
    layer.mkdir(parents=True)
    binary = pa.FixedSizeBinaryArray.from_buffers(pa.binary(24), 5, [None, pa.py_buffer(acts)])
    table = {"seq_id": pa.array([4] * 5, pa.int32()), "pos": pa.array(range(5), pa.int32())}
    pq.write_table(pa.table({**table, "act": binary}), layer / "part-00000.parquet")
    shards = [{"file": "part-00000.parquet"}]
    write_manifest(layer, {"format": "parquet", "dtype": "float32", "d_model": 6, "shards": shards})
    out = tmp_path / "sim" / "manifest.json"
    analysis = {"name": "a", "sequences": [4], "codes": "activations"}
    run_similarity(analysis, layer / "manifest.json", tokens, out)
    got = pd.read_parquet(out.parent / "4.parquet").to_numpy(np.float64)
    np.testing.assert_allclose(got, reference(acts.astype(np.float64)), atol=1e-6)
