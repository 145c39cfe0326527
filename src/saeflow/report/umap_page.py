"""UMAP page: 2-D or 3-D embedding, coloured by position or role, word filter and sequence lines.

Seed-faithful by default (seeds 000/002): the word filter keeps a point whose own hover context
contains ANY of the words (sequence-level ALL is `report.filter: all`), the hover shows the
context window and the UMAP coordinates, and lines join the points of each sequence.

The page stays small whatever the hover window: coordinates, positions and roles are packed
columns in the page; the tokens of each sequence sit in shards beside it (`tok-{k}.js`), loaded
when a point is hovered or a filter is typed, and the hover text is built from them in the page.
Filtering replaces hidden points' coordinates with null rather than dropping them, so every
per-point array keeps its length.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from saeflow.errors import DataError
from saeflow.io import read_json
from saeflow.report.common import render_page, write_page
from saeflow.report.shards import pack, page_data

REQUIRED = ("seq_id", "pos", "x", "y", "role")
ROLE_COLORS = {0: "#9e9e9e", 1: "#000000", 2: "#d62728"}
WEBGL_POINTS = 5000
SEQS_PER_SHARD = 32
# Token shards smaller than this in all are fetched in the background after the first draw, so
# hovers show the context at once; larger sets load per hovered sequence.
PREFETCH_BYTES = 2_000_000
# Chat markers (<start_of_turn>, <|im_start|>, <bos>) shown in italics, as in the umap stage.
MARKER_RE = r"^<\|?[A-Za-z][A-Za-z0-9_]*\|?>$"
HOVER_LINE_TOKENS = 15
OPTIONS = {
    "lines": "all",
    "max_sequences": None,
    "color": "position",
    "filter": "any",
    "sequences": None,
}


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


def _line_seqs(lines: Any, seq_ids: list[int]) -> list[int]:
    """Seq ids whose points get joined by a line."""
    if lines in (None, False, "none", "off"):
        return []
    if lines in (True, "all"):
        return list(seq_ids)
    if isinstance(lines, list | tuple):
        have = set(seq_ids)
        missing = [s for s in lines if int(s) not in have]
        if missing:
            raise DataError(f"report.lines: sequence ids {missing} are not in the embedding")
        return [int(s) for s in lines]
    raise DataError(f"report.lines: expected 'none', 'all' or a list of seq ids, got {lines!r}")


def page_options(analysis: Mapping[str, Any]) -> dict[str, Any]:
    """The analysis' `report` options over the defaults, checked."""
    opts = dict(OPTIONS)
    opts.update({k: v for k, v in (analysis.get("report") or {}).items() if k in OPTIONS})
    if opts["color"] not in ("position", "role"):
        raise DataError(f"report.color: expected 'position' or 'role', got {opts['color']!r}")
    if opts["filter"] not in ("any", "all"):
        raise DataError(f"report.filter: expected 'any' or 'all', got {opts['filter']!r}")
    return opts


def build_umap_page(
    embedding: pd.DataFrame,
    analysis: dict[str, Any],
    tokens: Mapping[int, Sequence[str]],
    out_path: str | os.PathLike,
    *,
    webgl: bool | None = None,
    source: str = "embedding",
) -> str:
    """Write the shards of one UMAP page beside `out_path` and return the page HTML.

    `embedding` rows: seq_id, pos, x, y[, z], role; `tokens`: decoded tokens per seq_id (at least
    up to each sequence's last embedded position). 2-D plots switch to WebGL above WEBGL_POINTS
    points unless `webgl` forces it; 3-D is WebGL.
    """
    missing = [c for c in REQUIRED if c not in embedding.columns]
    if missing:
        raise DataError(f"{source}: missing columns {missing} (need {list(REQUIRED)})")
    opts = page_options(analysis)
    df = embedding.sort_values(["seq_id", "pos"], kind="stable").reset_index(drop=True)
    if opts["sequences"] is not None:
        wanted = [int(s) for s in opts["sequences"]]
        have = set(int(s) for s in df["seq_id"].unique())
        absent = [s for s in wanted if s not in have]
        if absent:
            raise DataError(f"report.sequences: sequence ids {absent} are not in the embedding")
        df = df[df["seq_id"].isin(wanted)].reset_index(drop=True)
    dims = 3 if "z" in df.columns and df["z"].notna().any() else 2
    seq_ids = [int(s) for s in pd.unique(df["seq_id"])]
    seq_index = {sid: i for i, sid in enumerate(seq_ids)}
    axes = ["x", "y", "z"][:dims]
    window = int(analysis.get("hover_window", 50))
    last_pos = df.groupby("seq_id", sort=False)["pos"].max()
    for sid in seq_ids:
        if sid not in tokens:
            raise DataError(f"{source}: no tokens for sequence {sid}")
        if len(tokens[sid]) <= int(last_pos[sid]):
            raise DataError(
                f"{source}: sequence {sid} has {len(tokens[sid])} tokens but a point at "
                f"position {int(last_pos[sid])}"
            )
    webgl = len(df) > WEBGL_POINTS if webgl is None else webgl
    kind = "scatter3d" if dims == 3 else ("scattergl" if webgl else "scatter")

    with page_data(out_path) as data:
        tok_spec = data.items(
            "tok",
            ([str(t) for t in tokens[sid][: int(last_pos[sid]) + 1]] for sid in seq_ids),
            per=SEQS_PER_SHARD,
        )
        extra = {
            "data": data.meta,
            "tok": tok_spec,
            "n": len(df),
            "dims": dims,
            "kind": kind,
            "seq_ids": seq_ids,
            "cols": {
                **{a: pack(df[a].to_numpy(), "q16") for a in axes},
                "pos": pack(df["pos"].to_numpy(), "u32"),
                "role": pack(df["role"].to_numpy().clip(0, 255), "u8"),
                "seq": pack([seq_index[int(s)] for s in df["seq_id"]], "u32"),
            },
            "lines": [seq_index[s] for s in _line_seqs(opts["lines"], seq_ids)],
            "color": opts["color"],
            "filter": opts["filter"],
            "window": window,
            "line_tokens": HOVER_LINE_TOKENS,
            "marker_re": MARKER_RE,
            "role_colors": [ROLE_COLORS[i] for i in range(3)],
            "prefetch": tok_spec["bytes"] <= PREFETCH_BYTES,
        }
        layout: dict[str, Any] = {
            "template": "plotly_white",
            "margin": {"t": 30, "l": 40, "r": 20, "b": 40},
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
        limit = n_seq if opts["max_sequences"] is None else max(0, int(opts["max_sequences"]))
        mode_any = ' selected="selected"' if opts["filter"] == "any" else ""
        mode_all = ' selected="selected"' if opts["filter"] == "all" else ""
        by_pos = ' selected="selected"' if opts["color"] == "position" else ""
        by_role = ' selected="selected"' if opts["color"] == "role" else ""
        checked = ' checked="checked"' if extra["lines"] else ' disabled="disabled"'
        controls = (
            '<div class="controls">\n'
            '<label>Filter words: <input id="filter-words" type="search" size="32" '
            'placeholder="words"></label>\n'
            '<label><select id="filter-mode">'
            f'<option value="any"{mode_any}>points whose context has ANY word</option>'
            f'<option value="all"{mode_all}>sequences that have ALL words</option>'
            "</select></label>\n"
            f'<label>Max sequences: <input id="filter-limit" type="number" min="0" '
            f'max="{n_seq}" value="{limit}"></label>\n'
            '<label>Colour: <select id="color-by">'
            f'<option value="position"{by_pos}>position</option>'
            f'<option value="role"{by_role}>role (user black, model red)</option>'
            "</select></label>\n"
            f'<label><input id="show-lines" type="checkbox"{checked}> sequence lines</label>\n'
            '<span id="filter-status" class="note"></span>\n'
            "</div>\n"
        )
        detail = (
            '<div id="detail" class="detail note">Hover a point to read its context '
            f"(the {window} preceding tokens and the token itself in bold).</div>\n"
        )
        title = umap_title(analysis, dims)
        subtitle = f"{len(df)} tokens from {n_seq} sequences"
        return render_page(
            title,
            subtitle=subtitle,
            body_html=controls,
            figure={"data": [], "layout": layout},
            after_plot_html=detail,
            extra=extra,
            assets=["umap.js"],
        )


def load_tokens(
    tokens_path: str | os.PathLike, seq_ids: Sequence[int] | None = None
) -> dict[int, list[str]]:
    """Decoded tokens (`tokens` column) per seq_id from a tokens parquet."""
    try:
        df = pd.read_parquet(tokens_path, columns=["seq_id", "tokens"])
    except (OSError, ValueError, KeyError) as err:
        raise DataError(f"{tokens_path}: need columns seq_id and tokens ({err})") from None
    wanted = None if seq_ids is None else {int(s) for s in seq_ids}
    return {
        int(s): [str(x) for x in t]
        for s, t in zip(df["seq_id"], df["tokens"], strict=True)
        if wanted is None or int(s) in wanted
    }


def write_umap_page(
    embedding_path: str | os.PathLike,
    results_path: str | os.PathLike | None,
    out_path: str | os.PathLike,
    analysis: dict[str, Any] | None = None,
    tokens_path: str | os.PathLike | None = None,
) -> Path:
    """Read embedding.parquet and the tokens, write the page and its shards atomically.

    Page options come from the analysis' `report` sub-dict: `lines` (none | all | [seq ids]),
    `max_sequences` (initial limit, null = all), `color` (position | role), `filter` (any | all),
    `sequences` (explicit seq ids to show, null = all).
    """
    if analysis is None:
        if results_path is None:
            raise DataError(f"{embedding_path}: no analysis config given and no results.json")
        analysis = read_json(results_path).get("config") or {}
    if tokens_path is None:
        raise DataError(f"{embedding_path}: the UMAP page needs the tokens parquet")
    try:
        embedding = pd.read_parquet(embedding_path)
    except (OSError, ValueError) as err:
        raise DataError(f"{embedding_path}: cannot read parquet ({err})") from None
    tokens = load_tokens(tokens_path, embedding["seq_id"].unique().tolist())
    page = build_umap_page(embedding, analysis, tokens, out_path, source=str(embedding_path))
    return write_page(out_path, page)
