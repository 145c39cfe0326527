"""Seed 001 (base vs instruct diffing): counts, exclusivity and inconsistency, re-implemented
densely from the notebook's cells and compared with the diffing stage's features.parquet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from test_diffing import GEN, PROMPT, write_codes_dir, write_tokens

from saeflow.diffing import run_diffing

F = 40
N = {"target": 7, "control": 5}
POS = {"model": 9, "newline": 10}  # GEN = <start_of_turn> model \n at 8, 9, 10: offsets -1, 0


def seed_precompute(base: dict, chat: dict, n_target: int, metric: str) -> pd.DataFrame:
    """The notebook's `precompute_feature_data` for one token type (all features, not filtered)."""
    bt, bc = base["target_num_active"], base["control_num_active"]
    ct, cc = chat["target_num_active"], chat["control_num_active"]
    base_excl = (bt > 0) & ~(bc > 0)
    chat_excl = (ct > 0) & ~(cc > 0)
    both = base_excl & chat_excl
    cat = np.where(both, "both", np.where(base_excl, "base", np.where(chat_excl, "chat", "none")))
    incons = (base_excl & (cc > 0)) | (chat_excl & (bc > 0))
    return pd.DataFrame(
        {
            "base_target_num_active": bt,
            "base_control_num_active": bc,
            "chat_target_num_active": ct,
            "chat_control_num_active": cc,
            "exclusive": cat,
            "inconsistent": incons,
            f"base_{metric}": base[metric],
            f"chat_{metric}": chat[metric],
            "base_target_pct": bt / n_target * 100,
        }
    )


def test_diffing_matches_the_notebook(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    tokens, codes, dense = {}, {}, {}
    for s, n in N.items():
        seqs = {i: PROMPT[:4] + [f"w{s}{i}"] + PROMPT[5:] + GEN for i in range(n)}
        tokens[s], codes[s] = {}, {}
        for m in ("base", "chat"):
            tokens[s][m] = write_tokens(tmp_path / "tokens" / m / f"{s}.parquet", seqs)
            # TopK-like codes: a few features per token, fp16 as stored
            X = rng.random((n, len(seqs[0]), F)) * (rng.random((n, len(seqs[0]), F)) < 0.15)
            X = X.astype(np.float16).astype(np.float32)
            dense[m, s] = X
            rows = {(i, p): X[i, p] for i in range(n) for p in range(len(seqs[i]))}
            codes[s][m] = write_codes_dir(tmp_path / "codes" / m / s, rows, F)
    analysis = {
        "type": "diffing",
        "name": "intro",
        "models": ["base", "chat"],
        "sae": "s",
        "target": "target",
        "control": "control",
        "token_types": {"model": -1, "newline": 0},
        "metrics": ["target_all_mean", "target_sparsity"],
    }
    out = tmp_path / "out"
    summary = run_diffing(analysis, tokens, codes, out / "features.parquet", out / "summary.json")
    table = pd.read_parquet(out / "features.parquet")
    assert summary["n_target"] == N["target"] and summary["n_control"] == N["control"]
    for token_type, p in POS.items():
        data = {}
        for m in ("base", "chat"):
            data[m] = {f"{s}_num_active": (dense[m, s][:, p] > 0).sum(0) for s in N} | {
                "target_all_mean": dense[m, "target"][:, p].mean(0),
                "target_sparsity": (dense[m, "target"][:, p] > 0).mean(0),
            }
        for metric in ("target_all_mean", "target_sparsity"):
            want = seed_precompute(data["base"], data["chat"], N["target"], metric)
            got = table[table["token_type"] == token_type].reset_index(drop=True)
            for col in want.columns:
                if col == "base_target_pct":
                    np.testing.assert_allclose(
                        got["base_target_num_active"] / summary["n_target"] * 100, want[col]
                    )
                elif want[col].dtype.kind == "f":
                    np.testing.assert_allclose(got[col], want[col], rtol=1e-6, atol=1e-7)
                else:
                    assert got[col].tolist() == want[col].tolist(), (token_type, col)
        # the plotted set: target-exclusive for at least one model
        plotted = want["exclusive"] != "none"
        assert summary["token_types"][token_type]["exclusive"]["none"] == int((~plotted).sum())
