"""Representation-similarity measures: closed forms; numbers against scipy/sklearn/naive numpy."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.linalg import subspace_angles
from scipy.spatial import procrustes as scipy_procrustes

from saeflow.compare import measures as ms


def _side(X, pca_dim=8, knn_k=5):
    return ms.prepare_side(X, pca_dim=pca_dim, svcca_variance=0.99, max_dim=64, knn_k=knn_k)


def _naive_cka(X, Y):
    n = X.shape[0]
    H = np.eye(n) - 1.0 / n
    K, L = X @ X.T, Y @ Y.T

    def hsic(a, b):
        return np.trace(a @ H @ b @ H)

    return hsic(K, L) / np.sqrt(hsic(K, K) * hsic(L, L))


def _naive_hsic_u(K, L):
    n = K.shape[0]
    K, L = K.copy(), L.copy()
    np.fill_diagonal(K, 0)
    np.fill_diagonal(L, 0)
    one = np.ones(n)
    return (
        np.trace(K @ L)
        + (one @ K @ one) * (one @ L @ one) / ((n - 1) * (n - 2))
        - 2.0 / (n - 2) * (one @ K @ L @ one)
    ) / (n * (n - 3))


def _naive_debiased(X, Y):
    K, L = X @ X.T, Y @ Y.T
    return _naive_hsic_u(K, L) / np.sqrt(_naive_hsic_u(K, K) * _naive_hsic_u(L, L))


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    Z = rng.normal(size=(200, 4))
    X = Z @ rng.normal(size=(4, 12)) + 0.5 * rng.normal(size=(200, 12))
    Y = Z @ rng.normal(size=(4, 9)) + 0.5 * rng.normal(size=(200, 9))
    return X, Y


def test_identical_inputs_give_one(data):
    X, _ = data
    a = _side(X)
    out = ms.all_measures(a, _side(X.copy()))
    for m in ms.SIMILARITIES:
        assert out[m] == pytest.approx(1.0, abs=1e-9), m
    assert out["procrustes"] == pytest.approx(0.0, abs=1e-6)


def test_rotation_leaves_cka_cca_unchanged(data):
    X, Y = data
    rng = np.random.default_rng(1)
    Q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    base = ms.all_measures(_side(X), _side(Y))
    rot = ms.all_measures(_side(X @ Q), _side(Y))
    for m in ("cka", "cka_debiased", "cca", "svcca", "mknn"):
        assert rot[m] == pytest.approx(base[m], abs=1e-9), m
    # rotation of X against itself: Procrustes finds the map back
    assert ms.all_measures(_side(X @ Q), _side(X))["procrustes"] == pytest.approx(0, abs=1e-6)


def test_independent_noise_sits_at_baseline():
    rng = np.random.default_rng(2)
    X, Y = rng.normal(size=(300, 10)), rng.normal(size=(300, 8))
    res = ms.compare_with_permutations(_side(X), _side(Y), n_perm=30, rng=rng)
    for m, r in res.items():
        assert r["p"] > 0.01, (m, r)
        assert r["z"] is None or abs(r["z"]) < 4, (m, r)
    assert abs(res["cka_debiased"]["value"]) < 0.05
    related = ms.compare_with_permutations(
        _side(X), _side(X[:, :6] + 0.1 * Y[:, :6]), n_perm=30, rng=rng
    )
    for m in ms.MEASURES:
        assert related[m]["p"] == pytest.approx(1 / 31), m


def test_cka_against_naive_gram(data):
    X, Y = data
    Xc, Yc = ms.prepare(X), ms.prepare(Y)
    assert ms.linear_cka(Xc, Yc) == pytest.approx(_naive_cka(Xc, Yc), rel=1e-9)
    assert ms.debiased_cka(Xc, Yc) == pytest.approx(_naive_debiased(Xc, Yc), rel=1e-9)
    # raw (uncentred) data through `prepare` gives the same numbers
    assert ms.linear_cka(ms.prepare(X + 5), ms.prepare(Y - 3)) == pytest.approx(
        ms.linear_cka(Xc, Yc), rel=1e-12
    )


def test_cca_against_scipy_and_sklearn(data):
    X, Y = data
    Xc, Yc = ms.prepare(X), ms.prepare(Y)
    qx, qy = ms.pca_basis(Xc, dim=6), ms.pca_basis(Yc, dim=6)
    ours = ms.canonical_correlations(qx, qy)
    ref = np.sort(np.cos(subspace_angles(qx, qy)))[::-1]
    np.testing.assert_allclose(ours, ref, atol=1e-9)
    # full-rank CCA's first canonical correlation against sklearn's CCA (iterative NIPALS)
    from sklearn.cross_decomposition import CCA

    full = ms.canonical_correlations(ms.pca_basis(Xc), ms.pca_basis(Yc))
    xs, ys = CCA(n_components=1, max_iter=5000, tol=1e-12).fit(X, Y).transform(X, Y)
    assert full[0] == pytest.approx(abs(np.corrcoef(xs[:, 0], ys[:, 0])[0, 1]), abs=1e-4)


def test_procrustes_against_scipy(data):
    X, Y = data
    Y12 = np.hstack([Y, np.random.default_rng(3).normal(size=(200, 3))])
    _, _, disparity = scipy_procrustes(X, Y12)
    d = ms.procrustes_distance(ms.prepare(X), ms.prepare(Y12))
    # scipy: disparity = 1 - ||X^T Y||_*^2 ; ours: d^2 = 2 - 2 ||X^T Y||_*
    assert d**2 == pytest.approx(2 - 2 * np.sqrt(1 - disparity), abs=1e-9)


def test_mknn_against_sklearn(data):
    from sklearn.neighbors import NearestNeighbors

    X, Y = data
    Xc, Yc = ms.prepare(X), ms.prepare(Y)
    k = 7

    def nn(A):
        idx = NearestNeighbors(n_neighbors=k + 1, metric="cosine").fit(A).kneighbors(A)[1]
        return [set(r[r != i][:k]) for i, r in enumerate(idx)]

    ref = np.mean([len(a & b) / k for a, b in zip(nn(Xc), nn(Yc), strict=True)])
    assert ms.mutual_knn(ms.knn_sets(Xc, k), ms.knn_sets(Yc, k)) == pytest.approx(ref)
    # the permuted form equals the measure on explicitly permuted rows
    perm = np.random.default_rng(4).permutation(len(Y))
    direct = ms.mutual_knn(ms.knn_sets(Xc, k), ms.knn_sets(Yc[perm], k))
    assert ms.mutual_knn(ms.knn_sets(Xc, k), ms.knn_sets(Yc, k), perm) == pytest.approx(direct)


def test_zero_variance_columns_dropped_no_nan(data):
    X, Y = data
    Xd = np.hstack([X, np.zeros((200, 3)), np.full((200, 1), 7.0)])
    assert ms.prepare(Xd).shape[1] == 12
    out = ms.all_measures(_side(Xd), _side(Y))
    assert all(np.isfinite(v) for v in out.values())
    empty = ms.all_measures(_side(np.zeros((200, 4))), _side(Y))
    assert all(np.isfinite(v) for v in empty.values())


def test_svcca_keeps_variance_components():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(100, 3)) @ rng.normal(size=(3, 10))  # rank 3
    assert ms.pca_basis(ms.prepare(X), dim=50, variance=0.99).shape[1] <= 3


def test_subspace_null_from_random_columns():
    rng = np.random.default_rng(6)
    Z = rng.normal(size=(300, 3))
    X = np.hstack([Z, rng.normal(size=(300, 30))])
    Y = np.hstack([Z @ rng.normal(size=(3, 3)), rng.normal(size=(300, 30))])
    res = ms.compare_subspaces(
        X, Y, np.arange(3), np.arange(3), n_random=20, rng=rng, side_fn=lambda A: _side(A, 3)
    )
    assert res["cca"]["value"] > 0.99
    assert res["cca"]["p"] == pytest.approx(1 / 21)


def test_gram_path_equals_feature_path():
    import dataclasses

    rng = np.random.default_rng(7)
    X, Y = rng.normal(size=(60, 40)), rng.normal(size=(60, 30))
    Y[:, :5] += X[:, :5]
    a, b = _side(X), _side(Y)
    assert a.K is not None and b.K is not None
    a2 = dataclasses.replace(a, K=None, knn=ms.knn_sets(a.X, 5))
    b2 = dataclasses.replace(b, K=None, knn=ms.knn_sets(b.X, 5))
    perm = rng.permutation(60)
    for p in (None, perm):
        one, two = ms.all_measures(a, b, p), ms.all_measures(a2, b2, p)
        for m in ms.MEASURES:
            assert one[m] == pytest.approx(two[m], abs=1e-9), m
    Xc, Yc = ms.prepare(X), ms.prepare(Y)
    assert ms.all_measures(a, b)["cka_debiased"] == pytest.approx(_naive_debiased(Xc, Yc))
    assert ms.all_measures(a, b)["cka"] == pytest.approx(_naive_cka(Xc, Yc))


def _codes_dir(path, dense, seq, pos):
    import scipy.sparse as sp

    from saeflow.codes import CODES_FORMAT, Codes, write_code_shard
    from saeflow.io import write_manifest

    csr = sp.csr_matrix(dense.astype(np.float32))
    codes = Codes(
        np.asarray(seq, np.int32),
        np.asarray(pos, np.int32),
        csr.indptr.astype(np.int64),
        csr.indices.astype(np.int32),
        csr.data.astype(np.float16),
        dense.shape[1],
    )
    path.mkdir(parents=True)
    write_code_shard(path / "part-00000.parquet", codes)
    write_manifest(
        path,
        {
            "format": CODES_FORMAT,
            "d_sae": dense.shape[1],
            "parts": {"codes": "."},
            "shards": ["part-00000.parquet"],
        },
    )
    return str(path)


def test_run_rep_similarity_on_code_folders(tmp_path):
    import json
    import sys
    from pathlib import Path

    import pandas as pd

    from saeflow.compare.repsim import run_rep_similarity
    from saeflow.errors import DataError

    sys.path.insert(0, str(Path(__file__).parent))
    from _fixtures_models import write_tokens

    rng = np.random.default_rng(8)
    ids = [list(rng.integers(0, 5, size=20)) for _ in range(10)]
    tok_a = write_tokens(tmp_path / "ta.parquet", ids)
    tok_b = write_tokens(tmp_path / "tb.parquet", ids)
    seq = np.repeat(np.arange(10), 20)
    pos = np.tile(np.arange(20), 10)
    word = np.concatenate(ids) == 3  # token "w3" is the keyword
    A = np.abs(rng.normal(size=(200, 12))) * (rng.random((200, 12)) < 0.3)
    A[:, 0] = word * 2.0
    B = np.hstack([A[:, [1, 2, 0]] * 1.5, np.zeros((200, 2))])  # B reorders A, two dead features
    specs = [
        {
            "model": "m1",
            "layer": 0,
            "sae": "a",
            "path": _codes_dir(tmp_path / "a", A, seq, pos),
            "tokens": str(tok_a),
        },
        {
            "model": "m2",
            "layer": 0,
            "sae": "b",
            "path": _codes_dir(tmp_path / "b", B, seq, pos),
            "tokens": str(tok_b),
        },
    ]
    analysis = {
        "name": "t",
        "type": "rep_similarity",
        "n_null": 5,
        "max_tokens": None,
        "skip_pos0": True,
        "pca_dim": 3,
        "svcca_variance": 0.99,
        "max_dim": 8,
        "knn_k": 4,
        "keywords": {"words": ["W3"], "each": False, "top_n": 3, "min_frac": 0.5},
    }
    out = tmp_path / "out"
    summary = run_rep_similarity(
        [dict(s) for s in specs],
        analysis=analysis,
        seed=0,
        out_measures=out / "m.parquet",
        out_summary=out / "s.json",
        out_page=out / "repsim-t.html",
    )
    assert summary["n_tokens"] == 190  # position 0 left out
    assert summary["dims_dropped"]["m2@0:b"] == 2
    kw = {k["source"]: k["features"] for k in summary["keywords"]}
    assert kw == {"m1@0:a": [0], "m2@0:b": [2]}
    table = pd.read_parquet(out / "m.parquet")
    assert table.notna().all().all()
    row = table[(table["subspace"] == "W3") & (table["measure"] == "cka")]
    assert row["value"].iloc[0] == pytest.approx(1.0)
    assert json.loads((out / "s.json").read_text())["labels"] == ["m1@0:a", "m2@0:b"]
    assert "Representation similarity" in (out / "repsim-t.html").read_text()
    # different token ids in the two models: refused before anything is written
    write_tokens(tok_b, [[(t + 1) % 5 for t in row] for row in ids])
    with pytest.raises(DataError, match="different token ids"):
        run_rep_similarity(
            [dict(s) for s in specs],
            analysis=analysis,
            seed=0,
            out_measures=tmp_path / "x.parquet",
            out_summary=tmp_path / "x.json",
        )
    assert not (tmp_path / "x.parquet").exists()


def test_pca_wider_than_tall_matches_svd():
    rng = np.random.default_rng(9)
    X = ms.prepare(rng.normal(size=(30, 80)))
    U, S = ms._pca(X)
    _, S_ref, _ = np.linalg.svd(X, full_matrices=False)
    np.testing.assert_allclose(S, S_ref[: len(S)], rtol=1e-8)
    np.testing.assert_allclose(np.abs(U.T @ U), np.eye(len(S)), atol=1e-8)
