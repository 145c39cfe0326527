"""HTML pages of the geometry analyses (results/reports/geometry-{analysis}.html).

Built on the shared report shell (`saeflow.report.common`): plotly.js is shipped beside the pages
and referenced by `<script src="plotly.min.js">`, data is embedded with `safe_json`, plain text
reaches the DOM only through `textContent`, and the only HTML inserted with `innerHTML` is the
example contexts that `top_examples.context_html` escaped token by token before adding tags.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from saeflow.report.common import (
    esc,
    esc_label,
    fmt_num,
    html_table,
    render_page,
    round_list,
    write_page,
)

WEBGL_POINTS = 5000
SAE_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2")

_EXTRA_CSS = """
<style>
.geo-results { max-height: 14em; overflow: auto; border: 1px solid #ddd; padding: 0.3em;
               font-size: 0.85em; }
.geo-results button { display: block; width: 100%; text-align: left; border: 0;
                      background: none; padding: 0.15em 0.3em; cursor: pointer; }
.geo-results button:hover { background: #eef; }
.geo-ex { font-family: ui-monospace, Menlo, Consolas, monospace; white-space: pre-wrap;
          font-size: 0.85em; margin: 0.15em 0; }
.geo-ex .act { display: inline-block; width: 5em; color: #555; }
.geo-cols { display: flex; gap: 2em; flex-wrap: wrap; }
.geo-plot-small { width: 100%; height: 300px; }
</style>
"""

# Pure search functions (no DOM): the page uses them and a test runs them under node.
SEARCH_JS = r"""
function geoNorm(s) { return String(s).trim(); }
/* Features whose top activating tokens contain `query` EXACTLY (after trimming whitespace):
   "king" matches " king" but never "talking". Ranked by how many top examples hit. */
function geoSearchToken(features, query) {
  var q = geoNorm(query), out = [];
  if (!q.length) { return out; }
  features.forEach(function (f) {
    var hits = 0;
    (f.tt || []).forEach(function (t, i) {
      if (geoNorm(t) === q) { hits += (f.tc || [])[i] || 1; }
    });
    if (hits > 0) { out.push([hits, f]); }
  });
  out.sort(function (a, b) { return b[0] - a[0] || a[1].id - b[1].id; });
  return out.map(function (x) { return x[1]; });
}
function geoSearchId(features, query) {
  var q = geoNorm(query);
  if (!/^\d+$/.test(q)) { return []; }
  var id = parseInt(q, 10);
  return features.filter(function (f) { return f.id === id; });
}
"""

_DASHBOARD_JS = r"""
var D = EXTRA, BY_ID = {};
D.features.forEach(function (f) { BY_ID[f.id] = f; });
function el(tag, text, cls) {
  var e = document.createElement(tag);
  if (text !== undefined && text !== null) { e.textContent = String(text); }
  if (cls) { e.className = cls; }
  return e;
}
function fmt(v) { return (v === null || v === undefined) ? "\u2014" : Number(v).toPrecision(4); }
function listResults(list) {
  var box = document.getElementById("geo-results");
  box.textContent = "";
  if (!list.length) { box.appendChild(el("span", "no feature found")); return; }
  list.slice(0, 500).forEach(function (f) {
    var toks = (f.tt || []).slice(0, 6).map(function (t) { return JSON.stringify(t); });
    var b = el("button", "#" + f.id + "  density " + fmt(f.d) + "  max " + fmt(f.mx) +
      "  tokens: " + toks.join(" "));
    b.addEventListener("click", function () { showFeature(f.id); });
    box.appendChild(b);
  });
  if (list.length > 500) { box.appendChild(el("span", (list.length - 500) + " more")); }
}
function logitTable(title, toks, vals) {
  var t = el("table", null, "data"), head = el("tr");
  head.appendChild(el("th", title)); head.appendChild(el("th", "logit"));
  t.appendChild(head);
  (toks || []).forEach(function (tok, i) {
    var r = el("tr");
    r.appendChild(el("td", JSON.stringify(tok))); r.appendChild(el("td", fmt(vals[i])));
    t.appendChild(r);
  });
  return t;
}
function showFeature(id) {
  var f = BY_ID[id], dash = document.getElementById("geo-dash");
  if (!f) { return; }
  dash.textContent = "";
  dash.appendChild(el("h2", "Feature " + f.id));
  dash.appendChild(el("p", "fires on " + f.n + " tokens (density " + fmt(f.d) + "), max " +
    fmt(f.mx) + ", mean when active " + fmt(f.mean)));
  var nb = (f.hc || []).length, w = nb ? (f.hh - f.hl) / nb : 1, xs = [];
  for (var i = 0; i < nb; i++) { xs.push(f.hl + (i + 0.5) * w); }
  Plotly.react("plot", [{type: "bar", x: xs, y: f.hc, marker: {color: "#ff8c00"},
    hovertemplate: "activation %{x:.3g}<br>count %{y}<extra></extra>"}],
    {title: {text: "Activation density of feature " + f.id + " (non-zero activations)"},
     xaxis: {title: {text: "activation"}}, yaxis: {title: {text: "count"}}, bargap: 0.02,
     margin: {t: 40}}, FIG.config);
  if (f.tl) {
    var cols = el("div", null, "geo-cols");
    cols.appendChild(logitTable("top logits", f.tl, f.tlv));
    cols.appendChild(logitTable("bottom logits", f.bl, f.blv));
    dash.appendChild(cols);
  }
  dash.appendChild(el("h3", "Top activating examples"));
  var ex = D.examples[String(f.id)];
  if (!ex) {
    dash.appendChild(el("p", f.n ? "examples of this feature are not embedded in the page " +
      "(see examples.parquet)" : "this feature never fires"));
    return;
  }
  ex.forEach(function (e) {
    var row = el("div", null, "geo-ex");
    row.appendChild(el("span", fmt(e[0]), "act"));
    var ctx = el("span");
    ctx.innerHTML = e[1];  /* escaped in Python token by token before <b>/<span> were added */
    row.appendChild(ctx);
    dash.appendChild(row);
  });
}
document.getElementById("geo-id").addEventListener("input", function (ev) {
  listResults(geoSearchId(D.features, ev.target.value));
});
document.getElementById("geo-token").addEventListener("input", function (ev) {
  listResults(geoSearchToken(D.features, ev.target.value));
});
saeflowPlot(FIG).then(function () {
  if (D.features.length) { showFeature(D.first); }
});
"""


def _list(values: Any, digits: int = 5) -> list[Any]:
    return round_list(np.asarray(values, dtype=np.float64).tolist(), digits)


def dashboard_payload(
    index_df: pd.DataFrame,
    examples_df: pd.DataFrame,
    *,
    page_features: int = 1024,
    page_examples: int = 10,
    n_tokens: int = 12,
) -> dict[str, Any]:
    """Compact per-feature records (all features) and example contexts (a bounded subset).

    Every feature is searchable; examples are embedded for at most `page_features` features
    (the most frequently firing ones when the SAE is wider) to keep the page small.
    """
    features = []
    has_logits = "top_logit_tokens" in index_df.columns
    for row in index_df.itertuples(index=False):
        rec = {
            "id": int(row.feature_id),
            "n": int(row.n_active),
            "d": float(f"{row.density:.4g}"),
            "mx": float(f"{row.max_act:.4g}"),
            "mean": float(f"{row.mean_act:.4g}"),
            "hl": float(row.hist_lo),
            "hh": float(row.hist_hi),
            "hc": [int(c) for c in row.hist_counts],
            "tt": [str(t) for t in list(row.top_tokens)[:n_tokens]],
            "tc": [int(c) for c in list(row.top_token_counts)[:n_tokens]],
        }
        if has_logits:
            rec["tl"] = [str(t) for t in row.top_logit_tokens]
            rec["tlv"] = _list(row.top_logit_values, 4)
            rec["bl"] = [str(t) for t in row.bottom_logit_tokens]
            rec["blv"] = _list(row.bottom_logit_values, 4)
        features.append(rec)
    active = index_df[index_df["n_active"] > 0]
    chosen = active.sort_values(["n_active", "feature_id"], ascending=[False, True], kind="stable")
    keep = set(chosen["feature_id"].head(page_features).astype(int))
    examples: dict[str, list[list[Any]]] = {}
    ex = examples_df[examples_df["feature_id"].isin(keep) & (examples_df["rank"] < page_examples)]
    for fid, act, html_ctx in zip(
        ex["feature_id"], ex["activation"], ex["context_html"], strict=True
    ):
        examples.setdefault(str(int(fid)), []).append([float(f"{act:.4g}"), str(html_ctx)])
    first = (
        int(chosen["feature_id"].iloc[0]) if len(chosen) else (features[0]["id"] if features else 0)
    )
    return {"features": features, "examples": examples, "first": first}


def build_dashboard_page(
    index_df: pd.DataFrame,
    examples_df: pd.DataFrame,
    *,
    analysis: dict[str, Any],
    page_features: int = 1024,
    page_examples: int = 10,
) -> str:
    """SAEDashboard-style page: search (feature id / exact token), histogram, logits, examples."""
    payload = dashboard_payload(
        index_df, examples_df, page_features=page_features, page_examples=page_examples
    )
    name = analysis.get("name", "")
    sae = analysis.get("sae", "")
    title = f"Feature dashboards of SAE {sae} [{name}]"
    subtitle = (
        f"model {analysis.get('model', '?')}, dataset {analysis.get('dataset', '?')}: "
        f"{len(index_df)} features, {int((index_df['n_active'] == 0).sum())} of them never fire"
    )
    controls = (
        _EXTRA_CSS
        + '<div class="controls">'
        + '<label>feature id <input id="geo-id" type="text" inputmode="numeric" size="8"></label>'
        + '<label>exact activating token <input id="geo-token" type="text" size="16"></label>'
        + '<span class="note">token search is exact after trimming spaces: '
        + "&quot;king&quot; finds &quot; king&quot;, never &quot;talking&quot;</span>"
        + '</div>\n<div id="geo-results" class="geo-results"></div>\n'
    )
    fig = {
        "data": [{"type": "bar", "x": [], "y": []}],
        "layout": {"title": {"text": "Activation density"}, "margin": {"t": 40}},
    }
    return render_page(
        title,
        subtitle=subtitle,
        body_html=controls,
        figure=fig,
        extra=payload,
        script=SEARCH_JS + _DASHBOARD_JS,
        after_plot_html='<div id="geo-dash"></div>\n',
    ).replace('class="plot"', 'class="geo-plot-small"', 1)


def write_dashboard_page(
    path: str | Path,
    index_df: pd.DataFrame,
    examples_df: pd.DataFrame,
    *,
    analysis: dict[str, Any],
    page_features: int = 1024,
    page_examples: int = 10,
) -> Path:
    page = build_dashboard_page(
        index_df,
        examples_df,
        analysis=analysis,
        page_features=page_features,
        page_examples=page_examples,
    )
    return write_page(path, page)


# ----------------------------------------------------------------------------- matching


def build_match_page(
    table: pd.DataFrame, summary: dict[str, Any], *, analysis: dict[str, Any]
) -> str:
    """Top-1 correlation histograms in both directions, decoder cosine vs correlation, tables."""
    from plotly.subplots import make_subplots

    sae_a = str(summary.get("a", {}).get("sae", "a"))
    sae_b = str(summary.get("b", {}).get("sae", "b"))
    top1 = table[table["rank"] == 0]
    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=(
            "best-match correlation",
            "decoder cosine vs correlation (mutual pairs)",
        ),
    )
    for direction, label, color in (
        ("a_to_b", f"{sae_a} → {sae_b}", SAE_COLORS[0]),
        ("b_to_a", f"{sae_b} → {sae_a}", SAE_COLORS[1]),
    ):
        vals = top1[top1["direction"] == direction]["corr"]
        fig.add_histogram(
            x=_list(vals, 4),
            name=esc_label(label),
            opacity=0.6,
            marker_color=color,
            xbins={"start": -1, "end": 1.0001, "size": 0.02},
            row=1,
            col=1,
        )
    mutual = top1[top1["mutual"] & (top1["direction"] == "a_to_b")]
    cos_ok = mutual["decoder_cos"].notna().to_numpy()
    if cos_ok.any():
        sub = mutual[cos_ok]
        fig.add_scattergl(
            x=_list(sub["corr"], 4),
            y=_list(sub["decoder_cos"], 4),
            mode="markers",
            marker={"size": 4, "color": "#444"},
            name="mutual pairs",
            text=[
                f"{int(a)} ↔ {int(b)}"
                for a, b in zip(sub["source_feature"], sub["target_feature"], strict=True)
            ],
            hovertemplate="%{text}<br>corr %{x}<br>decoder cos %{y}<extra></extra>",
            row=1,
            col=2,
        )
    fig.update_layout(barmode="overlay", margin={"t": 60})
    fig.update_xaxes(title_text="Pearson correlation", range=[-1, 1], row=1, col=1)
    fig.update_xaxes(title_text="Pearson correlation", row=1, col=2)
    fig.update_yaxes(title_text="decoder cosine", row=1, col=2)

    rows = [
        ["tokens", summary.get("n_tokens")],
        [f"features {sae_a} / {sae_b}", f"{summary.get('d_sae_a')} / {summary.get('d_sae_b')}"],
        ["zero-variance (no match)", f"{summary.get('dead_a')} / {summary.get('dead_b')}"],
        ["mutual nearest neighbours", summary.get("n_mutual")],
        [
            f"{sae_a} features that are the best match of ≥2 {sae_b} features",
            summary.get("n_a_split_candidates"),
        ],
        ["batch size / batches", f"{summary.get('batch_size')} / {summary.get('n_batches')}"],
        ["peak batch bytes (largest intermediates)", summary.get("peak_batch_bytes")],
        ["device", summary.get("device")],
    ]
    best = mutual.sort_values(["corr", "source_feature"], ascending=[False, True]).head(100)
    pair_rows = [
        [
            int(r.source_feature),
            int(r.target_feature),
            fmt_num(r.corr),
            fmt_num(None if math.isnan(r.decoder_cos) else r.decoder_cos),
        ]
        for r in best.itertuples(index=False)
    ]
    after = (
        "<h2>Summary</h2>\n"
        + html_table(
            ["", "value"], [[k, fmt_num(v) if isinstance(v, float) else v] for k, v in rows]
        )
        + "<h2>Best mutual pairs</h2>\n"
        + html_table([f"{sae_a} feature", f"{sae_b} feature", "corr", "decoder cos"], pair_rows)
    )
    title = f"Feature matching {sae_a} ↔ {sae_b} [{analysis.get('name', '')}]"
    return render_page(
        title,
        subtitle=f"Pearson correlation of activations on dataset {analysis.get('dataset', '?')}",
        figure=fig,
        after_plot_html=after,
    )


def write_match_page(
    path: str | Path, table: pd.DataFrame, summary: dict[str, Any], *, analysis: dict[str, Any]
) -> Path:
    return write_page(path, build_match_page(table, summary, analysis=analysis))


# ----------------------------------------------------------------------------- decoder UMAP

_UMAP_JS = r"""
var D = EXTRA;
saeflowPlot(FIG).then(function (gd) {
  var HL = D.highlight_trace, SR = D.search_trace, dims = D.dims;
  function coords(ti, pi) {
    var t = gd.data[ti], c = [t.x[pi], t.y[pi]];
    if (dims === 3) { c.push(t.z[pi]); }
    return c;
  }
  function setTrace(ti, pts, text) {
    var upd = {x: [pts.map(function (p) { return p[0]; })],
               y: [pts.map(function (p) { return p[1]; })]};
    if (dims === 3) { upd.z = [pts.map(function (p) { return p[2]; })]; }
    if (text) { upd.hovertext = [text]; }
    Plotly.restyle(gd, upd, [ti]);
  }
  /* Restyling re-renders the plot, which fires hover events again: only act when the hovered
     feature changes, or the restyle would recurse. */
  var current = null;
  gd.on("plotly_hover", function (ev) {
    var p = ev.points[0];
    if (!p || p.curveNumber >= D.n_sae_traces) { return; }
    var key = D.saes[p.curveNumber] + ":" + D.ids[p.curveNumber][p.pointNumber];
    if (key === current) { return; }
    current = key;
    var partners = D.partners[key] || [], pts = [], text = [];
    var here = coords(p.curveNumber, p.pointNumber);
    partners.forEach(function (m) {
      var where = D.where[m[0] + ":" + m[1]];
      if (!where) { return; }
      var c = coords(where[0], where[1]);
      pts.push(here); text.push("");
      pts.push(c); text.push(m[0] + " #" + m[1] + " corr " + m[2] + (m[3] ? " (mutual)" : ""));
      pts.push(dims === 3 ? [null, null, null] : [null, null]); text.push("");
    });
    setTrace(HL, pts, text);
    document.getElementById("geo-partner").textContent = partners.length ?
      key + " matched to " + partners.map(function (m) {
        return m[0] + " #" + m[1] + " (corr " + m[2] + (m[3] ? ", mutual" : "") + ")";
      }).join(", ") : key + ": no matched partner";
  });
  function search() {
    var idq = document.getElementById("geo-id").value;
    var tq = document.getElementById("geo-token").value;
    var sae = document.getElementById("geo-sae").value, pts = [], n = 0;
    D.features.forEach(function (fs, ti) {
      if (sae && D.saes[ti] !== sae) { return; }
      var hits = tq.trim().length ? geoSearchToken(fs, tq) :
        (idq.trim().length ? geoSearchId(fs, idq) : []);
      hits.forEach(function (f) { pts.push(coords(ti, f.i)); n++; });
    });
    setTrace(SR, pts);
    document.getElementById("geo-count").textContent = n + " feature(s) found";
  }
  ["geo-id", "geo-token", "geo-sae"].forEach(function (id) {
    document.getElementById(id).addEventListener("input", search);
  });
});
"""


def build_decoder_umap_page(
    emb: pd.DataFrame,
    partners: dict[str, list[list[Any]]],
    *,
    analysis: dict[str, Any],
) -> str:
    """Joint decoder UMAP coloured by SAE; search by feature id / exact top token; hovering a
    point draws lines to its matched partner(s) from match_features."""
    dims = 3 if "z" in emb.columns else 2
    axes = "xyz"[:dims]
    saes = list(dict.fromkeys(emb["sae"]))
    kind = "scatter3d" if dims == 3 else ("scattergl" if len(emb) > WEBGL_POINTS else "scatter")
    traces, features, ids, where = [], [], [], {}
    for ti, sae in enumerate(saes):
        sub = emb[emb["sae"] == sae]
        fids = sub["feature_id"].astype(int).tolist()
        logit_toks = list(sub["top_logit_tokens"]) if "top_logit_tokens" in sub else [[]] * len(sub)
        act_toks = list(sub["top_tokens"]) if "top_tokens" in sub else [[]] * len(sub)
        hover, recs = [], []
        for pi, (fid, lt, at) in enumerate(zip(fids, logit_toks, act_toks, strict=True)):
            lt, at = [str(t) for t in lt], [str(t) for t in at]
            text = f"<b>{esc_label(sae)}</b> #{fid}"
            if lt:
                text += "<br>top logits: " + esc_label(" | ".join(lt[:5]))
            if at:
                text += "<br>activating: " + esc_label(" | ".join(at[:5]))
            hover.append(text)
            recs.append({"id": fid, "i": pi, "tt": list(dict.fromkeys(at + lt))})
            where[f"{sae}:{fid}"] = [ti, pi]
        traces.append(
            {
                "type": kind,
                "mode": "markers",
                "name": esc_label(sae),
                **{a: round_list(sub[a], 5) for a in axes},
                "hovertext": hover,
                "hoverinfo": "text",
                "marker": {
                    "size": 3 if dims == 3 else 4,
                    "opacity": 0.7,
                    "color": SAE_COLORS[ti % len(SAE_COLORS)],
                },
            }
        )
        features.append(recs)
        ids.append(fids)
    empty = {a: [] for a in axes}
    traces.append(
        {
            "type": "scatter3d" if dims == 3 else "scatter",
            "mode": "lines+markers",
            "name": "matched partner",
            **empty,
            "hovertext": [],
            "hoverinfo": "text",
            "line": {"color": "black", "width": 2},
            "marker": {
                "size": 10,
                "color": "rgba(0,0,0,0)",
                "line": {"color": "black", "width": 2},
            },
        }
    )
    traces.append(
        {
            "type": "scatter3d" if dims == 3 else "scatter",
            "mode": "markers",
            "name": "search hits",
            **empty,
            "hoverinfo": "skip",
            "marker": {
                "size": 12,
                "symbol": "circle-open",
                "color": "#ff00ff",
                "line": {"width": 2},
            },
        }
    )
    fig = {
        "data": traces,
        "layout": {
            "legend": {"itemsizing": "constant"},
            "margin": {"t": 30},
            "hovermode": "closest",
        },
    }
    extra = {
        "saes": saes,
        "ids": ids,
        "features": features,
        "partners": partners,
        "where": where,
        "dims": dims,
        "n_sae_traces": len(saes),
        "highlight_trace": len(saes),
        "search_trace": len(saes) + 1,
    }
    options = '<option value="">all SAEs</option>' + "".join(
        f'<option value="{esc(s)}">{esc(s)}</option>' for s in saes
    )
    controls = (
        '<div class="controls">'
        + '<label>feature id <input id="geo-id" type="text" size="8"></label>'
        + '<label>exact top token <input id="geo-token" type="text" size="16"></label>'
        + f'<label>in <select id="geo-sae">{options}</select></label>'
        + '<span id="geo-count" class="note"></span></div>\n'
        + '<div id="geo-partner" class="note">hover a point to highlight its matched '
        + "partner(s)</div>\n"
    )
    n_pairs = sum(len(v) for v in partners.values()) // 2
    title = f"Decoder UMAP of {', '.join(saes)} [{analysis.get('name', '')}]"
    sub = (
        f"{len(emb)} decoder directions, cosine metric; {n_pairs} matched pairs linked on hover"
        if partners
        else f"{len(emb)} decoder directions (no match analysis linked)"
    )
    return render_page(
        title,
        subtitle=sub,
        body_html=controls,
        figure=fig,
        extra=extra,
        script=SEARCH_JS + _UMAP_JS,
    )


def write_decoder_umap_page(
    path: str | Path,
    emb: pd.DataFrame,
    partners: dict[str, list[list[Any]]],
    *,
    analysis: dict[str, Any],
) -> Path:
    return write_page(path, build_decoder_umap_page(emb, partners, analysis=analysis))


# ----------------------------------------------------------------------------- Mapper


def graph_layout(
    graph: dict[str, Any], seed: int = 0, iterations: int = 150
) -> tuple[list[float], list[float]]:
    """Deterministic 2-D node positions: Fruchterman-Reingold with edges weighted by shared
    members (numpy only; a Mapper graph has at most a few thousand nodes)."""
    n = len(graph["nodes"])
    if n == 0:
        return [], []
    rng = np.random.default_rng(seed)
    pos = rng.uniform(-1.0, 1.0, (n, 2))
    if n == 1:
        return [0.0], [0.0]
    src = np.array([e["source"] for e in graph["edges"]], dtype=np.int64)
    dst = np.array([e["target"] for e in graph["edges"]], dtype=np.int64)
    weight = np.array([float(e["shared"]) for e in graph["edges"]])
    if len(weight):
        weight = weight / weight.max()
    k = 1.0 / math.sqrt(n)
    for step in range(iterations):
        temp = 0.1 * (1.0 - step / iterations) + 1e-3
        delta = pos[:, None, :] - pos[None, :, :]
        dist = np.maximum(np.linalg.norm(delta, axis=-1), 1e-3)
        disp = (delta * (k * k / dist**2)[..., None]).sum(axis=1)
        if len(src):
            d = pos[src] - pos[dst]
            length = np.maximum(np.linalg.norm(d, axis=1), 1e-3)
            pull = d * (length * weight / k)[:, None]
            np.add.at(disp, src, -pull)
            np.add.at(disp, dst, pull)
        size = np.maximum(np.linalg.norm(disp, axis=1), 1e-9)
        pos += disp / size[:, None] * np.minimum(size, temp)[:, None]
    pos -= pos.mean(axis=0)
    pos /= max(float(np.abs(pos).max()), 1e-9)
    return pos[:, 0].tolist(), pos[:, 1].tolist()


def _graph_traces(graph: dict[str, Any], stat: str, seed: int) -> tuple[dict, dict]:
    xs, ys = graph_layout(graph, seed)
    ex, ey = [], []
    for e in graph["edges"]:
        ex += [xs[e["source"]], xs[e["target"]], None]
        ey += [ys[e["source"]], ys[e["target"]], None]
    sizes = [int(n["size"]) for n in graph["nodes"]]
    top = max(sizes, default=1)
    hover = []
    for n in graph["nodes"]:
        text = f"node {n['id']} (cover {n['cover']})<br>{n['size']} points"
        for k, v in sorted(n["stats"].items()):
            text += f"<br>{esc_label(k)}: {fmt_num(v)}"
        hover.append(text)
    edges = {
        "type": "scatter",
        "mode": "lines",
        "x": round_list(ex, 5),
        "y": round_list(ey, 5),
        "line": {"color": "rgba(120,120,120,0.6)", "width": 1},
        "hoverinfo": "skip",
        "showlegend": False,
    }
    nodes = {
        "type": "scatter",
        "mode": "markers",
        "x": round_list(xs, 5),
        "y": round_list(ys, 5),
        "hovertext": hover,
        "hoverinfo": "text",
        "showlegend": False,
        "marker": {
            "size": [6 + 24 * math.sqrt(s / top) for s in sizes],
            "color": round_list([n["stats"].get(stat) for n in graph["nodes"]], 5),
            "colorscale": "Viridis",
            "showscale": True,
            "line": {"width": 0.5, "color": "#333"},
        },
    }
    return edges, nodes


def build_mapper_page(
    graph: dict[str, Any], baseline: dict[str, Any] | None, *, analysis: dict[str, Any]
) -> str:
    """Mapper graph beside its random baseline: node size = members, colour = chosen statistic."""
    from plotly.subplots import make_subplots

    graphs = [("data", graph)] + ([("baseline", baseline)] if baseline else [])
    stat_names = sorted({k for _, g in graphs for n in g["nodes"] for k in n["stats"]})
    stat = analysis.get("color_by", "pos")
    if stat not in stat_names:
        stat = stat_names[0] if stat_names else ""
    seed = int(graph.get("params", {}).get("seed", 0))
    fig = make_subplots(
        rows=1,
        cols=len(graphs),
        subplot_titles=[
            f"{label}: V={g['summary']['n_nodes']} E={g['summary']['n_edges']} "
            f"C={g['summary']['n_components']} cycles={g['summary']['n_cycles']}"
            for label, g in graphs
        ],
    )
    node_traces = []
    for col, (_, g) in enumerate(graphs, start=1):
        edges, nodes = _graph_traces(g, stat, seed)
        if col > 1:
            nodes["marker"]["showscale"] = False
        fig.add_trace(edges, row=1, col=col)
        fig.add_trace(nodes, row=1, col=col)
        node_traces.append(2 * (col - 1) + 1)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    buttons = []
    for name in stat_names:
        colors = [round_list([n["stats"].get(name) for n in g["nodes"]], 5) for _, g in graphs]
        buttons.append(
            {
                "label": f"colour: {esc_label(name)}",
                "method": "restyle",
                "args": [{"marker.color": colors, "marker.colorbar.title.text": name}, node_traces],
            }
        )
    fig.update_layout(
        margin={"t": 80},
        updatemenus=[
            {
                "type": "dropdown",
                "x": 0,
                "xanchor": "left",
                "y": 1.15,
                "yanchor": "bottom",
                "active": stat_names.index(stat) if stat in stat_names else 0,
                "buttons": buttons,
            }
        ]
        if buttons
        else [],
    )
    p = graph.get("params", {})
    rows = [
        ["lens", f"{p.get('lens')} {p.get('lens_dim')}-D"],
        ["cover", f"{p.get('n_intervals')} intervals per dimension, overlap {p.get('overlap')}"],
        [
            "clustering",
            f"{p.get('clusterer')} on PCA-{p.get('cluster_dims')}, scale {fmt_num(p.get('scale'))}",
        ],
        ["points", graph.get("n_points")],
    ]
    summary_rows = [
        [
            label,
            g["summary"]["n_nodes"],
            g["summary"]["n_edges"],
            g["summary"]["n_components"],
            g["summary"]["n_cycles"],
            fmt_num(g["summary"]["coverage"]),
        ]
        for label, g in graphs
    ]
    base_note = (
        f'<p class="note">Baseline: {esc(baseline.get("baseline", ""))}</p>\n' if baseline else ""
    )
    after = (
        html_table(["parameter", "value"], rows)
        + html_table(
            ["graph", "nodes", "edges", "components", "cycles (E-V+C)", "coverage"], summary_rows
        )
        + base_note
    )
    what = analysis.get("codes") or "codes"
    title = f"Mapper graph of {what} [{analysis.get('name', '')}]"
    sub = f"model {analysis.get('model', '?')}, dataset {analysis.get('dataset', '?')}"
    if analysis.get("sae"):
        sub += f", SAE {analysis['sae']}"
    return render_page(title, subtitle=sub, figure=fig, after_plot_html=after)


def write_mapper_page(
    path: str | Path,
    graph: dict[str, Any],
    baseline: dict[str, Any] | None,
    *,
    analysis: dict[str, Any],
) -> Path:
    return write_page(path, build_mapper_page(graph, baseline, analysis=analysis))
