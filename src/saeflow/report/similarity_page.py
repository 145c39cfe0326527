"""Similarity page: position × position heatmap per sequence, token labels on both axes.

Axis labels are `"{pos}: {token}"`, unique per position, so a categorical axis never merges two
occurrences of the same token; a dropdown switches between sequences.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from saeflow.errors import DataError
from saeflow.report.common import render_page, round_list, token_label, write_page

MATRIX_NOTE = "square table, one column per position named '0'..'L-1', one row per position"


def read_matrix(path: str | os.PathLike) -> list[list[float | None]]:
    """Read one `{seq_id}.parquet` L×L matrix (columns "0".."L-1") as rounded nested lists."""
    try:
        df = pd.read_parquet(path)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read parquet ({err})") from None
    n = len(df)
    expected = [str(i) for i in range(n)]
    if [str(c) for c in df.columns] != expected:
        raise DataError(f"{path}: expected a {MATRIX_NOTE}; got columns {list(df.columns)[:5]}...")
    return [round_list(row, 4) for row in df.to_numpy(dtype="float64")]


def matrix_paths(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """`{seq_id}.parquet` files: given explicitly, or found next to a manifest / in a directory."""
    if isinstance(source, str | os.PathLike):
        base = Path(source)
        if base.is_file():
            base = base.parent
        paths = [p for p in base.glob("*.parquet") if p.stem.lstrip("-").isdigit()]
    else:
        paths = [Path(p) for p in source]
    bad = [str(p) for p in paths if not p.stem.lstrip("-").isdigit()]
    if bad:
        raise DataError(f"similarity matrices must be named {{seq_id}}.parquet, got {bad}")
    if not paths:
        raise DataError(f"{source}: no {{seq_id}}.parquet similarity matrices found")
    return sorted(paths, key=lambda p: int(p.stem))


def axis_labels(tokens: Sequence[Any] | None, n: int) -> list[str]:
    """Unique escaped labels `pos: token` for the n positions."""
    labels = []
    for i in range(n):
        tok = token_label(tokens[i]) if tokens is not None and i < len(tokens) else ""
        labels.append(f"{i}: {tok}" if tok else str(i))
    return labels


def build_similarity_page(
    matrices: dict[int, list[list[float | None]]],
    tokens: dict[int, Sequence[Any]],
    analysis: dict[str, Any],
) -> str:
    """Whole HTML page: one heatmap at a time, chosen per sequence in a dropdown."""
    if not matrices:
        raise DataError("similarity report: no matrices")
    seqs = list(matrices)
    labels = {s: axis_labels(tokens.get(s), len(matrices[s])) for s in seqs}

    def view(seq: int) -> tuple[dict[str, Any], dict[str, Any]]:
        style = {"z": [matrices[seq]], "x": [labels[seq]], "y": [labels[seq]]}
        axes = {
            "xaxis.categoryarray": labels[seq],
            "yaxis.categoryarray": labels[seq],
            "title.text": f"sequence {seq}",
        }
        return style, axes

    first = seqs[0]
    trace = {
        "type": "heatmap",
        "z": matrices[first],
        "x": labels[first],
        "y": labels[first],
        "colorscale": "RdBu",
        "reversescale": True,
        "zmid": 0,
        "zmin": -1,
        "zmax": 1,
        "colorbar": {"title": {"text": "cosine"}},
        "hovertemplate": "row %{y}<br>col %{x}<br>cosine %{z:.3f}<extra></extra>",
        "hoverongaps": False,
    }
    layout: dict[str, Any] = {
        "template": "plotly_white",
        "title": {"text": f"sequence {first}"},
        "margin": {"t": 80, "l": 140, "r": 20, "b": 140},
        "xaxis": {
            "type": "category",
            "categoryorder": "array",
            "categoryarray": labels[first],
            "tickangle": -60,
            "scaleanchor": "y",
            "constrain": "domain",
        },
        "yaxis": {
            "type": "category",
            "categoryorder": "array",
            "categoryarray": labels[first],
            "autorange": "reversed",
            "constrain": "domain",
        },
    }
    if len(seqs) > 1:
        layout["updatemenus"] = [
            {
                "type": "dropdown",
                "x": 0,
                "xanchor": "left",
                "y": 1.15,
                "yanchor": "top",
                "active": 0,
                "buttons": [
                    {"label": f"sequence {s}", "method": "update", "args": list(view(s))}
                    for s in seqs
                ],
            }
        ]
    what = analysis.get("codes") or "predictable"
    sae = analysis.get("sae")
    name = analysis.get("name")
    title = f"Similarity {name}" if name else "Similarity"
    subtitle = (
        f"cosine similarity between positions of centred {what} codes"
        + (f" of SAE {sae}" if sae else "")
        + (f", model {analysis['model']}" if analysis.get("model") else "")
        + (f", dataset {analysis['dataset']}" if analysis.get("dataset") else "")
    )
    return render_page(title, subtitle=subtitle, figure={"data": [trace], "layout": layout})


def load_tokens_by_seq(tokens_path: str | os.PathLike, seq_ids: Sequence[int]) -> dict[int, list]:
    """Decoded tokens (`tokens` column) of the wanted sequences from a tokens parquet."""
    try:
        df = pd.read_parquet(tokens_path, columns=["seq_id", "tokens"])
    except (OSError, ValueError, KeyError) as err:
        raise DataError(f"{tokens_path}: need columns seq_id and tokens ({err})") from None
    wanted = set(int(s) for s in seq_ids)
    return {
        int(s): list(t) for s, t in zip(df["seq_id"], df["tokens"], strict=True) if int(s) in wanted
    }


def write_similarity_page(
    matrices: str | os.PathLike | Sequence[str | os.PathLike],
    tokens_path: str | os.PathLike | None,
    out_path: str | os.PathLike,
    analysis: dict[str, Any],
) -> Path:
    """Read the `{seq_id}.parquet` matrices (+ token labels) and write the page atomically."""
    paths = matrix_paths(matrices)
    wanted = analysis.get("sequences")
    if wanted:
        by_seq = {int(p.stem): p for p in paths}
        missing = [s for s in wanted if int(s) not in by_seq]
        if missing:
            raise DataError(
                f"similarity: no matrix for sequences {missing} (have {sorted(by_seq)})"
            )
        paths = [by_seq[int(s)] for s in wanted]
    mats = {int(p.stem): read_matrix(p) for p in paths}
    toks = load_tokens_by_seq(tokens_path, list(mats)) if tokens_path else {}
    for seq, mat in mats.items():
        if seq in toks and len(toks[seq]) < len(mat):
            raise DataError(
                f"{tokens_path}: sequence {seq} has {len(toks[seq])} tokens but its matrix is "
                f"{len(mat)}×{len(mat)}"
            )
    return write_page(out_path, build_similarity_page(mats, toks, analysis))
