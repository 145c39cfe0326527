"""HTML pages of the geometry analyses: feature dashboards, matching, decoder UMAP, Mapper.

Each page is `results/reports/geometry-{analysis}.html`, built on the shared shell
(`saeflow.report.common`). Per-feature detail (statistics, histograms, logits, example contexts),
the exact-token search index, per-point hover text and matched partners are in shards beside the
page (`geometry-{analysis}.data/`), loaded on demand, so a 131k-feature SAE opens as fast as a
1k one. Plain text reaches the DOM through `textContent`; the only HTML inserted with `innerHTML`
is the example contexts that `top_examples.context_html` escaped token by token before adding
tags, and hover strings escaped here.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
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
from saeflow.report.shards import page_data

WEBGL_POINTS = 5000
SAE_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2")
FEATURES_PER_SHARD = 64
POINTS_PER_SHARD = 512
TOKEN_KEYS_PER_SHARD = 1024
MAX_MATCH_SCATTER = 20_000
# What String.prototype.trim strips, so Python and the page agree on token search keys.
_JS_SPACE = (
    " \t\n\v\f\r\u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
    "\u2009\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
)


def token_key(token: Any) -> str:
    """Search key of a token: surrounding whitespace dropped (as JS trim), otherwise exact."""
    return str(token).strip(_JS_SPACE)


def _n_token_shards(n_keys: int) -> int:
    return max(1, math.ceil(n_keys / TOKEN_KEYS_PER_SHARD))


def _list(values: Any, digits: int = 5) -> list[Any]:
    return round_list(np.asarray(values, dtype=np.float64).tolist(), digits)


def _feature_record(row: Any, has_logits: bool, n_tokens: int) -> dict[str, Any]:
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
    return rec


def token_index(index_df: pd.DataFrame, n_tokens: int = 12) -> dict[str, list[list[int]]]:
    """Exact-token search index: token key -> [[feature id, hits], ...], most hits first."""
    out: dict[str, list[list[int]]] = defaultdict(list)
    for fid, toks, counts in zip(
        index_df["feature_id"], index_df["top_tokens"], index_df["top_token_counts"], strict=True
    ):
        hits: dict[str, int] = {}
        for tok, c in zip(list(toks)[:n_tokens], list(counts)[:n_tokens], strict=True):
            key = token_key(tok)
            if key:
                hits[key] = hits.get(key, 0) + (int(c) or 1)
        for key, h in hits.items():
            out[key].append([int(fid), h])
    for hits_list in out.values():
        hits_list.sort(key=lambda fh: (-fh[1], fh[0]))
    return dict(out)


def build_dashboard_page(
    index_df: pd.DataFrame,
    examples_df: pd.DataFrame,
    out_path: str | os.PathLike,
    *,
    analysis: dict[str, Any],
    page_features: int = 1024,
    page_examples: int = 10,
    n_tokens: int = 12,
    families: list[str] = (),
) -> str:
    """SAEDashboard-style page: search (feature id / exact token), histogram, logits, examples.

    `families` names feature_families analyses of this SAE: the page loads their
    `families-{name}.links.js` and links a feature that heads a family to its tree.

    Every feature's record and its top `page_examples` examples are in `feat-{k}.js` shards (k =
    feature id // 64), the token index in `tok-{h}.js` (h = FNV-1a(token) % shards); the page
    itself lists only the `page_features` most frequently firing features.
    """
    index_df = index_df.sort_values("feature_id", kind="stable").reset_index(drop=True)
    has_logits = "top_logit_tokens" in index_df.columns
    ex = examples_df[examples_df["rank"] < page_examples].sort_values(
        ["feature_id", "rank"], kind="stable"
    )
    examples: dict[int, list[list[Any]]] = defaultdict(list)
    for fid, act, html_ctx in zip(
        ex["feature_id"], ex["activation"], ex["context_html"], strict=True
    ):
        examples[int(fid)].append([float(f"{act:.4g}"), str(html_ctx)])
    n_ids = int(index_df["feature_id"].max()) + 1 if len(index_df) else 0
    records = {int(r.feature_id): r for r in index_df.itertuples(index=False)}

    def items() -> Any:
        for fid in range(n_ids):
            row = records.get(fid)
            if row is None:
                yield None
                continue
            rec = _feature_record(row, has_logits, n_tokens)
            rec["ex"] = examples.get(fid, [])
            yield rec

    active = index_df[index_df["n_active"] > 0]
    chosen = active.sort_values(["n_active", "feature_id"], ascending=[False, True], kind="stable")
    top = [
        [int(r.feature_id), int(r.n_active), [str(t) for t in list(r.top_tokens)[:6]]]
        for r in chosen.head(page_features).itertuples(index=False)
    ]
    first = top[0][0] if top else (int(index_df["feature_id"].iloc[0]) if n_ids else None)
    tokens = token_index(index_df, n_tokens)
    with page_data(out_path) as data:
        feat = data.items("feat", items(), per=FEATURES_PER_SHARD)
        tok = data.keyed("tok", tokens, _n_token_shards(len(tokens)))
        if first is not None:
            data.eager.append(f"{data.base}/feat-{first // FEATURES_PER_SHARD}.js")
        extra = {
            "data": data.meta,
            "feat": feat,
            "tok": tok,
            "top": top,
            "first": first,
            "sae": str(analysis.get("sae", "")),
            "families": [f"families-{name}.links.js" for name in families],
        }
        name = analysis.get("name", "")
        sae = analysis.get("sae", "")
        title = f"Feature dashboards of SAE {sae} [{name}]"
        subtitle = (
            f"model {analysis.get('model', '?')}, dataset {analysis.get('dataset', '?')}: "
            f"{len(index_df)} features, {int((index_df['n_active'] == 0).sum())} of them "
            "never fire"
        )
        controls = (
            '<div class="controls">'
            '<label>feature id <input id="geo-id" type="text" inputmode="numeric" size="8">'
            "</label>"
            '<label>exact activating token <input id="geo-token" type="text" size="16"></label>'
            '<span class="note">token search is exact after trimming spaces: '
            "&quot;king&quot; finds &quot; king&quot;, never &quot;talking&quot;</span>"
            f'</div>\n<p class="note">The {len(top)} most frequently firing features:</p>\n'
            '<div id="geo-results" class="results"></div>\n'
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
            extra=extra,
            assets=["search.js", "dashboard.js"],
            after_plot_html='<div id="geo-dash"></div>\n',
            eager=data.eager,
            plot_class="plot-small",
        )


def write_dashboard_page(
    path: str | Path,
    index_df: pd.DataFrame,
    examples_df: pd.DataFrame,
    *,
    analysis: dict[str, Any],
    page_features: int = 1024,
    page_examples: int = 10,
    families: list[str] = (),
) -> Path:
    """Write the dashboard page and its shards atomically."""
    page = build_dashboard_page(
        index_df,
        examples_df,
        path,
        analysis=analysis,
        page_features=page_features,
        page_examples=page_examples,
        families=families,
    )
    return write_page(path, page)


# ----------------------------------------------------------------------------- matching


def build_match_page(
    table: pd.DataFrame, summary: dict[str, Any], *, analysis: dict[str, Any]
) -> str:
    """Top-1 correlation histograms in both directions, decoder cosine vs correlation, tables.

    The histograms are binned here (100 bins) and the scatter holds at most MAX_MATCH_SCATTER
    mutual pairs (the best correlated), so the page does not grow with the SAEs."""
    from plotly.subplots import make_subplots

    sae_a = str(summary.get("a", {}).get("sae", "a"))
    sae_b = str(summary.get("b", {}).get("sae", "b"))
    top1 = table[table["rank"] == 0]
    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=(
            "best-match correlation",
            "decoder cosine vs correlation (best mutual pairs)",
        ),
    )
    for direction, label, color in (
        ("a_to_b", f"{sae_a} → {sae_b}", SAE_COLORS[0]),
        ("b_to_a", f"{sae_b} → {sae_a}", SAE_COLORS[1]),
    ):
        vals = top1[top1["direction"] == direction]["corr"].to_numpy(dtype=np.float64)
        counts, edges = np.histogram(vals[np.isfinite(vals)], bins=100, range=(-1.0, 1.0))
        fig.add_bar(
            x=_list((edges[:-1] + edges[1:]) / 2, 4),
            y=[int(c) for c in counts],
            width=float(edges[1] - edges[0]),
            name=esc_label(label),
            opacity=0.6,
            marker_color=color,
            hovertemplate="corr %{x:.2f}<br>%{y} features<extra></extra>",
            row=1,
            col=1,
        )
    mutual = top1[top1["mutual"] & (top1["direction"] == "a_to_b")]
    cos_ok = mutual["decoder_cos"].notna().to_numpy()
    n_scatter = int(cos_ok.sum())
    if cos_ok.any():
        sub = mutual[cos_ok].sort_values(
            ["corr", "source_feature"], ascending=[False, True], kind="stable"
        )
        sub = sub.head(MAX_MATCH_SCATTER)
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
        ["mutual pairs in the scatter", f"{min(n_scatter, MAX_MATCH_SCATTER)} of {n_scatter}"],
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
    """Write the matching page atomically."""
    return write_page(path, build_match_page(table, summary, analysis=analysis))


# ----------------------------------------------------------------------------- decoder UMAP


def build_decoder_umap_page(
    emb: pd.DataFrame,
    partners: dict[str, list[list[Any]]],
    out_path: str | os.PathLike,
    *,
    analysis: dict[str, Any],
) -> str:
    """Joint decoder UMAP coloured by SAE; search by feature id / exact top token; hovering a
    point draws lines to its matched partner(s) from match_features.

    Coordinates are packed columns (those beyond the inline budget load after the first draw);
    hover text, the token index and partners are shards."""
    dims = 3 if "z" in emb.columns else 2
    axes = "xyz"[:dims]
    saes = list(dict.fromkeys(str(s) for s in emb["sae"]))
    order = {s: i for i, s in enumerate(saes)}
    emb = (
        emb.assign(_s=emb["sae"].astype(str).map(order))
        .sort_values(["_s", "feature_id"], kind="stable")
        .reset_index(drop=True)
    )
    kind = "scatter3d" if dims == 3 else ("scattergl" if len(emb) > WEBGL_POINTS else "scatter")
    n = len(emb)
    logit = list(emb["top_logit_tokens"]) if "top_logit_tokens" in emb else [[]] * n
    act = list(emb["top_tokens"]) if "top_tokens" in emb else [[]] * n
    sae_col = emb["sae"].astype(str).tolist()
    fid_col = emb["feature_id"].astype(int).tolist()
    tokens: dict[str, list[int]] = defaultdict(list)
    for i, (lt, at) in enumerate(zip(logit, act, strict=True)):
        for key in dict.fromkeys(token_key(t) for t in list(at) + list(lt)):
            if key:
                tokens[key].append(i)

    def hovers() -> Any:
        for sae, fid, lt, at in zip(sae_col, fid_col, logit, act, strict=True):
            lt, at = [str(t) for t in lt], [str(t) for t in at]
            text = f"<b>{esc_label(sae)}</b> #{fid}"
            if lt:
                text += "<br>top logits: " + esc_label(" | ".join(lt[:5]))
            if at:
                text += "<br>activating: " + esc_label(" | ".join(at[:5]))
            yield text

    starts = [int(np.searchsorted(emb["_s"].to_numpy(), i)) for i in range(len(saes) + 1)]
    with page_data(out_path) as data:
        cols = {a: (emb[a].to_numpy(), "q16") for a in axes}
        cols["fid"] = (np.asarray(fid_col, dtype=np.int64), "u32")
        points = data.columns("pts", cols)
        hover = data.items("hover", hovers(), per=POINTS_PER_SHARD)
        tok = data.keyed("tok", dict(tokens), _n_token_shards(len(tokens)))
        par = data.keyed("par", partners, _n_token_shards(len(partners)))
        extra = {
            "data": data.meta,
            "points": points,
            "hover": hover,
            "tok": tok,
            "par": par,
            "saes": saes,
            "starts": starts,
            "dims": dims,
            "kind": kind,
            "colors": list(SAE_COLORS),
        }
        options = '<option value="">all SAEs</option>' + "".join(
            f'<option value="{esc(s)}">{esc(s)}</option>' for s in saes
        )
        controls = (
            '<div class="controls">'
            '<label>feature id <input id="geo-id" type="text" size="8"></label>'
            '<label>exact top token <input id="geo-token" type="text" size="16"></label>'
            f'<label>in <select id="geo-sae">{options}</select></label>'
            '<span id="geo-count" class="note"></span></div>\n'
            '<div id="geo-partner" class="note">hover a point to highlight its matched '
            "partner(s)</div>\n"
        )
        n_pairs = sum(len(v) for v in partners.values()) // 2
        title = f"Decoder UMAP of {', '.join(saes)} [{analysis.get('name', '')}]"
        sub = (
            f"{n} decoder directions, cosine metric; {n_pairs} matched pairs linked on hover"
            if partners
            else f"{n} decoder directions (no match analysis linked)"
        )
        fig = {
            "data": [],
            "layout": {
                "legend": {"itemsizing": "constant"},
                "margin": {"t": 30},
                "hovermode": "closest",
                "uirevision": "keep",
            },
        }
        return render_page(
            title,
            subtitle=sub,
            body_html=controls,
            figure=fig,
            extra=extra,
            assets=["search.js", "decoder_umap.js"],
        )


def write_decoder_umap_page(
    path: str | Path,
    emb: pd.DataFrame,
    partners: dict[str, list[list[Any]]],
    *,
    analysis: dict[str, Any],
) -> Path:
    """Write the decoder UMAP page and its shards atomically."""
    return write_page(path, build_decoder_umap_page(emb, partners, path, analysis=analysis))


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
    """Write the Mapper page atomically."""
    return write_page(path, build_mapper_page(graph, baseline, analysis=analysis))
