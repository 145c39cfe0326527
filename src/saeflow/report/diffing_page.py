"""Diffing page (seed 001): per-feature scatter of one model against the other, per metric.

One trace per (token type, exclusivity, inconsistent): legend groups are token types, symbols
encode exclusivity, inconsistent features have their own entries. The page holds the plotted
points as packed columns (ids, classes, metric values); counts and explanations are in
`feat-{k}.js` shards beside it, so its first load stays small at 131k features.
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
    esc,
    fmt_num,
    html_table,
    render_page,
    wrap_label,
    write_page,
)
from saeflow.report.shards import page_data

NEURONPEDIA = "https://www.neuronpedia.org"
WEBGL_POINTS = 2000
# Seed 001 colours the token types "model" and "newline" #FF6B6B and #4ECDC4.
PALETTE = ["#FF6B6B", "#4ECDC4", "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#bcbd22"]
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


METRIC_NAMES = {
    "target_all_mean": "Mean Activation",
    "target_sparsity": "Activation Sparsity",
    "target_all_std": "Activation Std",
    "target_max": "Max Activation",
    "target_num_active": "Active Prompts",
}
CATEGORIES = ("both", "m0", "m1", "none")
OPTIONS = {"plot": "exclusive", "explanation_column": "description"}
DETAIL_PER = 256


def page_options(analysis: dict[str, Any]) -> dict[str, Any]:
    """The analysis' `report` options over the defaults, checked."""
    opts = dict(OPTIONS)
    opts.update({k: v for k, v in (analysis.get("report") or {}).items() if k in OPTIONS})
    if opts["plot"] not in ("exclusive", "all"):
        raise DataError(f"report.plot: expected 'exclusive' or 'all', got {opts['plot']!r}")
    return opts


def model_label(models: list[str], info: dict[str, dict[str, Any]] | None) -> tuple[str, str]:
    """(model name, layer) for the title: the compared models' hub names and layer."""
    info = info or {}
    names = list(dict.fromkeys(str(info.get(m, {}).get("name") or m) for m in models))
    layers = list(
        dict.fromkeys(str(info[m]["layer"]) for m in models if "layer" in info.get(m, {}))
    )
    return " / ".join(names), " / ".join(layers)


def _detail_items(
    features: pd.DataFrame, models: list[str], token_types: list[str], has_desc: bool
) -> tuple[int, Any]:
    """(number of feature ids, iterator of per-feature detail: counts per token type and the
    escaped, wrapped explanation) for the `feat` shards, indexed by feature id."""
    count_cols = [f"{m}_{w}_num_active" for m in models for w in ("target", "control")]
    present = [c for c in count_cols if c in features.columns]
    n_ids = int(features["feature_id"].max()) + 1 if len(features) else 0
    by_id: dict[int, dict[str, Any]] = {}
    tt_col = features["token_type"].astype(str).to_numpy()
    fid_col = features["feature_id"].astype(int).to_numpy()
    counts = features[present].fillna(0).astype(int).to_numpy() if present else None
    desc = features["description"].to_numpy() if has_desc else None
    for i in range(len(features)):
        rec = by_id.setdefault(int(fid_col[i]), {"c": {}, "e": None})
        if counts is not None:
            rec["c"][tt_col[i]] = [int(v) for v in counts[i]]
        if desc is not None and rec["e"] is None:
            d = desc[i]
            if isinstance(d, str) and d.strip():
                rec["e"] = wrap_label(d, width=80, max_lines=20)
    empty = {"c": {}, "e": None}
    return n_ids, (by_id.get(i, empty) for i in range(n_ids))


def build_diffing_page(
    features: pd.DataFrame,
    summary: dict[str, Any],
    analysis: dict[str, Any],
    out_path: str | os.PathLike,
    *,
    neuronpedia: str | None = None,
    models_info: dict[str, dict[str, Any]] | None = None,
    webgl: bool | None = None,
    source: str = "features.parquet",
) -> str:
    """Write the shards of one diffing page beside `out_path` and return the page HTML.

    Seed 001 by default: only target-exclusive features are plotted (`report.plot: all` adds the
    rest), inconsistent ones get their own legend entries, the hover shows both values and their
    difference, counts and the explanation ("No explanation available" where none). Per-feature
    detail is in `feat-{k}.js` shards, loaded on hover.
    """
    required = ["token_type", "feature_id", "exclusive", "inconsistent"]
    missing = [c for c in required if c not in features.columns]
    if missing:
        raise DataError(f"{source}: missing columns {missing}")
    opts = page_options(analysis)
    models = find_models(features, analysis.get("models"))
    metrics = find_metrics(features, models, analysis.get("metrics"))
    metrics = [m for m in metrics if m not in COUNT_SUFFIXES] or metrics
    m0, m1 = models
    codes = {"both": 0, m0: 1, m1: 2, "none": 3}
    bad = sorted(set(map(str, features["exclusive"])) - set(codes))
    if bad:
        raise DataError(f"{source}: column exclusive has values {bad}; expected {sorted(codes)}")
    base_url = neuronpedia_base(neuronpedia)
    has_desc = "description" in features.columns
    token_types = list(dict.fromkeys(str(t) for t in features["token_type"]))

    df = features.assign(
        _tt=features["token_type"].astype(str).map({t: i for i, t in enumerate(token_types)}),
        _cat=features["exclusive"].astype(str).map(codes),
        _inc=features["inconsistent"].fillna(False).astype(bool),
    )
    if opts["plot"] == "exclusive":
        df = df[df["_cat"] != 3]
    df = df.assign(_rest=df["_cat"] == 3).sort_values(["_rest", "_tt", "feature_id"], kind="stable")
    cols: dict[str, tuple[Any, str]] = {
        "fid": (df["feature_id"].to_numpy(), "u32"),
        "tt": (df["_tt"].to_numpy(), "u8"),
        "cat": ((df["_cat"] + 4 * df["_inc"]).to_numpy(), "u8"),
    }
    for j, metric in enumerate(metrics):
        cols[f"x{j}"] = (df[f"{m0}_{metric}"].to_numpy(dtype="float64"), "f32")
        cols[f"y{j}"] = (df[f"{m1}_{metric}"].to_numpy(dtype="float64"), "f32")
    totals = {
        tt: [_count_total(summary, "n_target", tt), _count_total(summary, "n_control", tt)]
        for tt in token_types
    }
    name_m, layer = model_label(models, models_info)
    webgl = len(df) > WEBGL_POINTS if webgl is None else webgl

    with page_data(out_path) as data:
        n_ids, items = _detail_items(features, models, token_types, has_desc)
        detail = data.items("feat", items, per=DETAIL_PER)
        points = data.columns("pts", cols)
        extra = {
            "data": data.meta,
            "feat": detail,
            "points": points,
            "models": models,
            "token_types": token_types,
            "totals": totals,
            "metrics": metrics,
            "metric_names": [METRIC_NAMES.get(m, m) for m in metrics],
            "palette": PALETTE,
            "inconsistent_color": INCONSISTENT,
            "kind": "scattergl" if webgl else "scatter",
            "neuronpedia_base": base_url,
            "plot": opts["plot"],
            "plot_title": f"{m0} → {m1} SAE features",
            "plot_subtitle": f"{name_m}, residual stream post-layer {layer}" if layer else name_m,
        }
        layout: dict[str, Any] = {
            "template": "plotly_white",
            "hovermode": "closest",
            "hoverlabel": {"align": "left"},
            "margin": {"t": 70, "l": 60, "r": 20, "b": 50},
            "legend": {"groupclick": "togglegroup", "title": {"text": "Activation position"}},
            "xaxis": {"constrain": "domain", "zeroline": False},
            "yaxis": {
                "scaleanchor": "x",
                "scaleratio": 1,
                "constrain": "domain",
                "zeroline": False,
            },
        }
        name = analysis.get("name", "")
        where = f"{name_m}, layer {layer}" if layer else name_m
        title = f"Diffing {name}: {m0} → {m1} ({where})" if name else f"Diffing {m0} → {m1}"
        parts = [f"SAE {analysis['sae']}" if analysis.get("sae") else ""]
        if analysis.get("target"):
            parts.append(f"target {analysis['target']}")
        if analysis.get("control"):
            parts.append(f"control {analysis['control']}")
        shown = "target-exclusive features" if opts["plot"] == "exclusive" else "all features"
        parts.append(f"{shown} ({points['n']} points)")
        subtitle = ", ".join(p for p in parts if p)
        summary_rows = [
            [k, fmt_num(v) if isinstance(v, int | float) else v] for k, v in _flatten(summary)
        ]
        options = "".join(
            f'<option value="{j}">{esc(METRIC_NAMES.get(m, m))} ({esc(m)})</option>'
            for j, m in enumerate(metrics)
        )
        body = (
            '<div class="controls"><label>Metric: '
            f'<select id="metric">{options}</select></label></div>\n'
            '<p class="note">Symbols: star = target-exclusive for both models, circle = '
            f"{esc(m0)} only, square = {esc(m1)} only"
            + (", small dot = not exclusive" if opts["plot"] == "all" else "")
            + ". A red border (own legend entry) marks a feature that is also active on the other "
            "model's control prompts. The dashed diagonal is no change."
            + (" Click a point to open the feature on Neuronpedia." if base_url else "")
            + "</p>\n"
        )
        after = '<div id="detail" class="detail note">Hover a feature for its details.</div>\n'
        if summary_rows:
            after += html_table(["summary", "value"], summary_rows)
        return render_page(
            title,
            subtitle=subtitle,
            body_html=body,
            figure={"data": [], "layout": layout},
            after_plot_html=after,
            extra=extra,
            assets=["diffing.js"],
        )


def write_diffing_page(
    features_path: str | os.PathLike,
    summary_path: str | os.PathLike | None,
    out_path: str | os.PathLike,
    analysis: dict[str, Any],
    neuronpedia: str | None = None,
    models_info: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """Read features.parquet + summary.json and write the page and its shards atomically."""
    try:
        features = pd.read_parquet(features_path)
    except (OSError, ValueError) as err:
        raise DataError(f"{features_path}: cannot read parquet ({err})") from None
    summary = read_json(summary_path) if summary_path else {}
    page = build_diffing_page(
        features,
        summary,
        analysis,
        out_path,
        neuronpedia=neuronpedia,
        models_info=models_info,
        source=str(features_path),
    )
    return write_page(out_path, page)
