"""Labelling the pairs that `match_features` found, and redundant pairs inside one SAE.

For the best mutual pairs (A's feature a and B's feature b, each the other's best match), from the
matches table and both code sets over the same tokens:
- `jaccard_top`: Jaccard overlap of the distinct token strings of their top-`top_n` activations
  (seed 003: "+1 if contains same token in top 5", made a proper set overlap);
- `n_both`, `n_a_only`, `n_b_only`: tokens where both fire, where A fires and B is zero, and the
  reverse, with the most frequent token strings of the two one-sided sets ("find what are the
  tokens that are 0 in A but nonzero in B");
- a scatter of A's activation against B's on the tokens where either fires, hover = context.

Redundant pairs are a self-match without the diagonal: each SAE's codes matched against
themselves (the same streaming top-k as `match_features`, one extra neighbour), the feature itself
removed from its list, and pairs above `redundant_threshold` kept once (f < g).
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

log = logging.getLogger(__name__)


def top_token_sets(
    csr: sp.csr_matrix, features: np.ndarray, tokens: list[str], top_n: int
) -> list[set[str]]:
    """Distinct stripped token strings of each feature's top-`top_n` activations."""
    from saeflow.geometry.top_examples import norm_token

    csc = csr.tocsc()
    out = []
    for f in features:
        col = csc[:, int(f)]
        rows, vals = col.indices, col.data
        keep = vals > 0
        rows, vals = rows[keep], vals[keep]
        order = np.lexsort((rows, -vals))[:top_n]
        out.append({norm_token(tokens[r]) for r in rows[order]})
    return out


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if (a or b) else 0.0


def one_sided(
    col_a: np.ndarray, col_b: np.ndarray, tokens: list[str], n: int = 5
) -> dict[str, Any]:
    """Counts of both / A-only / B-only tokens and the most frequent token strings of each side."""
    a, b = col_a > 0, col_b > 0
    only_a, only_b = np.flatnonzero(a & ~b), np.flatnonzero(b & ~a)

    def common(rows: np.ndarray) -> list[str]:
        return [
            f"{t} ({c})"
            for t, c in Counter(tokens[r].strip() or tokens[r] for r in rows).most_common(n)
        ]

    return {
        "n_both": int((a & b).sum()),
        "n_a_only": int(len(only_a)),
        "n_b_only": int(len(only_b)),
        "a_only_tokens": common(only_a),
        "b_only_tokens": common(only_b),
    }


def label_pairs(
    matches: pd.DataFrame,
    A: sp.csr_matrix,
    B: sp.csr_matrix,
    tokens: list[str],
    *,
    n_pairs: int,
    top_n: int,
) -> pd.DataFrame:
    """One row per labelled pair: the `n_pairs` mutual pairs with the highest correlation."""
    m = matches[(matches["direction"] == "a_to_b") & matches["mutual"]]
    m = m.sort_values(["corr", "source_feature"], ascending=[False, True]).head(n_pairs)
    fa = m["source_feature"].to_numpy()
    fb = m["target_feature"].to_numpy()
    sets_a = top_token_sets(A, fa, tokens, top_n)
    sets_b = top_token_sets(B, fb, tokens, top_n)
    Ac, Bc = A.tocsc(), B.tocsc()
    rows = []
    for i, (a, b) in enumerate(zip(fa, fb, strict=True)):
        col_a = Ac[:, int(a)].toarray().ravel()
        col_b = Bc[:, int(b)].toarray().ravel()
        rows.append(
            {
                "feature_a": int(a),
                "feature_b": int(b),
                "corr": float(m["corr"].iloc[i]),
                "decoder_cos": m["decoder_cos"].iloc[i],
                "jaccard_top": jaccard(sets_a[i], sets_b[i]),
                "top_a": sorted(sets_a[i]),
                "top_b": sorted(sets_b[i]),
                **one_sided(col_a, col_b, tokens),
            }
        )
    return pd.DataFrame(rows)


def redundant_pairs(
    codes: sp.csr_matrix, W_dec_FD: np.ndarray | None, *, threshold: float, sae: str
) -> pd.DataFrame:
    """Pairs (f < g) of one SAE correlating above `threshold` (a self-match, no diagonal)."""
    from saeflow.geometry.matching import decoder_cosine, match_features

    res = match_features(codes, codes, top_k=2)
    f = np.arange(codes.shape[1])
    ids, corr = res.a_to_b_ids, res.a_to_b_corr
    # the diagonal is each feature's own best match (corr 1); take the best other one
    other_col = np.where(ids[:, 0] == f, 1, 0)
    g = ids[f, other_col]
    c = corr[f, other_col]
    keep = (g >= 0) & (g != f) & (c >= threshold) & ~res.dead_a
    lo, hi = np.minimum(f, g)[keep], np.maximum(f, g)[keep]
    df = pd.DataFrame({"feature": lo, "other": hi, "corr": c[keep]}).drop_duplicates(
        ["feature", "other"]
    )
    df.insert(0, "sae", sae)
    if W_dec_FD is not None and len(df):
        df["decoder_cos"] = decoder_cosine(
            W_dec_FD, W_dec_FD, df["feature"].to_numpy(), df["other"].to_numpy()
        )
    else:
        df["decoder_cos"] = np.float32(np.nan)
    return df.sort_values(["corr", "feature"], ascending=[False, True]).reset_index(drop=True)


def scatter_points(
    col_a: np.ndarray, col_b: np.ndarray, n: int, rng: np.random.Generator
) -> np.ndarray:
    """Rows where either feature fires, at most `n` (seeded sample, in token order)."""
    rows = np.flatnonzero((col_a > 0) | (col_b > 0))
    if len(rows) > n:
        rows = np.sort(rng.choice(rows, size=n, replace=False))
    return rows


def run_label_pairs(
    *,
    codes_a_path: str,
    codes_b_path: str,
    tokens_path: str,
    matches_path: str,
    analysis: dict[str, Any],
    sae_a_spec: dict[str, Any] | None,
    sae_b_spec: dict[str, Any] | None,
    seed: int,
    out_pairs: str | Path,
    out_redundant: str | Path,
    out_page: str | Path | None,
) -> pd.DataFrame:
    """The rule: label the top mutual pairs, find redundant pairs in each SAE, write the page."""
    from saeflow.codes import load_codes
    from saeflow.geometry.matching import align_codes, read_matches, side_label
    from saeflow.geometry.weights import load_decoder
    from saeflow.io import atomic_path
    from saeflow.tokenize import load_tokens

    lab = analysis["labels"]
    part = analysis.get("codes")
    ca = load_codes(codes_a_path, part=analysis["a"].get("codes", part))
    cb = load_codes(codes_b_path, part=analysis["b"].get("codes", part))
    A, B, _ = align_codes(ca, cb)
    ka, kb = _key(ca), _key(cb)
    keys = ka if np.array_equal(ka, kb) else np.intersect1d(ka, kb)  # align_codes' row order
    seq, pos = (keys >> 32).astype(np.int64), (keys & 0xFFFFFFFF).astype(np.int64)
    tok_df = load_tokens(tokens_path)
    by_seq = dict(zip(tok_df["seq_id"].astype(int), tok_df["tokens"], strict=True))
    tokens = [str(by_seq[int(s)][int(p)]) for s, p in zip(seq, pos, strict=True)]
    pairs = label_pairs(
        read_matches(matches_path),
        A,
        B,
        tokens,
        n_pairs=int(lab["n_pairs"]),
        top_n=int(lab["top_n"]),
    )
    W_a = load_decoder(sae_a_spec) if sae_a_spec else None
    W_b = load_decoder(sae_b_spec) if sae_b_spec else None
    names = (side_label(analysis["a"]), side_label(analysis["b"]))
    red = [redundant_pairs(A, W_a, threshold=float(lab["redundant_threshold"]), sae=names[0])]
    if names[1] != names[0]:
        red.append(
            redundant_pairs(B, W_b, threshold=float(lab["redundant_threshold"]), sae=names[1])
        )
    redundant = pd.concat(red, ignore_index=True)
    with atomic_path(out_pairs) as tmp:
        pairs.to_parquet(tmp, compression="zstd", index=False)
    with atomic_path(out_redundant) as tmp:
        redundant.to_parquet(tmp, compression="zstd", index=False)
    if out_page:
        from saeflow.compare.pages import write_pairs_page

        rng = np.random.default_rng(seed)
        Ac, Bc = A.tocsc(), B.tocsc()
        scatters = []
        for r in pairs.head(int(lab["page_pairs"])).itertuples():
            col_a = Ac[:, r.feature_a].toarray().ravel()
            col_b = Bc[:, r.feature_b].toarray().ravel()
            rows = scatter_points(col_a, col_b, int(lab["scatter_points"]), rng)
            hover = [_context(by_seq, int(seq[i]), int(pos[i]), int(lab["context"])) for i in rows]
            scatters.append((r.feature_a, r.feature_b, col_a[rows], col_b[rows], hover))
        write_pairs_page(out_page, pairs, redundant, scatters, name=analysis["name"], sides=names)
    log.info("label_pairs %s: %d pairs, %d redundant", analysis["name"], len(pairs), len(redundant))
    return pairs


def _key(codes: Any) -> np.ndarray:
    return codes.seq_ids.astype(np.int64) << 32 | codes.positions.astype(np.int64)


def _context(by_seq: dict[int, Any], seq: int, pos: int, window: int) -> str:
    """Escaped hover text: the preceding tokens, then the token itself in bold."""
    from saeflow.report.common import esc_label

    toks = [str(t) for t in by_seq[seq]]
    before = "".join(toks[max(0, pos - window) : pos]).replace("\n", "⏎")
    tok = toks[pos].replace("\n", "⏎")
    return f"{esc_label(before)}<b>{esc_label(tok)}</b><br>seq {seq} pos {pos}"
