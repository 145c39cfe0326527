"""sae_metrics on a tiny Llama: formulas checked independently, CE with identity/zero splices."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from _fixtures_models import make_tiny_model, write_tokens
from safetensors.torch import save_file

from saeflow.activations import cache_activations, load_activations
from saeflow.errors import DataError
from saeflow.sae import TemporalSAE, load_sae
from saeflow.sae.encode import encode_sae
from saeflow.sae.metrics import ce_recovered, sae_metrics

D, LAYER = 32, 1


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("metrics")
    model = make_tiny_model("llama", root / "model", d_model=D, n_layers=3)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(4, 64, (n,), generator=g).tolist() for n in (9, 5, 12, 7, 2, 10)]
    tokens = write_tokens(root / "tokens.parquet", seqs)
    acts = root / "acts"
    cache_activations(
        {"path": str(model)}, tokens, acts, layer=LAYER, batch_size=4, shard_tokens=20, device="cpu"
    )
    return {"root": root, "model": model, "tokens": tokens, "acts": acts / "manifest.json"}


def write_identity_sae(folder: Path, scale: float = 1.0) -> None:
    """ReLU SAE with W_enc = [I, -I]: relu(x) - relu(-x) = x, a perfect reconstruction."""
    folder.mkdir(parents=True, exist_ok=True)
    eye = torch.eye(D)
    tensors = {
        "W_enc": torch.cat([eye, -eye], 1),
        "W_dec": torch.cat([eye, -eye], 0) * scale,
        "b_enc": torch.zeros(2 * D),
        "b_dec": torch.zeros(D),
    }
    cfg = {"architecture": "standard", "d_in": D, "d_sae": 2 * D, "apply_b_dec_to_input": True}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(folder / "sae_weights.safetensors"))


def _run(setup: dict, spec: dict, sae=None, name: str = "m") -> dict:
    codes = setup["root"] / f"codes_{name}" / "manifest.json"
    encode_sae(setup["acts"], spec, codes, runtime={"device": "cpu"}, sae=sae)
    model_spec = {"name": "tiny", "path": str(setup["model"]), "layer": LAYER}
    out = setup["root"] / f"{name}.json"
    metrics_cfg = {"ce_batch_size": 4, "ce_max_sequences": 5}
    result = sae_metrics(
        setup["acts"],
        codes,
        spec,
        model_spec,
        setup["tokens"],
        out,
        runtime={"device": "cpu"},
        metrics_cfg=metrics_cfg,
        sae=sae,
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    return result


def _ce(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    loss = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum")
    return float(loss), len(ids[0]) - 1


def _independent_ce(setup: dict, replace) -> float:
    """Mean next-token CE over the first 5 sequences (length >= 2), one sequence at a time."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(setup["model"]).eval()
    seqs = pq.read_table(setup["tokens"]).column("token_ids").to_pylist()
    seqs = [s for s in seqs if len(s) >= 2][:5]
    block = model.model.layers[LAYER]

    def hook(_m, _a, out):
        h = out[0] if isinstance(out, tuple) else out
        new = replace(h)
        new[:, 0] = h[:, 0]
        return (new, *out[1:]) if isinstance(out, tuple) else new

    handle = block.register_forward_hook(hook) if replace is not None else None
    total, count = 0.0, 0
    with torch.no_grad():
        for s in seqs:
            ids = torch.tensor([s])
            loss, n = _ce(model(input_ids=ids).logits, ids)
            total, count = total + loss, count + n
    if handle is not None:
        handle.remove()
    return total / count


def test_identity_sae_recovers_everything(setup: dict) -> None:
    write_identity_sae(setup["root"] / "identity")
    spec = {"name": "identity", "format": "saelens", "path": str(setup["root"] / "identity")}
    r = _run(setup, spec, name="identity")
    assert r["variance_explained"] == pytest.approx(1.0, abs=1e-6)
    assert r["mse"] == pytest.approx(0.0, abs=1e-10)
    assert r["ce_loss_recon"] == pytest.approx(r["ce_loss_clean"], abs=1e-5)
    assert r["ce_loss_clean"] == pytest.approx(_independent_ce(setup, None), abs=1e-4)
    zero = _independent_ce(setup, lambda h: torch.zeros_like(h))
    assert r["ce_loss_zero"] == pytest.approx(zero, abs=1e-4)
    # the random tiny LM does not get worse when its layer is zeroed: the ratio is undefined
    assert r["ce_loss_zero"] <= r["ce_loss_clean"]
    assert r["ce_recovered"] is None and "not above the clean loss" in r["ce_recovered_reason"]
    assert r["variance_explained_flat"] == pytest.approx(1.0, abs=1e-6)
    assert r["l0_pred"] == 0 and r["l0_total"] == r["l0_novel"]
    assert r["n_tokens"] == 45 - 6 and r["excluded_positions"] == [0]


def test_scaled_sae_formulas(setup: dict) -> None:
    write_identity_sae(setup["root"] / "half", scale=0.5)
    spec = {"name": "half", "format": "saelens", "path": str(setup["root"] / "half")}
    r = _run(setup, spec, name="half")
    seq, pos, acts = load_activations(setup["acts"])
    x = acts.float()[torch.from_numpy(np.asarray(pos) > 0)].double()
    recon = 0.5 * x
    ve = 1 - ((x - recon) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert r["variance_explained"] == pytest.approx(float(ve), rel=1e-6)
    assert r["mse"] == pytest.approx(float(((x - recon) ** 2).mean()), rel=1e-6)
    assert r["l0_novel"] == pytest.approx(float((x != 0).sum(-1).double().mean()))
    ce_half = _independent_ce(setup, lambda h: 0.5 * h)
    assert r["ce_loss_recon"] == pytest.approx(ce_half, abs=1e-4)
    flat = 1 - ((x - recon) ** 2).mean() / x.var()  # seed 002's definition, over all entries
    assert r["variance_explained_flat"] == pytest.approx(float(flat), rel=1e-6)
    assert r["variance_explained_flat"] != pytest.approx(r["variance_explained"], rel=1e-3)


def test_ce_recovered_is_null_with_a_reason_when_zeroing_does_not_hurt() -> None:
    assert ce_recovered(2.0, 2.5, 4.0) == (pytest.approx(0.75), None)
    value, reason = ce_recovered(9.88, 9.0, 9.43)
    assert value is None and "9.43 is not above the clean loss 9.88" in reason
    assert ce_recovered(3.0, 3.0, 3.0)[0] is None


def test_temporal_sae_metrics(setup: dict) -> None:
    torch.manual_seed(0)
    sae = TemporalSAE(D, 64, n_heads=2, bottleneck_factor=4, kval_topk=4, scaling_factor=0.7)
    sae.eval().requires_grad_(False)
    spec = {"name": "temporal", "format": "temporal", "path": "unused"}
    r = _run(setup, spec, sae=sae, name="temporal")
    seq, pos, acts = load_activations(setup["acts"])
    pos = np.asarray(pos)
    starts = np.flatnonzero(pos == 0).tolist() + [len(pos)]
    xs, recons, l0p = [], [], []
    for a, b in zip(starts[:-1], starts[1:], strict=True):
        out = sae(acts[a:b].float().unsqueeze(0))
        xs.append(acts[a + 1 : b].double())
        recons.append(out.recon[0, 1:].double())
        l0p.append((out.pred[0, 1:] != 0).sum(-1))
    x, recon = torch.cat(xs), torch.cat(recons)
    ve = 1 - ((x - recon) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert r["variance_explained"] == pytest.approx(float(ve), rel=1e-5, abs=1e-6)
    assert r["l0_pred"] == pytest.approx(float(torch.cat(l0p).double().mean()))
    assert r["l0_novel"] <= 4 and r["kind"] == "temporal"
    assert (r["ce_recovered"] is None) == (r["ce_loss_zero"] <= r["ce_loss_clean"])


def test_codes_from_other_dataset_are_refused(setup: dict, tmp_path: Path) -> None:
    write_identity_sae(tmp_path / "sae")
    spec = {"name": "x", "format": "saelens", "path": str(tmp_path / "sae")}
    codes = tmp_path / "codes" / "manifest.json"
    encode_sae(setup["acts"], spec, codes)
    manifest = json.loads(codes.read_text())
    manifest["n_tokens"] = 3
    codes.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="3 tokens of codes but the activations have 45"):
        sae_metrics(setup["acts"], codes, spec, {"path": "x", "layer": 1}, "t", tmp_path / "o.json")
    assert load_sae(spec).d_in == D


def test_metrics_page_says_why_ce_recovered_is_null() -> None:
    from saeflow.report.metrics_page import build_metrics_page

    _, reason = ce_recovered(9.88, 9.0, 9.43)
    page = build_metrics_page(
        [
            (
                "topk · base · dialogues",
                {
                    "variance_explained": 0.8,
                    "ce_recovered": None,
                    "ce_recovered_reason": reason + " <b>",
                },
            ),
            ("ok", {"variance_explained": 0.9, "ce_recovered": 0.7, "ce_recovered_reason": None}),
        ]
    )
    assert "topk · base · dialogues: ce_recovered is null: zero-ablation loss 9.43" in page
    assert "&lt;b&gt;" in page and "ok: ce_recovered" not in page
