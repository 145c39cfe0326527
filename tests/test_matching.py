"""Cross-SAE feature matching: exact recovery of a permutation, dead features, bounded memory."""

from __future__ import annotations

import json
import runpy
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
import torch

from saeflow.codes import CODES_FORMAT, Codes, write_code_shard
from saeflow.errors import ConfigError, DataError
from saeflow.geometry.matching import (
    align_codes,
    check_same_tokens,
    column_moments,
    match_features,
    match_summary,
    matches_table,
)
from saeflow.io import write_manifest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny tensors: OpenMP threads only add barrier cost on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_codes(n: int, f: int, k: int, seed: int) -> sp.csr_matrix:
    """TopK-like codes: k distinct active features per token with positive values."""
    rng = np.random.default_rng(seed)
    cols = np.argpartition(rng.random((n, f)), k, axis=1)[:, :k]
    cols.sort(axis=1)
    vals = rng.exponential(1.0, n * k).astype(np.float32) + 0.1
    return sp.csr_matrix((vals, cols.ravel(), np.arange(0, n * k + 1, k)), shape=(n, f))


def permuted_with_noise(A: sp.csr_matrix, perm: np.ndarray, seed: int) -> sp.csr_matrix:
    """B[:, j] = A[:, perm[j]] with multiplicative noise on the non-zeros."""
    rng = np.random.default_rng(seed)
    B = sp.csr_matrix(A[:, perm])
    B.data = B.data * rng.uniform(0.8, 1.2, B.nnz).astype(np.float32)
    return B


def test_permutation_is_matched_exactly_and_dead_gives_no_nan():
    n, f = 3000, 40
    A = random_codes(n, f, 6, seed=0).tolil()
    A[:, 3] = 0  # dead feature
    A = sp.csr_matrix(A)
    perm = np.random.default_rng(1).permutation(f)
    B = permuted_with_noise(A, perm, seed=2)
    # an extra dead column in B
    B = sp.hstack([B, sp.csr_matrix((n, 1), dtype=np.float32)]).tocsr()
    res = match_features(A, B, top_k=3, batch_size=7)
    inv = np.argsort(perm)  # a-feature i sits at B column inv[i]
    live_a = np.arange(f) != 3
    assert res.dead_a.tolist() == (~live_a).tolist()
    assert res.dead_b.tolist() == [perm[j] == 3 for j in range(f)] + [True]
    assert np.array_equal(res.a_to_b_ids[live_a, 0], inv[live_a])
    live_b = ~res.dead_b
    assert np.array_equal(res.b_to_a_ids[live_b, 0], perm[live_b[:f]])
    assert (res.a_to_b_corr[live_a, 0] > 0.9).all()
    assert res.mutual_a()[live_a].all() and not res.mutual_a()[3]
    # dead: no match ids, corr 0, no NaN anywhere; dead never chosen as a match
    assert (res.a_to_b_ids[3] == -1).all() and (res.a_to_b_corr[3] == 0).all()
    assert (res.b_to_a_ids[f] == -1).all()
    for arr in (res.a_to_b_corr, res.b_to_a_corr):
        assert np.isfinite(arr).all()
    assert inv[3] not in res.a_to_b_ids[live_a] and f not in res.a_to_b_ids
    assert 3 not in res.b_to_a_ids

    W_a = np.random.default_rng(3).standard_normal((f, 8)).astype(np.float32)
    W_b = np.concatenate([W_a[perm], np.zeros((1, 8), np.float32)])
    table = matches_table(res, sae_a="small", sae_b="big", W_dec_a=W_a, W_dec_b=W_b)
    assert not table[["corr", "decoder_cos"]].isna().any().any()
    mutual = table[table["mutual"]]
    assert len(mutual) == 2 * (f - 1)  # both directions, every live pair
    np.testing.assert_allclose(mutual["decoder_cos"], 1.0, rtol=1e-5)
    assert 3 not in table.query("direction == 'a_to_b'")["source_feature"].tolist()
    summary = match_summary(res, table)
    assert summary["dead_a"] == 1 and summary["dead_b"] == 2 and summary["n_mutual"] == f - 1


def test_directions_differ_and_split_is_counted():
    """b0 = a0 exactly, b1 = a0 + noise: both b's pick a0, a0 picks only b0 (not symmetric)."""
    n = 2000
    A = random_codes(n, 5, 2, seed=4)
    a0 = A[:, [0]].toarray().ravel()
    noise = np.random.default_rng(5).normal(0, 0.3, n) * (a0 > 0)
    B = sp.csr_matrix(np.stack([a0, a0 + noise, A[:, 1].toarray().ravel()], axis=1))
    res = match_features(A, B, top_k=2, batch_size=2)
    assert res.a_to_b_ids[0, 0] == 0
    assert res.b_to_a_ids[:2, 0].tolist() == [0, 0]
    table = matches_table(res)
    flags = table[(table["direction"] == "b_to_a") & (table["rank"] == 0)]
    assert flags.set_index("source_feature")["mutual"].to_dict() == {0: True, 1: False, 2: True}
    assert match_summary(res, table)["n_a_split_candidates"] == 1
    assert table["decoder_cos"].isna().all()  # no decoders given: null, reported as such


def test_correlation_matches_numpy():
    A = random_codes(500, 12, 3, seed=6)
    B = random_codes(500, 9, 2, seed=7)
    res = match_features(A, B, top_k=9, batch_size=4)
    full = np.corrcoef(A.toarray().T, B.toarray().T)[:12, 12:]
    order = np.argsort(-full, axis=1, kind="stable")
    np.testing.assert_allclose(
        res.a_to_b_corr, np.take_along_axis(full, order, 1), rtol=1e-4, atol=1e-5
    )
    assert np.array_equal(res.a_to_b_ids[:, 0], order[:, 0])
    mean, std = column_moments(A)
    np.testing.assert_allclose(std, A.toarray().astype(np.float64).std(axis=0), rtol=1e-9)
    np.testing.assert_allclose(mean, A.toarray().astype(np.float64).mean(axis=0), rtol=1e-9)


def test_peak_memory_bounded_by_batch_size():
    """Honest measure: (1) the bytes of every intermediate alive in one batch, summed, as the
    function records them; (2) tracemalloc's peak over the call, which sees numpy/scipy
    allocations (the CPU Gram blocks and their dense copies) but NOT torch's CPU allocator."""
    f, bs = 2048, 64
    A = random_codes(3000, f, 8, seed=8)
    B = random_codes(3000, f, 8, seed=9)
    full_bytes = f * f * 4  # 16 MiB: what the notebooks materialised
    tracemalloc.start()
    res = match_features(A, B, top_k=2, batch_size=bs)
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    block = f * bs * 4
    assert res.stats["peak_batch_bytes"] <= 8 * block
    assert res.stats["peak_batch_bytes"] < full_bytes / 4
    assert traced_peak < full_bytes / 4
    bigger = match_features(A, B, top_k=2, batch_size=4 * bs)
    assert bigger.stats["peak_batch_bytes"] > 2 * res.stats["peak_batch_bytes"]
    assert np.array_equal(bigger.a_to_b_ids, res.a_to_b_ids)
    assert np.array_equal(bigger.b_to_a_ids, res.b_to_a_ids)


def test_bad_inputs():
    A = random_codes(10, 4, 1, seed=0)
    with pytest.raises(DataError, match="tokens"):
        match_features(A, A[:5])
    with pytest.raises(ConfigError, match="top_k"):
        match_features(A, A, top_k=0)
    with pytest.raises(ConfigError, match="batch_size"):
        match_features(A, A, batch_size=0)
    tok = pd.DataFrame({"seq_id": [0, 1], "token_ids": [[1, 2], [3]]})
    check_same_tokens(tok, tok)
    other = pd.DataFrame({"seq_id": [0, 1], "token_ids": [[1, 2], [4]]})
    with pytest.raises(DataError, match="seq_id 1"):
        check_same_tokens(tok, other)


def _codes(csr: sp.csr_matrix, seq, pos) -> Codes:
    csr = sp.csr_matrix(csr, dtype=np.float32)
    csr.sort_indices()
    return Codes(
        np.asarray(seq, np.int32),
        np.asarray(pos, np.int32),
        csr.indptr.astype(np.int64),
        csr.indices.astype(np.int32),
        csr.data.astype(np.float16),
        csr.shape[1],
    )


def test_align_codes_keeps_shared_tokens_in_order():
    A = random_codes(6, 4, 1, seed=1)
    ca = _codes(A, [0, 0, 0, 1, 1, 1], [0, 1, 2, 0, 1, 2])
    cb = _codes(A[[1, 2, 3, 4]], [0, 0, 1, 1], [1, 2, 0, 1])
    a, b, dropped = align_codes(ca, cb)
    assert dropped == 2 and a.shape[0] == 4
    assert np.allclose(a.toarray(), b.toarray())
    cc = _codes(A[:1], [9], [0])
    with pytest.raises(DataError, match="share no"):
        align_codes(ca, cc)


class _Names(list):
    def __init__(self, **items):
        super().__init__(items.values())
        self.__dict__.update(items)


def _write_codes_dir(path: Path, codes: Codes) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    write_code_shard(path / "part-00000.parquet", codes)
    return write_manifest(
        path,
        {
            "format": CODES_FORMAT,
            "d_sae": codes.d_sae,
            "parts": {"codes": "."},
            "shards": ["part-00000.parquet"],
        },
    )


def _write_saelens(path: Path, W_dec_FD: np.ndarray) -> dict:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    d_sae, d_in = W_dec_FD.shape
    (path / "cfg.json").write_text(
        json.dumps({"d_in": d_in, "d_sae": d_sae, "architecture": "topk", "k": 2})
    )
    save_file(
        {
            "W_enc": torch.from_numpy(np.ascontiguousarray(W_dec_FD.T)),
            "W_dec": torch.from_numpy(W_dec_FD),
            "b_enc": torch.zeros(d_sae),
            "b_dec": torch.zeros(d_in),
        },
        str(path / "sae_weights.safetensors"),
    )
    return {"name": path.name, "format": "saelens", "path": str(path)}


def test_match_features_script(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stdout", sys.stdout)
    monkeypatch.setattr(sys, "stderr", sys.stderr)
    n, f = 400, 16
    seq, pos = np.repeat(np.arange(20), 20), np.tile(np.arange(20), 20)
    A = random_codes(n, f, 3, seed=10)
    perm = np.random.default_rng(11).permutation(2 * f) % f  # B is twice as wide: splits
    B = permuted_with_noise(A, perm, seed=12)
    ma = _write_codes_dir(tmp_path / "ca", _codes(A, seq, pos))
    mb = _write_codes_dir(tmp_path / "cb", _codes(B, seq, pos))
    W_a = np.random.default_rng(13).standard_normal((f, 8)).astype(np.float32)
    spec_a = _write_saelens(tmp_path / "small", W_a)
    spec_b = _write_saelens(tmp_path / "big", np.ascontiguousarray(W_a[perm]))
    out = tmp_path / "results"
    analysis = {
        "type": "match_features",
        "name": "m",
        "dataset": "d",
        "top_k": 2,
        "batch_size": 5,
        "a": {"model": "base", "sae": "small"},
        "b": {"model": "base", "sae": "big"},
    }
    smk = type("Snakemake", (), {})()
    smk.input = _Names(codes_a=str(ma), codes_b=str(mb))
    smk.output = _Names(
        matches=str(out / "geometry/m/matches.parquet"),
        summary=str(out / "geometry/m/summary.json"),
        page=str(out / "reports/geometry-m.html"),
    )
    smk.params = _Names(
        analysis=analysis, sae_a=spec_a, sae_b=spec_b, runtime={"device": "cpu", "seed": 0}
    )
    smk.log = _Names(log=str(tmp_path / "logs/m.log"))
    smk.threads = 1
    runpy.run_path(
        str(SCRIPTS / "match_features.py"), init_globals={"snakemake": smk}, run_name="__main__"
    )
    table = pq.read_table(out / "geometry/m/matches.parquet").to_pandas()
    summary = json.loads((out / "geometry/m/summary.json").read_text())
    b2a = table[(table["direction"] == "b_to_a") & (table["rank"] == 0)]
    assert (b2a["target_feature"].to_numpy() == perm[b2a["source_feature"].to_numpy()]).all()
    np.testing.assert_allclose(b2a["decoder_cos"], 1.0, rtol=1e-5)
    assert set(table["source_sae"]) == {"small", "big"}
    assert summary["n_a_split_candidates"] == f and summary["n_tokens"] == n
    page = (out / "reports/geometry-m.html").read_text()
    assert 'src="plotly.min.js"' in page and "Best mutual pairs" in page


def _write_sharded(path: Path, csr: sp.csr_matrix, keys: np.ndarray, cuts: list[int]) -> Path:
    """A code directory whose rows (token keys `keys`) are split into shards at `cuts`."""
    path.mkdir(parents=True, exist_ok=True)
    csr = sp.csr_matrix(csr, dtype=np.float32)
    csr.sort_indices()
    edges = [0, *cuts, csr.shape[0]]
    names = []
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        part = csr[lo:hi]
        names.append(f"part-{i:05d}.parquet")
        write_code_shard(
            path / names[-1],
            Codes(
                (keys[lo:hi] >> 32).astype(np.int32),
                (keys[lo:hi] & 0xFFFFFFFF).astype(np.int32),
                part.indptr.astype(np.int64),
                part.indices.astype(np.int32),
                part.data.astype(np.float16),
                csr.shape[1],
            ),
        )
    meta = {"format": CODES_FORMAT, "d_sae": csr.shape[1], "parts": {"codes": "."}}
    return write_manifest(path, {**meta, "shards": names, "n_tokens": csr.shape[0]})


def test_streamed_matching_equals_in_memory_and_numpy(tmp_path):
    """Shards cut at different tokens on each side, tokens missing on either side, and several
    passes over B's columns: the result equals the in-memory match and numpy's corrcoef."""
    from saeflow.geometry.matching import aligned_code_blocks, match_features_stream

    n, fa, fb = 900, 24, 30
    keys = np.array([(s << 32) | p for s in range(30) for p in range(30)], np.int64)
    A = random_codes(n, fa, 4, seed=20)
    B = random_codes(n, fb, 5, seed=21)
    A.data = A.data.astype(np.float16).astype(np.float32)
    B.data = B.data.astype(np.float16).astype(np.float32)
    keep_a = np.arange(n) % 17 != 3  # tokens only B has
    keep_b = np.arange(n) % 23 != 5  # tokens only A has
    pa_ = _write_sharded(tmp_path / "a", A[keep_a], keys[keep_a], [100, 101, 500])
    pb_ = _write_sharded(tmp_path / "b", B[keep_b], keys[keep_b], [333, 600])
    blocks, wa, wb, n_blocks, dropped = aligned_code_blocks(pa_, None, pb_, None)
    assert (wa, wb, n_blocks) == (fa, fb, 4)
    both = keep_a & keep_b
    assert dropped == int((keep_a ^ keep_b).sum())
    streamed = match_features_stream(blocks, fa, fb, top_k=3, batch_size=4, pass_columns=12)
    assert streamed.stats["n_passes"] == 3 and streamed.stats["n_tokens"] == int(both.sum())
    memory = match_features(A[both], B[both], top_k=3, batch_size=4)
    assert np.array_equal(streamed.a_to_b_ids, memory.a_to_b_ids)
    assert np.array_equal(streamed.b_to_a_ids, memory.b_to_a_ids)
    np.testing.assert_allclose(streamed.a_to_b_corr, memory.a_to_b_corr, atol=1e-5)
    full = np.corrcoef(A[both].toarray().T.astype(np.float64), B[both].toarray().T)[:fa, fa:]
    ref_ids = np.argsort(-full, axis=1, kind="stable")[:, :3]
    assert np.array_equal(streamed.a_to_b_ids, ref_ids)
    np.testing.assert_allclose(
        streamed.a_to_b_corr, np.take_along_axis(full, ref_ids, 1), rtol=1e-4, atol=1e-5
    )


def test_matching_state_flat_in_blocks():
    """Feeding 40 blocks instead of 4 (10x the tokens) leaves the recorded peak unchanged."""
    from saeflow.geometry.matching import match_features_stream, prepare_pair

    fa, fb, rows = 64, 48, 200

    def blocks_of(count):
        pairs = [
            prepare_pair(
                random_codes(rows, fa, 4, seed=2 * i), random_codes(rows, fb, 4, 2 * i + 1)
            )
            for i in range(count)
        ]
        return lambda: iter(pairs)

    few = match_features_stream(blocks_of(4), fa, fb, top_k=2, batch_size=16)
    many = match_features_stream(blocks_of(40), fa, fb, top_k=2, batch_size=16)
    assert many.stats["n_tokens"] == 10 * few.stats["n_tokens"]
    assert many.stats["peak_batch_bytes"] <= 1.2 * few.stats["peak_batch_bytes"]
