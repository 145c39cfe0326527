"""One joint UMAP of the decoder directions of several SAEs.

Embedding each SAE separately gives maps whose coordinates cannot be compared; stacking all
decoders (e.g. widths 8k/16k/32k of one model, or SAEs of two models of the same width) into one
fit puts related features of different SAEs next to each other, which is what makes feature
splitting visible. Rows are L2-normalised and the metric is cosine by default: decoder norms
carry the SAE's training scale, not meaning.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from saeflow.errors import ConfigError, DataError
from saeflow.io import atomic_path

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    "n_neighbors": 15,
    "min_dist": 0.1,
    "metric": "cosine",
    "n_components": 2,
    "random_state": 42,
    "n_logits": 5,
    "fold_final_norm": True,
}
PARQUET_OPTS: dict[str, Any] = {"compression": "zstd", "compression_level": 3}


def stack_decoders(decoders: dict[str, np.ndarray]) -> tuple[np.ndarray, pd.DataFrame]:
    """Stacked, row-normalised decoders and a frame (sae, feature_id) naming every row."""
    if not decoders:
        raise ConfigError("saes: decoder_umap needs at least one SAE")
    dims = {name: int(np.asarray(W).shape[1]) for name, W in decoders.items()}
    if len(set(dims.values())) > 1:
        raise DataError(
            f"decoders live in different spaces (d_in {dims}); a joint UMAP needs one d_model"
        )
    blocks, names, ids = [], [], []
    for name, W in decoders.items():
        W = np.asarray(W, dtype=np.float32)
        norms = np.linalg.norm(W, axis=1, keepdims=True)
        blocks.append(np.divide(W, norms, out=np.zeros_like(W), where=norms > 0))
        names.extend([name] * len(W))
        ids.append(np.arange(len(W), dtype=np.int32))
    meta = pd.DataFrame({"sae": names, "feature_id": np.concatenate(ids)})
    return np.concatenate(blocks), meta


def decoder_umap(
    decoders: dict[str, np.ndarray],
    *,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    metric: str = "cosine",
    n_components: int = 2,
    random_state: int | None = 42,
) -> pd.DataFrame:
    """Joint UMAP of all decoders: one row per (sae, feature_id) with x, y[, z].

    `random_state` makes the layout reproducible (umap then runs single-threaded); null trades
    that for parallel speed.
    """
    import umap

    if n_components not in (2, 3):
        raise ConfigError(f"n_components: must be 2 or 3, got {n_components}")
    X, meta = stack_decoders(decoders)
    n_neighbors = max(2, min(int(n_neighbors), len(X) - 1))
    reducer = umap.UMAP(
        n_neighbors=n_neighbors,
        min_dist=float(min_dist),
        metric=metric,
        n_components=int(n_components),
        random_state=random_state,
        n_jobs=1 if random_state is not None else -1,
    )
    from saeflow.embedding import seeded_eigsh

    with seeded_eigsh(random_state):
        emb = reducer.fit_transform(X).astype(np.float32)
    for d, axis in enumerate("xyz"[:n_components]):
        meta[axis] = emb[:, d]
    return meta


def partner_map(matches: pd.DataFrame, max_rank: int = 0) -> dict[str, list[list[Any]]]:
    """ "sae:feature" -> [[sae, feature, corr, mutual], ...] from match tables, both directions.

    Only ranks <= `max_rank` are linked (the best match by default), so hovering shows the
    matched partner(s), not the whole top-k.
    """
    out: dict[str, list[list[Any]]] = {}
    if matches is None or matches.empty:
        return out
    keep = matches[matches["rank"] <= max_rank]
    for src, sf, dst, df, corr, mut in zip(
        keep["source_sae"],
        keep["source_feature"],
        keep["target_sae"],
        keep["target_feature"],
        keep["corr"],
        keep["mutual"],
        strict=True,
    ):
        for key, other in (
            (f"{src}:{int(sf)}", [str(dst), int(df)]),
            (f"{dst}:{int(df)}", [str(src), int(sf)]),
        ):
            entry = [*other, round(float(corr), 4), bool(mut)]
            bucket = out.setdefault(key, [])
            if not any(e[0] == entry[0] and e[1] == entry[1] for e in bucket):
                bucket.append(entry)
    return {k: sorted(v, key=lambda e: (-e[2], e[0], e[1])) for k, v in sorted(out.items())}


def write_embedding(df: pd.DataFrame, path: str | Path) -> None:
    """Atomic, byte-stable Parquet of the embedding (plus top-token lists when present)."""
    fields = [("sae", pa.string()), ("feature_id", pa.int32())]
    fields += [(a, pa.float32()) for a in "xyz" if a in df.columns]
    fields += [(c, pa.list_(pa.string())) for c in ("top_logit_tokens", "top_tokens") if c in df]
    schema = pa.schema(fields)
    arrays = []
    for fld in schema:
        col = df[fld.name]
        if pa.types.is_list(fld.type):
            arrays.append(pa.array([list(v) for v in col], type=fld.type))
        else:
            arrays.append(pa.array(col.to_numpy(), type=fld.type))
    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_arrays(arrays, schema=schema), tmp, **PARQUET_OPTS)


def attach_tokens(
    emb: pd.DataFrame,
    logit_tokens: dict[str, list[list[str]]] | None = None,
    indexes: list[pd.DataFrame] | None = None,
) -> pd.DataFrame:
    """Add `top_logit_tokens` (per SAE, from W_dec · W_U) and `top_tokens` (activating tokens
    from top_examples feature indexes) so the page can search features by token."""
    emb = emb.copy()
    if logit_tokens:
        col = []
        for sae, fid in zip(emb["sae"], emb["feature_id"], strict=True):
            rows = logit_tokens.get(sae)
            col.append(list(rows[int(fid)]) if rows is not None and fid < len(rows) else [])
        emb["top_logit_tokens"] = col
    if indexes:
        lookup: dict[tuple[str, int], list[str]] = {}
        for idx in indexes:
            for sae, fid, toks in zip(
                idx["sae"], idx["feature_id"], idx["top_tokens"], strict=True
            ):
                lookup.setdefault((str(sae), int(fid)), [str(t) for t in toks])
        emb["top_tokens"] = [
            lookup.get((s, int(f)), []) for s, f in zip(emb["sae"], emb["feature_id"], strict=True)
        ]
    return emb


def run_decoder_umap(
    *,
    analysis: dict[str, Any],
    sae_specs: dict[str, dict[str, Any]],
    model_specs: dict[str, dict[str, Any] | None],
    match_paths: list[str | Path],
    index_paths: list[str | Path],
    out_embedding: str | Path,
    out_page: str | Path | None,
    threads: int = 1,
) -> dict[str, Any]:
    """The `decoder_umap` rule.

    `sae_specs`: SAE name -> `load_sae` spec, in the config's order; `model_specs`: SAE name ->
    model spec of the model it reads (for the top-logit tokens), or None to skip them.
    """
    import torch

    from saeflow.geometry.matching import read_matches
    from saeflow.geometry.top_examples import logit_lens, read_index
    from saeflow.geometry.weights import load_decoder, read_unembedding, token_strings_for

    params = {**DEFAULTS, **{k: v for k, v in analysis.items() if v is not None}}
    torch.set_num_threads(max(1, int(threads)))
    # In the analysis' own order (the params mapping has sorted keys).
    order = [s for s in params.get("saes", []) if s in sae_specs] or list(sae_specs)
    decoders = {name: load_decoder(sae_specs[name]) for name in order}
    emb = decoder_umap(
        decoders,
        n_neighbors=int(params["n_neighbors"]),
        min_dist=float(params["min_dist"]),
        metric=str(params["metric"]),
        n_components=int(params["n_components"]),
        random_state=analysis.get("random_state", DEFAULTS["random_state"]),
    )
    logit_tokens: dict[str, list[list[str]]] = {}
    n_logits = int(params["n_logits"])
    for name, W in decoders.items():
        model = model_specs.get(name)
        if model is None or n_logits <= 0:
            continue
        W_U = read_unembedding(
            model["path"],
            revision=model.get("revision"),
            fold_final_norm=bool(params["fold_final_norm"]),
        )
        top_ids = logit_lens(W, W_U, n_logits)[0]
        vocab = token_strings_for(
            model["path"],
            top_ids,
            revision=model.get("revision"),
            trust_remote_code=bool(model.get("trust_remote_code", False)),
        )
        logit_tokens[name] = [[vocab[int(i)] for i in row] for row in top_ids]
    indexes = [read_index(p) for p in index_paths]
    emb = attach_tokens(emb, logit_tokens, indexes)
    matches = [read_matches(p) for p in match_paths]
    partners = partner_map(pd.concat(matches, ignore_index=True) if matches else None)
    write_embedding(emb, out_embedding)
    if out_page:
        from saeflow.report import write_decoder_umap_page

        write_decoder_umap_page(out_page, emb, partners, analysis=analysis)
    summary = {"n_points": len(emb), "saes": {k: len(v) for k, v in decoders.items()}}
    log.info("decoder_umap %s: %s", analysis.get("name"), summary)
    return summary
