"""Page first loads stay under 2 MB at the seeds' sizes: 131k-feature dashboards, diffing and
decoder UMAPs, 30k-point UMAPs with a 500-token hover window. The synthetic inputs are written
directly (no stage runs); `first_load_bytes` counts the page, its local scripts and the shards it
loads at start."""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd
import pytest

from saeflow.report import (
    first_load_bytes,
    write_dashboard_page,
    write_decoder_umap_page,
    write_diffing_page,
    write_match_page,
    write_umap_page,
)

LIMIT = 2_000_000
F = 131_072


def _diffing_features(rng: np.random.Generator) -> pd.DataFrame:
    parts = []
    for tt in ("model", "newline"):
        counts = {
            f"{m}_{s}_num_active": rng.binomial(40, 0.02, F)
            for m in ("base", "chat")
            for s in ("target", "control")
        }
        frame = pd.DataFrame({"token_type": tt, "feature_id": np.arange(F), **counts})
        for m in ("base", "chat"):
            frame[f"{m}_target_all_mean"] = rng.random(F)
            frame[f"{m}_target_sparsity"] = rng.random(F)
        excl_b = (frame["base_target_num_active"] > 0) & (frame["base_control_num_active"] == 0)
        excl_c = (frame["chat_target_num_active"] > 0) & (frame["chat_control_num_active"] == 0)
        frame["exclusive"] = np.select(
            [excl_b & excl_c, excl_b, excl_c], ["both", "base", "chat"], "none"
        )
        frame["inconsistent"] = (excl_b & (frame["chat_control_num_active"] > 0)) | (
            excl_c & (frame["base_control_num_active"] > 0)
        )
        frame["description"] = [f"feature {i} about things" if i % 3 else None for i in range(F)]
        parts.append(frame)
    return pd.concat(parts, ignore_index=True)


@pytest.fixture(scope="module")
def diffing_features(tmp_path_factory):
    feats = tmp_path_factory.mktemp("diffing") / "features.parquet"
    _diffing_features(np.random.default_rng(0)).to_parquet(feats)
    return feats


@pytest.mark.parametrize("plot", ["exclusive", "all"])
def test_diffing_page_first_load_at_131k_features(tmp_path, diffing_features, plot):
    feats = diffing_features
    page = write_diffing_page(
        feats,
        None,
        tmp_path / "reports" / "diffing-big.html",
        {"name": "big", "models": ["base", "chat"], "report": {"plot": plot}},
    )
    assert first_load_bytes(page) < LIMIT


def test_umap_page_first_load_at_30k_points_and_500_token_window(tmp_path):
    rng = np.random.default_rng(1)
    n_seq, per_seq, length = 1000, 30, 512
    pos = np.linspace(0, length - 1, per_seq).astype(np.int32)
    emb = pd.DataFrame(
        {
            "seq_id": np.repeat(np.arange(n_seq, dtype=np.int32), per_seq),
            "pos": np.tile(pos, n_seq),
            "x": rng.normal(size=n_seq * per_seq),
            "y": rng.normal(size=n_seq * per_seq),
            "z": rng.normal(size=n_seq * per_seq),
            "role": rng.integers(0, 3, n_seq * per_seq).astype(np.int8),
        }
    )
    emb.to_parquet(tmp_path / "embedding.parquet")
    vocab = np.array([f" w{i}" for i in range(5000)])
    pd.DataFrame(
        {
            "seq_id": np.arange(n_seq, dtype=np.int32),
            "tokens": [list(vocab[rng.integers(0, 5000, length)]) for _ in range(n_seq)],
        }
    ).to_parquet(tmp_path / "tokens.parquet")
    page = write_umap_page(
        tmp_path / "embedding.parquet",
        None,
        tmp_path / "reports" / "umap-big.html",
        {"name": "big", "hover_window": 500, "report": {"lines": "all"}},
        tokens_path=tmp_path / "tokens.parquet",
    )
    assert first_load_bytes(page) < LIMIT


@functools.cache
def big_dashboard_frames(n: int = F) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Feature index and two examples per feature for an SAE of n features."""
    rng = np.random.default_rng(2)
    n_active = rng.integers(0, 500, n)
    toks = [f" t{i}" for i in range(20000)]
    index = pd.DataFrame(
        {
            "feature_id": np.arange(n, dtype=np.int32),
            "n_active": n_active,
            "density": n_active / 2e5,
            "max_act": rng.random(n),
            "mean_act": rng.random(n),
            "hist_lo": np.zeros(n),
            "hist_hi": np.ones(n),
            "hist_counts": [[1, 2, 3, 4]] * n,
            "top_tokens": [[toks[(7 * i + j) % 20000] for j in range(4)] for i in range(n)],
            "top_token_counts": [[4, 3, 2, 1]] * n,
        }
    )
    examples = pd.DataFrame(
        {
            "feature_id": np.repeat(np.arange(n, dtype=np.int32), 2),
            "rank": np.tile([0, 1], n),
            "activation": rng.random(2 * n),
            "context_html": "a b <b>c</b> d",
        }
    )
    return index, examples


def test_dashboard_and_decoder_umap_first_load_at_131k_features(tmp_path):
    rng = np.random.default_rng(2)
    toks = [f" t{i}" for i in range(20000)]
    index, examples = big_dashboard_frames()
    dash = write_dashboard_page(
        tmp_path / "reports" / "geometry-dash.html", index, examples, analysis={"name": "d"}
    )
    assert first_load_bytes(dash) < LIMIT

    emb = pd.DataFrame(
        {
            "sae": np.repeat(["a", "b"], F),
            "feature_id": np.tile(np.arange(F), 2),
            "x": rng.normal(size=2 * F),
            "y": rng.normal(size=2 * F),
            "z": rng.normal(size=2 * F),
            "top_tokens": [[toks[i % 20000]] for i in range(2 * F)],
        }
    )
    partners = {f"a:{i}": [["b", i, 0.9, True]] for i in range(0, F, 4)}
    dec = write_decoder_umap_page(
        tmp_path / "reports" / "geometry-dec.html", emb, partners, analysis={"name": "u"}
    )
    assert first_load_bytes(dec) < LIMIT


def test_match_page_first_load_at_131k_features(tmp_path):
    rng = np.random.default_rng(3)
    n = F
    table = pd.DataFrame(
        {
            "direction": np.repeat(["a_to_b", "b_to_a"], n),
            "rank": 0,
            "source_feature": np.tile(np.arange(n), 2),
            "target_feature": rng.permutation(2 * n) % n,
            "corr": rng.uniform(-1, 1, 2 * n),
            "decoder_cos": rng.uniform(-1, 1, 2 * n),
            "mutual": rng.random(2 * n) < 0.5,
        }
    )
    page = write_match_page(
        tmp_path / "reports" / "geometry-m.html",
        table,
        {"a": {"sae": "a"}, "b": {"sae": "b"}, "n_tokens": 1},
        analysis={"name": "m"},
    )
    assert first_load_bytes(page) < LIMIT
