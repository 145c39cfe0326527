"""The `sae_steer` analysis: add alpha * W_dec[f] at the SAE's hook point and watch what changes.

The SAE's own layer and hook (recorded in its files or configured; resid_post of the model's
`layer` by default, through `saeflow.models.splice_hook`, whose resid_post case is the splice MFA
steering uses) receive x <- x + alpha d_f at every position, d_f the decoder
direction of feature f as the SAE decodes it (in activation space). For every prompt x feature x
alpha we report:
- the top increases and drops of the last-position logits against the unsteered run;
- the greedy continuation with the steering on (every generated position is steered too);
- the SAE features that move when the steered activations are encoded again: the mean change of
  each feature's code over the prompt's positions, largest up and down ("labels before and after
  steering" in seed 003). The steered feature itself is expected at the top; the others are the
  features whose decoder directions interfere with d_f.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from saeflow.errors import ConfigError

log = logging.getLogger(__name__)


def add_direction_fn(
    d_D: torch.Tensor, alpha: float, record: list[torch.Tensor] | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """x + alpha d in float32; `record` keeps the steered activations of each call."""

    def fn(acts_BPD: torch.Tensor) -> torch.Tensor:
        out = acts_BPD.float() + alpha * d_D.to(acts_BPD.device, torch.float32)
        if record is not None:
            record.append(out.detach())
        return out

    return fn


@torch.no_grad()
def greedy(lm: nn.Module, ids_1P: torch.Tensor, n_new: int) -> list[int]:
    """Greedy continuation (no KV cache: every step sees, and steers, the whole sequence)."""
    device = next(lm.parameters()).device
    ids = ids_1P.to(device)
    out: list[int] = []
    for _ in range(n_new):
        nxt = int(lm(input_ids=ids, use_cache=False).logits[0, -1].argmax())
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]], device=device)], dim=1)
    return out


def choose_features(codes: Any, n: int) -> list[int]:
    """The `n` most frequently active features (ties by id): live, well-supported directions."""
    counts = np.bincount(codes.feature_ids, minlength=codes.d_sae)
    order = np.lexsort((np.arange(len(counts)), -counts))
    return [int(f) for f in order[:n] if counts[f] > 0]


def moved_features(
    sae: Any, before_PD: torch.Tensor, after_PD: torch.Tensor, k: int
) -> list[tuple[str, int, float, float, float]]:
    """(direction, feature, mean change, mean before, mean after): the k largest moves each way."""
    b = sae.encode(before_PD.float()).mean(dim=0)
    a = sae.encode(after_PD.float()).mean(dim=0)
    delta = a - b
    k = min(k, delta.numel())
    rows = []
    for sign, vals in (("+", delta), ("-", -delta)):
        v, i = vals.topk(k)
        for val, f in zip(v.tolist(), i.tolist(), strict=True):
            if val > 0:
                rows.append((sign, int(f), float(delta[f]), float(b[f]), float(a[f])))
    return rows


def steer_sae_features(
    lm: nn.Module,
    tokenizer: Any,
    sae: Any,
    directions: dict[int, torch.Tensor],
    layer: int,
    *,
    hook: str = "resid_post",
    prompts: list[str],
    features: list[int],
    alphas: list[float],
    top_logits: int,
    max_new_tokens: int,
    top_moved: int,
    chat: bool,
) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """Long table of logit changes and moved features; a list of runs with continuations."""
    from saeflow.mfa.steer import encode_prompt, last_logits, top_changes
    from saeflow.models import splice_hook

    rows: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    for p_idx, prompt in enumerate(prompts):
        ids = encode_prompt(tokenizer, prompt, chat)
        clean: list[torch.Tensor] = []
        with splice_hook(
            lm,
            layer,
            hook,
            add_direction_fn(torch.zeros_like(next(iter(directions.values()))), 0.0, clean),
        ):
            base = last_logits(lm, ids)
        base_cont = greedy(lm, ids, max_new_tokens)
        for f in features:
            for alpha in alphas:
                rec: list[torch.Tensor] = []
                with splice_hook(
                    lm, layer, hook, add_direction_fn(directions[f], float(alpha), rec)
                ):
                    after = last_logits(lm, ids)
                    cont = greedy(lm, ids, max_new_tokens)
                delta = after - base
                key = {"prompt_idx": p_idx, "prompt": prompt, "feature": f, "alpha": float(alpha)}
                for direction, rank, tok, value in top_changes(delta, top_logits):
                    rows.append(
                        {
                            **key,
                            "kind": "logit",
                            "direction": direction,
                            "rank": rank,
                            "id": tok,
                            "label": tokenizer.decode([tok]),
                            "delta": value,
                            "before": float(base[tok]),
                            "after": float(after[tok]),
                        }
                    )
                moved = moved_features(sae, clean[0][0].cpu(), rec[0][0].cpu(), top_moved)
                ranks = {"+": 0, "-": 0}
                for direction, g, d, b, a in moved:
                    rows.append(
                        {
                            **key,
                            "kind": "feature",
                            "direction": direction,
                            "rank": ranks[direction],
                            "id": g,
                            "label": f"f{g}" + (" (steered)" if g == f else ""),
                            "delta": d,
                            "before": b,
                            "after": a,
                        }
                    )
                    ranks[direction] += 1
                runs.append(
                    {
                        **key,
                        "continuation": tokenizer.decode(cont),
                        "base_continuation": tokenizer.decode(base_cont),
                        "max_abs_logit_delta": float(delta.abs().max()),
                    }
                )
    df = pd.DataFrame(rows)
    if not df.empty:
        df = df.astype(
            {
                "prompt_idx": "int32",
                "feature": "int32",
                "alpha": "float32",
                "rank": "int32",
                "id": "int32",
                "delta": "float32",
                "before": "float32",
                "after": "float32",
            }
        )
    return df, runs


def run_sae_steer(
    *,
    analysis: dict[str, Any],
    model: dict[str, Any],
    sae_spec: dict[str, Any],
    runtime: dict[str, Any],
    out_path: str | Path,
    info_path: str | Path,
    page_path: str | Path | None = None,
    codes_path: str | Path | None = None,
    tokens_path: str | Path | None = None,
    hookpoint: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The rule: load LM and SAE, choose features, steer at the SAE's hook point (default: the
    model's layer, resid_post), write table, info and page."""
    from saeflow import load_sae
    from saeflow.codes import load_codes
    from saeflow.devices import resolve_device
    from saeflow.io import atomic_path, write_json
    from saeflow.models import load_lm
    from saeflow.sae.models import check_sae_matches
    from saeflow.tokenize import load_tokenizer
    from saeflow.utils import seed_everything

    seed_everything(int(runtime.get("seed", 0)))
    device = resolve_device(runtime)
    lm = load_lm(
        model["path"],
        revision=model.get("revision"),
        trust_remote_code=bool(model.get("trust_remote_code", False)),
        device=device,
        dtype=str(runtime.get("dtype", "bfloat16")),
        with_head=True,
    )
    sae = load_sae(sae_spec, device="cpu")
    cfg = getattr(lm.config, "text_config", None) or lm.config
    check_sae_matches(sae, int(cfg.hidden_size), f"sae_steer {analysis['name']}")
    features = analysis.get("features")
    codes = load_codes(codes_path) if codes_path else None
    if features is None:
        features = choose_features(codes, int(analysis["n_features"]))
    bad = [f for f in features if not 0 <= f < sae.d_sae]
    if bad:
        raise ConfigError(
            f"analyses {analysis['name']}.features = {bad}: the SAE has features 0..{sae.d_sae - 1}"
        )
    directions = decoder_rows(sae, list(features))
    tokenizer = load_tokenizer(
        model["path"],
        revision=model.get("revision"),
        trust_remote_code=bool(model.get("trust_remote_code", False)),
    )
    layer = int(hookpoint["layer"]) if hookpoint else int(model["layer"])
    hook = str(hookpoint["hook"]) if hookpoint else "resid_post"
    df, runs = steer_sae_features(
        lm,
        tokenizer,
        sae,
        directions,
        layer,
        hook=hook,
        prompts=list(analysis["prompts"]),
        features=list(features),
        alphas=[float(a) for a in analysis["alphas"]],
        top_logits=int(analysis["top_logits"]),
        max_new_tokens=int(analysis["max_new_tokens"]),
        top_moved=int(analysis["top_moved"]),
        chat=bool(analysis["chat"]),
    )
    if codes is not None and tokens_path and len(df):
        df["tokens"] = feature_labels(df, codes, tokens_path)
    info = {
        "name": analysis["name"],
        "layer": layer,
        "hook": hook,
        "lm": model["path"],
        "features": list(features),
        "alphas": [float(a) for a in analysis["alphas"]],
        "prompts": list(analysis["prompts"]),
        "decoder_norms": {str(f): float(directions[f].norm()) for f in features},
        "runs": runs,
    }
    with atomic_path(out_path) as tmp:
        df.to_parquet(tmp, compression="zstd", index=False)
    write_json(info_path, info)
    zero = [r for r in runs if r["alpha"] == 0]
    if zero and max(r["max_abs_logit_delta"] for r in zero) > 1e-3:
        log.warning("alpha=0 steering changed logits: check the hook")
    if page_path:
        from saeflow.compare.pages import write_steer_page

        write_steer_page(page_path, df, info)
    return info


def feature_labels(df: pd.DataFrame, codes: Any, tokens_path: str | Path) -> list[str]:
    """Top activating tokens (distinct, of the top 5 activations) of every feature row's feature:
    the labels the plan compares before and after steering; empty for logit rows."""
    from saeflow.compare.pairs import top_token_sets
    from saeflow.tokenize import load_tokens

    tok_df = load_tokens(tokens_path)
    by_seq = dict(zip(tok_df["seq_id"].astype(int), tok_df["tokens"], strict=True))
    tokens = [
        str(by_seq[int(s)][int(p)]) for s, p in zip(codes.seq_ids, codes.positions, strict=True)
    ]
    is_feat = (df["kind"] == "feature").to_numpy()
    feats = np.unique(np.concatenate([df.loc[is_feat, "id"].to_numpy(), df["feature"].to_numpy()]))
    sets = top_token_sets(codes.to_scipy(), feats, tokens, 5)
    label = {int(f): " ".join(sorted(s)) for f, s in zip(feats, sets, strict=True)}
    return [label[int(i)] if k else "" for i, k in zip(df["id"], is_feat, strict=True)]


def decoder_rows(sae: Any, features: list[int]) -> dict[int, torch.Tensor]:
    """d_f = decode(e_f) - decode(0): the move feature f makes in activation space (so an SAE's
    input scaling is undone); the raw decoder row where decoding needs the input itself."""
    with torch.no_grad():
        onehot = torch.zeros(len(features), sae.d_sae)
        onehot[torch.arange(len(features)), torch.tensor(features, dtype=torch.long)] = 1.0
        try:
            rows = (sae.decode(onehot) - sae.decode(torch.zeros(1, sae.d_sae))).float()
        except (ValueError, TypeError):
            from saeflow.geometry.weights import decoder_weights

            rows = torch.from_numpy(decoder_weights(sae)[features])
    return {f: rows[i] for i, f in enumerate(features)}
