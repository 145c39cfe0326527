"""Report page for an MFA analysis: NLL curves, top contexts, subspace scatters, steering tables.

Built with the shared `Page` (plotly.min.js beside the page, no CDN). The subspace scatters show
any pair of loading axes: the page holds each component's member coordinates on every axis as
packed columns and two menus pick the pair (seed 004 plots dims=(0, 8)). All dataset text
(tokens, contexts, prompts) is escaped before any markup such as <b> is added.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from saeflow.report.common import Page, esc, esc_label, write_page
from saeflow.report.shards import pack


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


def subspace_members(
    sub: pd.DataFrame, component: int, *, max_points: int = 2000, seed: int = 0
) -> tuple[pd.DataFrame, np.ndarray]:
    """(members, coords_NR) of `component`: a seeded sample of at most `max_points` members."""
    members = sub[sub["component"] == component]
    if len(members) > max_points:
        members = members.sample(n=max_points, random_state=seed).sort_index()
    coords = np.stack(members["coords"].to_numpy()) if len(members) else np.zeros((0, 2))
    return members, coords


def subspace_figure(
    sub: pd.DataFrame,
    component: int,
    *,
    dims: tuple[int, int] = (0, 1),
    max_points: int = 2000,
    max_labels: int = 150,
    seed: int = 0,
) -> go.Figure:
    """Members of `component` in two of its loading axes (`dims`, any pair; the page's menus
    switch to any other pair)."""
    members, coords = subspace_members(sub, component, max_points=max_points, seed=seed)
    R = coords.shape[1] if coords.ndim == 2 and len(members) else 0
    a, b = (min(d, R - 1) for d in dims) if R else (0, 0)
    tokens = [visible(t) for t in members["token"]]
    labels = [esc_label(t) if i < max_labels else "" for i, t in enumerate(tokens)]
    hover = [
        f"{esc_label(t)}<br>seq {s} pos {p}<br>resp {r:.2f}"
        for t, s, p, r in zip(
            tokens, members["seq_id"], members["pos"], members["resp"], strict=True
        )
    ]
    fig = go.Figure(
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
            name=f"u{a} vs u{b}",
        )
    )
    fig.update_layout(
        title=f"Component {component}: {len(members)} members in its loading axes",
        xaxis_title=f"u{a}",
        yaxis_title=f"u{b}",
        height=520,
        showlegend=False,
        margin={"t": 60},
    )
    return fig


def axis_menus(div_id: str, R: int, dims: tuple[int, int]) -> str:
    """Two selects (x axis, y axis) over all R loading axes for the scatter in `div_id`."""

    def select(which: str, chosen: int) -> str:
        opts = "".join(
            f'<option value="{r}"{" selected" if r == chosen else ""}>u{r}</option>'
            for r in range(R)
        )
        return (
            f'<label>{which} axis <select class="mfa-axis" data-plot="{esc(div_id)}" '
            f'data-axis="{which}">{opts}</select></label>'
        )

    return f'<div class="controls">{select("x", dims[0])}{select("y", dims[1])}</div>\n'


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
    dims: tuple[int, int] = (0, 1),
    seed: int = 0,
    ship_plotlyjs: bool = True,
) -> Path:
    """Write the whole page atomically; plotly.min.js is copied beside it."""
    comps = choose_components(summary, contexts, n_components)
    cfg = model_config or {}
    facts = ", ".join(
        f"{k} = {cfg[k]}"
        for k in ("K", "R", "D", "psi", "best_epoch", "n_train", "n_val")
        if k in cfg
    )
    page = Page(title, subtitle=facts)
    page.heading("Training")
    page.figure(nll_figure(nll), div_id="mfa-nll", css_class="plot-small")
    page.heading("Top-likelihood contexts")
    page.note(
        "Tokens ranked by log p(x | k); lines are a seeded random sample of each component's top "
        "pool. The scored token is in bold after its preceding context."
    )
    page.html(contexts_html(contexts, comps, summary))
    page.heading("Local subspaces")
    page.note(
        "Members (argmax responsibility) projected by least squares onto the unit loading "
        "directions, centred at the centroid; axes in fitted order (sorted by loading norm with "
        "sort_loadings: true). Pick any two axes."
    )
    axes: dict[str, list[dict[str, Any]]] = {}
    for k in comps:
        div_id = f"mfa-subspace-{k}"
        _, coords = subspace_members(subspace, k, max_points=max_points, seed=seed)
        R = coords.shape[1] if coords.ndim == 2 and len(coords) else 0
        if R:
            axes[div_id] = [pack(coords[:, r], "f32") for r in range(R)]
            page.html(axis_menus(div_id, R, (min(dims[0], R - 1), min(dims[1], R - 1))))
        fig = subspace_figure(
            subspace, k, dims=dims, max_points=max_points, max_labels=max_labels, seed=seed
        )
        page.figure(fig, div_id=div_id)
    page.extra["axes"] = axes
    page.heading("Steering: logit changes at the last position")
    if steer_info:
        page.html(
            f'<p class="note">layer {esc(steer_info.get("layer"))}, '
            f"z = {esc(steer_info.get('z'))}; centroid: (1−α)x + αμ_k; two-stage: "
            "x + α(μ_k − x) + W_k z.</p>\n"
        )
    page.html(steer_html(steer))
    return write_page(out_path, page.render(assets=["mfa.js"]), ship_plotlyjs=ship_plotlyjs)


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
