"""UMAP page: 2-D or 3-D embedding, coloured by position or role, with word filter and lines.

Filtering replaces hidden points' coordinates with null rather than dropping them, so every
per-point array (colour by position, colour by role, hover) keeps its length and the colour
toggle (plain updatemenus restyle buttons) stays valid whatever the filter shows.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd

from saeflow.errors import DataError
from saeflow.io import read_json
from saeflow.report.common import (
    _asset,
    hover_to_text,
    render_page,
    round_list,
    sanitize_hover,
    write_page,
)

REQUIRED = ("seq_id", "pos", "x", "y", "role", "hover")
ROLE_COLORS = {0: "#9e9e9e", 1: "#000000", 2: "#d62728"}
WEBGL_POINTS = 5000


def umap_title(analysis: dict[str, Any], dims: int) -> str:
    """Say what was embedded: LLM activations, or pred/novel/total SAE codes, on which dataset."""
    codes = analysis.get("codes")
    sae = analysis.get("sae")
    model = analysis.get("model")
    if codes == "activations" or not sae:
        what = "LLM activations" + (f" of {model}" if model else "")
        if analysis.get("layer") is not None:
            what += f" (layer {analysis['layer']})"
    else:
        what = (f"{codes} codes" if codes else "codes") + f" of SAE {sae}"
        if model:
            what += f" on {model}"
    dataset = analysis.get("dataset")
    name = analysis.get("name")
    title = f"UMAP {dims}-D of {what}" + (f", dataset {dataset}" if dataset else "")
    return title + (f" [{name}]" if name else "")


def _seq_texts(df: pd.DataFrame, seq_ids: list[int]) -> list[str]:
    """Lower-case plain text per sequence for the word filter."""
    texts: list[str] = []
    groups = df.groupby("seq_id", sort=False)
    for sid in seq_ids:
        g = groups.get_group(sid)
        if "text" in g.columns:
            parts = list(dict.fromkeys(str(t) for t in g["text"] if t is not None))
            plain = hover_to_text(" ".join(parts))
        else:
            plain = max((hover_to_text(str(h)) for h in g["hover"]), key=len, default="")
        texts.append(" ".join(plain.lower().split()))
    return texts


def _line_seqs(lines: Any, seq_ids: list[int]) -> list[int]:
    """Indices (into seq_ids) of the sequences whose points get joined by a line."""
    if lines in (None, False, "none", "off"):
        return []
    if lines in (True, "all"):
        return list(range(len(seq_ids)))
    if isinstance(lines, list | tuple):
        index = {sid: i for i, sid in enumerate(seq_ids)}
        missing = [s for s in lines if int(s) not in index]
        if missing:
            raise DataError(f"report.lines: sequence ids {missing} are not in the embedding")
        return [index[int(s)] for s in lines]
    raise DataError(f"report.lines: expected 'none', 'all' or a list of seq ids, got {lines!r}")


def build_umap_page(
    embedding: pd.DataFrame,
    analysis: dict[str, Any],
    *,
    lines: Any = "none",
    max_sequences: int | None = None,
    color: str = "position",
    webgl: bool | None = None,
    source: str = "embedding",
) -> str:
    """Whole HTML page for one UMAP embedding (rows: seq_id, pos, x, y[, z], role, hover).

    2-D plots switch to WebGL above WEBGL_POINTS points unless `webgl` forces it; 3-D is WebGL.
    """
    missing = [c for c in REQUIRED if c not in embedding.columns]
    if missing:
        raise DataError(f"{source}: missing columns {missing} (need {list(REQUIRED)})")
    if color not in ("position", "role"):
        raise DataError(f"report.color: expected 'position' or 'role', got {color!r}")
    df = embedding.sort_values(["seq_id", "pos"], kind="stable").reset_index(drop=True)
    dims = 3 if "z" in df.columns and df["z"].notna().any() else 2
    seq_ids = [int(s) for s in pd.unique(df["seq_id"])]
    seq_index = {sid: i for i, sid in enumerate(seq_ids)}
    point_seq = [seq_index[int(s)] for s in df["seq_id"]]
    axes = ["x", "y", "z"][:dims]
    coords = {a: round_list(df[a], 6) for a in axes}
    pos = [int(p) for p in df["pos"]]
    role_colors = [ROLE_COLORS.get(int(r), ROLE_COLORS[0]) for r in df["role"]]
    hover = [sanitize_hover(h) for h in df["hover"]]

    by_pos = {"color": pos, "colorscale": "Viridis", "showscale": True}
    by_role = {"color": role_colors, "showscale": False}
    marker = {
        "size": 3 if dims == 3 else 5,
        "opacity": 0.85,
        "colorbar": {"title": {"text": "position"}},
        **(by_pos if color == "position" else by_role),
    }
    webgl = len(df) > WEBGL_POINTS if webgl is None else webgl
    kind = "scatter3d" if dims == 3 else ("scattergl" if webgl else "scatter")
    points = {
        "type": kind,
        "mode": "markers",
        "name": "tokens",
        **coords,
        "customdata": point_seq,
        "hovertext": hover,
        "hoverinfo": "text",
        "marker": marker,
        "showlegend": False,
    }
    traces = [points]

    chosen = _line_seqs(lines, seq_ids)
    if chosen:
        wanted = set(chosen)
        line_xyz: dict[str, list[float | None]] = {a: [] for a in axes}
        line_seq: list[int | None] = []
        for i, sid in enumerate(point_seq):
            if sid not in wanted:
                continue
            if line_seq and line_seq[-1] is not None and line_seq[-1] != sid:
                for a in axes:
                    line_xyz[a].append(None)
                line_seq.append(None)
            for a in axes:
                line_xyz[a].append(coords[a][i])
            line_seq.append(sid)
        traces.append(
            {
                "type": "scatter3d" if dims == 3 else kind,
                "mode": "lines",
                "name": "sequence order",
                **line_xyz,
                "customdata": line_seq,
                "line": {"color": "rgba(90,90,90,0.45)", "width": 1},
                "hoverinfo": "skip",
                "showlegend": False,
            }
        )

    menus = [
        {
            "type": "buttons",
            "direction": "right",
            "x": 0,
            "xanchor": "left",
            "y": 1.08,
            "yanchor": "bottom",
            "showactive": True,
            "active": 0 if color == "position" else 1,
            "buttons": [
                {
                    "label": "colour: position",
                    "method": "restyle",
                    "args": [
                        {
                            "marker.color": [pos],
                            "marker.colorscale": "Viridis",
                            "marker.showscale": True,
                        },
                        [0],
                    ],
                },
                {
                    "label": "colour: role",
                    "method": "restyle",
                    "args": [{"marker.color": [role_colors], "marker.showscale": False}, [0]],
                },
            ],
        }
    ]
    if chosen:
        menus.append(
            {
                "type": "buttons",
                "direction": "right",
                "x": 0.45,
                "xanchor": "left",
                "y": 1.08,
                "yanchor": "bottom",
                "showactive": True,
                "active": 0,
                "buttons": [
                    {"label": "lines on", "method": "restyle", "args": [{"visible": True}, [1]]},
                    {"label": "lines off", "method": "restyle", "args": [{"visible": False}, [1]]},
                ],
            }
        )
    layout: dict[str, Any] = {
        "template": "plotly_white",
        "updatemenus": menus,
        "margin": {"t": 70, "l": 40, "r": 20, "b": 40},
        "hovermode": "closest",
        "hoverlabel": {"align": "left"},
        "uirevision": "keep",
    }
    if dims == 3:
        layout["scene"] = {
            "xaxis": {"title": {"text": "UMAP 1"}},
            "yaxis": {"title": {"text": "UMAP 2"}},
            "zaxis": {"title": {"text": "UMAP 3"}},
        }
    else:
        layout["xaxis"] = {"title": {"text": "UMAP 1"}}
        layout["yaxis"] = {"title": {"text": "UMAP 2"}}

    n_seq = len(seq_ids)
    limit = n_seq if max_sequences is None else max(0, int(max_sequences))
    controls = (
        '<div class="controls">\n'
        "<label>Show sequences containing all of these words: "
        '<input id="filter-words" type="search" size="32" placeholder="words"></label>\n'
        f'<label>Max sequences: <input id="filter-limit" type="number" min="0" max="{n_seq}" '
        f'value="{limit}"></label>\n'
        '<span id="filter-status" class="note"></span>\n'
        "</div>\n"
        '<p class="note">Colour by role: black = user, red = model, grey = other tokens.</p>\n'
    )
    extra = {"seq_ids": seq_ids, "seq_text": _seq_texts(df, seq_ids), "axes": axes}
    title = umap_title(analysis, dims)
    subtitle = f"{len(df)} tokens from {n_seq} sequences"
    return render_page(
        title,
        subtitle=subtitle,
        body_html=controls,
        figure={"data": traces, "layout": layout},
        extra=extra,
        script=_asset("umap.js"),
    )


def write_umap_page(
    embedding_path: str | os.PathLike,
    results_path: str | os.PathLike | None,
    out_path: str | os.PathLike,
    analysis: dict[str, Any] | None = None,
) -> Path:
    """Read embedding.parquet (+ results.json for the config) and write the page atomically.

    Page options come from the analysis' `report` sub-dict: `lines` (none | all | [seq ids]),
    `max_sequences` (initial limit, null = all), `color` (position | role).
    """
    if analysis is None:
        if results_path is None:
            raise DataError(f"{embedding_path}: no analysis config given and no results.json")
        analysis = read_json(results_path).get("config") or {}
    try:
        embedding = pd.read_parquet(embedding_path)
    except (OSError, ValueError) as err:
        raise DataError(f"{embedding_path}: cannot read parquet ({err})") from None
    opts = analysis.get("report") or {}
    page = build_umap_page(
        embedding,
        analysis,
        lines=opts.get("lines", "none"),
        max_sequences=opts.get("max_sequences"),
        color=opts.get("color", "position"),
        source=str(embedding_path),
    )
    return write_page(out_path, page)
