"""Joint decoder UMAP: stacking, partner links from matches, the page; ONE UMAP fit in total."""

from __future__ import annotations

import json
import re
import runpy
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
import torch

from saeflow.errors import ConfigError, DataError
from saeflow.geometry.decoder_umap import attach_tokens, partner_map, stack_decoders
from saeflow.geometry.matching import match_features, matches_table, write_matches
from saeflow.geometry.top_examples import compute_top_examples, write_index
from saeflow.report import build_decoder_umap_page

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
XSS = "<img src=x onerror=alert(1)>"


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_stack_decoders_normalises_and_names_rows():
    W = {"a": np.array([[3.0, 4.0], [0.0, 0.0]]), "b": np.array([[0.0, 2.0]])}
    X, meta = stack_decoders(W)
    np.testing.assert_allclose(X, [[0.6, 0.8], [0.0, 0.0], [0.0, 1.0]])
    assert meta["sae"].tolist() == ["a", "a", "b"] and meta["feature_id"].tolist() == [0, 1, 0]
    with pytest.raises(DataError, match="different spaces"):
        stack_decoders({"a": np.zeros((2, 3)), "b": np.zeros((2, 4))})
    with pytest.raises(ConfigError, match="at least one"):
        stack_decoders({})


def test_partner_map_links_both_ways():
    table = pd.DataFrame(
        {
            "direction": ["a_to_b", "a_to_b", "b_to_a"],
            "source_sae": ["s", "s", "l"],
            "source_feature": [0, 0, 5],
            "rank": [0, 1, 0],
            "target_sae": ["l", "l", "s"],
            "target_feature": [5, 6, 0],
            "corr": [0.9, 0.5, 0.9],
            "mutual": [True, False, True],
        }
    )
    partners = partner_map(table)
    assert partners == {"l:5": [["s", 0, 0.9, True]], "s:0": [["l", 5, 0.9, True]]}
    assert "l:6" in partner_map(table, max_rank=1)


def test_page_escapes_tokens_and_embeds_partners(tmp_path):
    from _browser import read_shards

    emb = pd.DataFrame({"sae": ["a", "b"], "feature_id": [0, 0], "x": [0.0, 1.0], "y": [1.0, 0.0]})
    emb = attach_tokens(emb, {"a": [[XSS]], "b": [["king"]]})
    out = tmp_path / "geometry-u.html"
    page = build_decoder_umap_page(emb, {"a:0": [["b", 0, 0.8, True]]}, out, analysis={"name": "u"})
    assert "<img" not in page and 'src="plotly.min.js"' in page
    extra = json.loads(re.search(r"^var EXTRA = (.*);$", page, re.MULTILINE).group(1))
    assert extra["saes"] == ["a", "b"] and extra["starts"] == [0, 1, 2]
    shards = read_shards(out)
    assert [k for (s, _), d in shards.items() if s == "par" for k in d["keys"]] == ["a:0"]
    assert XSS in [k for (s, _), d in shards.items() if s == "tok" for k in d["keys"]]
    assert "&lt;img" in shards[("hover", 0)]["items"][0]


def _write_saelens(path: Path, W_dec_FD: np.ndarray) -> dict:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    d_sae, d_in = W_dec_FD.shape
    (path / "cfg.json").write_text(
        json.dumps({"d_in": d_in, "d_sae": d_sae, "architecture": "topk", "k": 2})
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
    return {"name": path.name, "format": "saelens", "path": str(path)}


class _Names(list):
    def __init__(self, **items):
        super().__init__(items.values())
        self.__dict__.update(items)


def test_decoder_umap_script_two_widths(tmp_path, monkeypatch):
    """The one UMAP fit of the suite: widths 16 and 32 of one tiny model, matches linked."""
    monkeypatch.setattr(sys, "stdout", sys.stdout)
    monkeypatch.setattr(sys, "stderr", sys.stderr)
    sys.path.insert(0, str(Path(__file__).parent))
    from _fixtures_models import make_tiny_model

    model = make_tiny_model("gpt2", tmp_path / "model", vocab=40, d_model=16, n_layers=1)
    rng = np.random.default_rng(0)
    W_small = rng.standard_normal((16, 16)).astype(np.float32)
    W_big = np.concatenate([W_small, rng.standard_normal((16, 16)).astype(np.float32)])
    spec_small = _write_saelens(tmp_path / "w16", W_small)
    spec_big = _write_saelens(tmp_path / "w32", W_big)

    # codes over the same tokens; the big SAE's first 16 features copy the small SAE's
    n = 300
    dense = rng.random((n, 16)).astype(np.float32)
    dense[dense < 0.8] = 0
    extra = rng.random((n, 16)).astype(np.float32)
    extra[extra < 0.8] = 0
    small, big = sp.csr_matrix(dense), sp.csr_matrix(np.concatenate([dense, extra], axis=1))
    table = matches_table(
        match_features(small, big, top_k=2, batch_size=8),
        sae_a="w16",
        sae_b="w32",
        W_dec_a=W_small,
        W_dec_b=W_big,
    )
    write_matches(table, tmp_path / "matches.parquet")
    seq, pos = np.repeat(np.arange(30), 10), np.tile(np.arange(10), 30)
    tokens = pd.DataFrame({"seq_id": np.arange(30), "tokens": [[XSS] + ["king"] * 9] * 30})
    _, index = compute_top_examples(small, seq, pos, tokens, n_examples=3, sae="w16")
    write_index(index, tmp_path / "index.parquet")

    out = tmp_path / "results"
    smk = type("Snakemake", (), {})()
    smk.input = _Names(
        matches=[str(tmp_path / "matches.parquet")], indexes=[str(tmp_path / "index.parquet")]
    )
    smk.output = _Names(
        embedding=str(out / "geometry/du/embedding.parquet"),
        page=str(out / "reports/geometry-du.html"),
    )
    model_spec = {"path": str(model), "revision": None, "trust_remote_code": False}
    smk.params = _Names(
        analysis={
            "type": "decoder_umap",
            "name": "du",
            "saes": ["w16", "w32"],
            "match": "m",
            "n_neighbors": 5,
            "n_logits": 3,
        },
        saes={"w16": spec_small, "w32": spec_big},
        models={"w16": model_spec, "w32": model_spec},
    )
    smk.log = _Names(log=str(tmp_path / "logs/du.log"))
    smk.threads = 1
    runpy.run_path(
        str(SCRIPTS / "decoder_umap.py"), init_globals={"snakemake": smk}, run_name="__main__"
    )

    emb = pq.read_table(out / "geometry/du/embedding.parquet").to_pandas()
    assert len(emb) == 48 and emb.groupby("sae").size().to_dict() == {"w16": 16, "w32": 32}
    assert np.isfinite(emb[["x", "y"]].to_numpy()).all()
    # identical decoder rows land at (nearly) the same place in the joint embedding
    xy = emb[["x", "y"]].to_numpy()
    same = np.linalg.norm(xy[:16] - xy[16:32], axis=1)
    spread = np.linalg.norm(xy - xy.mean(axis=0), axis=1).max()
    assert np.median(same) < 0.25 * spread
    assert all(len(t) == 3 for t in emb["top_logit_tokens"])
    assert (emb[emb["sae"] == "w16"]["top_tokens"].map(len) > 0).any()

    page = (out / "reports/geometry-du.html").read_text()
    assert "<img" not in page and 'src="plotly.min.js"' in page
    extra = json.loads(re.search(r"^var EXTRA = (.*);$", page, re.MULTILINE).group(1))
    assert extra["saes"] == ["w16", "w32"]
    from _browser import read_shards

    shards = read_shards(out / "reports/geometry-du.html")
    partners = {k: v for (s, _), d in shards.items() if s == "par" for k, v in d["keys"].items()}
    for f in range(16):
        assert ["w32", f] in [p[:2] for p in partners[f"w16:{f}"]]
    assert "plotly_hover" in page and "function geoTokenKey" in page
