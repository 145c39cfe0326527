"""Steer an HF causal LM with an MFA component and report the logit changes at the last position.

Two interventions, as in the reference tutorial, applied at every position of block `layer`'s
output (resid_post) through a plain forward hook (`saeflow.models.splice_layer`):
- centroid: x <- (1 - alpha) x + alpha mu_k. We interpolate rather than add because the centroid
  is an absolute position in activation space; alpha = 1 replaces x by mu_k, alpha = 0 is a no-op.
- two-stage: x <- x + alpha (mu_k - x), then + W_k z (the within-region move is not scaled by
  alpha). z defaults to `z_scale` on loading axis 0 (the first fitted axis; the strongest one
  with `sort_loadings: true`); z ~ N(0, I) under the model, so 2 means a two-sigma move along it.
  The tutorial's z[0] = 20, z[8] = -10 is `steer.z: [20, 0, 0, 0, 0, 0, 0, 0, -10, 0]`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from saeflow.errors import ConfigError
from saeflow.mfa.model import MFA

log = logging.getLogger("saeflow.mfa")

METHODS = ("centroid", "two_stage")


def centroid_fn(mu_D: torch.Tensor, alpha: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """(1 - alpha) x + alpha mu, computed in float32."""

    def fn(acts_BPD: torch.Tensor) -> torch.Tensor:
        x = acts_BPD.float()
        return (1.0 - alpha) * x + alpha * mu_D.to(x.device, torch.float32)

    return fn


def two_stage_fn(
    mu_D: torch.Tensor, W_DR: torch.Tensor, z_R: torch.Tensor, alpha: float
) -> Callable[[torch.Tensor], torch.Tensor]:
    """x + alpha (mu - x) + W z, computed in float32."""

    def fn(acts_BPD: torch.Tensor) -> torch.Tensor:
        x = acts_BPD.float()
        mu = mu_D.to(x.device, torch.float32)
        delta_D = W_DR.to(x.device, torch.float32) @ z_R.to(x.device, torch.float32)
        return x + alpha * (mu - x) + delta_D

    return fn


@torch.no_grad()
def last_logits(model: nn.Module, input_ids_1P: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    out = model(input_ids=input_ids_1P.to(device), use_cache=False)
    return out.logits[0, -1].float().cpu()


def top_changes(delta_V: torch.Tensor, k: int) -> list[tuple[str, int, int, float]]:
    """(direction, rank, token id, delta) for the k largest increases and the k largest drops."""
    k = min(k, delta_V.numel())
    pos_v, pos_i = delta_V.topk(k)
    neg_v, neg_i = (-delta_V).topk(k)
    rows = [("+", r, int(i), float(v)) for r, (v, i) in enumerate(zip(pos_v, pos_i, strict=True))]
    rows += [("-", r, int(i), -float(v)) for r, (v, i) in enumerate(zip(neg_v, neg_i, strict=True))]
    return rows


def default_components(mfa: MFA, component: int | list[int] | None) -> list[int]:
    """Config component(s), or the heaviest component (largest pi) when null."""
    comps = component if isinstance(component, list) else [component]
    out = []
    for c in comps:
        if c is None:
            with torch.no_grad():
                c = int(mfa.log_pi_K().argmax())
        if not 0 <= c < mfa.K:
            raise ConfigError(f"steer.component = {c}: the MFA has components 0..{mfa.K - 1}")
        out.append(int(c))
    return out


def steer_logit_changes(
    lm: nn.Module,
    tokenizer: Any,
    mfa: MFA,
    layer: int,
    *,
    prompts: list[str],
    components: list[int],
    alphas: list[float],
    z_R: torch.Tensor,
    top_logits: int,
    chat: bool = False,
) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """Logit changes for every prompt x component x method x alpha; plus per-run checks."""
    from saeflow.models import splice_layer

    mu_KD = mfa.mu.detach().cpu()
    W_KDR = mfa.W.detach().cpu()
    rows: list[dict[str, Any]] = []
    checks: list[dict[str, Any]] = []
    for p_idx, prompt in enumerate(prompts):
        ids = encode_prompt(tokenizer, prompt, chat)
        base = last_logits(lm, ids)
        for k in components:
            for method in METHODS:
                for alpha in alphas:
                    if method == "centroid":
                        fn = centroid_fn(mu_KD[k], float(alpha))
                    else:
                        fn = two_stage_fn(mu_KD[k], W_KDR[k], z_R, float(alpha))
                    shift = _ShiftMeter(fn)
                    with splice_layer(lm, layer, shift):
                        after = last_logits(lm, ids)
                    delta = after - base
                    checks.append(
                        {
                            "prompt_idx": p_idx,
                            "component": k,
                            "method": method,
                            "alpha": float(alpha),
                            "max_abs_delta": float(delta.abs().max()),
                            "layer_shift_norm": shift.mean_norm,
                            "hook_calls": shift.calls,
                        }
                    )
                    for direction, rank, tok, value in top_changes(delta, top_logits):
                        rows.append(
                            {
                                "prompt_idx": p_idx,
                                "prompt": prompt,
                                "component": k,
                                "method": method,
                                "alpha": float(alpha),
                                "direction": direction,
                                "rank": rank,
                                "token_id": tok,
                                "token": tokenizer.decode([tok]),
                                "delta": value,
                                "logit_before": float(base[tok]),
                                "logit_after": float(after[tok]),
                            }
                        )
    df = pd.DataFrame(rows)
    if not df.empty:
        df = df.astype(
            {
                "prompt_idx": "int32",
                "component": "int32",
                "alpha": "float32",
                "rank": "int32",
                "token_id": "int32",
                "delta": "float32",
                "logit_before": "float32",
                "logit_after": "float32",
            }
        )
    return df, checks


class _ShiftMeter:
    """Wraps a splice function and records how far it moved the layer output (a hook check)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.fn, self.calls, self.mean_norm = fn, 0, 0.0

    def __call__(self, acts_BPD: torch.Tensor) -> torch.Tensor:
        out = self.fn(acts_BPD)
        self.calls += 1
        self.mean_norm = float((out - acts_BPD.float()).norm(dim=-1).mean())
        return out


def encode_prompt(tokenizer: Any, prompt: str, chat: bool) -> torch.Tensor:
    """(1, P) input ids: the plain prompt, or a one-turn chat with the generation prompt."""
    if chat:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return torch.tensor([list(ids)], dtype=torch.long)
    enc = tokenizer(prompt, return_tensors="pt")
    if enc["input_ids"].shape[1] == 0:
        raise ConfigError(f"steer.prompts: prompt {prompt!r} tokenizes to nothing")
    return enc["input_ids"]


def resolve_z(steer: dict[str, Any], R: int) -> torch.Tensor:
    if steer.get("z") is not None:
        return torch.tensor(steer["z"], dtype=torch.float32)
    z = torch.zeros(R)
    z[0] = float(steer.get("z_scale", 2.0))
    return z


def run_mfa_steer(
    mfa_path: str | Path,
    *,
    lm_path: str,
    layer: int,
    out_path: str | Path,
    info_path: str | Path,
    settings: dict[str, Any],
    revision: str | None = None,
    trust_remote_code: bool = False,
    device: str = "auto",
    dtype: str = "bfloat16",
    seed: int = 0,
) -> dict[str, Any]:
    """mfa_steer rule: logit-change table (parquet) and a JSON with the run's checks."""
    from saeflow.io import atomic_path, write_json
    from saeflow.mfa import resolve_settings
    from saeflow.mfa.model import load_mfa
    from saeflow.models import load_lm
    from saeflow.tokenize import load_tokenizer
    from saeflow.utils import seed_everything

    s = resolve_settings(settings)
    steer = s["steer"]
    seed_everything(seed)
    mfa = load_mfa(mfa_path)
    lm = load_lm(
        lm_path,
        revision=revision,
        trust_remote_code=trust_remote_code,
        device=device,
        dtype=dtype,
        with_head=True,
    )
    d_model = _d_model(lm)
    if d_model is not None and d_model != mfa.D:
        raise ConfigError(f"{mfa_path}: MFA has D={mfa.D} but {lm_path} has hidden size {d_model}")
    tokenizer = load_tokenizer(str(lm_path), revision=revision, trust_remote_code=trust_remote_code)
    components = default_components(mfa, steer["component"])
    z_R = resolve_z(steer, mfa.R)
    df, checks = steer_logit_changes(
        lm,
        tokenizer,
        mfa,
        layer,
        prompts=steer["prompts"],
        components=components,
        alphas=[float(a) for a in steer["alphas"]],
        z_R=z_R,
        top_logits=steer["top_logits"],
        chat=bool(steer.get("chat")),
    )
    info = {
        "layer": layer,
        "lm": lm_path,
        "components": components,
        "z": z_R.tolist(),
        "alphas": [float(a) for a in steer["alphas"]],
        "prompts": steer["prompts"],
        "methods": list(METHODS),
        "checks": checks,
    }
    with atomic_path(out_path) as tmp:
        df.to_parquet(tmp, compression="zstd", index=False)
    write_json(info_path, info)
    zero = [c for c in checks if c["alpha"] == 0 and c["method"] == "centroid"]
    if zero and max(c["max_abs_delta"] for c in zero) > 1e-3:
        log.warning(
            "alpha=0 centroid steering changed logits (max %.3g): check the hook",
            max(c["max_abs_delta"] for c in zero),
        )
    return info


def _d_model(lm: nn.Module) -> int | None:
    cfg = getattr(lm, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    value = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    return int(value) if value else None
