"""Report pages of the compare stages, one small function per page, on the shared page shell.

Each page is `render_page` (saeflow.report.common) with at most one Plotly figure, its controls
built into the figure (dropdown buttons), and escaped HTML tables after it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from saeflow.report.common import esc, esc_label, fmt_num, html_table, render_page, write_page

_NOTE = '<p class="note">{}</p>\n'
MEASURE_TEXT = {
    "cca": "mean canonical correlation of the top-pca_dim principal components",
    "svcca": "SVCCA: mean canonical correlation of the components explaining svcca_variance",
    "cka": "linear CKA",
    "cka_debiased": "debiased linear CKA (unbiased HSIC)",
    "mknn": "mutual k-nearest-neighbour alignment",
    "procrustes": "orthogonal Procrustes distance (0 = identical, √2 = unrelated)",
}


def _fmt_z(r: Any) -> str:
    z = r.get("z") if isinstance(r, dict) else r.z
    return "—" if z is None or (isinstance(z, float) and np.isnan(z)) else f"{z:+.1f}"


def repsim_figure(table: pd.DataFrame, labels: list[str]) -> go.Figure:
    """S x S heatmap of one measure at a time (dropdown), cells show value and z of the null."""
    full = table[table["subspace"] == "all"]
    measures = list(dict.fromkeys(full["measure"]))
    idx = {lab: i for i, lab in enumerate(labels)}
    fig = go.Figure()
    shown = [esc_label(lab) for lab in labels]
    for t, m in enumerate(measures):
        S = len(labels)
        val = np.full((S, S), 0.0 if m == "procrustes" else 1.0)
        text = [["" for _ in range(S)] for _ in range(S)]
        for r in full[full["measure"] == m].itertuples():
            i, j = idx[r.a], idx[r.b]
            val[i, j] = val[j, i] = r.value
            cell = f"{r.value:.3f}<br>z {_fmt_z(r)}"
            text[i][j] = text[j][i] = cell
        fig.add_trace(
            go.Heatmap(
                z=val.round(6).tolist(),
                x=shown,
                y=shown,
                text=text,
                texttemplate="%{text}",
                colorscale="Viridis",
                reversescale=m == "procrustes",
                zmin=0.0,
                zmax=float(np.sqrt(2)) if m == "procrustes" else 1.0,
                visible=t == 0,
                name=m,
                hovertemplate="%{y} vs %{x}<br>%{text}<extra>" + m + "</extra>",
            )
        )
    buttons = [
        {
            "label": m,
            "method": "update",
            "args": [
                {"visible": [k == t for k in range(len(measures))]},
                {"title.text": esc_label(MEASURE_TEXT.get(m, m))},
            ],
        }
        for t, m in enumerate(measures)
    ]
    fig.update_layout(
        title=esc_label(MEASURE_TEXT.get(measures[0], measures[0])) if measures else "",
        updatemenus=[{"buttons": buttons, "direction": "down", "x": 1.0, "y": 1.12}],
        yaxis={"autorange": "reversed"},
        margin={"t": 80},
    )
    return fig


def _measure_rows(table: pd.DataFrame) -> list[list[Any]]:
    rows = []
    for r in table.itertuples():
        rows.append(
            [
                r.subspace,
                r.a,
                r.b,
                r.measure,
                f"{r.dim_a}×{r.dim_b}",
                fmt_num(r.value),
                fmt_num(r.null_mean),
                fmt_num(r.null_std),
                _fmt_z(r),
                fmt_num(r.p),
                r.baseline,
            ]
        )
    return rows


def write_repsim_page(out_path: str | Path, table: pd.DataFrame, summary: dict[str, Any]) -> Path:
    """`reports/repsim-{name}.html`: the heatmap, every number with its null, keyword subspaces."""
    header = [
        "subspace",
        "A",
        "B",
        "measure",
        "dims",
        "value",
        "null mean",
        "null sd",
        "z",
        "p",
        "null",
    ]
    s = summary["settings"]
    dropped = ", ".join(f"{k}: {v}" for k, v in summary["dims_dropped"].items())
    intro = (
        f"{summary['n_tokens']} shared tokens (aligned by seq_id, pos; token ids checked equal"
        f"{', position 0 left out' if s.get('skip_pos0') else ''}). Zero-variance columns dropped "
        f"first ({dropped}). CCA uses the top {s['pca_dim']} principal "
        f"components of each side; SVCCA keeps {s['svcca_variance']} of the variance (at most "
        f"{s['max_dim']} components); mutual kNN uses k = {s['knn_k']}. Each value has a null of "
        f"{s['n_null']} token permutations (keyword subspaces: random feature subsets of the same "
        "size); z = (value − null mean) / null sd, p one-sided."
    )
    full = table[table["subspace"] == "all"]
    kw = table[table["subspace"] != "all"]
    after = "<h2>All measures</h2>\n" + html_table(header, _measure_rows(full))
    if summary.get("keywords"):
        feats = [
            [k["subspace"], k["source"], len(k["features"]), " ".join(map(str, k["features"][:40]))]
            for k in summary["keywords"]
        ]
        after += "<h2>Keyword subspaces</h2>\n" + _NOTE.format(
            "Features whose top activating tokens mostly match the words "
            f"({esc(s.get('keywords', {}).get('words'))}), compared across the two SAEs."
        )
        after += html_table(["subspace", "source", "features", "ids"], feats)
        after += (
            html_table(header, _measure_rows(kw))
            if len(kw)
            else _NOTE.format("no pair of sources had matching features on both sides")
        )
    page = render_page(
        f"Representation similarity: {summary['name']}",
        subtitle=" · ".join(summary["labels"]),
        body_html=_NOTE.format(esc(intro)),
        figure=repsim_figure(table, summary["labels"]),
        after_plot_html=after,
    )
    return write_page(out_path, page)


def _visible(text: Any) -> str:
    return str(text).replace("\n", "⏎").replace("\t", "⇥")


def _tok(r: Any) -> str:
    tokens = getattr(r, "tokens", "")
    return f' <span class="note">[{esc(_visible(tokens))}]</span>' if tokens else ""


def _alpha_table(g: pd.DataFrame, alphas: list[float], fmt: str) -> str:
    """Rows = rank, columns = alpha x (up, down); cells `label (delta)`."""
    n = int(g["rank"].max()) + 1 if len(g) else 0
    head = "".join(
        f'<th>α={a:g} <span class="pos">↑</span></th><th>α={a:g} <span class="neg">↓</span></th>'
        for a in alphas
    )
    cells = {(r.alpha, r.direction, r.rank): r for r in g.itertuples()}
    body = []
    for rank in range(n):
        tds = []
        for a in alphas:
            for d in ("+", "-"):
                r = cells.get((np.float32(a), d, rank))
                tds.append(
                    "<td></td>"
                    if r is None
                    else f"<td>{esc(_visible(r.label))}{_tok(r)} ({format(r.delta, fmt)})</td>"
                )
        body.append(f"<tr><td>{rank + 1}</td>{''.join(tds)}</tr>\n")
    return (
        f'<table class="data"><thead><tr><th>#</th>{head}</tr></thead>\n<tbody>\n'
        f"{''.join(body)}</tbody></table>\n"
    )


def write_steer_page(out_path: str | Path, steer: pd.DataFrame, info: dict[str, Any]) -> Path:
    """`reports/steer-{name}.html`, in the MFA steering page's layout: one block per prompt x
    feature with logit changes, moved features and greedy continuations per alpha."""
    alphas = [float(a) for a in info["alphas"] if float(a) != 0.0]
    norms = ", ".join(f"f{k}: {v:.3g}" for k, v in info["decoder_norms"].items())
    parts = [
        _NOTE.format(
            f"x ← x + α·d_f at block {esc(info['layer'])} ({esc(info['hook'])}), every position; "
            f"d_f = the feature's decoder direction in activation space (norms: {esc(norms)}). "
            "Logit changes are at the last prompt position; "
            "moved features are mean code changes over the prompt when the steered activations "
            "are encoded again by the same SAE, with their top activating tokens in brackets. "
            "α = 0 (the no-op check) is left out of the tables."
        )
    ]
    runs = pd.DataFrame(info["runs"])
    for (p_idx, feat), g in (
        steer.groupby(["prompt_idx", "feature"], sort=True) if len(steer) else []
    ):
        prompt = info["prompts"][int(p_idx)]
        parts.append(
            f"<h2>Prompt {int(p_idx)}: “{esc(_visible(prompt))}” — feature {int(feat)}</h2>\n"
        )
        parts.append("<h3>Logit changes at the last position</h3>\n")
        parts.append(_alpha_table(g[g["kind"] == "logit"], alphas, "+.3f"))
        parts.append("<h3>Features that move when re-encoded</h3>\n")
        parts.append(_alpha_table(g[g["kind"] == "feature"], alphas, "+.3f"))
        r = runs[(runs["prompt_idx"] == p_idx) & (runs["feature"] == feat)]
        rows = [["unsteered", _visible(r["base_continuation"].iloc[0])]] if len(r) else []
        rows += [
            [f"α={a:g}", _visible(c)] for a, c in zip(r["alpha"], r["continuation"], strict=True)
        ]
        parts.append("<h3>Greedy continuations</h3>\n" + html_table(["", "continuation"], rows))
    page = render_page(
        f"SAE steering: {info['name']}",
        subtitle=f"{info['lm']} · features {info['features']}",
        body_html="".join(parts),
    )
    return write_page(out_path, page, ship_plotlyjs=False)


def pairs_figure(
    scatters: list[tuple[int, int, np.ndarray, np.ndarray, list[str]]], sides: tuple[str, str]
) -> go.Figure:
    """Activation of A against B for one pair at a time (dropdown), hover = context."""
    fig = go.Figure()
    for t, (fa, fb, xa, xb, hover) in enumerate(scatters):
        fig.add_trace(
            go.Scatter(
                x=np.round(xa, 4).tolist(),
                y=np.round(xb, 4).tolist(),
                mode="markers",
                hovertext=hover,
                hoverinfo="text",
                visible=t == 0,
                name=f"{fa} ↔ {fb}",
                marker={"size": 6, "opacity": 0.6},
            )
        )
    buttons = [
        {
            "label": f"A{fa} ↔ B{fb}",
            "method": "update",
            "args": [
                {"visible": [k == t for k in range(len(scatters))]},
                {
                    "xaxis.title.text": esc_label(f"{sides[0]} feature {fa}"),
                    "yaxis.title.text": esc_label(f"{sides[1]} feature {fb}"),
                },
            ],
        }
        for t, (fa, fb, *_rest) in enumerate(scatters)
    ]
    first = scatters[0] if scatters else (0, 0)
    fig.update_layout(
        title="Activation of A vs B on tokens where either fires",
        xaxis_title=esc_label(f"{sides[0]} feature {first[0]}"),
        yaxis_title=esc_label(f"{sides[1]} feature {first[1]}"),
        updatemenus=[{"buttons": buttons, "direction": "down", "x": 1.0, "y": 1.12}]
        if buttons
        else [],
        showlegend=False,
    )
    return fig


def write_pairs_page(
    out_path: str | Path,
    pairs: pd.DataFrame,
    redundant: pd.DataFrame,
    scatters: list[tuple[int, int, np.ndarray, np.ndarray, list[str]]],
    *,
    name: str,
    sides: tuple[str, str],
) -> Path:
    """`reports/pairs-{match}.html`: labelled mutual pairs, their scatters, redundant pairs."""
    rows = [
        [
            r.feature_a,
            r.feature_b,
            fmt_num(r.corr),
            fmt_num(r.decoder_cos),
            fmt_num(r.jaccard_top),
            " ".join(r.top_a),
            " ".join(r.top_b),
            r.n_both,
            r.n_a_only,
            r.n_b_only,
            ", ".join(r.a_only_tokens),
            ", ".join(r.b_only_tokens),
        ]
        for r in pairs.itertuples()
    ]
    table = html_table(
        [
            "A",
            "B",
            "corr",
            "decoder cos",
            "Jaccard top tokens",
            "top tokens A",
            "top tokens B",
            "both fire",
            "A only",
            "B only",
            "A-only tokens",
            "B-only tokens",
        ],
        rows,
    )
    red_rows = [
        [r.sae, r.feature, r.other, fmt_num(r.corr), fmt_num(r.decoder_cos)]
        for r in redundant.head(200).itertuples()
    ]
    after = (
        f"<h2>Mutual pairs ({len(pairs)})</h2>\n"
        + table
        + f"<h2>Redundant pairs inside one SAE ({len(redundant)})</h2>\n"
        + _NOTE.format(
            "Self-match without the diagonal: each feature's best other feature of the "
            "same SAE, kept above the threshold (first 200 shown)."
        )
        + html_table(["SAE", "feature", "other", "corr", "decoder cos"], red_rows)
    )
    page = render_page(
        f"Matched pairs: {name}",
        subtitle=f"A = {sides[0]}, B = {sides[1]}",
        body_html=_NOTE.format(
            "Jaccard of the distinct top activating tokens; counts of tokens where both fire, "
            "where "
            "only A fires (B is zero) and the reverse, with their most frequent tokens."
        ),
        figure=pairs_figure(scatters, sides) if scatters else None,
        after_plot_html=after,
    )
    return write_page(out_path, page, ship_plotlyjs=bool(scatters))


def family_tree_html(table: pd.DataFrame, max_families: int) -> str:
    """Nested <details> lists: parent (density, tokens) -> children with their split measures.

    Parents carry the anchor `p{id}`, so a feature dashboard can link `families-NAME.html#p12`.
    """
    if table.empty:
        return _NOTE.format("no family passes the threshold")
    fams = table.drop_duplicates("parent").set_index("parent", drop=False)
    parts = ['<ul class="tree">\n']
    for fam in fams.loc[shown_parents(table, max_families)].itertuples():
        kids = table[table["parent"] == fam.parent].sort_values("rank")
        head = (
            f"parent {fam.parent} → {fam.split_ratio} children"
            f" · density {fmt_num(fam.parent_density)} · coverage {fmt_num(fam.coverage)}"
            f" · children Jaccard {fmt_num(fam.children_jaccard)}"
            f" · tokens: {' '.join(fam.parent_tokens)}"
        )
        items = "".join(
            f"<li>child {k.child}: corr {fmt_num(k.corr)}, decoder cos {fmt_num(k.decoder_cos)}, "
            f"density ×{fmt_num(k.density_ratio)}, P(c|p) {fmt_num(k.p_child_given_parent)}, "
            f"P(p|c) {fmt_num(k.p_parent_given_child)}, in {k.child_parents} families · "
            f"tokens: {esc(' '.join(k.child_tokens))}</li>\n"
            for k in kids.itertuples()
        )
        parts.append(
            f'<li id="p{fam.parent}"><details open><summary>{esc(head)}</summary>\n'
            f"<ul>\n{items}</ul></details></li>\n"
        )
    parts.append("</ul>\n")
    return "".join(parts)


def write_families_page(
    out_path: str | Path, table: pd.DataFrame, summary: dict[str, Any], *, max_families: int
) -> Path:
    """`reports/families-{name}.html`: headline numbers and one tree per family."""
    facts = html_table(
        ["measure", "value"],
        [
            [k, ", ".join(f"{a}: {b}" for a, b in v.items()) if isinstance(v, dict) else fmt_num(v)]
            for k, v in summary.items()
            if k not in ("name",)
        ],
    )
    intro = _NOTE.format(
        f"Parents: features of {esc(summary['parent_sae'])} ({summary['d_parent']}); children: "
        f"features of {esc(summary['child_sae'])} ({summary['d_child']}) among a parent's matches "
        f"with activation correlation ≥ {summary['threshold']} (at most the match's top_k = "
        f"{summary.get('max_children')} per parent). Density × is the child's firing "
        "frequency over the parent's; P(c|p) and P(p|c) are co-activation rates; coverage is the "
        "share of the parent's tokens on which some child fires."
    )
    page = render_page(
        f"Feature families: {summary['name']}",
        subtitle=f"{summary['parent_sae']} → {summary['child_sae']} (match {summary['match']})",
        body_html=intro + facts + "<h2>Families</h2>\n" + family_tree_html(table, max_families),
    )
    return write_page(out_path, page, ship_plotlyjs=False)


def shown_parents(table: pd.DataFrame, max_families: int) -> list[int]:
    """The parents whose trees the families page shows (and anchors as `#p{id}`), in page order."""
    if table.empty:
        return []
    fams = table.drop_duplicates("parent").sort_values(
        ["split_ratio", "parent"], ascending=[False, True]
    )
    return [int(p) for p in fams.head(max_families)["parent"]]


def write_family_links(
    out_path: str | Path, table: pd.DataFrame, summary: dict[str, Any], *, max_families: int
) -> Path:
    """`reports/families-{name}.links.js`: the families a feature dashboard can link to (the
    parents shown on the families page, and their children in the wider SAE).

    One `saeflowFamilyLinks({...})` call, loaded by a dashboard of the parent SAE with a script
    tag (works from file://), so the dashboard needs no rerun when the families change.
    """
    import json

    from saeflow.io import atomic_path

    parents = shown_parents(table, max_families)
    children: dict[str, list[int]] = {}
    if parents:
        kids = table[table["parent"].isin(parents)].sort_values(["child", "parent"])
        for child, parent in zip(kids["child"], kids["parent"], strict=True):
            children.setdefault(str(int(child)), []).append(int(parent))
    payload = {
        "name": summary["name"],
        "page": Path(out_path).name.removesuffix(".links.js") + ".html",
        "sae": summary["parent_sae"],
        "parents": parents,
        "child_sae": summary["child_sae"],
        "children": children,
    }
    with atomic_path(out_path) as tmp:
        Path(tmp).write_text(f"saeflowFamilyLinks({json.dumps(payload, sort_keys=True)});\n")
    return Path(out_path)
