"""Seed 002 (Temporal SAE demo) on a tiny LM: the reference forward with `return_graph` and
`inf_k`, the pred-code cosine similarity on dense codes, and both variance-explained definitions.

Everything the seed computes is re-implemented here from its equations (per-head softmax
attention written out, no saeflow modules) and compared with what the workflow writes.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from _fixtures_models import make_tiny_model, write_tokens
from safetensors.torch import load_file
from test_temporal_sae import _conf, write_temporal

from saeflow.activations import cache_activations, load_activations
from saeflow.codes import DenseCodes, load_attention, load_codes
from saeflow.sae import load_sae
from saeflow.sae.encode import encode_sae
from saeflow.sae.metrics import reconstruction_metrics
from saeflow.sae.train import train_temporal_sae
from saeflow.similarity import run_similarity

D, LAYER, EXP, HEADS, BOTTLENECK = 32, 1, 2, 2, 2
WIDTH = D * EXP
CPU = torch.device("cpu")


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Published-layout weights with b as [d] (the seed's nn.Parameter(th.zeros(dimin)))."""
    g = torch.Generator().manual_seed(seed)
    n_embds = WIDTH // BOTTLENECK
    state = {"D": torch.randn(WIDTH, D, generator=g), "b": torch.randn(D, generator=g) * 0.1}
    for name, (out_dim, in_dim) in {
        "k_ctx": (n_embds, WIDTH),
        "q_target": (n_embds, WIDTH),
        "v_ctx": (WIDTH, WIDTH),
        "c_proj": (WIDTH, WIDTH),
    }.items():
        state[f"attn_layers.0.{name}.weight"] = torch.randn(out_dim, in_dim, generator=g) * 0.2
        state[f"attn_layers.0.{name}.bias"] = torch.randn(out_dim, generator=g) * 0.1
    return state


def seed_forward(state: dict, kval: int, scale: float, x_BLD: torch.Tensor):
    """Seed 002's TemporalSAE.forward(return_graph=True, inf_k=kval), written out."""
    lam, eps = 1 / (4 * D), 1e-6
    Dm, b = state["D"], state["b"]
    x = x_BLD * scale - b
    B, L, _ = x.shape
    hk, hv = WIDTH // BOTTLENECK // HEADS, WIDTH // HEADS
    mask = torch.ones(L, L).tril().bool()
    p = {n: state[f"attn_layers.0.{n}.weight"] for n in ("k_ctx", "q_target", "v_ctx", "c_proj")}
    pb = {n: state[f"attn_layers.0.{n}.bias"] for n in ("k_ctx", "q_target", "v_ctx", "c_proj")}
    z_in = torch.relu((x * lam) @ Dm.T)
    z_ctx = torch.cat([torch.zeros_like(z_in[:, :1]), z_in[:, :-1]], dim=1)
    q = z_in @ p["q_target"].T + pb["q_target"]
    k = z_ctx @ p["k_ctx"].T + pb["k_ctx"]
    v = z_ctx @ p["v_ctx"].T + pb["v_ctx"]
    heads, maps = [], []
    for h in range(HEADS):
        s = q[..., h * hk : (h + 1) * hk] @ k[..., h * hk : (h + 1) * hk].transpose(-1, -2)
        a = torch.softmax((s / math.sqrt(hk)).masked_fill(~mask, float("-inf")), dim=-1)
        maps.append(a)
        heads.append(a @ v[..., h * hv : (h + 1) * hv])
    zp = torch.relu(torch.cat(heads, -1) @ p["c_proj"].T + pb["c_proj"])
    Dz = zp @ Dm
    proj = (Dz * x).sum(-1, keepdim=True) / (Dz.norm(dim=-1, keepdim=True) + eps) ** 2
    z_pred = zp * proj
    x = x - proj * Dz
    z_novel = torch.relu((x * lam) @ Dm.T)
    idx = z_novel.topk(kval, dim=-1).indices
    z_novel = z_novel * torch.zeros_like(z_novel).scatter_(-1, idx, 1)
    recon = ((z_novel + z_pred) @ Dm + b) / scale
    graphs = torch.stack(maps, dim=1)[:, None]  # [B, n_attn_layers, H, L, L]
    return {
        "novel_codes": z_novel,
        "pred_codes": z_pred,
        "recon": recon,
        "pred_recons": z_pred @ Dm / scale,
        "novel_recons": z_novel @ Dm / scale,
        "attn_graphs": graphs,
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """A tiny LM's cached activations, a temporal SAE (b as [d]) and its default (dense) codes."""
    root = tmp_path_factory.mktemp("seed002")
    model = make_tiny_model("llama", root / "model", d_model=D, n_layers=3)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(4, 64, (n,), generator=g).tolist() for n in (12, 9, 15, 7)]
    tokens = write_tokens(root / "tokens.parquet", seqs)
    cache_activations(
        {"path": str(model)},
        tokens,
        root / "acts",
        layer=LAYER,
        batch_size=2,
        shard_tokens=24,
        device="cpu",
    )
    conf = _conf(k=5, scale=0.8)
    conf["llm"]["dimin"], conf["sae"]["exp_factor"] = D, EXP
    state = _state()
    write_temporal(root / "sae", conf, state)
    spec = {"name": "t", "format": "temporal", "path": str(root / "sae")}
    codes = root / "codes" / "manifest.json"
    encode_sae(
        root / "acts",
        spec,
        codes,
        runtime={"device": "cpu"},
        encode_cfg={"batch_tokens": 20, "attention_maps": [0, 2]},
    )
    return {
        "root": root,
        "tokens": tokens,
        "acts": root / "acts",
        "spec": spec,
        "state": state,
        "conf": conf,
        "codes": codes,
    }


def _sequences(acts_dir: Path) -> list[torch.Tensor]:
    seq, pos, x = load_activations(acts_dir)
    starts = np.flatnonzero(np.asarray(pos) == 0).tolist() + [len(pos)]
    return [x[a:b].float() for a, b in zip(starts[:-1], starts[1:], strict=True)]


def test_forward_return_graph_and_inf_k_match_the_seed(run: dict) -> None:
    x = _sequences(run["acts"])[0][None]
    for inf_k in (None, 3):
        sae = load_sae({**run["spec"], "inf_k": inf_k})
        out = sae(x, return_graph=True)
        ref = seed_forward(run["state"], inf_k or 5, 0.8, x)
        torch.testing.assert_close(out.novel, ref["novel_codes"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.pred, ref["pred_codes"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.recon, ref["recon"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.attn_graphs, ref["attn_graphs"], atol=1e-6, rtol=1e-5)
        pred_r, novel_r = sae.split_recon(out.novel, out.pred)
        torch.testing.assert_close(pred_r, ref["pred_recons"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(novel_r, ref["novel_recons"], atol=1e-5, rtol=1e-5)
        assert int((out.novel != 0).sum(-1).max()) <= (inf_k or 5)
    # the maps written beside the codes are the same maps
    torch.testing.assert_close(
        torch.from_numpy(load_attention(run["codes"], 0)), ref["attn_graphs"][0], atol=1e-6, rtol=0
    )
    assert load_attention(run["codes"], 2).shape == (1, HEADS, 15, 15)


def test_b_is_written_as_d_and_read_in_both_shapes(run: dict, tmp_path: Path) -> None:
    sae = load_sae(run["spec"])
    assert tuple(sae.b.shape) == (D,)
    old = {**run["state"], "b": run["state"]["b"][None]}  # the [1, d] layout of older files
    write_temporal(tmp_path / "old", run["conf"], old)
    torch.testing.assert_close(
        load_sae({"format": "temporal", "path": str(tmp_path / "old")}).b, sae.b
    )
    # a trained SAE writes b as [d], as seed 002 declares it
    train_temporal_sae(
        [run["acts"]],
        tmp_path / "trained",
        {
            "exp_factor": 2,
            "n_heads": 2,
            "kval_topk": 4,
            "steps": 2,
            "batch_sequences": 2,
            "holdout_every": 2,
        },
    )
    written = load_file(str(tmp_path / "trained" / "latest_ckpt.safetensors"))
    assert tuple(written["b"].shape) == (D,)


def test_pred_similarity_on_dense_codes_matches_the_seed(run: dict, tmp_path: Path) -> None:
    """The similarity cell on `pred_codes[0]` (centred on the sequence, normalised, x x^T)."""
    pred = load_codes(run["codes"], "pred")
    assert isinstance(pred, DenseCodes)
    analysis = {"name": "sim", "sequences": [0, 2], "codes": "pred", "eps": 0}
    manifest = run_similarity(
        analysis, run["codes"], run["tokens"], tmp_path / "s" / "manifest.json"
    )
    seqs = _sequences(run["acts"])
    for s in (0, 2):
        with torch.no_grad():
            pred_LD = seed_forward(run["state"], 5, 0.8, seqs[s][None])["pred_codes"][0].double()
        centred = pred_LD - pred_LD.mean(dim=0, keepdim=True)
        normed = F.normalize(centred, p=2, dim=-1)
        want = (normed @ normed.T).numpy()
        table = pq.read_table(tmp_path / "s" / manifest["files"][str(s)]["file"]).to_pandas()
        got = table.to_numpy().T  # column i is position i
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)  # float32 on disk


def test_both_variance_explained_definitions_and_the_parts(run: dict) -> None:
    sae = load_sae(run["spec"])
    r = reconstruction_metrics(sae, run["acts"], CPU, batch_tokens=20)
    xs, recons, preds, novels = [], [], [], []
    b = run["state"]["b"] / 0.8
    for x in _sequences(run["acts"]):
        with torch.no_grad():
            ref = seed_forward(run["state"], 5, 0.8, x[None])
        xs.append(x[1:].double())
        recons.append(ref["recon"][0, 1:].double())
        preds.append((ref["pred_recons"][0, 1:] + b).double())
        novels.append((ref["novel_recons"][0, 1:] + b).double())
    x, recon = torch.cat(xs), torch.cat(recons)
    # seed 002: 1 - th.mean((recons[:, 1:] - acts[:, 1:]) ** 2) / acts[:, 1:].var()
    flat = 1 - torch.mean((recon - x) ** 2) / x.var()
    centred = 1 - ((x - recon) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert r["variance_explained_flat"] == pytest.approx(float(flat), rel=1e-5)
    assert r["variance_explained"] == pytest.approx(float(centred), rel=1e-5)
    for name, part in (("pred", torch.cat(preds)), ("novel", torch.cat(novels))):
        want = 1 - torch.mean((part - x) ** 2) / x.var()
        assert r[f"variance_explained_flat_{name}"] == pytest.approx(float(want), rel=1e-5)
        want_c = 1 - ((x - part) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
        assert r[f"variance_explained_{name}"] == pytest.approx(float(want_c), rel=1e-5)


def test_every_analysis_reader_sees_the_exact_dense_codes(run: dict) -> None:
    """UMAP/similarity (gather_rows), Mapper (load_points), matching (align_codes), total."""
    from saeflow.embedding import gather_rows, iter_row_blocks
    from saeflow.geometry.mapper import load_points
    from saeflow.geometry.matching import align_codes

    pred = load_codes(run["codes"], "pred", dense=True)
    exact = pred.codes_NF
    X, seq, pos = load_points(run["codes"], "pred")
    np.testing.assert_array_equal(X.toarray(), exact)
    A, B, dropped = align_codes(load_codes(run["codes"], "pred"), load_codes(run["codes"], "pred"))
    np.testing.assert_array_equal(A.toarray(), exact)
    assert dropped == 0
    rows = gather_rows(
        iter_row_blocks(run["codes"], "pred"), pred.seq_ids[::3], pred.positions[::3]
    )
    got = rows.toarray() if hasattr(rows, "toarray") else rows
    np.testing.assert_array_equal(got, exact[::3])
    total = load_codes(run["codes"], "total", dense=True).codes_NF
    novel = load_codes(run["codes"], "novel", dense=True).codes_NF
    np.testing.assert_array_equal(total, novel + exact)
