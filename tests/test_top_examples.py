"""Top-activating examples, feature index, exact-token search, logit lens and the dashboard page."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
import torch

from saeflow.codes import CODES_FORMAT, Codes, write_code_shard
from saeflow.errors import ConfigError, DataError
from saeflow.geometry.top_examples import (
    build_index,
    compute_top_examples,
    context_html,
    csr_lookup,
    feature_stats,
    parse_window,
    read_index,
    search_features,
    top_activations,
)
from saeflow.geometry.weights import read_unembedding
from saeflow.io import write_manifest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
XSS = "<img src=x onerror=alert(1)>"


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny tensors: OpenMP threads only add barrier cost on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class _Names(list):
    """Stand-in for snakemake's Namedlist: a list whose items are also attributes."""

    def __init__(self, **items):
        super().__init__(items.values())
        self.__dict__.update(items)


def run_script(name: str, **parts) -> None:
    smk = type("Snakemake", (), {})()
    for key in ("input", "output", "params", "log"):
        setattr(smk, key, _Names(**parts.get(key, {})))
    smk.threads = 1
    runpy.run_path(str(SCRIPTS / name), init_globals={"snakemake": smk}, run_name="__main__")


def write_codes_dir(path: Path, csr: sp.csr_matrix, seq_ids, positions) -> Path:
    """A one-shard code directory in the encode_sae layout."""
    csr = sp.csr_matrix(csr, dtype=np.float32)
    csr.sort_indices()
    path.mkdir(parents=True, exist_ok=True)
    codes = Codes(
        np.asarray(seq_ids, np.int32),
        np.asarray(positions, np.int32),
        csr.indptr.astype(np.int64),
        csr.indices.astype(np.int32),
        csr.data.astype(np.float16),
        csr.shape[1],
    )
    write_code_shard(path / "part-00000.parquet", codes)
    return write_manifest(
        path,
        {
            "format": CODES_FORMAT,
            "d_sae": csr.shape[1],
            "parts": {"codes": "."},
            "shards": ["part-00000.parquet"],
            "n_tokens": csr.shape[0],
        },
    )


def tokens_frame(token_lists: list[list[str]]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "seq_id": np.arange(len(token_lists), dtype=np.int32),
            "token_ids": [np.arange(len(t), dtype=np.int32) for t in token_lists],
            "roles": [np.zeros(len(t), np.int8) for t in token_lists],
            "n_tokens": [len(t) for t in token_lists],
            "tokens": token_lists,
        }
    )


def test_top_activations_rank_and_ties():
    dense = np.array(
        [[0.0, 1.0, 0.0], [3.0, 1.0, 0.0], [2.0, 5.0, 0.0], [3.0, 0.0, 0.0]], dtype=np.float32
    )
    top = top_activations(sp.csr_matrix(dense), 2)
    f0 = top[top["feature_id"] == 0]
    # equal values: earlier token first
    assert f0["row"].tolist() == [1, 3] and f0["rank"].tolist() == [0, 1]
    f1 = top[top["feature_id"] == 1]
    assert f1["row"].tolist() == [2, 0] and f1["activation"].tolist() == [5.0, 1.0]
    assert 2 not in set(top["feature_id"])  # never fires
    with pytest.raises(ConfigError, match="n_examples"):
        top_activations(sp.csr_matrix(dense), 0)


def test_feature_stats_dead_feature_has_no_nan():
    dense = np.array([[1.0, 0.0], [3.0, 0.0], [2.0, 0.0]], dtype=np.float32)
    stats = feature_stats(sp.csr_matrix(dense), n_bins=4)
    assert stats["n_active"].tolist() == [3, 0]
    assert stats["max_act"].tolist() == [3.0, 0.0]
    assert not stats[["density", "max_act", "mean_act"]].isna().any().any()
    assert np.asarray(stats["hist_counts"][0]).sum() == 3
    assert np.asarray(stats["hist_counts"][1]).sum() == 0


def test_csr_lookup_and_window():
    csr = sp.csr_matrix(np.array([[0, 2, 0], [1, 0, 4]], dtype=np.float32))
    got = csr_lookup(csr, np.array([0, 1, 1, -1, 0]), np.array([1, 2, 1, 2, 0]))
    assert got.tolist() == [2.0, 4.0, 0.0, 0.0, 0.0]
    assert parse_window(3) == (3, 3)
    assert parse_window([5, 1]) == (5, 1)
    with pytest.raises(ConfigError, match="window"):
        parse_window("wide")


def test_context_html_escapes_before_bold():
    html_ctx = context_html(["<b>", "a&b", XSS, "\n"], center=2, acts=[0, 1.0, 2.0, 0], scale=2.0)
    assert html_ctx.count("<b>") == 1 and html_ctx.count("</b>") == 1
    assert "&lt;b&gt;" in html_ctx and "a&amp;b" in html_ctx
    assert "<img" not in html_ctx and "<b>&lt;img src=x onerror=alert(1)&gt;</b>" in html_ctx
    assert "\u21b5" in html_ctx and "\n" not in html_ctx


def _king_index() -> pd.DataFrame:
    stats = pd.DataFrame(
        {
            "feature_id": np.arange(4, dtype=np.int32),
            "n_active": [5, 3, 2, 0],
            "density": [0.5, 0.3, 0.2, 0.0],
            "max_act": np.ones(4, np.float32),
            "mean_act": np.ones(4, np.float32),
            "hist_lo": np.zeros(4, np.float32),
            "hist_hi": np.ones(4, np.float32),
            "hist_counts": [np.zeros(3, np.int32)] * 4,
        }
    )
    examples = pd.DataFrame(
        {
            "feature_id": [0, 0, 0, 1, 1, 2, 2],
            "token": [" king", " king", "queen", "talking", "talking", "king", "kingdom"],
        }
    )
    return build_index(stats, examples, sae="s")


def test_exact_token_search_king_not_talking():
    index = _king_index()
    assert index["top_tokens"][0] == [" king", "queen"]
    assert index["top_token_counts"][0] == [2, 1]
    hits = search_features(index, token="king")
    assert hits["feature_id"].tolist() == [0, 2]  # 2 hits before 1 hit; never "talking"
    assert hits["token_hits"].tolist() == [2, 1]
    assert search_features(index, token="talk").empty
    assert search_features(index, token="talking")["feature_id"].tolist() == [1]
    assert search_features(index, feature_id=2)["feature_id"].tolist() == [2]
    assert search_features(index, feature_id=2, token="queen").empty


def _tiny_llama(path: Path, vocab: int = 48, d_model: int = 16) -> Path:
    """A tiny untied Llama with a non-trivial final norm gain, saved like a hub checkpoint."""
    sys.path.insert(0, str(Path(__file__).parent))
    from _fixtures_models import make_tokenizer, tiny_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        tiny_config("llama", vocab=vocab, d_model=d_model, n_layers=1, n_heads=2)
    )
    with torch.no_grad():
        model.model.norm.weight.uniform_(0.5, 1.5)
    model.save_pretrained(str(path))
    make_tokenizer(path, vocab=vocab)
    return path


def test_read_unembedding_untied_and_tied(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from _fixtures_models import tiny_config
    from transformers import AutoModelForCausalLM

    llama = _tiny_llama(tmp_path / "llama")
    model = AutoModelForCausalLM.from_pretrained(str(llama))
    want = (model.lm_head.weight * model.model.norm.weight[None, :]).detach().numpy()
    np.testing.assert_allclose(read_unembedding(llama), want, rtol=1e-6)
    raw = read_unembedding(llama, fold_final_norm=False)
    np.testing.assert_allclose(raw, model.lm_head.weight.detach().numpy())

    torch.manual_seed(1)
    gpt2 = AutoModelForCausalLM.from_config(tiny_config("gpt2", vocab=40, d_model=16, n_layers=1))
    gpt2.save_pretrained(str(tmp_path / "gpt2"))
    wte = gpt2.transformer.wte.weight * gpt2.transformer.ln_f.weight[None, :]
    np.testing.assert_allclose(read_unembedding(tmp_path / "gpt2"), wte.detach().numpy())
    with pytest.raises(DataError, match="model.safetensors"):
        read_unembedding(tmp_path)


def write_saelens(path: Path, W_dec_FD: np.ndarray, k: int = 2) -> Path:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    d_sae, d_in = W_dec_FD.shape
    (path / "cfg.json").write_text(
        json.dumps({"d_in": d_in, "d_sae": d_sae, "architecture": "topk", "k": k})
    )
    save_file(
        {
            "W_enc": torch.from_numpy(np.ascontiguousarray(W_dec_FD.T)),
            "W_dec": torch.from_numpy(np.ascontiguousarray(W_dec_FD)),
            "b_enc": torch.zeros(d_sae),
            "b_dec": torch.zeros(d_in),
        },
        str(path / "sae_weights.safetensors"),
    )
    return path


def test_top_examples_script_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stdout", sys.stdout)
    monkeypatch.setattr(sys, "stderr", sys.stderr)
    rng = np.random.default_rng(0)
    model = _tiny_llama(tmp_path / "model")
    n_seq, seq_len, d_sae = 6, 10, 12
    words = ["talking", " king", XSS, "the", "a&b", "\n"]
    token_lists = [[words[(s + p) % len(words)] for p in range(seq_len)] for s in range(n_seq)]
    tok_path = tmp_path / "tokens.parquet"
    tokens_frame(token_lists).to_parquet(tok_path)
    seq = np.repeat(np.arange(n_seq), seq_len)
    pos = np.tile(np.arange(seq_len), n_seq)
    dense = rng.random((n_seq * seq_len, d_sae)).astype(np.float32)
    dense[dense < 0.7] = 0
    dense[:, 5] = 0  # a dead feature
    dense[:, 0] = 0
    dense[np.array([t == " king" for tl in token_lists for t in tl]), 0] = 2.0
    codes_manifest = write_codes_dir(tmp_path / "codes", sp.csr_matrix(dense), seq, pos)
    W_dec = rng.standard_normal((d_sae, 16)).astype(np.float32)
    sae_dir = write_saelens(tmp_path / "sae", W_dec)
    analysis = {
        "type": "top_examples",
        "name": "dash",
        "model": "m",
        "dataset": "d",
        "sae": "s",
        "n_examples": 4,
        "window": [3, 1],
        "n_logits": 3,
    }
    out = tmp_path / "results"
    run_script(
        "top_examples.py",
        input={"codes": str(codes_manifest), "tokens": str(tok_path)},
        output={
            "examples": str(out / "geometry/dash/examples.parquet"),
            "index": str(out / "geometry/dash/feature_index.parquet"),
            "page": str(out / "reports/geometry-dash.html"),
        },
        params={
            "analysis": analysis,
            "model": {"path": str(model), "revision": None, "trust_remote_code": False},
            "sae": {"name": "s", "format": "saelens", "path": str(sae_dir)},
            "runtime": {"device": "cpu", "seed": 0},
            "families": [],
        },
        log={"log": str(tmp_path / "logs/top.log")},
    )
    examples = pq.read_table(out / "geometry/dash/examples.parquet").to_pandas()
    index = read_index(out / "geometry/dash/feature_index.parquet")
    assert len(index) == d_sae and index["sae"].unique().tolist() == ["s"]
    assert index.loc[5, "n_active"] == 0 and index.loc[5, "top_tokens"] == []
    assert examples.groupby("feature_id").size().max() == 4
    ex0 = examples[examples["feature_id"] == 0]
    assert set(ex0["token"]) == {" king"} and (ex0["activation"] == 2.0).all()
    # the context's centre token is the example's token; windows are clipped at sequence start
    for row in examples.itertuples():
        assert row.context_tokens[row.center] == row.token
        assert len(row.context_tokens) <= 5
        assert row.context_acts[row.center] == pytest.approx(row.activation, rel=1e-3)
    assert search_features(index, token="king")["feature_id"].tolist()[0] == 0
    assert 0 not in search_features(index, token="talking")["feature_id"].tolist()

    # logit lens: W_dec . (W_U * g)^T, top and bottom ids
    logits = W_dec @ read_unembedding(model).T
    for f in (0, 7):
        assert index.loc[f, "top_logit_ids"] == np.argsort(-logits[f])[:3].tolist()
        assert index.loc[f, "bottom_logit_ids"] == np.argsort(logits[f])[:3].tolist()
        assert index.loc[f, "top_logit_tokens"][0] == f"w{index.loc[f, 'top_logit_ids'][0]}"

    page = (out / "reports/geometry-dash.html").read_text()
    assert '<script charset="utf-8" src="plotly.min.js"></script>' in page
    assert (out / "reports/plotly.min.js").exists()
    assert "<img" not in page and "function geoTokenKey" in page
    from _browser import read_shards

    shards = read_shards(out / "reports/geometry-dash.html")
    records = [r for (s, _), d in sorted(shards.items()) if s == "feat" for r in d["items"]]
    assert len(records) == d_sae and records[0]["tl"] == index.loc[0, "top_logit_tokens"]

    # same inputs, same bytes
    first = (out / "geometry/dash/feature_index.parquet").read_bytes()
    ex_first = (out / "geometry/dash/examples.parquet").read_bytes()
    _, index2 = compute_top_examples(
        sp.csr_matrix(dense.astype(np.float16).astype(np.float32)),
        seq,
        pos,
        tokens_frame(token_lists),
        n_examples=4,
        window=[3, 1],
        sae="s",
    )
    assert index2["top_tokens"].tolist() == index["top_tokens"].tolist()
    run_script(
        "top_examples.py",
        input={"codes": str(codes_manifest), "tokens": str(tok_path)},
        output={
            "examples": str(out / "geometry/dash/examples.parquet"),
            "index": str(out / "geometry/dash/feature_index.parquet"),
            "page": str(out / "reports/geometry-dash.html"),
        },
        params={
            "analysis": analysis,
            "model": {"path": str(model), "revision": None, "trust_remote_code": False},
            "sae": {"name": "s", "format": "saelens", "path": str(sae_dir)},
            "runtime": {"device": "cpu", "seed": 0},
            "families": [],
        },
        log={"log": str(tmp_path / "logs/top.log")},
    )
    assert (out / "geometry/dash/feature_index.parquet").read_bytes() == first
    assert (out / "geometry/dash/examples.parquet").read_bytes() == ex_first


def test_mismatched_tokens_is_one_line_error():
    csr = sp.csr_matrix(np.array([[1.0]], dtype=np.float32))
    with pytest.raises(DataError, match="seq_id 3"):
        compute_top_examples(csr, np.array([3]), np.array([0]), tokens_frame([["a"]]))
    with pytest.raises(DataError, match="different tokenizations"):
        compute_top_examples(csr, np.array([0]), np.array([4]), tokens_frame([["a"]]))


def _dense_reference(dense: np.ndarray, n: int, n_bins: int):
    """Independent per-feature reference: Python sort of each column, histogram with np.histogram
    semantics re-derived by hand (equal bins over [min(0, lo), hi], the top edge in the last bin).
    """
    top, stats = [], []
    for f in range(dense.shape[1]):
        col = dense[:, f]
        rows = [r for r in range(len(col)) if col[r] != 0]
        rows.sort(key=lambda r: (-col[r], r))
        top += [(f, rank, r, col[r]) for rank, r in enumerate(rows[:n])]
        nz = col[col != 0].astype(np.float64)
        hi = max(0.0, nz.max()) if len(nz) else 0.0
        lo = min(0.0, nz.min()) if len(nz) else 0.0
        width = hi - lo if hi > lo else 1.0
        hist = np.zeros(n_bins, np.int64)
        for v in nz:
            hist[min(max(int((v - lo) / width * n_bins), 0), n_bins - 1)] += 1
        stats.append((len(nz), hi, nz.mean() if len(nz) else 0.0, lo, hist))
    return top, stats


def _blocks_of(csr, seq, pos, sizes):
    edges = np.concatenate([[0], np.cumsum(sizes)])

    def blocks():
        for lo, hi in zip(edges[:-1], edges[1:], strict=True):
            yield csr[lo:hi], seq[lo:hi], pos[lo:hi]

    return blocks


def test_streamed_top_examples_equal_a_dense_reference():
    rng = np.random.default_rng(11)
    n_seq, length, n_feat, n = 12, 25, 30, 4
    dense = rng.exponential(1.0, (n_seq * length, n_feat)).astype(np.float16).astype(np.float32)
    dense[rng.random(dense.shape) < 0.8] = 0
    dense[:, 7] = 0  # dead
    dense[5, 3] = dense[40, 3] = dense[200, 3] = 9.0  # ties: token order decides
    dense[rng.random(dense.shape) < 0.02] *= -1  # a few negative values widen the histogram
    seq = np.repeat(np.arange(n_seq), length).astype(np.int32)
    pos = np.tile(np.arange(length), n_seq).astype(np.int32)
    toks = [[f"t{s}_{p}" for p in range(length)] for s in range(n_seq)]
    csr = sp.csr_matrix(dense)
    blocks = _blocks_of(csr, seq, pos, [7, 50, 1, 100, 142])
    examples, index = compute_top_examples(
        None,
        seq,
        pos,
        tokens_frame(toks),
        n_examples=n,
        window=(3, 2),
        n_bins=6,
        blocks=blocks,
        n_feat=n_feat,
    )
    ref_top, ref_stats = _dense_reference(dense, n, 6)
    got = list(
        zip(
            examples["feature_id"],
            examples["rank"],
            examples["seq_id"] * length + examples["pos"],
            examples["activation"],
            strict=True,
        )
    )
    assert [(int(a), int(b), int(c), float(d)) for a, b, c, d in got] == [
        (f, r, row, float(v)) for f, r, row, v in ref_top
    ]
    for i, (n_act, hi, mean, lo, hist) in enumerate(ref_stats):
        row = index.iloc[i]
        assert row["n_active"] == n_act and row["max_act"] == np.float32(hi)
        assert row["hist_lo"] == np.float32(lo)
        np.testing.assert_allclose(row["mean_act"], mean, rtol=1e-6)
        assert list(row["hist_counts"]) == hist.tolist()
    # context activations are the dense values of the same feature around each example
    for ex in examples.itertuples():
        lo_pos = max(ex.pos - 3, 0)
        want = dense[
            ex.seq_id * length + lo_pos : ex.seq_id * length + min(ex.pos + 3, length),
            ex.feature_id,
        ]
        np.testing.assert_array_equal(ex.context_acts, want)
    # the in-memory call gives the same bytes-level tables
    mem_ex, mem_index = compute_top_examples(
        csr, seq, pos, tokens_frame(toks), n_examples=n, window=(3, 2), n_bins=6
    )
    pd.testing.assert_frame_equal(mem_ex, examples)
    pd.testing.assert_frame_equal(mem_index, index)


def test_top_examples_state_does_not_grow_with_tokens():
    from saeflow.geometry.top_examples import TopExamplesState

    rng = np.random.default_rng(3)
    n_feat, n = 64, 5
    state = TopExamplesState(n_feat, n, n_bins=8)
    sizes = []
    for b in range(40):
        block = sp.random(
            500, n_feat, density=0.1, format="csr", dtype=np.float32, random_state=rng
        )
        state.update(block, np.full(500, b, np.int32), np.arange(500, dtype=np.int32))
        sizes.append(state.nbytes())
    assert state.n_tokens == 40 * 500
    assert len(state.feat_M) == n_feat * n
    assert sizes[-1] == sizes[5]  # flat once every feature has its n examples
    assert sizes[-1] <= n_feat * (n * 24 + 8 * 8 + 40)
