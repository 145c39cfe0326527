"""Diffing page: per-feature scatter of one model against the other for each diffing metric.

One trace per (token type, exclusivity): legend groups are token types and symbols encode
exclusivity. Hover text is a per-trace `hovertemplate` over a compact `customdata` row, which keeps
pages for large dictionaries several times smaller than one pre-rendered string per point.
"""

from __future__ import annotations

import os
import urllib.parse
from pathlib import Path
from typing import Any

import pandas as pd

from saeflow.errors import DataError
from saeflow.io import read_json
from saeflow.report.common import (
    _asset,
    esc,
    esc_label,
    fmt_num,
    html_table,
    render_page,
    round_list,
    wrap_label,
    write_page,
)

NEURONPEDIA = "https://www.neuronpedia.org"
WEBGL_POINTS = 2000
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
INCONSISTENT = "#d62728"
COUNT_SUFFIXES = ("target_num_active", "control_num_active")


def neuronpedia_base(neuronpedia_id: str | None) -> str | None:
    """`https://www.neuronpedia.org/{id}/` with the id's path segments URL-quoted."""
    if not neuronpedia_id:
        return None
    ident = str(neuronpedia_id).strip("/")
    if not ident or ".." in ident.split("/"):
        raise DataError(f"saes.*.neuronpedia: invalid Neuronpedia id {neuronpedia_id!r}")
    return f"{NEURONPEDIA}/{urllib.parse.quote(ident, safe='/-_.~')}/"


def find_models(features: pd.DataFrame, models: list[str] | None) -> list[str]:
    """The two compared models: from the analysis, or from `{model}_target_num_active` columns."""
    if not models:
        models = [
            c[: -len("_target_num_active")]
            for c in features.columns
            if c.endswith("_target_num_active")
        ]
    if len(models) < 2:
        raise DataError(f"features.parquet: need two models to compare, found {models}")
    return list(models[:2])


def find_metrics(features: pd.DataFrame, models: list[str], wanted: list[str] | None) -> list[str]:
    """Metrics with a numeric `{model}_{metric}` column for both models (the analysis' first)."""

    def present(metric: str) -> bool:
        cols = [f"{m}_{metric}" for m in models]
        return all(
            c in features.columns and pd.api.types.is_numeric_dtype(features[c]) for c in cols
        )

    if wanted:
        missing = [m for m in wanted if not present(m)]
        if missing:
            raise DataError(
                f"features.parquet: metrics {missing} need numeric columns "
                + ", ".join(f"{mod}_{m}" for m in missing for mod in models)
            )
        return list(wanted)
    prefix = f"{models[0]}_"
    found = [c[len(prefix) :] for c in features.columns if c.startswith(prefix)]
    metrics = [m for m in found if present(m)]
    if not metrics:
        raise DataError(f"features.parquet: no numeric {{model}}_{{metric}} columns for {models}")
    return metrics


def _count_total(summary: dict[str, Any], key: str, token_type: str) -> int | None:
    """n_target / n_control of a token type: a number, a per-type dict, or under token_types."""
    value = summary.get(key)
    if isinstance(value, dict):
        value = value.get(token_type)
    if value is None:
        per_type = summary.get("token_types")
        if isinstance(per_type, dict) and isinstance(per_type.get(token_type), dict):
            value = per_type[token_type].get(key)
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _flatten(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(obj, dict):
        rows: list[tuple[str, Any]] = []
        for key in sorted(obj, key=str):
            rows.extend(_flatten(obj[key], f"{prefix}.{key}" if prefix else str(key)))
        return rows
    if isinstance(obj, list) and len(obj) > 8:
        return [(prefix, f"[{len(obj)} items]")]
    return [(prefix, obj)]


def _axis_range(values: list[float | None]) -> list[float]:
    """Common range of both axes: data extent plus 5% on each side."""
    finite = [v for v in values if v is not None]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    span = hi - lo
    pad = 0.05 * span if span > 0 else max(abs(hi) * 0.05, 0.5)
    return [lo - pad, hi + pad]


def build_diffing_page(
    features: pd.DataFrame,
    summary: dict[str, Any],
    analysis: dict[str, Any],
    *,
    neuronpedia: str | None = None,
    webgl: bool | None = None,
    source: str = "features.parquet",
) -> str:
    """Whole HTML page for one diffing analysis (WebGL above WEBGL_POINTS rows unless forced)."""
    required = ["token_type", "feature_id", "exclusive", "inconsistent"]
    missing = [c for c in required if c not in features.columns]
    if missing:
        raise DataError(f"{source}: missing columns {missing}")
    models = find_models(features, analysis.get("models"))
    metrics = find_metrics(features, models, analysis.get("metrics"))
    m0, m1 = models
    symbols = {
        "both": ("star", 10, "both"),
        m0: ("circle", 7, f"{m0} only"),
        m1: ("square", 7, f"{m1} only"),
        "none": ("circle", 3, "neither"),
    }
    bad = sorted(set(map(str, features["exclusive"])) - set(symbols))
    if bad:
        raise DataError(f"{source}: column exclusive has values {bad}; expected {sorted(symbols)}")
    base_url = neuronpedia_base(neuronpedia)
    has_desc = "description" in features.columns
    webgl = len(features) > WEBGL_POINTS if webgl is None else webgl
    token_types = list(dict.fromkeys(str(t) for t in features["token_type"]))

    traces: list[dict[str, Any]] = []
    per_metric_xy: dict[str, tuple[list[Any], list[Any]]] = {m: ([], []) for m in metrics}
    all_values: dict[str, list[float | None]] = {m: [] for m in metrics}
    for ti, tt in enumerate(token_types):
        color = PALETTE[ti % len(PALETTE)]
        n_target = _count_total(summary, "n_target", tt)
        n_control = _count_total(summary, "n_control", tt)
        totals = {"target": n_target, "control": n_control}
        sub_tt = features[features["token_type"].astype(str) == tt]
        for excl in ("both", m0, m1, "none"):
            sub = sub_tt[sub_tt["exclusive"].astype(str) == excl].sort_values("feature_id")
            if sub.empty:
                continue
            symbol, size, label = symbols[excl]
            inconsistent = [bool(v) for v in sub["inconsistent"].fillna(False)]
            custom_cols: list[list[Any]] = [[int(f) for f in sub["feature_id"]]]
            custom_cols.append(["inconsistent" if v else "consistent" for v in inconsistent])
            lines = [
                f"<b>feature %{{customdata[0]}}</b> · token type {esc_label(tt)}",
                f"exclusive: {esc_label(label)} · %{{customdata[1]}}",
            ]
            for model in models:
                for which in ("target", "control"):
                    col = f"{model}_{which}_num_active"
                    if col not in features.columns:
                        continue
                    counts = [int(v) for v in sub[col].fillna(0)]
                    k = len(custom_cols)
                    custom_cols.append(counts)
                    total = totals[which]
                    text = f"{esc_label(model)} {which}: %{{customdata[{k}]}}"
                    if total:
                        custom_cols.append(round_list((c / total for c in counts), 4))
                        text += f" / {total} (%{{customdata[{k + 1}]:.2%}})"
                    lines.append(text)
            for metric in metrics:
                if metric in COUNT_SUFFIXES:
                    continue
                parts = []
                for model in models:
                    k = len(custom_cols)
                    custom_cols.append(round_list(sub[f"{model}_{metric}"], 6))
                    parts.append(f"{esc_label(model)} %{{customdata[{k}]:.4g}}")
                lines.append(f"{esc_label(metric)}: " + " · ".join(parts))
            if has_desc:
                k = len(custom_cols)
                custom_cols.append(
                    [
                        "" if d is None or d != d else "<br>" + wrap_label(d)
                        for d in sub["description"]
                    ]
                )
                lines[-1] += f"%{{customdata[{k}]}}"
            if base_url:
                lines.append("<i>click to open on Neuronpedia</i>")
            for metric in metrics:
                xs = round_list(sub[f"{m0}_{metric}"], 6)
                ys = round_list(sub[f"{m1}_{metric}"], 6)
                per_metric_xy[metric][0].append(xs)
                per_metric_xy[metric][1].append(ys)
                all_values[metric].extend(xs + ys)
            first = metrics[0]
            traces.append(
                {
                    "type": "scattergl" if webgl else "scatter",
                    "mode": "markers",
                    "name": esc_label(label),
                    "legendgroup": esc_label(tt),
                    "legendgrouptitle": {"text": f"token type {esc_label(tt)}"},
                    "x": per_metric_xy[first][0][-1],
                    "y": per_metric_xy[first][1][-1],
                    "customdata": [list(row) for row in zip(*custom_cols, strict=True)],
                    "hovertemplate": "<br>".join(lines) + "<extra></extra>",
                    "marker": {
                        "symbol": symbol,
                        "size": size,
                        "color": color,
                        "opacity": 0.8,
                        "line": {
                            "color": [INCONSISTENT if v else color for v in inconsistent],
                            "width": [2 if v else 0 for v in inconsistent],
                        },
                    },
                }
            )

    def axes_update(metric: str) -> dict[str, Any]:
        rng = _axis_range(all_values[metric])
        return {
            "xaxis.range": rng,
            "yaxis.range": rng,
            "xaxis.title.text": f"{esc_label(m0)} {esc_label(metric)}",
            "yaxis.title.text": f"{esc_label(m1)} {esc_label(metric)}",
            "shapes": [_diagonal(rng)],
        }

    buttons = [
        {
            "label": esc_label(metric),
            "method": "update",
            "args": [
                {"x": per_metric_xy[metric][0], "y": per_metric_xy[metric][1]},
                axes_update(metric),
            ],
        }
        for metric in metrics
    ]
    rng0 = _axis_range(all_values[metrics[0]])
    layout: dict[str, Any] = {
        "template": "plotly_white",
        "hovermode": "closest",
        "hoverlabel": {"align": "left"},
        "margin": {"t": 60, "l": 60, "r": 20, "b": 50},
        "legend": {"groupclick": "toggleitem"},
        "xaxis": {
            "range": rng0,
            "title": {"text": f"{esc_label(m0)} {esc_label(metrics[0])}"},
            "constrain": "domain",
            "zeroline": False,
        },
        "yaxis": {
            "range": rng0,
            "title": {"text": f"{esc_label(m1)} {esc_label(metrics[0])}"},
            "scaleanchor": "x",
            "scaleratio": 1,
            "constrain": "domain",
            "zeroline": False,
        },
        "shapes": [_diagonal(rng0)],
        "updatemenus": [
            {
                "type": "dropdown",
                "buttons": buttons,
                "active": 0,
                "x": 0,
                "xanchor": "left",
                "y": 1.12,
                "yanchor": "top",
                "showactive": True,
            }
        ],
    }

    name = analysis.get("name", "")
    title = f"Diffing {name}: {m0} vs {m1}" if name else f"Diffing: {m0} vs {m1}"
    parts = [f"SAE {analysis['sae']}" if analysis.get("sae") else ""]
    if analysis.get("target"):
        parts.append(f"target {analysis['target']}")
    if analysis.get("control"):
        parts.append(f"control {analysis['control']}")
    subtitle = ", ".join(p for p in parts if p)
    summary_rows = [
        [k, fmt_num(v) if isinstance(v, int | float) else v] for k, v in _flatten(summary)
    ]
    body = (
        '<p class="note">Symbols: star = active in both, circle = '
        f"{esc(m0)} only, square = {esc(m1)} only, small dot = neither. A red border marks an "
        "inconsistent feature. The dashed diagonal is no change. Pick the metric in the menu."
        + (" Click a point to open the feature on Neuronpedia." if base_url else "")
        + "</p>\n"
    )
    table = html_table(["summary", "value"], summary_rows) if summary_rows else ""
    return render_page(
        title,
        subtitle=subtitle,
        body_html=body,
        figure={"data": traces, "layout": layout},
        after_plot_html=table,
        extra={"neuronpedia_base": base_url},
        script=_asset("diffing.js"),
    )


def _diagonal(rng: list[float]) -> dict[str, Any]:
    return {
        "type": "line",
        "xref": "x",
        "yref": "y",
        "x0": rng[0],
        "y0": rng[0],
        "x1": rng[1],
        "y1": rng[1],
        "layer": "above",
        "line": {"color": "#888", "width": 1, "dash": "dash"},
    }


def write_diffing_page(
    features_path: str | os.PathLike,
    summary_path: str | os.PathLike | None,
    out_path: str | os.PathLike,
    analysis: dict[str, Any],
    neuronpedia: str | None = None,
) -> Path:
    """Read features.parquet + summary.json and write the page atomically."""
    try:
        features = pd.read_parquet(features_path)
    except (OSError, ValueError) as err:
        raise DataError(f"{features_path}: cannot read parquet ({err})") from None
    summary = read_json(summary_path) if summary_path else {}
    page = build_diffing_page(
        features, summary, analysis, neuronpedia=neuronpedia, source=str(features_path)
    )
    return write_page(out_path, page)
