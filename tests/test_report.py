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
    NEURONPEDIA_ID,
    SCRIPT_BREAK,
    SIM_ANALYSIS,
    UMAP_ANALYSIS,
    XSS,
    build_all_reports,
    diffing_frame,
    umap_frame,
    write_metrics_inputs,
    write_similarity_inputs,
)

from saeflow.errors import DataError
from saeflow.report import common
from saeflow.report.diffing_page import build_diffing_page, neuronpedia_base
from saeflow.report.index import build_index, write_index
from saeflow.report.metrics_page import build_metrics_page, run_label
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


def test_umap_page_figure():
    page = build_umap_page(umap_frame(), UMAP_ANALYSIS, lines="all", max_sequences=3)
    fig = page_json(page, "FIG")
    assert_valid_figure(fig)
    points, lines = fig["data"]
    assert points["type"] == "scatter" and len(points["x"]) == 20
    assert points["marker"]["colorscale"] == "Viridis" and points["marker"]["color"][:5] == [
        0,
        1,
        2,
        3,
        4,
    ]
    # lines: 4 sequences of 5 points with a null between sequences
    assert len(lines["x"]) == 20 + 3 and lines["x"].count(None) == 3
    colour_menu = fig["layout"]["updatemenus"][0]["buttons"]
    by_role = colour_menu[1]["args"][0]["marker.color"][0]
    assert by_role[:3] == ["#9e9e9e", "#000000", "#d62728"]
    assert 'id="filter-limit" type="number" min="0" max="4" value="3"' in page
    extra = page_json(page, "EXTRA")
    assert extra["seq_ids"] == [0, 1, 2, 3] and "needle" in extra["seq_text"][2]
    assert XSS in extra["seq_text"][1]  # plain text for search, JSON-escaped in the page
    hovers = points["hovertext"]
    assert "<b>w0_0</b>" in hovers[0]
    assert any("&lt;img src=x onerror=alert(1)&gt;" in h for h in hovers)
    assert_no_raw_payload(page)


def test_umap_page_raw_hover_is_neutralised_and_3d():
    df = umap_frame(dims=3)
    df.loc[3, "hover"] = "<b>" + XSS + "</b>" + SCRIPT_BREAK
    df = df.drop(columns="text")
    page = build_umap_page(df, {"model": "chat", "dataset": "d"}, lines=[1])
    fig = page_json(page, "FIG")
    assert_valid_figure(fig)
    assert fig["data"][0]["type"] == "scatter3d" and len(fig["data"][0]["z"]) == 20
    assert fig["data"][1]["customdata"] == [1] * 5
    assert_no_raw_payload(page)
    assert "UMAP 3-D of LLM activations of chat, dataset d" in page


def test_umap_titles_and_errors():
    assert "pred codes of SAE s" in umap_title({"sae": "s", "codes": "pred", "dataset": "x"}, 2)
    assert "total codes" in umap_title({"sae": "s", "codes": "total"}, 3)
    assert "LLM activations" in umap_title({"sae": "s", "codes": "activations"}, 2)
    with pytest.raises(DataError, match="missing columns"):
        build_umap_page(umap_frame().drop(columns="hover"), {})
    with pytest.raises(DataError, match="report.lines"):
        build_umap_page(umap_frame(), {}, lines=[99])
    with pytest.raises(DataError, match="report.color"):
        build_umap_page(umap_frame(), {}, color="rainbow")


def test_umap_webgl_switch():
    fig = page_json(build_umap_page(umap_frame(), {}, webgl=True), "FIG")
    assert fig["data"][0]["type"] == "scattergl"


# ---------------------------------------------------------------- diffing


def test_diffing_page_figure():
    page = build_diffing_page(
        diffing_frame(), DIFF_SUMMARY, DIFF_ANALYSIS, neuronpedia=NEURONPEDIA_ID
    )
    fig = page_json(page, "FIG")
    assert_valid_figure(fig)
    traces = fig["data"]
    assert len(traces) == 8  # 2 token types x 4 exclusivity classes
    assert sum(len(t["x"]) for t in traces) == 12
    assert {t["legendgroup"] for t in traces} == {"model", "newline"}
    symbols = {t["name"]: t["marker"]["symbol"] for t in traces}
    assert symbols == {
        "both": "star",
        "base only": "circle",
        "chat only": "square",
        "neither": "circle",
    }
    inconsistent = [t for t in traces if "#d62728" in t["marker"]["line"]["color"]]
    assert len(inconsistent) == 2 and all(t["marker"]["line"]["width"] == [2] for t in inconsistent)
    layout = fig["layout"]
    assert layout["xaxis"]["range"] == layout["yaxis"]["range"]
    assert layout["yaxis"]["scaleanchor"] == "x"
    values = [v for t in traces for v in t["x"] + t["y"]]
    lo, hi = min(values), max(values)
    assert layout["xaxis"]["range"] == pytest.approx([lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo)])
    assert layout["shapes"][0]["line"]["dash"] == "dash"
    buttons = layout["updatemenus"][0]["buttons"]
    assert [b["label"] for b in buttons] == ["target_all_mean", "target_sparsity"]
    assert len(buttons[1]["args"][0]["x"]) == 8
    row = traces[0]["customdata"][0]
    assert isinstance(row[0], int)
    template = traces[0]["hovertemplate"]
    assert "/ 40 (%{customdata[3]:.2%})" in template and "chat target_all_mean" not in template
    hostile = [r[-1] for t in traces for r in t["customdata"] if "img" in str(r[-1])]
    assert hostile and all("&lt;img src=x onerror=alert(1)&gt;" in h for h in hostile)
    assert page_json(page, "EXTRA")["neuronpedia_base"] == (
        "https://www.neuronpedia.org/gemma-2-2b/12-gemmascope-res-16k/"
    )
    assert_no_raw_payload(page)


def test_diffing_reads_whatever_columns_exist():
    df = diffing_frame(models=("pt", "it")).drop(columns=["description"])
    df["pt_extra_metric"] = 1.0
    df["it_extra_metric"] = 2.0
    page = build_diffing_page(df, {}, {"name": "x"}, webgl=True)
    fig = page_json(page, "FIG")
    labels = [b["label"] for b in fig["layout"]["updatemenus"][0]["buttons"]]
    assert labels == [
        "target_num_active",
        "control_num_active",
        "target_all_mean",
        "target_sparsity",
        "extra_metric",
    ]
    assert {t["type"] for t in fig["data"]} == {"scattergl"}
    assert {t["name"] for t in fig["data"]} == {"both", "pt only", "it only", "neither"}
    assert page_json(page, "EXTRA")["neuronpedia_base"] is None
    assert "Neuronpedia" not in fig["data"][0]["hovertemplate"]


def test_diffing_errors():
    df = diffing_frame()
    with pytest.raises(DataError, match="target_kl"):
        build_diffing_page(df, {}, {**DIFF_ANALYSIS, "metrics": ["target_kl"]})
    bad = df.assign(exclusive="maybe")
    with pytest.raises(DataError, match="exclusive"):
        build_diffing_page(bad, {}, DIFF_ANALYSIS)
    with pytest.raises(DataError, match="Neuronpedia id"):
        neuronpedia_base("../evil")
    assert neuronpedia_base("a b/c") == "https://www.neuronpedia.org/a%20b/c/"


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
        ["index.html", "plotly.min.js"] + [p.name for p in page_list]
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
        input={"embedding": str(emb), "results": str(results)},
        output={"page": str(out / "umap-u.html")},
        params={"analysis": UMAP_ANALYSIS},
        log={"log": str(logs / "umap.log")},
    )
    _run_script(
        "report_diffing.py",
        input={"features": str(feats), "summary": str(summary)},
        output={"page": str(out / "diffing-d.html")},
        params={"analysis": DIFF_ANALYSIS, "neuronpedia": None},
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
        "diffing-d.html",
        "index.html",
        "metrics-m.html",
        "plotly.min.js",
        "similarity-s.html",
        "umap-u.html",
    ]
    sim = page_json((out / "similarity-s.html").read_text(), "FIG")
    assert [b["label"] for b in sim["layout"]["updatemenus"][0]["buttons"]] == [
        "sequence 7",
        "sequence 0",
    ]
    assert (tmp_path / "results" / "site" / "index.html").exists()
