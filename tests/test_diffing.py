"""Diffing: token-type anchors, statistics, classification, and the whole stage on tiny files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp

from saeflow.codes import CODES_FORMAT, Codes, write_code_shard
from saeflow.diffing import (
    TokenType,
    anchor_position,
    classify,
    detect_model_header,
    diff_table,
    feature_stats,
    parse_token_types,
    pick_model_header,
    resolve_positions,
    run_diffing,
)
from saeflow.errors import ConfigError, DataError
from saeflow.io import read_json, write_manifest

PROMPT = ["<bos>", "<start_of_turn>", "user", "\n", "Hi", " you", "<end_of_turn>", "\n"]
GEN = ["<start_of_turn>", "model", "\n"]


def write_codes_dir(path: Path, rows: dict[tuple[int, int], np.ndarray], d_sae: int) -> Path:
    """A one-part codes directory (saeflow.codes layout) from dense rows keyed by (seq_id, pos)."""
    path.mkdir(parents=True, exist_ok=True)
    keys = sorted(rows)
    dense = np.stack([rows[k] for k in keys]).astype(np.float32)
    csr = sp.csr_matrix(dense)
    codes = Codes(
        np.array([k[0] for k in keys], np.int32),
        np.array([k[1] for k in keys], np.int32),
        csr.indptr.astype(np.int64),
        csr.indices.astype(np.int32),
        csr.data.astype(np.float16),
        d_sae,
    )
    half = len(keys) // 2  # two shards, to exercise streaming
    write_code_shard(path / "part-00000.parquet", codes.select(np.arange(len(keys)) < half))
    write_code_shard(path / "part-00001.parquet", codes.select(np.arange(len(keys)) >= half))
    write_manifest(
        path,
        {
            "format": CODES_FORMAT,
            "d_sae": d_sae,
            "parts": {"codes": "."},
            "shards": ["part-00000.parquet", "part-00001.parquet"],
        },
    )
    return path / "manifest.json"


def write_tokens(path: Path, seqs: dict[int, list[str]]) -> Path:
    """A tokens parquet (tokenize contract) from decoded token lists."""
    vocab: dict[str, int] = {}
    seq_ids = sorted(seqs)
    token_ids = [[vocab.setdefault(t, len(vocab)) for t in seqs[s]] for s in seq_ids]
    table = pa.table(
        {
            "seq_id": pa.array(seq_ids, pa.int32()),
            "token_ids": pa.array(token_ids, pa.list_(pa.int32())),
            "roles": pa.array([[0] * len(seqs[s]) for s in seq_ids], pa.list_(pa.int8())),
            "n_tokens": pa.array([len(seqs[s]) for s in seq_ids], pa.int32()),
            "tokens": pa.array([seqs[s] for s in seq_ids], pa.list_(pa.string())),
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


# ----------------------------------------------------------------------------- anchors


def test_anchor_resolution_on_rendered_tokens():
    tokens = PROMPT + GEN  # 11 tokens; "model" is 9, its newline 10
    assert detect_model_header(tokens) == "<start_of_turn>model"
    assert anchor_position(tokens, "<start_of_turn>model", -1) == 9
    assert anchor_position(tokens, "<start_of_turn>model", 0) == 10
    assert anchor_position(tokens, "<start_of_turn>model", 1) is None  # past the end
    assert anchor_position(tokens, "<end_of_turn>", 0) == 7
    # first vs last occurrence of a literal that occurs twice
    assert anchor_position(tokens, "<start_of_turn>", 0, "first") == 2
    assert anchor_position(tokens, "<start_of_turn>", 0, "last") == 9
    # an anchor ending inside a token counts that token as the anchor's last one
    assert anchor_position(tokens, "<start_of_turn>mod", 0) == 10
    assert anchor_position(tokens, "nowhere", 0) is None

    two_turns = PROMPT + ["<start_of_turn>", "model", "\n", "Yo", "<end_of_turn>", "\n"] + GEN
    types = parse_token_types({"model": -1, "newline": 0, "eot": {"anchor": "<end_of_turn>"}})
    pos = resolve_positions([tokens, two_turns], [0, 1], types, "<start_of_turn>model")
    assert pos.tolist() == [[9, 15], [10, 16], [7, 13]]
    first = [TokenType("m", -1, "<start_of_turn>model", "first")]
    assert resolve_positions([two_turns], [1], first, None).tolist() == [[9]]


def test_anchor_errors():
    with pytest.raises(DataError, match="seq_id 7: token type 'newline'"):
        resolve_positions([PROMPT], [7], parse_token_types({"newline": 0}), "<start_of_turn>model")
    with pytest.raises(ConfigError, match="model_header"):
        pick_model_header([["plain", "text"]], None)
    assert pick_model_header([["x"]], "User:") == "User:"
    with pytest.raises(ConfigError, match="occurrence"):
        parse_token_types({"a": {"anchor": "x", "occurrence": "middle"}})
    with pytest.raises(ConfigError, match="integer offset"):
        parse_token_types({"a": "1"})
    with pytest.raises(ConfigError, match="non-empty"):
        parse_token_types({})


# ----------------------------------------------------------------------------- statistics

F = 8
# Hand-built codes at the "model" position, [prompts, features]; features 0..6 cover every case.
MODEL_POS = {
    ("base", "target"): {0: [1, 0, 2], 2: [1, 1, 0], 3: [1, 0, 0], 4: [0, 3, 0]},
    ("base", "control"): {3: [1, 0], 5: [0, 2]},
    ("chat", "target"): {1: [2, 0, 0], 2: [0, 1, 0], 3: [1, 1, 1], 5: [1, 0, 0]},
    ("chat", "control"): {3: [0, 1], 4: [1, 0]},
}
NEWLINE_POS = {("chat", "target"): {6: [0, 5, 0]}}
N_PROMPTS = {"target": 3, "control": 2}
# exclusive / inconsistent per feature at the "model" position, worked out by hand:
#   f0 base only; f1 chat only; f2 both; f3 none (active on both controls);
#   f4 base only but active on chat's control -> inconsistent; f5 chat only but active on base's
#   control -> inconsistent; f6, f7 never active at this position.
EXPECT_MODEL = ["base", "chat", "both", "none", "base", "chat", "none", "none"]
EXPECT_INCONSISTENT = [False, False, False, False, True, True, False, False]


def dense(spec: dict[int, list[float]], n: int) -> np.ndarray:
    out = np.zeros((n, F), np.float32)
    for f, col in spec.items():
        out[:, f] = col
    return out


def test_feature_stats_match_dense_numpy():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(9, 5)) * (rng.random((9, 5)) < 0.4)
    X[:, 4] = 0.0
    X[:, 3] = np.abs(X[:, 3]) + 0.5  # stored in every row
    stats = feature_stats(sp.csr_matrix(X))
    assert stats["num_active"].tolist() == (X > 0).sum(0).tolist()
    np.testing.assert_allclose(stats["all_mean"], X.mean(0))
    np.testing.assert_allclose(stats["all_std"], X.std(0, ddof=1))
    np.testing.assert_allclose(stats["max"], X.max(0))
    np.testing.assert_allclose(stats["sparsity"], (X > 0).mean(0))


def test_classification_against_hand_counts():
    codes = {
        m: {s: [sp.csr_matrix(dense(MODEL_POS.get((m, s), {}), N_PROMPTS[s]))] for s in N_PROMPTS}
        for m in ("base", "chat")
    }
    table = diff_table(codes, ["base", "chat"], ["model"], ["target_all_mean", "target_sparsity"])
    assert table["exclusive"].tolist() == EXPECT_MODEL
    assert table["inconsistent"].tolist() == EXPECT_INCONSISTENT
    assert table["base_target_num_active"].tolist() == [2, 0, 2, 1, 1, 0, 0, 0]
    assert table["base_control_num_active"].tolist() == [0, 0, 0, 1, 0, 1, 0, 0]
    assert table["chat_target_num_active"].tolist() == [0, 1, 1, 3, 0, 1, 0, 0]
    assert table["chat_control_num_active"].tolist() == [0, 0, 0, 1, 1, 0, 0, 0]
    assert table["base_target_all_mean"].tolist()[:5] == [1.0, 0.0, 2 / 3, 1 / 3, 1.0]
    assert table["chat_target_sparsity"].tolist()[3] == 1.0

    counts = {"a": {"target": np.array([1, 1]), "control": np.array([0, 0])}}
    counts["b"] = {"target": np.array([0, 1]), "control": np.array([2, 0])}
    label, flag = classify(counts, ["a", "b"])
    assert label.tolist() == ["a", "both"] and flag.tolist() == [True, False]
    with pytest.raises(ConfigError, match="unknown"):
        diff_table(codes, ["base", "chat"], ["model"], ["target_median"])


def _stage_inputs(tmp_path: Path) -> tuple[dict, dict]:
    """tokens[set][model] and codes[set][model] files for the hand-built fixture."""
    tokens, codes = {}, {}
    for s, n in N_PROMPTS.items():
        seqs = {i: PROMPT[:4] + [f"w{s}{i}"] + PROMPT[5:] + GEN for i in range(n)}
        tokens[s], codes[s] = {}, {}
        for m in ("base", "chat"):
            tokens[s][m] = write_tokens(tmp_path / "tokens" / m / f"{s}.parquet", seqs)
            at_model = dense(MODEL_POS.get((m, s), {}), n)
            at_newline = dense(NEWLINE_POS.get((m, s), {}), n)
            rows = {}
            for i in range(n):
                for p in range(len(seqs[i])):
                    row = np.zeros(F, np.float32)
                    row[7] = 1.0  # noise at every other position: must never be counted
                    rows[(i, p)] = {9: at_model[i], 10: at_newline[i]}.get(p, row)
            codes[s][m] = write_codes_dir(tmp_path / "codes" / m / s, rows, F)
    return tokens, codes


def test_diff_stage_end_to_end(tmp_path: Path):
    tokens, codes = _stage_inputs(tmp_path)
    expl = tmp_path / "expl.csv"
    expl.write_text('feature_id,description,extra\n4,"<b>odd</b> feature",x\n0,first,y\n')
    analysis = {
        "type": "diffing",
        "name": "intro",
        "models": ["base", "chat"],
        "sae": "s",
        "target": "t",
        "control": "c",
        "token_types": {"model": -1, "newline": 0},
        "metrics": ["target_all_mean", "control_max"],
    }
    out = tmp_path / "diffing" / "intro"
    summary = run_diffing(
        analysis, tokens, codes, out / "features.parquet", out / "summary.json", expl
    )
    table = pd.read_parquet(out / "features.parquet")
    assert len(table) == 2 * F
    assert table["token_type"].tolist() == ["model"] * F + ["newline"] * F
    assert table["feature_id"].tolist() == list(range(F)) * 2
    model = table[table["token_type"] == "model"]
    assert model["exclusive"].tolist() == EXPECT_MODEL
    assert model["inconsistent"].tolist() == EXPECT_INCONSISTENT
    newline = table[table["token_type"] == "newline"]
    assert newline["exclusive"].tolist() == ["none"] * 6 + ["chat", "none"]
    assert table["chat_control_max"].tolist()[4] == 1.0
    assert {"base_target_all_mean", "chat_control_max", "description"} <= set(table.columns)
    assert table["description"].tolist()[4] == "<b>odd</b> feature"
    assert table["description"].isna().sum() == 2 * F - 4
    assert summary == read_json(out / "summary.json")
    assert summary["n_target"] == 3 and summary["n_control"] == 2
    assert summary["token_types"]["model"] == {
        "exclusive": {"base": 2, "chat": 2, "both": 1, "none": 3},
        "inconsistent": 2,
    }
    assert summary["token_types"]["newline"]["exclusive"]["chat"] == 1
    assert summary["token_type_specs"]["model"]["anchor"] == "<start_of_turn>model"
    assert summary["exclusive_any"] == 6


def test_models_must_share_token_ids(tmp_path: Path):
    tokens, codes = _stage_inputs(tmp_path)
    table = pq.read_table(tokens["target"]["base"]).to_pylist()
    table[1]["token_ids"] = table[1]["token_ids"][:-1] + [99]
    changed = tmp_path / "changed.parquet"
    pq.write_table(pa.Table.from_pylist(table, pq.read_schema(tokens["target"]["base"])), changed)
    tokens["target"]["chat"] = changed
    analysis = {"name": "x", "models": ["base", "chat"], "token_types": {"model": -1}}
    with pytest.raises(DataError, match="seq_id 1 is tokenized differently.*position 10"):
        run_diffing(analysis, tokens, codes, tmp_path / "f.parquet", tmp_path / "s.json")
    bad = {"name": "x", "models": ["base"], "token_types": {"m": 0}}
    with pytest.raises(ConfigError, match="two different models"):
        run_diffing(bad, tokens, codes, tmp_path / "f.parquet", tmp_path / "s.json")
