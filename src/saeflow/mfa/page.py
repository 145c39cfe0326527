"""Report page for an MFA analysis: NLL curves, top contexts, subspace scatters, steering tables.

Page functions return Plotly figures or HTML strings; `write_mfa_page` puts the figures'
`to_html(full_html=False, include_plotlyjs=False)` fragments in a plain shell that loads
`plotly.min.js` from beside the page (no CDN). All dataset text (tokens, contexts, prompts) is
escaped before any markup such as <b> is added.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from saeflow.report.common import esc, esc_label

PLOTLY_JS = "plotly.min.js"
_FIG_CONFIG = {"displaylogo": False, "responsive": True}

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 1.5em;
       color: #222; }
h1 { font-size: 1.35em; } h2 { font-size: 1.15em; margin-top: 1.6em; } h3 { font-size: 1em; }
table.data { border-collapse: collapse; margin: 0.6em 0; font-size: 0.88em; }
table.data th, table.data td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: left;
       vertical-align: top; }
ul.contexts { font-family: ui-monospace, monospace; font-size: 0.85em; }
ul.contexts li { margin: 0.15em 0; white-space: pre-wrap; }
.note { color: #555; font-size: 0.9em; }
.pos { color: #0a5; } .neg { color: #b22; }
"""


def visible(text: str) -> str:
    """Make whitespace visible in a token or context (newlines and tabs)."""
    return str(text).replace("\n", "⏎").replace("\t", "⇥")


# ---- figures -------------------------------------------------------------------------------------
def nll_figure(nll: pd.DataFrame) -> go.Figure:
    """Train and validation NLL per epoch (epoch 0 = initialisation), best epoch marked."""
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(x=nll["epoch"], y=nll["train_nll"], mode="lines+markers", name="train")
    )
    if nll["val_nll"].notna().any():
        fig.add_trace(
            go.Scatter(x=nll["epoch"], y=nll["val_nll"], mode="lines+markers", name="validation")
        )
    best = nll[nll["best"]] if "best" in nll else nll.iloc[0:0]
    if len(best):
        y = best["val_nll"] if best["val_nll"].notna().all() else best["train_nll"]
        fig.add_trace(
            go.Scatter(
                x=best["epoch"],
                y=y,
                mode="markers",
                name="kept (best)",
                marker={"size": 12, "symbol": "star"},
            )
        )
    fig.update_layout(
        title="Negative log-likelihood per token (nats)",
        xaxis_title="epoch",
        yaxis_title="NLL",
        height=380,
        margin={"t": 50, "b": 40},
    )
    return fig


def subspace_figure(
    sub: pd.DataFrame,
    component: int,
    *,
    max_points: int = 2000,
    max_labels: int = 150,
    seed: int = 0,
) -> go.Figure:
    """Members of `component` in pairs of its loading axes (buttons switch the pair)."""
    members = sub[sub["component"] == component]
    if len(members) > max_points:
        members = members.sample(n=max_points, random_state=seed).sort_index()
    coords = np.stack(members["coords"].to_numpy()) if len(members) else np.zeros((0, 2))
    R = coords.shape[1] if coords.ndim == 2 else 0
    pairs = [(i, i + 1) for i in range(0, R - 1, 2)] or [(0, 0)]
    tokens = [visible(t) for t in members["token"]]
    labels = [esc_label(t) if i < max_labels else "" for i, t in enumerate(tokens)]
    hover = [
        f"{esc_label(t)}<br>seq {s} pos {p}<br>resp {r:.2f}"
        for t, s, p, r in zip(
            tokens, members["seq_id"], members["pos"], members["resp"], strict=True
        )
    ]
    fig = go.Figure()
    for j, (a, b) in enumerate(pairs):
        fig.add_trace(
            go.Scatter(
                x=coords[:, a] if R else [],
                y=coords[:, b] if R else [],
                mode="markers+text",
                text=labels,
                hovertext=hover,
                hoverinfo="text",
                textposition="top center",
                textfont={"size": 9},
                marker={"size": 5, "opacity": 0.6},
                visible=j == 0,
                name=f"u{a} vs u{b}",
            )
        )
    buttons = [
        {
            "label": f"u{a} / u{b}",
            "method": "update",
            "args": [
                {"visible": [i == j for i in range(len(pairs))]},
                {"xaxis.title.text": f"u{a}", "yaxis.title.text": f"u{b}"},
            ],
        }
        for j, (a, b) in enumerate(pairs)
    ]
    fig.update_layout(
        title=f"Component {component}: {len(members)} members in its loading axes",
        xaxis_title=f"u{pairs[0][0]}",
        yaxis_title=f"u{pairs[0][1]}",
        height=520,
        showlegend=False,
        margin={"t": 60},
        updatemenus=[{"buttons": buttons, "direction": "down", "x": 1.0, "y": 1.15}]
        if len(pairs) > 1
        else [],
    )
    return fig


# ---- tables --------------------------------------------------------------------------------------
def choose_components(summary: dict[str, Any] | None, contexts: pd.DataFrame, n: int) -> list[int]:
    """The `n` largest components by member count (all of them without a summary)."""
    if summary and summary.get("components"):
        comps = sorted(summary["components"], key=lambda c: (-c["size"], c["component"]))
        return [int(c["component"]) for c in comps[:n]]
    return sorted(int(k) for k in contexts["component"].unique())[:n]


def contexts_html(
    contexts: pd.DataFrame, components: list[int], summary: dict[str, Any] | None = None
) -> str:
    """Per component: its weight, frequent member tokens and the sampled top-likelihood contexts."""
    info = {c["component"]: c for c in (summary or {}).get("components", [])}
    parts = []
    for k in components:
        c = info.get(k, {})
        head = f"Component {k}"
        if c:
            head += f" — π = {c['pi']:.3f}, {c['size']} members"
        parts.append(f"<h3>{esc(head)}</h3>\n")
        if c.get("top_tokens"):
            toks = ", ".join(f"{esc(visible(t))} ({n})" for t, n in c["top_tokens"])
            parts.append(f'<p class="note">frequent member tokens: {toks}</p>\n')
        rows = contexts[(contexts["component"] == k) & contexts["shown"]].sort_values("rank")
        items = "".join(
            f"<li>{esc(visible(r.context))}<b>{esc(visible(r.token))}</b>"
            f' <span class="note">(log p = {r.log_lik:.1f}, rank {r.rank})</span></li>\n'
            for r in rows.itertuples()
        )
        parts.append(f'<ul class="contexts">\n{items}</ul>\n')
    return "".join(parts)


def steer_html(steer: pd.DataFrame, top: int | None = None) -> str:
    """One table per (prompt, component, method): columns are alphas, up and down changes."""
    if steer is None or steer.empty:
        return '<p class="note">no steering results</p>\n'
    parts = []
    for (p_idx, comp, method), g in steer.groupby(["prompt_idx", "component", "method"], sort=True):
        prompt = g["prompt"].iloc[0]
        alphas = sorted(g["alpha"].unique())
        n = int(g["rank"].max()) + 1 if top is None else top
        header = "".join(
            f'<th>α={a:g} <span class="pos">↑</span></th>'
            f'<th>α={a:g} <span class="neg">↓</span></th>'
            for a in alphas
        )
        body = []
        for rank in range(n):
            cells = []
            for a in alphas:
                for d in ("+", "-"):
                    hit = g[(g["alpha"] == a) & (g["direction"] == d) & (g["rank"] == rank)]
                    if hit.empty:
                        cells.append("<td></td>")
                    else:
                        r = hit.iloc[0]
                        cells.append(f"<td>{esc(visible(r['token']))} ({r['delta']:+.3f})</td>")
            body.append(f"<tr><td>{rank + 1}</td>{''.join(cells)}</tr>\n")
        parts.append(
            f"<h3>Prompt {int(p_idx)}: “{esc(visible(prompt))}” — component {int(comp)}, "
            f'{esc(method)}</h3>\n<table class="data"><thead><tr><th>#</th>{header}</tr></thead>'
            f"\n<tbody>\n{''.join(body)}</tbody></table>\n"
        )
    return "".join(parts)


def _fig_html(fig: go.Figure, div_id: str) -> str:
    # A fixed div id keeps the page bytes deterministic (plotly otherwise draws a uuid).
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id, config=_FIG_CONFIG)


def write_mfa_page(
    out_path: str | Path,
    *,
    title: str,
    nll: pd.DataFrame,
    contexts: pd.DataFrame,
    subspace: pd.DataFrame,
    steer: pd.DataFrame | None = None,
    steer_info: dict[str, Any] | None = None,
    summary: dict[str, Any] | None = None,
    model_config: dict[str, Any] | None = None,
    n_components: int = 8,
    max_points: int = 2000,
    max_labels: int = 150,
    seed: int = 0,
    ship_plotlyjs: bool = True,
) -> Path:
    """Write the whole page atomically; plotly.min.js is expected (or copied) beside it."""
    from saeflow.io import atomic_path

    comps = choose_components(summary, contexts, n_components)
    cfg = model_config or {}
    facts = ", ".join(
        f"{k} = {esc(cfg[k])}"
        for k in ("K", "R", "D", "psi", "best_epoch", "n_train", "n_val")
        if k in cfg
    )
    body = [
        f"<h1>{esc(title)}</h1>\n",
        f'<p class="note">{facts}</p>\n' if facts else "",
        '<p><a href="index.html">&larr; all reports</a></p>\n',
        "<h2>Training</h2>\n",
        _fig_html(nll_figure(nll), "mfa-nll"),
        "<h2>Top-likelihood contexts</h2>\n",
        '<p class="note">Tokens ranked by log p(x | k); lines are a seeded random sample of each '
        "component's top pool. The scored token is in bold after its preceding context.</p>\n",
        contexts_html(contexts, comps, summary),
        "<h2>Local subspaces</h2>\n",
        '<p class="note">Members (argmax responsibility) projected by least squares onto the '
        "unit loading directions, centred at the centroid; axes in fitted order (sorted by "
        "loading norm with sort_loadings: true).</p>\n",
    ]
    for k in comps:
        fig = subspace_figure(subspace, k, max_points=max_points, max_labels=max_labels, seed=seed)
        body.append(_fig_html(fig, f"mfa-subspace-{k}"))
    body.append("<h2>Steering: logit changes at the last position</h2>\n")
    if steer_info:
        body.append(
            f'<p class="note">layer {esc(steer_info.get("layer"))}, '
            f"z = {esc(steer_info.get('z'))}; centroid: (1−α)x + αμ_k; two-stage: "
            "x + α(μ_k − x) + W_k z.</p>\n"
        )
    body.append(steer_html(steer))
    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{esc(title)}</title>\n<style>{_CSS}</style>\n"
        f'<script charset="utf-8" src="{PLOTLY_JS}"></script>\n</head>\n<body>\n'
        + "".join(body)
        + "</body>\n</html>\n"
    )
    out_path = Path(out_path)
    if ship_plotlyjs:
        try:
            from saeflow.report.common import ensure_plotlyjs
        except ImportError:  # pragma: no cover - the report helper ships it otherwise
            pass
        else:
            ensure_plotlyjs(out_path.parent)
    with atomic_path(out_path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out_path


def run_report_mfa(
    out_path: str | Path,
    *,
    nll_path: str | Path,
    contexts_path: str | Path,
    subspace_path: str | Path,
    summary_path: str | Path,
    model_config_path: str | Path,
    steer_path: str | Path | None = None,
    steer_info_path: str | Path | None = None,
    settings: dict[str, Any],
    title: str,
    seed: int = 0,
) -> Path:
    """report_mfa rule: read the stage outputs and write the page."""
    from saeflow.io import read_json
    from saeflow.mfa import resolve_settings

    s = resolve_settings(settings)
    steer = pd.read_parquet(steer_path) if steer_path else None
    return write_mfa_page(
        out_path,
        title=title,
        nll=pd.read_parquet(nll_path),
        contexts=pd.read_parquet(contexts_path),
        subspace=pd.read_parquet(subspace_path),
        steer=steer,
        steer_info=read_json(steer_info_path) if steer_info_path else None,
        summary=read_json(summary_path),
        model_config=read_json(model_config_path),
        n_components=s["page_components"],
        max_points=s["scatter_points"],
        max_labels=s["scatter_labels"],
        seed=seed,
    )
