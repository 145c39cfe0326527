"""Position x position cosine similarity of centred codes, one matrix per chosen sequence.

Reference: canrager/dynamic_representations `plotting/surprisal_similarity_matrix.py`. For one
sequence it takes the rows of the chosen positions (`selected_LD`), centres them on THEIR OWN mean
over positions (`selected_LD - selected_LD.mean(dim=0)`: the sequence's mean, not a dataset mean),
and computes `x / (||x|| + 1e-8)` then `x_norm @ x_norm.T`. Here the same numbers come from the
Gram matrix of the sparse codes, so a wide SAE never becomes dense:
  G = X X^T,  r = X mu,  Gc = G - r 1^T - 1 r^T + mu.mu,  sim = Gc / ((n + eps)(n + eps)^T),
with n = sqrt(diag Gc), all in float64.

The reference drops BOS and keeps positions [start:end). Here a matrix always spans positions
0..L-1 (L = min(end, n_tokens)), so row/column i is token i; positions before `start` are NaN
and do not enter the mean. `start: 1` drops BOS.

`eps` (default 1e-8, added to each norm as the reference above does); seed 002's similarity cell
uses `F.normalize` (x / max(||x||, 1e-12)), which `eps: 0` reproduces for every non-zero row.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp

from saeflow.embedding import gather_rows, iter_row_blocks, read_tokens_table, resolve_part
from saeflow.errors import ConfigError, DataError
from saeflow.io import atomic_dir, write_manifest

log = logging.getLogger("saeflow.similarity")

EPS = 1e-8
PARQUET_OPTS: dict[str, Any] = {"compression": "zstd", "compression_level": 3}


def cosine_similarity_matrix(
    rows_LF: sp.spmatrix | np.ndarray, center: bool = True, eps: float = EPS
) -> np.ndarray:
    """[L, L] float64 cosine similarity of the rows (minus their mean row if `center`)."""
    if sp.issparse(rows_LF):
        X = sp.csr_matrix(rows_LF, dtype=np.float64)
        gram = (X @ X.T).toarray()
        if center and X.shape[0]:
            mu = np.asarray(X.mean(axis=0)).ravel()
            r = X @ mu
            gram = gram - r[:, None] - r[None, :] + float(mu @ mu)
    else:
        X = np.asarray(rows_LF, dtype=np.float64)
        if center and X.shape[0]:
            X = X - X.mean(axis=0, keepdims=True)
        gram = X @ X.T
    norms = np.sqrt(np.clip(np.diag(gram), 0.0, None)) + eps
    norms[norms == 0] = 1.0  # eps 0: a zero row stays zero, as F.normalize leaves it
    return gram / norms[:, None] / norms[None, :]


def similarity_options(analysis: Mapping[str, Any]) -> dict[str, Any]:
    """sequences, center, start, end with defaults, checked."""
    name = analysis.get("name", "?")
    seqs = analysis.get("sequences")
    if not isinstance(seqs, list) or not seqs or not all(isinstance(s, int) for s in seqs):
        raise ConfigError(f"analyses[{name}].sequences = {seqs!r}: a non-empty list of seq_ids")
    start = int(analysis.get("start", 0))
    end = analysis.get("end")
    if start < 0 or (end is not None and int(end) <= start):
        raise ConfigError(f"analyses[{name}].start/end = {start}/{end}: need 0 <= start < end")
    eps = analysis.get("eps", EPS)
    if not isinstance(eps, int | float) or isinstance(eps, bool) or eps < 0:
        raise ConfigError(f"analyses[{name}].eps = {eps!r}: a number >= 0")
    return {
        "sequences": list(dict.fromkeys(seqs)),
        "center": bool(analysis.get("center", True)),
        "eps": float(eps),
        "start": start,
        "end": None if end is None else int(end),
    }


def run_similarity(
    analysis: Mapping[str, Any],
    codes_path: str | os.PathLike,
    tokens_path: str | os.PathLike,
    manifest_out: str | os.PathLike,
) -> dict[str, Any]:
    """Write `{seq_id}.parquet` (columns "0".."L-1", one row per position) + manifest.json last.

    `codes_path` is the codes manifest, or the activations manifest when `codes: activations`.
    """
    opts = similarity_options(analysis)
    kind = analysis.get("codes")
    part = "activations" if kind == "activations" else resolve_part(codes_path, kind, "pred")
    table = read_tokens_table(tokens_path)
    seq_all = table.column("seq_id").to_numpy().astype(np.int64)
    n_tok = table.column("n_tokens").to_numpy().astype(np.int64)
    index = {int(s): i for i, s in enumerate(seq_all)}
    missing = [s for s in opts["sequences"] if s not in index]
    if missing:
        raise DataError(f"{tokens_path}: no sequence with seq_id {missing[0]}")
    spans = {}
    for s in opts["sequences"]:
        length = int(n_tok[index[s]])
        stop = length if opts["end"] is None else min(opts["end"], length)
        if stop - opts["start"] < 1:
            raise DataError(f"{tokens_path}: seq_id {s} has {length} tokens, none from start")
        spans[s] = (opts["start"], stop)
    seq_w = np.concatenate([np.full(b - a, s) for s, (a, b) in spans.items()])
    pos_w = np.concatenate([np.arange(a, b) for a, b in spans.values()])
    rows = gather_rows(iter_row_blocks(codes_path, part), seq_w, pos_w, source=str(codes_path))

    out_dir = Path(manifest_out).parent
    files = {}
    with atomic_dir(out_dir) as tmp:
        offset = 0
        for s, (a, b) in spans.items():
            sim = cosine_similarity_matrix(
                rows[offset : offset + b - a], center=opts["center"], eps=opts["eps"]
            )
            offset += b - a
            full = np.full((b, b), np.nan, np.float32)
            full[a:b, a:b] = sim
            cols = {str(i): pa.array(full[:, i]) for i in range(b)}
            pq.write_table(pa.table(cols), tmp / f"{s}.parquet", **PARQUET_OPTS)
            files[str(s)] = {"file": f"{s}.parquet", "length": b, "start": a}
        manifest = {
            "analysis": analysis.get("name"),
            "codes": kind or part or "codes",
            "part": part,
            "center": opts["center"],
            "sequences": opts["sequences"],
            "files": files,
        }
        write_manifest(tmp, manifest)
    log.info("similarity %s: %d matrices", analysis.get("name"), len(files))
    return manifest
