"""MFA steering on a tiny Llama built in the test: no-op at alpha=0, the hook really splices."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from saeflow.mfa.model import MFA, save_mfa
from saeflow.mfa.steer import (
    centroid_fn,
    run_mfa_steer,
    steer_logit_changes,
    top_changes,
    two_stage_fn,
)
from saeflow.models import layer_modules, splice_layer

sys.path.insert(0, str(Path(__file__).parent))
from _fixtures_models import save_steer_llama  # noqa: E402

D, VOCAB, LAYER = 32, 64, 0


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    model, tokenizer = save_steer_llama(path, d=D, vocab=VOCAB)
    return path, model, tokenizer


def tiny_mfa(K: int = 3, R: int = 2) -> MFA:
    g = torch.Generator().manual_seed(1)
    mfa = MFA(K, D, R)
    mfa.set_params(
        torch.randn(K, D, generator=g),
        torch.randn(K, D, R, generator=g),
        torch.ones(D),
        torch.log(torch.tensor([0.2, 0.5, 0.3])),
    )
    return mfa


def test_alpha_zero_is_a_no_op(tiny_llama):
    _, model, tok = tiny_llama
    mfa = tiny_mfa()
    df, checks = steer_logit_changes(
        model,
        tok,
        mfa,
        LAYER,
        prompts=["w5 w6 w7", "w9"],
        components=[1],
        alphas=[0.0, 0.5],
        z_R=torch.zeros(2),
        top_logits=5,
    )
    zero = [c for c in checks if c["alpha"] == 0.0]
    assert len(zero) == 4 and all(c["max_abs_delta"] == 0.0 for c in zero)
    assert all(c["hook_calls"] == 1 for c in checks)
    moved = [c for c in checks if c["alpha"] == 0.5]
    assert all(c["max_abs_delta"] > 1e-4 and c["layer_shift_norm"] > 0 for c in moved)
    rows = df[(df["alpha"] == 0.5) & (df["method"] == "centroid") & (df["prompt_idx"] == 0)]
    assert (rows[rows["direction"] == "+"]["delta"] > 0).all()
    assert (rows[rows["direction"] == "-"]["delta"] < 0).all()


def test_hook_replaces_the_layer_output(tiny_llama):
    """alpha=1 sends block 0's output to mu_k at every position: the next block receives mu_k."""
    _, model, tok = tiny_llama
    mu = torch.randn(D)
    seen = {}

    def pre_hook(_module, args, kwargs):
        seen["x"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    handle = layer_modules(model)[LAYER + 1].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        ids = tok("w5 w6 w7", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            model(input_ids=ids)
            plain = seen["x"]
            with splice_layer(model, LAYER, centroid_fn(mu, 1.0)):
                model(input_ids=ids)
            spliced = seen["x"]
            W, z = torch.randn(D, 2), torch.tensor([1.0, -2.0])
            with splice_layer(model, LAYER, two_stage_fn(mu, W, z, 0.25)):
                model(input_ids=ids)
            two = seen["x"]
    finally:
        handle.remove()
    assert not torch.allclose(plain, spliced)
    assert torch.allclose(spliced, mu.expand_as(spliced), atol=1e-6)
    expected = plain + 0.25 * (mu - plain) + W @ z
    assert torch.allclose(two, expected, atol=1e-5)


def test_top_changes_signs():
    rows = top_changes(torch.tensor([0.5, -2.0, 0.0, 3.0]), 2)
    assert rows[0] == ("+", 0, 3, 3.0) and rows[2] == ("-", 0, 1, -2.0)


def test_run_mfa_steer_writes_table(tiny_llama, tmp_path):
    path, _, _ = tiny_llama
    save_mfa(tiny_mfa(), tmp_path / "model.safetensors")
    info = run_mfa_steer(
        tmp_path / "model.safetensors",
        lm_path=str(path),
        layer=LAYER,
        out_path=tmp_path / "steer.parquet",
        info_path=tmp_path / "steer.json",
        settings={"R": 2, "steer": {"prompts": ["w5 w6"], "alphas": [0.0, 1.0], "top_logits": 3}},
        device="cpu",
        dtype="float32",
    )
    assert info["components"] == [1]  # null -> the heaviest component
    assert info["z"] == [2.0, 0.0]
    df = pd.read_parquet(tmp_path / "steer.parquet")
    assert set(df["method"]) == {"centroid", "two_stage"}
    assert len(df) == 1 * 2 * 2 * 2 * 3
    zero = df[(df["alpha"] == 0.0) & (df["method"] == "centroid")]
    assert (zero["delta"] == 0).all()
