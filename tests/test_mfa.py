"""MFA: likelihood against scipy, recovery of a known mixture, NaN guard, stages and page."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from scipy.stats import multivariate_normal

from saeflow.errors import ConfigError, DataError
from saeflow.mfa import resolve_settings
from saeflow.mfa.fit import NonFiniteNLLError, fit_mfa, run_fit_mfa, split_train_val
from saeflow.mfa.init import (
    init_centroids,
    load_centroids,
    reservoir_sample,
    run_mfa_init,
    tensor_source,
)
from saeflow.mfa.interpret import run_mfa_interpret
from saeflow.mfa.model import MFA, dense_log_prob_components, load_mfa, save_mfa
from saeflow.report import run_report_mfa

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices on a shared 2-core box: one thread avoids OpenMP spin contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_mfa(K, D, R, *, psi="shared", dtype=torch.float64, seed=0) -> MFA:
    g = torch.Generator().manual_seed(seed)
    model = MFA(
        K, D, R, psi=psi, center_D=torch.randn(D, generator=g, dtype=dtype), scale=2.5, dtype=dtype
    )
    psi_shape = (D,) if psi == "shared" else (K, D)
    model.set_params(
        3 * torch.randn(K, D, generator=g, dtype=dtype),
        torch.randn(K, D, R, generator=g, dtype=dtype),
        0.1 + torch.rand(psi_shape, generator=g, dtype=dtype),
        torch.log_softmax(torch.randn(K, generator=g, dtype=dtype), 0),
    )
    return model


def sample_mfa(mu_KD, W_KDR, psi_D, pi_K, N, seed):
    g = torch.Generator().manual_seed(seed)
    comp = torch.multinomial(pi_K, N, replacement=True, generator=g)
    z = torch.randn(N, W_KDR.shape[2], generator=g)
    noise = torch.randn(N, mu_KD.shape[1], generator=g) * psi_D.sqrt()
    return mu_KD[comp] + torch.einsum("ndr,nr->nd", W_KDR[comp], z) + noise


# ---- likelihood ----------------------------------------------------------------------------------
@pytest.mark.parametrize("psi", ["shared", "per_component"])
def test_log_likelihood_matches_scipy_dense(psi):
    K, D, R = 3, 6, 2
    model = random_mfa(K, D, R, psi=psi)
    x = 3 * torch.randn(9, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        ll = model.log_prob_components(x).numpy()
        mu, W, psi_KD = model.mu.numpy(), model.W.numpy(), model.psi.numpy()
        log_pi = model.log_pi_K().numpy()
        log_px = model.log_prob(x).numpy()
    ref = np.stack(
        [
            multivariate_normal(mu[k], W[k] @ W[k].T + np.diag(psi_KD[k])).logpdf(x.numpy())
            for k in range(K)
        ],
        axis=1,
    )
    assert np.abs(ll - ref).max() < 1e-4
    ref_px = np.logaddexp.reduce(ref + log_pi, axis=1)
    assert np.abs(log_px - ref_px).max() < 1e-4


def test_posterior_mean_matches_dense_formula():
    K, D, R = 2, 5, 2
    model = random_mfa(K, D, R)
    x = torch.randn(4, D, dtype=torch.float64)
    with torch.no_grad():
        post = model.posterior(x)
        for k in range(K):
            C = model.W[k] @ model.W[k].T + torch.diag(model.psi[k])
            Ez = (model.W[k].T @ torch.linalg.solve(C, (x - model.mu[k]).T)).T
            assert torch.allclose(post["Ez_BKR"][:, k], Ez, atol=1e-8)
        assert torch.allclose(post["resp_BK"].sum(1), torch.ones(4, dtype=torch.float64))
        dense = dense_log_prob_components(x, model.mu, model.W, model.psi)
        assert torch.allclose(post["ll_BK"], dense, atol=1e-8)


def test_save_load_roundtrip_and_sorted_loadings(tmp_path):
    model = random_mfa(3, 7, 3, psi="per_component", dtype=torch.float32)
    x = torch.randn(5, 7)
    before = model.log_prob(x).detach()
    model.sort_loadings()
    assert torch.allclose(model.log_prob(x).detach(), before, atol=1e-4)
    norms = model.W.detach().norm(dim=1)
    assert (norms[:, :-1] >= norms[:, 1:]).all()
    save_mfa(model, tmp_path / "m.safetensors")
    loaded = load_mfa(tmp_path / "m.safetensors")
    assert loaded.psi_mode == "per_component"
    assert torch.allclose(loaded.log_prob(x).detach(), before, atol=1e-4)


# ---- fitting -------------------------------------------------------------------------------------
def test_fit_recovers_known_mfa():
    """K=4, R=2, D=16: centroids within 0.5 (means have norm ~16) and NLL within 0.05 nats."""
    K, D, R, N = 4, 16, 2, 4000
    g = torch.Generator().manual_seed(3)
    mu = 4 * torch.randn(K, D, generator=g)
    W = torch.randn(K, D, R, generator=g)
    psi = 0.05 + 0.2 * torch.rand(D, generator=g)
    pi = torch.tensor([0.1, 0.2, 0.3, 0.4])
    X = sample_mfa(mu, W, psi, pi, N, seed=4)
    seq = np.arange(N) // 20
    settings = resolve_settings(
        {"K": K, "R": R, "epochs": 40, "lr": 5e-3, "patience": 5, "pool_size": 2000, "proj_dim": 8}
    )
    C, info = init_centroids(
        tensor_source(X), K, pool_size=2000, proj_dim=8, restarts=8, lloyd_iters=5, seed=0
    )
    assert info["method"] == "kmeans" and C.shape == (K, D)
    model, history, summary, _ = fit_mfa(X, seq, C, settings, seed=0, device=CPU)
    dist = torch.cdist(model.mu.detach(), mu).numpy()
    rows, cols = linear_sum_assignment(dist)
    assert dist[rows, cols].max() < 0.5, dist[rows, cols]
    truth = MFA(K, D, R)
    truth.set_params(mu, W, psi, torch.log(pi))
    with torch.no_grad():
        nll_fit, nll_true = float(model.nll(X)), float(truth.nll(X))
    assert nll_fit <= nll_true + 0.05, (nll_fit, nll_true)
    assert summary["split"] == "sequence" and summary["n_val"] > 0
    assert all(math.isfinite(h["train_nll"]) and math.isfinite(h["val_nll"]) for h in history)
    assert sum(h["best"] for h in history) == 1


def test_nan_nll_fails_loudly(tmp_path, monkeypatch):
    """An injected NaN in the NLL aborts the fit and writes no table."""
    X = torch.randn(300, 6)
    acts = write_acts(tmp_path / "acts", X, n_seq=30)
    C = X[:3].clone()
    from saeflow.mfa.init import save_centroids

    save_centroids(tmp_path / "c.safetensors", C)
    calls = {"n": 0}
    real = MFA.log_prob

    def poisoned(self, x):
        calls["n"] += 1
        out = real(self, x)
        return out * float("nan") if calls["n"] > 6 else out

    monkeypatch.setattr(MFA, "log_prob", poisoned)
    out = tmp_path / "out"
    with pytest.raises(NonFiniteNLLError, match="NLL is nan"):
        run_fit_mfa(
            acts,
            tmp_path / "c.safetensors",
            model_path=out / "model.safetensors",
            config_path=out / "model.json",
            nll_path=out / "nll.parquet",
            posteriors_path=out / "posteriors.parquet",
            settings={"K": 3, "R": 2, "epochs": 3, "batch_size": 64},
            device="cpu",
        )
    assert not (out / "nll.parquet").exists()
    assert not (out / "model.safetensors").exists()


def test_per_component_psi_fit_and_no_val_split():
    g = torch.Generator().manual_seed(2)
    X = torch.cat([torch.randn(150, 6, generator=g) * 0.3 + 4, torch.randn(150, 6, generator=g)])
    settings = resolve_settings(
        {"K": 2, "R": 1, "psi": "per_component", "epochs": 3, "val_fraction": 0.0}
    )
    model, history, summary, split = fit_mfa(
        X, np.zeros(300), X[[0, 200]].clone(), settings, seed=0, device=CPU
    )
    assert model.psi_mode == "per_component" and summary["split"] == "none"
    assert history[0]["val_nll"] is None and split.sum() == 0
    psi = model.psi.detach()
    assert psi[0].mean() < psi[1].mean()  # the tight cluster gets the smaller noise


def test_nonfinite_activations_rejected():
    X = torch.randn(100, 4)
    X[5, 2] = float("inf")
    with pytest.raises(DataError, match="inf/NaN"):
        fit_mfa(
            X, np.zeros(100), X[:2].clone(), resolve_settings({"K": 2, "R": 1}), seed=0, device=CPU
        )


def test_split_by_sequence_and_token():
    tr, va, how = split_train_val(np.repeat(np.arange(20), 5), 0.2, 0)
    assert how == "sequence" and len(va) == 20 and len(set(tr) & set(va)) == 0
    tr, va, how = split_train_val(np.zeros(50, dtype=int), 0.2, 0)
    assert how == "token" and len(va) == 10
    assert split_train_val(np.zeros(50, dtype=int), 0.0, 0)[2] == "none"


# ---- init ----------------------------------------------------------------------------------------
def test_reservoir_is_batching_independent_and_bounded():
    X = torch.arange(1000, dtype=torch.float32)[:, None].repeat(1, 3)
    a = reservoir_sample(
        (X[i : i + 7] for i in range(0, 1000, 7)), 50, torch.Generator().manual_seed(0)
    )
    b = reservoir_sample(
        (X[i : i + 100] for i in range(0, 1000, 100)), 50, torch.Generator().manual_seed(0)
    )
    assert a.shape == (50, 3) and torch.equal(a, b)
    assert len(set(a[:, 0].tolist())) == 50


def test_kmeans_and_random_init_find_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centers = 20 * torch.eye(5, 12)
    X = centers.repeat(80, 1) + 0.1 * torch.randn(400, 12, generator=g)
    C, info = init_centroids(
        tensor_source(X, 64), 5, pool_size=200, proj_dim=4, restarts=2, lloyd_iters=3, seed=1
    )
    d = torch.cdist(C, centers).numpy()
    r, c = linear_sum_assignment(d)
    assert d[r, c].max() < 0.2
    C2, info2 = init_centroids(tensor_source(X), 5, method="random", pool_size=200, seed=1)
    assert info2["method"] == "random" and C2.shape == (5, 12)
    with pytest.raises(ConfigError, match="pool_size"):
        init_centroids(tensor_source(X), 5, pool_size=3)


def test_settings_validation_names_key():
    s = resolve_settings({"name": "m", "K": 3})
    assert s["R"] == 8 and s["steer"]["alphas"] == [0.0, 0.25, 0.5, 1.0]
    with pytest.raises(ConfigError, match=r"analyses\[m\]\.psi"):
        resolve_settings({"name": "m", "psi": "full"})
    with pytest.raises(ConfigError, match=r"steer\.z"):
        resolve_settings({"name": "m", "R": 2, "steer": {"z": [1.0]}})


# ---- stages end to end ---------------------------------------------------------------------------
def write_acts(directory: Path, X: torch.Tensor, n_seq: int) -> Path:
    """An activation cache in the cache_activations layout (one parquet shard + manifest)."""
    from saeflow.activations import _write_shard
    from saeflow.io import write_manifest

    directory.mkdir(parents=True, exist_ok=True)
    N, D = X.shape
    per = N // n_seq
    seq = (np.arange(N) // per).astype(np.int32)
    pos = (np.arange(N) % per).astype(np.int32)
    _write_shard(directory / "part-00000.parquet", "parquet", seq, pos, X.contiguous())
    write_manifest(
        directory,
        {
            "format": "parquet",
            "dtype": "float32",
            "d_model": D,
            "n_tokens": N,
            "shards": [{"file": "part-00000.parquet", "n_tokens": N}],
        },
    )
    return directory / "manifest.json"


def write_token_table(path: Path, n_seq: int, per: int) -> Path:
    words = ["<script>alert(1)</script>", " the", " cat", "\n", " & co", " sat"]
    toks = [[words[(s + p) % len(words)] for p in range(per)] for s in range(n_seq)]
    table = pa.table(
        {
            "seq_id": pa.array(range(n_seq), pa.int32()),
            "token_ids": pa.array([[1] * per] * n_seq, pa.list_(pa.int32())),
            "roles": pa.array([[0] * per] * n_seq, pa.list_(pa.int8())),
            "n_tokens": pa.array([per] * n_seq, pa.int32()),
            "tokens": pa.array(toks, pa.list_(pa.string())),
        }
    )
    pq.write_table(table, path)
    return path


def test_stages_end_to_end_deterministic_and_escaped(tmp_path):
    K, D, R, n_seq, per = 3, 8, 2, 30, 20
    g = torch.Generator().manual_seed(5)
    X = sample_mfa(
        5 * torch.randn(K, D, generator=g),
        torch.randn(K, D, R, generator=g),
        0.1 * torch.ones(D),
        torch.ones(K) / K,
        n_seq * per,
        seed=6,
    )
    acts = write_acts(tmp_path / "acts", X, n_seq)
    tokens = write_token_table(tmp_path / "tokens.parquet", n_seq, per)
    settings = {
        "name": "t",
        "K": K,
        "R": R,
        "epochs": 4,
        "pool_size": 300,
        "proj_dim": 4,
        "restarts": 2,
        "lloyd_iters": 2,
        "top_pool": 12,
        "top_n": 4,
    }

    def fit(out: Path) -> dict:
        run_mfa_init(
            acts,
            centroids_path=out / "init/centroids.safetensors",
            info_path=out / "init/init.json",
            settings=settings,
            seed=0,
        )
        return run_fit_mfa(
            acts,
            out / "init/centroids.safetensors",
            model_path=out / "model.safetensors",
            config_path=out / "model.json",
            nll_path=out / "nll.parquet",
            posteriors_path=out / "posteriors.parquet",
            settings=settings,
            seed=0,
            device="cpu",
            meta={"analysis": "t"},
        )

    a, b = tmp_path / "a", tmp_path / "b"
    cfg = fit(a)
    fit(b)
    for name in (
        "init/centroids.safetensors",
        "model.safetensors",
        "nll.parquet",
        "posteriors.parquet",
        "model.json",
    ):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert load_centroids(a / "init/centroids.safetensors").shape == (K, D)
    assert cfg["K"] == K and cfg["n_train"] + cfg["n_val"] == n_seq * per
    nll = pd.read_parquet(a / "nll.parquet")
    assert list(nll.columns) == ["epoch", "train_nll", "val_nll", "best"]
    assert np.isfinite(nll[["train_nll", "val_nll"]].to_numpy()).all()
    post = pd.read_parquet(a / "posteriors.parquet")
    assert len(post) == n_seq * per and len(post["z"].iloc[0]) == R
    assert len(post["top_components"].iloc[0]) == min(4, K)

    summary = run_mfa_interpret(
        a / "model.safetensors",
        acts,
        tokens,
        contexts_path=a / "top_contexts.parquet",
        subspace_path=a / "subspace.parquet",
        summary_path=a / "interpret.json",
        settings=settings,
        seed=0,
    )
    ctx = pd.read_parquet(a / "top_contexts.parquet")
    assert len(ctx) == K * 12 and ctx.groupby("component")["shown"].sum().eq(4).all()
    assert (ctx.groupby("component")["log_lik"].apply(lambda s: s.is_monotonic_decreasing)).all()
    sub = pd.read_parquet(a / "subspace.parquet")
    assert len(sub) == n_seq * per and len(sub["coords"].iloc[0]) == R
    assert sub["ratio"].between(0, 1.0001).all()
    assert sum(c["size"] for c in summary["components"]) == n_seq * per

    steer = pd.DataFrame(
        [
            {
                "prompt_idx": 0,
                "prompt": "<i>hi</i>",
                "component": 0,
                "method": "centroid",
                "alpha": 0.5,
                "direction": d,
                "rank": 0,
                "token_id": 1,
                "token": "</script>",
                "delta": 0.1,
            }
            for d in "+-"
        ]
    )
    steer.to_parquet(a / "steer.parquet")
    page = run_report_mfa(
        tmp_path / "reports/mfa-t.html",
        nll_path=a / "nll.parquet",
        contexts_path=a / "top_contexts.parquet",
        subspace_path=a / "subspace.parquet",
        summary_path=a / "interpret.json",
        model_config_path=a / "model.json",
        steer_path=a / "steer.parquet",
        settings=settings,
        title="MFA <t>",
    )
    text = page.read_text()
    assert "<script>alert" not in text and "</script>)" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "<b>" in text and '<script charset="utf-8" src="plotly.min.js"></script>' in text
    assert "&lt;i&gt;hi&lt;/i&gt;" in text and "MFA &lt;t&gt;" in text
    assert (tmp_path / "reports/plotly.min.js").exists()


def test_posteriors_streamed_from_batches_equal_in_memory(tmp_path):
    """Batches of any size (shards) give the same posteriors as the in-memory writer, and the
    file holds few row groups, not one per batch."""
    from saeflow.mfa import fit as mfa_fit

    torch.manual_seed(0)
    N, D, K, R = 700, 6, 3, 2
    x = torch.randn(N, D)
    model = MFA(K, D, R)
    seq = np.repeat(np.arange(70), 10)
    pos = np.tile(np.arange(10), 70)
    split = (np.arange(N) % 5 == 0).astype(np.int8)
    mem = mfa_fit.write_posteriors(
        model,
        x,
        seq,
        pos,
        split,
        tmp_path / "a.parquet",
        top=2,
        batch_size=64,
        device=torch.device("cpu"),
    )
    shards = mfa_fit.token_batches(x, seq, pos, split, 333)
    streamed = mfa_fit.write_posteriors_stream(
        model, shards, tmp_path / "b.parquet", top=2, batch_size=64, device=torch.device("cpu")
    )
    assert np.array_equal(mem, streamed) and mem.sum() == N
    a, b = pq.read_table(tmp_path / "a.parquet"), pq.read_table(tmp_path / "b.parquet")
    assert a.equals(b)
    with torch.no_grad():
        post = model.posterior(x)
    arg = post["resp_BK"].argmax(1)
    np.testing.assert_array_equal(a.column("component").to_numpy(), arg)
    z = np.stack(a.column("z").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(z, post["Ez_BKR"][torch.arange(N), arg], rtol=1e-4, atol=1e-5)
    top = np.stack(a.column("top_resp").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(top, post["resp_BK"].topk(2, dim=1).values, rtol=1e-5, atol=1e-7)
    assert pq.ParquetFile(tmp_path / "a.parquet").metadata.num_row_groups == 1
