"""Metrics page: a table and bar charts of the SAE metrics JSON files (one per model/dataset/SAE).

Keys can be absent or null (e.g. CE losses of a temporal SAE): they show as an em dash in the table
and as a missing bar, never as zero.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from saeflow.errors import DataError
from saeflow.io import read_json
from saeflow.report.common import esc, esc_label, fmt_num, html_table, render_page, write_page

METRIC_KEYS = (
    "variance_explained",
    "variance_explained_flat",
    "variance_explained_pred",
    "variance_explained_novel",
    "mse",
    "l0_novel",
    "l0_pred",
    "l0_total",
    "dead_fraction",
    "ce_loss_clean",
    "ce_loss_recon",
    "ce_loss_zero",
    "ce_recovered",
    "n_tokens",
)


def run_label(path: str | os.PathLike) -> str:
    """`sae · model · dataset` from `metrics/{model}/{dataset}/{sae}.json`."""
    p = Path(path)
    parts = p.with_suffix("").parts
    if len(parts) >= 3:
        model, dataset, sae = parts[-3:]
        return f"{sae} · {model} · {dataset}"
    return p.stem


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def build_metrics_page(
    runs: Sequence[tuple[str, dict[str, Any]]], title: str = "SAE metrics"
) -> str:
    """Whole HTML page for `(label, metrics dict)` pairs."""
    if not runs:
        raise DataError("metrics report: no metrics files given")
    labels = [label for label, _ in runs]
    if len(set(labels)) != len(labels):
        raise DataError(f"metrics report: duplicate run labels {labels}")
    extra_keys = sorted(
        {
            k
            for _, m in runs
            for k, v in m.items()
            if k not in METRIC_KEYS and _number(v) is not None
        }
    )
    keys = [k for k in METRIC_KEYS if any(k in m for _, m in runs)] + extra_keys
    if not keys:
        raise DataError("metrics report: the metrics files hold none of " + ", ".join(METRIC_KEYS))
    rows = [[label] + [fmt_num(m.get(k)) for k in keys] for label, m in runs]
    table = html_table(["run"] + keys, rows)

    x = [esc_label(label) for label in labels]
    traces = [
        {
            "type": "bar",
            "name": esc_label(key),
            "x": x,
            "y": [_number(m.get(key)) for _, m in runs],
            "visible": i == 0,
            "hovertemplate": "%{x}<br>" + esc_label(key) + " %{y:.4g}<extra></extra>",
        }
        for i, key in enumerate(keys)
    ]
    buttons = [
        {
            "label": esc_label(key),
            "method": "update",
            "args": [
                {"visible": [j == i for j in range(len(keys))]},
                {"yaxis.title.text": esc_label(key)},
            ],
        }
        for i, key in enumerate(keys)
    ]
    layout = {
        "template": "plotly_white",
        "showlegend": False,
        "margin": {"t": 60, "l": 70, "r": 20, "b": 120},
        "yaxis": {"title": {"text": esc_label(keys[0])}},
        "xaxis": {"type": "category"},
        "updatemenus": [
            {
                "type": "dropdown",
                "buttons": buttons,
                "active": 0,
                "x": 0,
                "xanchor": "left",
                "y": 1.15,
                "yanchor": "top",
            }
        ],
    }
    note = (
        '<p class="note">variance_explained and ce_recovered are fractions; l0_* count active '
        "latents per token; a dash means the metric does not apply or was not computed. "
        "variance_explained centres each dimension on its mean; variance_explained_flat is the "
        "Temporal SAE notebook's 1 - mean(err²)/var(x) over all entries.</p>\n"
    )
    reasons = [
        f"<li>{esc(label)}: ce_recovered is null: {esc(m['ce_recovered_reason'])}</li>"
        for label, m in runs
        if m.get("ce_recovered") is None and m.get("ce_recovered_reason")
    ]
    if reasons:
        note += '<ul class="note ce-reasons">' + "".join(reasons) + "</ul>\n"
    return render_page(
        title,
        subtitle=f"{len(runs)} SAE runs",
        body_html=note + table,
        figure={"data": traces, "layout": layout},
    )


def write_metrics_page(
    metrics_paths: Sequence[str | os.PathLike],
    out_path: str | os.PathLike,
    labels: Sequence[str] | None = None,
    title: str = "SAE metrics",
) -> Path:
    """Read the metrics JSON files and write the page atomically."""
    paths = list(metrics_paths)
    if labels is not None and len(labels) != len(paths):
        raise DataError(f"metrics report: {len(labels)} labels for {len(paths)} metrics files")
    runs = []
    for i, path in enumerate(paths):
        try:
            data = read_json(path)
        except (OSError, ValueError) as err:
            raise DataError(f"{path}: cannot read metrics JSON ({err})") from None
        if not isinstance(data, dict):
            raise DataError(f"{path}: metrics JSON must be an object")
        runs.append((labels[i] if labels is not None else run_label(path), data))
    return write_page(out_path, build_metrics_page(runs, title=title))
