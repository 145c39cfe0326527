"""Unit tests of the report pages: figure content, escaping, plotly.js shipping, scripts."""

from __future__ import annotations

import json
import re
import runpy
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import pytest
from _browser import (
    CONFIG,
    DIFF_ANALYSIS,
    DIFF_SUMMARY,
    MODELS_INFO,
    NEURONPEDIA_ID,
    SCRIPT_BREAK,
    SIM_ANALYSIS,
    UMAP_ANALYSIS,
    XSS,
    build_all_reports,
    diffing_frame,
    read_shards,
    umap_frame,
    umap_tokens,
    write_metrics_inputs,
    write_similarity_inputs,
    write_tokens,
)

from saeflow.errors import DataError
from saeflow.report import common
from saeflow.report.common import write_page
from saeflow.report.diffing_page import build_diffing_page, neuronpedia_base
from saeflow.report.index import build_index, write_index
from saeflow.report.metrics_page import build_metrics_page, run_label
from saeflow.report.shards import data_dir, first_load_bytes, unpack
from saeflow.report.similarity_page import axis_labels, build_similarity_page, read_matrix
from saeflow.report.umap_page import build_umap_page, umap_title

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def page_json(page: str, name: str) -> dict:
    """The FIG / EXTRA object embedded in a page (the \\u escapes are plain JSON)."""
    match = re.search(rf"^var {name} = (.*);$", page, re.MULTILINE)
    assert match, f"no {name} in page"
    return json.loads(match.group(1))


def assert_no_raw_payload(page: str) -> None:
    """No literal tag from dataset text: `<` is escaped (HTML) or \\u003c-encoded (JSON)."""
    assert "<img" not in page
    assert "</script><script>alert" not in page


def assert_valid_figure(fig: dict) -> None:
    go.Figure({"data": fig["data"], "layout": fig["layout"]})


# ---------------------------------------------------------------- common


def test_escaping_helpers():
    assert common.esc('<a href="x">') == "&lt;a href=&quot;x&quot;&gt;"
    assert common.esc_label('<b>"$x$"') == '&lt;b&gt;"&#36;x&#36;"'
    assert common.sanitize_hover("a <b>b</b> &lt;i&gt;<br>") == "a <b>b</b> &lt;i&gt;<br>"
    assert common.sanitize_hover(XSS) == "&lt;img src=x onerror=alert(1)&gt;"
    assert common.sanitize_hover("<B>x</B><br/>") == "<b>x</b><br>"
    assert common.hover_to_text("a <b>&lt;c&gt;</b>") == "a  <c> "
    assert common.token_label("\n") == "\\n" and common.token_label(" ") == "␣"
    text = common.safe_json({"s": SCRIPT_BREAK + "&\u2028"})
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text) == {"s": SCRIPT_BREAK + "&\u2028"}
    assert common.fmt_num(None) == "—" and common.fmt_num(float("nan")) == "—"
    assert common.round_list([1.23456789, float("nan"), None], 3) == [1.23, None, None]


def test_ensure_plotlyjs_idempotent_and_repairs(tmp_path):
    src = common.plotlyjs_source()
    dest = common.ensure_plotlyjs(tmp_path)
    assert dest.read_bytes() == src.read_bytes()
    inode = dest.stat().st_ino
    assert common.ensure_plotlyjs(tmp_path).stat().st_ino == inode  # untouched when identical
    dest.write_bytes(b"truncated")
    assert common.ensure_plotlyjs(tmp_path).read_bytes() == src.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plotly.min.js"]


def test_pages_use_local_plotly_only_and_are_deterministic(tmp_path):
    a = build_all_reports(tmp_path / "a")
    b = build_all_reports(tmp_path / "b")
    for kind, path in a.items():
        page = path.read_text()
        assert page == b[kind].read_text(), kind
        assert "cdn" not in page.lower() and "https://cdn" not in page
        assert not re.search(r"<script[^>]+src=\"(?!plotly\.min\.js\")", page), kind
        assert_no_raw_payload(page)
    assert (tmp_path / "a" / "reports" / "plotly.min.js").exists()


# ---------------------------------------------------------------- umap


def _umap(tmp_path: Path, df=None, analysis=None, tokens=None, name: str = "umap-u.html"):
    out = tmp_path / name
    page = build_umap_page(
        umap_frame() if df is None else df,
        UMAP_ANALYSIS if analysis is None else analysis,
        umap_tokens() if tokens is None else tokens,
        out,
    )
    write_page(out, page)
    return out, page


def test_umap_page_packs_points_and_shards_tokens(tmp_path):
    out, page = _umap(tmp_path)
    extra = page_json(page, "EXTRA")
    assert extra["n"] == 20 and extra["dims"] == 2 and extra["kind"] == "scatter"
    x = unpack(extra["cols"]["x"])
    assert x == pytest.approx(umap_frame()["x"].to_numpy(), abs=1e-3)
    assert unpack(extra["cols"]["pos"]).tolist() == [0, 1, 2, 3, 4] * 4
    assert unpack(extra["cols"]["seq"]).tolist() == sorted([0, 1, 2, 3] * 5)
    assert extra["lines"] == [0, 1, 2, 3] and extra["filter"] == "any"
    assert extra["window"] == 3
    shards = read_shards(out)
    assert shards[("tok", 0)]["items"][1][2] == " " + XSS  # raw in the shard, JSON-escaped
    assert "<img" not in (data_dir(out) / "tok-0.js").read_text()
    assert 'id="filter-limit" type="number" min="0" max="4" value="4"' in page
    assert_no_raw_payload(page)


def test_umap_page_options(tmp_path):
    analysis = {
        **UMAP_ANALYSIS,
        "report": {"lines": [2], "filter": "all", "sequences": [2, 0], "max_sequences": 1},
    }
    _, page = _umap(tmp_path, analysis=analysis)
    extra = page_json(page, "EXTRA")
    assert extra["seq_ids"] == [0, 2] and extra["n"] == 10
    assert extra["filter"] == "all" and 'value="all" selected' in page
    assert 'max="2" value="1"' in page
    with pytest.raises(DataError, match="report.lines"):
        _umap(tmp_path, analysis={"report": {"lines": [1], "sequences": [0]}})
    with pytest.raises(DataError, match="report.sequences"):
        _umap(tmp_path, analysis={"report": {"sequences": [99]}})
    with pytest.raises(DataError, match="report.filter"):
        _umap(tmp_path, analysis={"report": {"filter": "some"}})


def test_umap_page_3d_and_errors(tmp_path):
    _, page = _umap(tmp_path, df=umap_frame(dims=3), analysis={"model": "chat", "dataset": "d"})
    extra = page_json(page, "EXTRA")
    assert extra["dims"] == 3 and extra["kind"] == "scatter3d" and "z" in extra["cols"]
    assert "UMAP 3-D of LLM activations of chat, dataset d" in page
    with pytest.raises(DataError, match="missing columns"):
        _umap(tmp_path, df=umap_frame().drop(columns="role"))
    with pytest.raises(DataError, match="no tokens for sequence 3"):
        _umap(tmp_path, tokens={s: t for s, t in umap_tokens().items() if s != 3})
    with pytest.raises(DataError, match="has 2 tokens"):
        _umap(tmp_path, tokens={**umap_tokens(), 0: ["a", "b"]})


def test_umap_titles():
    assert "pred codes of SAE s" in umap_title({"sae": "s", "codes": "pred", "dataset": "x"}, 2)
    assert "total codes" in umap_title({"sae": "s", "codes": "total"}, 3)
    assert "LLM activations" in umap_title({"sae": "s", "codes": "activations"}, 2)


def test_umap_page_does_not_grow_with_hover_window(tmp_path):
    """Seed 002's 500-token window costs nothing in the page: hover text is built from tokens."""
    toks = {s: [f" t{p}" for p in range(512)] for s in range(20)}
    df = pd.DataFrame(
        [
            {"seq_id": s, "pos": p, "x": 0.1 * p, "y": 0.2 * s, "z": 0.0, "role": 2}
            for s in range(20)
            for p in range(0, 512, 17)
        ]
    )
    small, _ = _umap(tmp_path, df, {**UMAP_ANALYSIS, "hover_window": 50}, toks, "umap-a.html")
    big, _ = _umap(tmp_path, df, {**UMAP_ANALYSIS, "hover_window": 500}, toks, "umap-b.html")
    assert first_load_bytes(big) - first_load_bytes(small) < 100


# ---------------------------------------------------------------- diffing


def _diffing(tmp_path: Path, df=None, analysis=None, name: str = "diffing-d.html", **kw):
    out = tmp_path / name
    page = build_diffing_page(
        diffing_frame() if df is None else df,
        DIFF_SUMMARY,
        DIFF_ANALYSIS if analysis is None else analysis,
        out,
        **{"neuronpedia": NEURONPEDIA_ID, "models_info": MODELS_INFO, **kw},
    )
    write_page(out, page)
    return out, page


def test_diffing_page_plots_exclusive_features_by_default(tmp_path):
    out, page = _diffing(tmp_path)
    extra = page_json(page, "EXTRA")
    pts = extra["points"]
    assert pts["n"] == 8 and pts["tail"]["count"] == 0  # 12 rows, 4 not exclusive
    fids = unpack(pts["head"]["fid"]).tolist()
    cats = unpack(pts["head"]["cat"]).tolist()
    assert 0 not in fids and 4 not in fids
    assert cats[fids.index(3)] == 1 + 4  # base only, inconsistent
    x0 = unpack(pts["head"]["x0"])
    assert x0[0] == pytest.approx(
        diffing_frame().query("exclusive != 'none'")["base_target_all_mean"].iloc[0], rel=1e-6
    )
    assert extra["metrics"] == ["target_all_mean", "target_sparsity"]
    assert extra["metric_names"] == ["Mean Activation", "Activation Sparsity"]
    assert (
        extra["neuronpedia_base"] == "https://www.neuronpedia.org/gemma-2-2b/12-gemmascope-res-16k/"
    )
    assert extra["plot_subtitle"] == "org/tiny-base / org/tiny-chat, residual stream post-layer 2"
    assert "Diffing intro: base → chat (org/tiny-base / org/tiny-chat, layer 2)" in page
    shards = read_shards(out)
    rec = shards[("feat", 0)]["items"][3]
    assert rec["e"].startswith("feature about &lt;img src=x onerror=alert(1)&gt;")
    assert set(rec["c"]) == {"model", "newline"} and len(rec["c"]["model"]) == 4
    assert shards[("feat", 0)]["items"][0]["e"] == "desc 0"
    assert_no_raw_payload(page)
    for path in data_dir(out).iterdir():
        assert_no_raw_payload(path.read_text())


def test_diffing_page_all_features_option(tmp_path):
    _, page = _diffing(tmp_path, analysis={**DIFF_ANALYSIS, "report": {"plot": "all"}})
    pts = page_json(page, "EXTRA")["points"]
    assert pts["n"] == 12
    cats = unpack(pts["head"]["cat"]).tolist()
    assert cats[-4:] == [3, 3, 3, 3]  # the non-exclusive features come last
    with pytest.raises(DataError, match="report.plot"):
        _diffing(tmp_path, analysis={**DIFF_ANALYSIS, "report": {"plot": "some"}})


def test_diffing_reads_whatever_columns_exist(tmp_path):
    df = diffing_frame(models=("pt", "it")).drop(columns=["description"])
    df["pt_extra_metric"] = 1.0
    df["it_extra_metric"] = 2.0
    out, page = _diffing(tmp_path, df=df, analysis={"name": "x"}, neuronpedia=None, webgl=True)
    extra = page_json(page, "EXTRA")
    assert extra["metrics"] == ["target_all_mean", "target_sparsity", "extra_metric"]
    assert extra["kind"] == "scattergl" and extra["neuronpedia_base"] is None
    assert read_shards(out)[("feat", 0)]["items"][1]["e"] is None
    assert "Neuronpedia" not in page


def test_diffing_errors(tmp_path):
    with pytest.raises(DataError, match="target_kl"):
        _diffing(tmp_path, analysis={**DIFF_ANALYSIS, "metrics": ["target_kl"]})
    with pytest.raises(DataError, match="exclusive"):
        _diffing(tmp_path, df=diffing_frame().assign(exclusive="maybe"))
    with pytest.raises(DataError, match="Neuronpedia id"):
        neuronpedia_base("../evil")
    assert neuronpedia_base("a b/c") == "https://www.neuronpedia.org/a%20b/c/"


def test_explanations_from_a_configurable_column(tmp_path):
    from saeflow.diffing import read_explanations

    csv = tmp_path / "expl.csv"
    pd.DataFrame({"feature_id": [0, 2], "claude_desc": [f"about {XSS}", None]}).to_csv(csv)
    df = read_explanations(csv, "claude_desc")
    assert df.columns.tolist() == ["feature_id", "description"]
    assert df["description"].iloc[0] == f"about {XSS}"
    with pytest.raises(DataError, match="explanation_column"):
        read_explanations(csv)


# ---------------------------------------------------------------- similarity


def test_similarity_page(tmp_path):
    manifest, _ = write_similarity_inputs(tmp_path / "sim")
    mats = {
        0: read_matrix(tmp_path / "sim" / "0.parquet"),
        7: read_matrix(tmp_path / "sim" / "7.parquet"),
    }
    labels = axis_labels(["<bos>", "the", XSS, "the", "\n"], 5)
    assert len(set(labels)) == 5 and labels[2] == "2: &lt;img src=x onerror=alert(1)&gt;"
    page = build_similarity_page(mats, {0: ["<bos>", "the", XSS, "the", "\n"]}, SIM_ANALYSIS)
    fig = page_json(page, "FIG")
    assert_valid_figure(fig)
    heat = fig["data"][0]
    assert heat["type"] == "heatmap" and len(heat["z"]) == 5 and len(heat["z"][0]) == 5
    assert heat["x"] == labels and heat["y"] == labels
    buttons = fig["layout"]["updatemenus"][0]["buttons"]
    assert [b["label"] for b in buttons] == ["sequence 0", "sequence 7"]
    assert buttons[1]["args"][0]["x"][0] == ["0", "1", "2"]  # no tokens given for seq 7
    assert_no_raw_payload(page)


def test_similarity_matrix_contract(tmp_path):
    path = tmp_path / "3.parquet"
    pd.DataFrame({"a": [1.0], "b": [2.0]}).to_parquet(path)
    with pytest.raises(DataError, match="'0'..'L-1'"):
        read_matrix(path)


# ---------------------------------------------------------------- metrics


def test_metrics_page(tmp_path):
    paths = write_metrics_inputs(tmp_path)
    assert run_label(paths[0]) == "topk · chat · stories"
    runs = [
        (f"run {XSS}", json.loads(paths[1].read_text())),
        ("b", json.loads(paths[0].read_text())),
    ]
    page = build_metrics_page(runs)
    fig = page_json(page, "FIG")
    assert_valid_figure(fig)
    names = [t["name"] for t in fig["data"]]
    assert names[:3] == ["variance_explained", "mse", "l0_novel"]
    ce = fig["data"][names.index("ce_recovered")]
    assert ce["y"] == [None, None]
    assert [t["visible"] for t in fig["data"]].count(True) == 1
    assert "<td>—</td>" in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert_no_raw_payload(page)
    with pytest.raises(DataError, match="no metrics"):
        build_metrics_page([])


# ---------------------------------------------------------------- index


def test_index_and_site(tmp_path):
    pages = build_all_reports(tmp_path)
    page_list = [pages[k] for k in ("diffing", "umap", "similarity", "metrics")]
    index = build_index(page_list, CONFIG, tmp_path / "reports")
    assert '<a href="umap-pred_alpaca.html">UMAP 2-D of pred codes' in index
    assert index.index("UMAP embeddings") < index.index("Model diffing")
    assert "path: prompts/&lt;img src=x onerror=alert(1)&gt;.jsonl" in index
    assert_no_raw_payload(index)
    site = tmp_path / "site"
    write_index(page_list, CONFIG, tmp_path / "reports" / "index.html", site_dir=site)
    assert sorted(p.name for p in site.iterdir()) == sorted(
        ["index.html", "plotly.min.js", "diffing-intro.data", "umap-pred_alpaca.data"]
        + [p.name for p in page_list]
    )
    assert (site / "plotly.min.js").read_bytes() == common.plotlyjs_source().read_bytes()
    with pytest.raises(DataError, match="not found"):
        write_index([tmp_path / "nope.html"], {}, tmp_path / "i.html")


# ---------------------------------------------------------------- scripts


class _Names(list):
    """Stand-in for snakemake's Namedlist: a list whose items are also attributes."""

    def __init__(self, **items):
        super().__init__(items.values())
        self.__dict__.update(items)


def _run_script(name: str, **parts) -> None:
    smk = type("Snakemake", (), {})()
    for key in ("input", "output", "params", "log"):
        setattr(smk, key, _Names(**parts.get(key, {})))
    runpy.run_path(str(SCRIPTS / name), init_globals={"snakemake": smk}, run_name="__main__")


def test_scripts(tmp_path, monkeypatch):
    import sys

    # log_to swaps sys.stdout/stderr for the log file; restore them after the test.
    monkeypatch.setattr(sys, "stdout", sys.stdout)
    monkeypatch.setattr(sys, "stderr", sys.stderr)
    inp = tmp_path / "in"
    inp.mkdir()
    out = tmp_path / "results" / "reports"
    logs = tmp_path / "logs"
    emb = inp / "embedding.parquet"
    umap_frame().to_parquet(emb)
    umap_tok = write_tokens(inp / "umap_tokens.parquet", umap_tokens())
    results = inp / "results.json"
    results.write_text(json.dumps({"config": UMAP_ANALYSIS}))
    feats = inp / "features.parquet"
    diffing_frame().to_parquet(feats)
    summary = inp / "summary.json"
    summary.write_text(json.dumps(DIFF_SUMMARY))
    manifest, tokens = write_similarity_inputs(inp / "sim")
    metrics = write_metrics_inputs(inp)

    _run_script(
        "report_umap.py",
        input={"embedding": str(emb), "results": str(results), "tokens": str(umap_tok)},
        output={"page": str(out / "umap-u.html")},
        params={"analysis": UMAP_ANALYSIS},
        log={"log": str(logs / "umap.log")},
    )
    _run_script(
        "report_diffing.py",
        input={"features": str(feats), "summary": str(summary)},
        output={"page": str(out / "diffing-d.html")},
        params={"analysis": DIFF_ANALYSIS, "neuronpedia": None, "models": MODELS_INFO},
        log={"log": str(logs / "diffing.log")},
    )
    _run_script(
        "report_similarity.py",
        input={"similarity": str(manifest), "tokens": str(tokens)},
        output={"page": str(out / "similarity-s.html")},
        params={"analysis": {**SIM_ANALYSIS, "sequences": [7, 0]}},
        log={"log": str(logs / "sim.log")},
    )
    _run_script(
        "report_metrics.py",
        input={"metrics": [str(p) for p in metrics]},
        output={"page": str(out / "metrics-m.html")},
        params={},
        log={"log": str(logs / "metrics.log")},
    )
    pages = sorted(str(p) for p in out.glob("*.html"))
    _run_script(
        "report_index.py",
        input={"pages": pages},
        output={"index": str(out / "index.html"), "site": str(tmp_path / "results" / "site")},
        params={"config": CONFIG},
        log={"log": str(logs / "index.log")},
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "diffing-d.data",
        "diffing-d.html",
        "index.html",
        "metrics-m.html",
        "plotly.min.js",
        "similarity-s.html",
        "umap-u.data",
        "umap-u.html",
    ]
    sim = page_json((out / "similarity-s.html").read_text(), "FIG")
    assert [b["label"] for b in sim["layout"]["updatemenus"][0]["buttons"]] == [
        "sequence 7",
        "sequence 0",
    ]
    site = tmp_path / "results" / "site"
    assert (site / "index.html").exists()
    assert sorted(p.name for p in (site / "umap-u.data").iterdir()) == ["tok-0.js"]
