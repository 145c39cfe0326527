"""Base-vs-chat feature diffing on target and control prompts, at named token positions.

Reference: the gemma introspection diffing notebooks ("Feature Analysis: Diffing Base and
Instruct" and the target_features script). There, every token type is an offset from ONE anchor,
the assistant header (`<start_of_turn>model` for gemma): with `k` the first header token,
`pos = k + len(header_tokens) + offset`, so `model: -1` is the header's last token ("model") and
`newline: 0` is the token right after it ("\\n"). Per token type, feature and model they keep
`num_active` (prompts with activation > 0), `all_mean` (mean over all prompts, zeros included),
`all_std`, `max` and `sparsity` (= num_active / prompts), for target and control prompts. A
feature is target-exclusive for a model when `target_num_active > 0 and control_num_active == 0`.

Token types here:
  name: offset                 offset from the model-turn header (the reference's form). The
                               header is `analysis.model_header`, or found automatically among
                               the known chat templates (MODEL_HEADERS).
  name: {anchor: "<literal>", offset: k, occurrence: last|first}
                               offset from the end of a literal string, matched on the decoded
                               tokens (the `tokens` column) of each prompt.
An anchor match ends inside some token; `pos = that token's index + 1 + offset`. `occurrence`
defaults to `last` (the reference takes the first match; they agree on single-turn prompts, and
with add_generation_prompt the last model header is the one being generated). A prompt without
the anchor, or whose position falls outside it, is an error naming the prompt (the reference
silently clamped to the last token).

Classification per (token type, feature): `exclusive` is the model for which the feature is
target-exclusive, `both`, or `none`; `inconsistent` marks a feature exclusive for one model that
is active on the OTHER model's control prompts.

Statistics are bincounts over the sparse codes of the selected rows only: O(features) memory.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp

from saeflow.embedding import gather_rows, iter_row_blocks, resolve_part
from saeflow.errors import ConfigError, DataError
from saeflow.io import atomic_path, write_json

log = logging.getLogger("saeflow.diffing")

# Model-turn headers of known chat templates (the reference's `assistant_header`s).
MODEL_HEADERS = (
    "<start_of_turn>model",
    "<|im_start|>assistant",
    "<|start_header_id|>assistant<|end_header_id|>",
)
SETS = ("target", "control")
STATS = ("num_active", "all_mean", "all_std", "max", "sparsity")
METRICS = tuple(f"{s}_{stat}" for s in SETS for stat in STATS)
DEFAULT_METRICS = ("target_all_mean", "target_sparsity")
PARQUET_OPTS: dict[str, Any] = {"compression": "zstd", "compression_level": 3}


@dataclass(frozen=True)
class TokenType:
    """A named prompt position: `offset` tokens after the end of `anchor` (None: model header)."""

    name: str
    offset: int
    anchor: str | None = None
    occurrence: str = "last"


def parse_token_types(spec: Mapping[str, Any], where: str = "token_types") -> list[TokenType]:
    """Token types from the config mapping (see the module docstring), in config order."""
    if not isinstance(spec, Mapping) or not spec:
        raise ConfigError(f"{where}: a non-empty mapping name -> offset or {{anchor, offset}}")
    out = []
    for name, value in spec.items():
        if isinstance(value, bool) or not isinstance(value, int | Mapping):
            raise ConfigError(f"{where}.{name} = {value!r}: an integer offset or a mapping")
        if isinstance(value, int):
            out.append(TokenType(str(name), value))
            continue
        unknown = sorted(set(value) - {"anchor", "offset", "occurrence"})
        if unknown:
            raise ConfigError(f"{where}.{name}: unknown key(s) {unknown}")
        anchor = value.get("anchor")
        offset = value.get("offset", 0)
        occurrence = value.get("occurrence", "last")
        if anchor is not None and (not isinstance(anchor, str) or not anchor):
            raise ConfigError(f"{where}.{name}.anchor = {anchor!r}: a non-empty string")
        if isinstance(offset, bool) or not isinstance(offset, int):
            raise ConfigError(f"{where}.{name}.offset = {offset!r}: an integer")
        if occurrence not in ("first", "last"):
            raise ConfigError(f"{where}.{name}.occurrence = {occurrence!r}: first or last")
        out.append(TokenType(str(name), offset, anchor, occurrence))
    return out


def detect_model_header(tokens: Sequence[str]) -> str | None:
    """The first known model-turn header that occurs in a prompt's decoded tokens."""
    text = "".join(tokens)
    return next((h for h in MODEL_HEADERS if h in text), None)


def anchor_position(
    tokens: Sequence[str], anchor: str, offset: int, occurrence: str = "last"
) -> int | None:
    """Index of the token `offset` after the end of `anchor` in the decoded tokens, or None.

    None when the anchor does not occur or the position falls outside the prompt.
    """
    text = "".join(tokens)
    start = text.rfind(anchor) if occurrence == "last" else text.find(anchor)
    if start < 0:
        return None
    ends = np.cumsum([len(t) for t in tokens])
    last_char = start + len(anchor) - 1
    anchor_end = int(np.searchsorted(ends, last_char, side="right"))
    pos = anchor_end + 1 + offset
    return pos if 0 <= pos < len(tokens) else None


def pick_model_header(
    token_lists: Sequence[Sequence[str]], configured: str | None, *, source: str = "tokens"
) -> str:
    """`model_header` from the config, else the known header found in the first prompt."""
    if configured:
        return configured
    header = detect_model_header(token_lists[0]) if len(token_lists) else None
    if header is None:
        raise ConfigError(
            f"{source}: no known model-turn header ({', '.join(MODEL_HEADERS)}) in the first "
            "prompt; set the analysis key model_header"
        )
    return header


def resolve_positions(
    token_lists: Sequence[Sequence[str]],
    seq_ids: Sequence[int],
    token_types: Sequence[TokenType],
    model_header: str | None,
    *,
    source: str = "tokens",
) -> np.ndarray:
    """Positions [T, S] of every token type in every prompt; DataError names the first failure."""
    out = np.zeros((len(token_types), len(token_lists)), np.int64)
    for t, tt in enumerate(token_types):
        anchor = tt.anchor if tt.anchor is not None else model_header
        if anchor is None:
            raise ConfigError(f"token type {tt.name!r} is relative to the model header: give one")
        for s, tokens in enumerate(token_lists):
            pos = anchor_position(tokens, anchor, tt.offset, tt.occurrence)
            if pos is None:
                raise DataError(
                    f"{source}: seq_id {seq_ids[s]}: token type {tt.name!r} "
                    f"({anchor!r} {tt.offset:+d}) is not inside the prompt ({len(tokens)} tokens)"
                )
            out[t, s] = pos
    return out


# ----------------------------------------------------------------------------- statistics


def _column_sums(codes_NF: sp.csr_matrix, weights: np.ndarray) -> np.ndarray:
    """Per-feature sums of `weights` (one per stored entry): a sparse mat-vec, no densifying.

    scipy's CSR column sum runs about 2x faster than np.bincount over the same ids (bincount
    first copies int32 ids to int64 and scans them for the range).
    """
    m = sp.csr_matrix((weights, codes_NF.indices, codes_NF.indptr), shape=codes_NF.shape)
    return np.asarray(m.sum(axis=0), dtype=np.float64).ravel()


def feature_stats(codes_NF: sp.csr_matrix, stats: Sequence[str] = STATS) -> dict[str, np.ndarray]:
    """Per-feature statistics over the N rows (one row per prompt) of sparse codes.

    A feature is active on a row when its value is > 0 (as in the reference). Means and stds
    count the implicit zeros; std is the unbiased one (torch's default). Cost: one pass over the
    stored entries per statistic; memory O(features).
    """
    codes_NF = sp.csr_matrix(codes_NF)
    n, n_features = codes_NF.shape
    vals = codes_NF.data.astype(np.float64, copy=False)
    out: dict[str, np.ndarray] = {}
    active = (vals > 0).astype(np.float64)
    num_active = np.rint(_column_sums(codes_NF, active)).astype(np.int64)
    out["num_active"] = num_active.astype(np.int32)
    if "sparsity" in stats:
        out["sparsity"] = num_active / n if n else np.zeros(n_features)
    if "all_mean" in stats or "all_std" in stats:
        mean = _column_sums(codes_NF, vals) / n if n else np.zeros(n_features)
        out["all_mean"] = mean
        if "all_std" in stats:
            sq = _column_sums(codes_NF, vals * vals)
            var = (sq - n * mean * mean) / (n - 1) if n > 1 else np.full(n_features, np.nan)
            out["all_std"] = np.sqrt(np.maximum(var, 0.0))
    if "max" in stats:
        top = np.full(n_features, -np.inf)
        np.maximum.at(top, codes_NF.indices, vals)
        stored = num_active
        if not active.all():
            stored = np.rint(_column_sums(codes_NF, np.ones_like(vals))).astype(np.int64)
        # Rows that do not store a feature hold an implicit 0.
        top = np.where(stored < n, np.maximum(top, 0.0), top)
        out["max"] = np.where(np.isfinite(top), top, 0.0)
    return out


def classify(
    num_active: Mapping[str, Mapping[str, np.ndarray]], models: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """(`exclusive` labels, `inconsistent` flags) from num_active[model][set] per feature."""
    a, b = models
    excl = {m: (num_active[m]["target"] > 0) & (num_active[m]["control"] == 0) for m in models}
    label = np.full(len(excl[a]), "none", dtype=object)
    label[excl[a] & ~excl[b]] = a
    label[excl[b] & ~excl[a]] = b
    label[excl[a] & excl[b]] = "both"
    inconsistent = (excl[a] & (num_active[b]["control"] > 0)) | (
        excl[b] & (num_active[a]["control"] > 0)
    )
    return label, inconsistent


def diff_table(
    codes: Mapping[str, Mapping[str, Sequence[sp.csr_matrix]]],
    models: Sequence[str],
    token_types: Sequence[str],
    metrics: Sequence[str] = DEFAULT_METRICS,
) -> pd.DataFrame:
    """One row per (token type, feature) from codes[model][set][t] = CSR [prompts, features].

    Columns: token_type, feature_id, `{model}_{set}_num_active` for both sets, `{model}_{metric}`
    for the other requested metrics, exclusive, inconsistent.
    """
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise ConfigError(f"metrics: unknown {bad}; choose from {', '.join(METRICS)}")
    wanted = {s: {"num_active"} for s in SETS}
    for metric in metrics:
        s, stat = metric.split("_", 1)
        wanted[s].add(stat)
    columns = ["target_num_active", "control_num_active"]
    columns += [m for m in metrics if m not in columns]
    frames = []
    for t, name in enumerate(token_types):
        n_features = codes[models[0]]["target"][t].shape[1]
        frame: dict[str, Any] = {
            "token_type": np.full(n_features, name, dtype=object),
            "feature_id": np.arange(n_features, dtype=np.int32),
        }
        counts: dict[str, dict[str, np.ndarray]] = {}
        for m in models:
            per_set = {s: feature_stats(codes[m][s][t], sorted(wanted[s])) for s in SETS}
            counts[m] = {s: per_set[s]["num_active"] for s in SETS}
            for col in columns:
                s, stat = col.split("_", 1)
                frame[f"{m}_{col}"] = per_set[s][stat]
        frame["exclusive"], frame["inconsistent"] = classify(counts, models)
        frames.append(pd.DataFrame(frame))
    return pd.concat(frames, ignore_index=True)


def summarize(
    table: pd.DataFrame, models: Sequence[str], n_target: int, n_control: int
) -> dict[str, Any]:
    """Prompt counts and exclusive/inconsistent feature counts per token type."""
    categories = [*models, "both", "none"]
    per_type: dict[str, Any] = {}
    for name, sub in table.groupby("token_type", sort=False):
        counts = sub["exclusive"].value_counts()
        per_type[str(name)] = {
            "exclusive": {c: int(counts.get(c, 0)) for c in categories},
            "inconsistent": int(sub["inconsistent"].sum()),
        }
    any_excl = table.loc[table["exclusive"] != "none", "feature_id"]
    return {
        "models": list(models),
        "n_target": int(n_target),
        "n_control": int(n_control),
        "n_features": int(table["feature_id"].max() + 1) if len(table) else 0,
        "token_types": per_type,
        "exclusive_any": int(any_excl.nunique()),
        "inconsistent_any": int(table.loc[table["inconsistent"], "feature_id"].nunique()),
    }


# ----------------------------------------------------------------------------- inputs


def read_prompt_tokens(path: str | os.PathLike) -> tuple[np.ndarray, pa.ListArray, list[list[str]]]:
    """(seq_ids, token_ids list array, decoded tokens) of a tokens parquet."""
    try:
        table = pq.read_table(path, columns=["seq_id", "token_ids", "tokens"])
    except (OSError, pa.ArrowInvalid, KeyError) as err:
        raise DataError(f"{path}: cannot read seq_id, token_ids, tokens ({err})") from None
    ids = table.column("token_ids").combine_chunks()
    return (
        table.column("seq_id").to_numpy().astype(np.int64),
        ids,
        table.column("tokens").to_pylist(),
    )


def check_same_tokens(
    a: tuple[np.ndarray, pa.ListArray], b: tuple[np.ndarray, pa.ListArray], what: str
) -> None:
    """Both models must see the same token ids; otherwise name the first prompt that differs."""
    (seq_a, ids_a), (seq_b, ids_b) = a, b
    if len(seq_a) != len(seq_b) or not np.array_equal(seq_a, seq_b):
        only = sorted(set(seq_a.tolist()) ^ set(seq_b.tolist()))
        first = only[0] if only else int(seq_a[np.flatnonzero(seq_a != seq_b)[0]])
        raise DataError(f"{what}: the models' token tables hold different prompts (seq_id {first})")
    if ids_a.equals(ids_b):
        return
    for i in range(len(seq_a)):
        x, y = ids_a[i].values.to_numpy(), ids_b[i].values.to_numpy()
        if len(x) != len(y) or not np.array_equal(x, y):
            n = min(len(x), len(y))
            diff = np.flatnonzero(x[:n] != y[:n])
            at = int(diff[0]) if len(diff) else n
            raise DataError(
                f"{what}: seq_id {int(seq_a[i])} is tokenized differently by the two models "
                f"(first difference at position {at}; lengths {len(x)} vs {len(y)})"
            )


def read_explanations(path: str | os.PathLike, column: str = "description") -> pd.DataFrame:
    """feature_id, description from a CSV: `column` (e.g. seed 001's claude_desc) is read as the
    description; other columns are ignored."""
    try:
        df = pd.read_csv(path, dtype={column: str})
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read explanations CSV ({err})") from None
    missing = [c for c in ("feature_id", column) if c not in df.columns]
    if missing:
        raise DataError(
            f"{path}: explanations CSV lacks column(s) {missing} (report.explanation_column)"
        )
    df = df[["feature_id", column]].rename(columns={column: "description"})
    if len(df) and not pd.api.types.is_integer_dtype(df["feature_id"]):
        raise DataError(f"{path}: feature_id must be integers")
    dup = df["feature_id"][df["feature_id"].duplicated()]
    if len(dup):
        raise DataError(f"{path}: feature_id {int(dup.iloc[0])} appears twice")
    return df.astype({"feature_id": np.int32})


def run_diffing(
    analysis: Mapping[str, Any],
    tokens: Mapping[str, Mapping[str, str | os.PathLike]],
    codes: Mapping[str, Mapping[str, str | os.PathLike]],
    features_out: str | os.PathLike,
    summary_out: str | os.PathLike,
    explanations: str | os.PathLike | None = None,
    context_lengths: Mapping[str, int | None] | None = None,
) -> dict[str, Any]:
    """The diff_stats stage: tokens[set][model] / codes[set][model] paths -> parquet + summary.

    `context_lengths[set]`: the dataset's context_length, so a prompt it cut before the model
    turn is reported as that, not as a missing header."""
    name = analysis.get("name", "?")
    models = list(analysis.get("models", []))
    if len(models) != 2 or models[0] == models[1]:
        raise ConfigError(f"analyses[{name}].models = {models}: two different models")
    token_types = parse_token_types(analysis.get("token_types"), f"analyses[{name}].token_types")
    metrics = list(analysis.get("metrics") or DEFAULT_METRICS)
    kind = analysis.get("codes")
    if kind == "activations":
        raise ConfigError(f"analyses[{name}].codes = 'activations': diffing needs SAE codes")

    rows: dict[str, dict[str, list[sp.csr_matrix]]] = {m: {} for m in models}
    n_prompts: dict[str, int] = {}
    headers: set[str] = set()
    header: str | None = None
    for s in SETS:
        dataset = analysis.get(s, s)
        per_model = {m: read_prompt_tokens(tokens[s][m]) for m in models}
        a, b = models
        check_same_tokens(per_model[a][:2], per_model[b][:2], f"{s} dataset {dataset}")
        seq_ids, _, token_strs = per_model[b]
        n_prompts[s] = len(seq_ids)
        if not n_prompts[s]:
            raise DataError(f"{tokens[s][b]}: no prompts")
        try:
            if any(tt.anchor is None for tt in token_types):
                header = pick_model_header(
                    token_strs, analysis.get("model_header"), source=str(tokens[s][b])
                )
                headers.add(header)
            pos_TS = resolve_positions(
                token_strs, seq_ids.tolist(), token_types, header, source=str(tokens[s][b])
            )
        except (ConfigError, DataError) as err:
            limit = (context_lengths or {}).get(s)
            cut = [
                int(i) for i, t in zip(seq_ids, token_strs, strict=True) if len(t) >= (limit or 0)
            ]
            if limit and cut:
                raise DataError(
                    f"{tokens[s][b]}: datasets.{dataset}.context_length = {limit} cuts "
                    f"{len(cut)} prompt(s) (seq_id {cut[0]} first) before the model turn that "
                    "diffing anchors on; raise context_length or remove it from that dataset"
                ) from err
            raise
        T, S = pos_TS.shape
        for m in models:
            part = resolve_part(codes[s][m], kind, "total")
            gathered = gather_rows(
                iter_row_blocks(codes[s][m], part),
                np.tile(seq_ids, T),
                pos_TS.reshape(-1),
                source=str(codes[s][m]),
            )
            rows[m][s] = [gathered[t * S : (t + 1) * S] for t in range(T)]
        log.info("diffing %s: %s set, %d prompts, positions resolved", name, s, S)
    if len(headers) > 1:
        raise DataError(f"analyses[{name}]: target and control use different model headers")
    widths = {rows[m][s][0].shape[1] for m in models for s in SETS}
    if len(widths) != 1:
        raise DataError(f"analyses[{name}]: code widths differ between inputs {sorted(widths)}")

    per_t = {m: {s: rows[m][s] for s in SETS} for m in models}
    table = diff_table(per_t, models, [tt.name for tt in token_types], metrics)
    if explanations:
        column = (analysis.get("report") or {}).get("explanation_column", "description")
        table = table.merge(read_explanations(explanations, column), on="feature_id", how="left")
    with atomic_path(features_out) as tmp:
        pq.write_table(pa.Table.from_pandas(table, preserve_index=False), tmp, **PARQUET_OPTS)
    summary = summarize(table, models, n_prompts["target"], n_prompts["control"])
    summary.update(
        {
            "analysis": name,
            "sae": analysis.get("sae"),
            "target": analysis.get("target"),
            "control": analysis.get("control"),
            "codes": kind or "total",
            "metrics": metrics,
            "token_type_specs": {
                tt.name: {
                    "anchor": tt.anchor if tt.anchor is not None else header,
                    "offset": tt.offset,
                    "occurrence": tt.occurrence,
                }
                for tt in token_types
            },
        }
    )
    write_json(summary_out, summary)
    return summary
