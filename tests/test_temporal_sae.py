"""The temporal SAE against an independent re-implementation of its equations (fp32, 1e-5)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from saeflow.errors import ConfigError, DataError
from saeflow.sae import TemporalSAE, load_sae

DIMIN, EXP, HEADS, BOTTLENECK = 8, 4, 2, 2
WIDTH = DIMIN * EXP


def _conf(diff: str = "topk", k: int | None = 6, tied: bool = True, layers: int = 1, scale=1.7):
    return {
        "llm": {"dimin": DIMIN},
        "sae": {
            "exp_factor": EXP,
            "n_heads": HEADS,
            "sae_diff_type": diff,
            "kval_topk": k,
            "tied_weights": tied,
            "n_attn_layers": layers,
            "bottleneck_factor": BOTTLENECK,
            "scaling_factor": scale,
        },
        "data": {"dtype": "float32"},
    }


def _state(conf: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n_embds = WIDTH // BOTTLENECK
    state = {
        "D": torch.randn(WIDTH, DIMIN, generator=g) * 2,
        "b": torch.randn(1, DIMIN, generator=g) * 0.3,
    }
    if not conf["sae"]["tied_weights"]:
        state["E"] = torch.randn(DIMIN, WIDTH, generator=g) * 2
    for i in range(conf["sae"]["n_attn_layers"]):
        for name, (out_dim, in_dim) in {
            "k_ctx": (n_embds, WIDTH),
            "q_target": (n_embds, WIDTH),
            "v_ctx": (WIDTH, WIDTH),
            "c_proj": (WIDTH, WIDTH),
        }.items():
            state[f"attn_layers.{i}.{name}.weight"] = (
                torch.randn(out_dim, in_dim, generator=g) * 0.2
            )
            state[f"attn_layers.{i}.{name}.bias"] = torch.randn(out_dim, generator=g) * 0.1
    return state


def reference(state: dict, conf: dict, x_BLD: torch.Tensor):
    """The paper's equations with explicit per-head softmax attention (no SDPA, no modules)."""
    sae = conf["sae"]
    s, lam, eps = sae["scaling_factor"], 1 / (4 * DIMIN), 1e-6
    D, b = state["D"], state["b"]
    E = D.T if sae["tied_weights"] else state["E"]
    x = x_BLD * s - b
    B, L, _ = x.shape
    hk = WIDTH // BOTTLENECK // HEADS
    hv = WIDTH // HEADS
    causal = torch.ones(L, L).tril().bool()
    z_pred = torch.zeros(B, L, WIDTH)
    for i in range(sae["n_attn_layers"]):
        p = {
            n: state[f"attn_layers.{i}.{n}.weight"]
            for n in ("k_ctx", "q_target", "v_ctx", "c_proj")
        }
        pb = {
            n: state[f"attn_layers.{i}.{n}.bias"] for n in ("k_ctx", "q_target", "v_ctx", "c_proj")
        }
        z_in = torch.relu((x * lam) @ E)
        z_ctx = torch.zeros_like(z_in)
        z_ctx[:, 1:] = z_in[:, :-1]
        q = z_in @ p["q_target"].T + pb["q_target"]
        k = z_ctx @ p["k_ctx"].T + pb["k_ctx"]
        v = z_ctx @ p["v_ctx"].T + pb["v_ctx"]
        heads = []
        for h in range(HEADS):
            qh, kh = q[..., h * hk : (h + 1) * hk], k[..., h * hk : (h + 1) * hk]
            vh = v[..., h * hv : (h + 1) * hv]
            scores = qh @ kh.transpose(-1, -2) / math.sqrt(hk)
            scores = scores.masked_fill(~causal, float("-inf"))
            heads.append(torch.softmax(scores, dim=-1) @ vh)
        attn = torch.cat(heads, dim=-1) @ p["c_proj"].T + pb["c_proj"]
        zp = torch.relu(attn)
        Dz = zp @ D
        scale = (Dz * x).sum(-1, keepdim=True) / (Dz.norm(dim=-1, keepdim=True) + eps) ** 2
        z_pred = z_pred + zp * scale
        x = x - scale * Dz
    if sae["sae_diff_type"] == "nullify":
        z_novel = torch.zeros_like(z_pred)
    else:
        z_novel = torch.relu((x * lam) @ E)
        if sae["sae_diff_type"] == "topk":
            kth = z_novel.topk(sae["kval_topk"], dim=-1).values[..., -1:]
            z_novel = z_novel * (z_novel >= kth)
    recon = ((z_novel + z_pred) @ D + b) / s
    return z_novel, z_pred, recon


def write_temporal(folder: Path, conf: dict, state: dict, *, pt: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "conf.yaml").write_text(yaml.safe_dump(conf))
    if pt:
        torch.save({"sae": state, "step": 10}, folder / "latest_ckpt.pt")
    else:
        save_file(state, str(folder / "latest_ckpt.safetensors"))


def _x(seed: int = 3, B: int = 3, L: int = 7) -> torch.Tensor:
    return torch.randn(B, L, DIMIN, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("diff", "tied", "layers", "pt"),
    [("topk", True, 1, False), ("relu", False, 2, False), ("topk", False, 2, True)],
)
def test_matches_equations(tmp_path: Path, diff: str, tied: bool, layers: int, pt: bool) -> None:
    conf = _conf(diff=diff, k=6 if diff == "topk" else None, tied=tied, layers=layers)
    state = _state(conf)
    write_temporal(tmp_path / "temporal", conf, state, pt=pt)
    sae = load_sae({"format": "temporal", "path": str(tmp_path / "temporal")})
    assert isinstance(sae, TemporalSAE) and sae.is_temporal and sae.d_sae == WIDTH
    x = _x()
    out = sae(x)
    novel, pred, recon = reference(state, conf, x)
    torch.testing.assert_close(out.novel, novel, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.pred, pred, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.recon, recon, atol=1e-5, rtol=1e-5)
    if diff == "topk":
        assert int((out.novel > 0).sum(-1).max()) <= 6


def test_nullify_and_single_sequence(tmp_path: Path) -> None:
    conf = _conf(diff="nullify", k=None)
    state = _state(conf, seed=4)
    write_temporal(tmp_path / "t", conf, state)
    sae = load_sae({"format": "temporal", "path": str(tmp_path / "t" / "latest_ckpt.safetensors")})
    x = _x(B=1)
    novel, pred = sae.encode(x[0])
    ref_novel, ref_pred, _ = reference(state, conf, x)
    assert novel.shape == (7, WIDTH) and float(novel.abs().sum()) == 0
    torch.testing.assert_close(pred, ref_pred[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(novel, ref_novel[0])


def test_prefix_causality(tmp_path: Path) -> None:
    """Codes of a prefix do not depend on later tokens (right padding is therefore exact)."""
    conf = _conf()
    write_temporal(tmp_path / "t", conf, _state(conf))
    sae = load_sae({"format": "temporal", "path": str(tmp_path / "t")})
    x = _x(B=1, L=9)
    full, short = sae(x), sae(x[:, :5])
    torch.testing.assert_close(full.pred[:, :5], short.pred, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full.novel[:, :5], short.novel, atol=1e-5, rtol=1e-5)


def test_conf_and_checkpoint_errors(tmp_path: Path) -> None:
    conf = _conf()
    state = _state(conf)
    bad = dict(conf, sae={k: v for k, v in conf["sae"].items() if k != "n_heads"})
    write_temporal(tmp_path / "a", bad, state)
    with pytest.raises(DataError, match=r"conf\.yaml: missing key 'sae\.n_heads'"):
        load_sae({"format": "temporal", "path": str(tmp_path / "a")})
    del state["attn_layers.0.v_ctx.bias"]
    write_temporal(tmp_path / "b", conf, state)
    with pytest.raises(DataError, match=r"missing tensor 'attn_layers\.0\.v_ctx\.bias'"):
        load_sae({"format": "temporal", "path": str(tmp_path / "b")})
    wrong = dict(conf, sae=dict(conf["sae"], sae_diff_type="batchtopk"))
    write_temporal(tmp_path / "c", wrong, _state(conf))
    with pytest.raises(ConfigError, match="sae_diff_type='batchtopk'"):
        load_sae({"format": "temporal", "path": str(tmp_path / "c")})


def test_hub_falls_back_to_pt_checkpoint(tmp_path: Path, monkeypatch) -> None:
    from huggingface_hub.errors import RemoteEntryNotFoundError

    conf = _conf()
    state = _state(conf)
    write_temporal(tmp_path / "gemma-2-2B" / "layer_12" / "temporal", conf, state, pt=True)
    calls = []

    def fake_download(repo_id: str, filename: str, revision: str | None = None, **kw) -> str:
        calls.append(filename)
        if not (tmp_path / filename).exists():
            # Built without an HTTP response object: the loader only looks at the type.
            err = RemoteEntryNotFoundError.__new__(RemoteEntryNotFoundError)
            Exception.__init__(err, "404 entry not found")
            raise err
        return str(tmp_path / filename)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    spec = {
        "format": "temporal",
        "repo": "canrager/temporalSAEs",
        "path": "gemma-2-2B/layer_12/temporal",
    }
    sae = load_sae(spec)
    assert [c.rsplit("/", 1)[1] for c in calls] == [
        "conf.yaml",
        "latest_ckpt.safetensors",
        "latest_ckpt.pt",
    ]
    x = _x()
    torch.testing.assert_close(sae(x).recon, reference(state, conf, x)[2], atol=1e-5, rtol=1e-5)
