"""Top-activating examples and SAEDashboard-style feature dashboards.

Everything is computed from the sparse codes in CSR form with vectorised numpy: one sort of the
non-zeros by (feature, -value) gives every feature's top-n at once, where a per-feature loop over
a 16k-wide SAE would take minutes. Context windows are looked up with one `searchsorted` over
(row, feature) keys instead of random CSR indexing.

Dataset text is untrusted: each token is HTML-escaped first and only then wrapped in `<b>` (the
activating token) or a shading `<span>`, so text such as `<b>` in the data can never become markup.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp
from tqdm import tqdm

from saeflow.errors import ConfigError, DataError
from saeflow.io import atomic_path

log = logging.getLogger(__name__)

PARQUET_OPTS: dict[str, Any] = {"compression": "zstd", "compression_level": 3}
DEFAULTS: dict[str, Any] = {
    "n_examples": 20,
    "window": [8, 4],
    "n_bins": 30,
    "n_logits": 10,
    "codes": None,
    "fold_final_norm": True,
    "logit_batch_size": 512,
    "page_features": 1024,
    "page_examples": 10,
}
NEWLINE_MARK = "\u21b5"


# ----------------------------------------------------------------------------- core math


def as_csr(codes_NF: Any) -> sp.csr_matrix:
    """scipy CSR float32 with sorted indices (the layout every function here relies on)."""
    if hasattr(codes_NF, "to_scipy"):
        codes_NF = codes_NF.to_scipy()
    csr = sp.csr_matrix(codes_NF, dtype=np.float32)
    if not csr.has_sorted_indices:
        csr = csr.sorted_indices()
    return csr


class TopExamplesState:
    """Per-feature top-n activations and firing statistics, fed one block of tokens at a time.

    The state is O(features x n_examples) whatever the number of tokens: each block's entries
    that beat a feature's current n-th best are merged into the running top-n with one lexsort,
    ordered by (feature, -activation, token order), so the result equals one sort over all tokens.
    The histogram needs each feature's final range, so it is a second pass (`update_hist`).
    """

    def __init__(self, n_feat: int, n_examples: int, n_bins: int = 30) -> None:
        if n_examples < 1:
            raise ConfigError(f"n_examples: must be >= 1, got {n_examples}")
        self.n_feat, self.n_examples, self.n_bins = int(n_feat), int(n_examples), int(n_bins)
        self.n_tokens = 0
        self.feat_M = np.zeros(0, np.int32)
        self.val_M = np.zeros(0, np.float32)
        self.row_M = np.zeros(0, np.int64)
        self.seq_M = np.zeros(0, np.int32)
        self.pos_M = np.zeros(0, np.int32)
        # n-th best value of a full feature (-inf until it has n examples): entries <= it lose.
        self.thr_F = np.full(self.n_feat, -np.inf, np.float32)
        self.n_active_F = np.zeros(self.n_feat, np.int64)
        self.total_F = np.zeros(self.n_feat, np.float64)
        self.hi_F = np.zeros(self.n_feat, np.float64)
        self.lo_F = np.zeros(self.n_feat, np.float64)
        self.hist_FB = np.zeros((self.n_feat, self.n_bins), np.int64)
        self._hist_rows = 0

    def nbytes(self) -> int:
        """Bytes held by the state (bounded by features x (n_examples + n_bins))."""
        arrays = (self.feat_M, self.val_M, self.row_M, self.seq_M, self.pos_M, self.thr_F)
        arrays += (self.n_active_F, self.total_F, self.hi_F, self.lo_F, self.hist_FB)
        return int(sum(a.nbytes for a in arrays))

    def _entries(self, codes_NF: Any) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray, np.ndarray]:
        csr = as_csr(codes_NF)
        if csr.shape[1] != self.n_feat:
            raise DataError(f"code block has {csr.shape[1]} features, expected {self.n_feat}")
        rows = np.repeat(np.arange(csr.shape[0], dtype=np.int64), np.diff(csr.indptr))
        cols = csr.indices.astype(np.int64)
        vals = csr.data.astype(np.float32)
        keep = vals != 0
        return csr, rows[keep], cols[keep], vals[keep]

    def update(self, codes_NF: Any, seq_ids: np.ndarray, positions: np.ndarray) -> None:
        """Pass 1: fold one block of tokens (rows in token order) into top-n and statistics."""
        csr, rows, cols, vals = self._entries(codes_NF)
        if len(seq_ids) != csr.shape[0] or len(positions) != csr.shape[0]:
            raise DataError(
                f"codes have {csr.shape[0]} rows but {len(seq_ids)} seq_ids / {len(positions)} pos"
            )
        v64 = vals.astype(np.float64)
        self.n_active_F += np.bincount(cols, minlength=self.n_feat)
        self.total_F += np.bincount(cols, weights=v64, minlength=self.n_feat)
        if len(vals):
            np.maximum.at(self.hi_F, cols, v64)
            np.minimum.at(self.lo_F, cols, v64)
        cand = vals > self.thr_F[cols]
        seq_ids = np.asarray(seq_ids)
        positions = np.asarray(positions)
        feat = np.concatenate([self.feat_M, cols[cand].astype(np.int32)])
        val = np.concatenate([self.val_M, vals[cand]])
        row = np.concatenate([self.row_M, rows[cand] + self.n_tokens])
        seq = np.concatenate([self.seq_M, seq_ids[rows[cand]].astype(np.int32)])
        pos = np.concatenate([self.pos_M, positions[rows[cand]].astype(np.int32)])
        self.n_tokens += csr.shape[0]
        if len(feat) == len(self.feat_M):
            return
        order = np.lexsort((row, -val, feat))
        feat_sorted = feat[order]
        rank = np.arange(len(order)) - np.searchsorted(feat_sorted, feat_sorted, side="left")
        take = order[rank < self.n_examples]
        self.feat_M, self.val_M, self.row_M = feat[take], val[take], row[take]
        self.seq_M, self.pos_M = seq[take], pos[take]
        last = rank[rank < self.n_examples] == self.n_examples - 1
        self.thr_F[self.feat_M[last]] = self.val_M[last]

    def update_hist(self, codes_NF: Any) -> None:
        """Pass 2: the activation histogram over each feature's [min(0, lowest), highest]."""
        _, _, cols, vals = self._entries(codes_NF)
        lo, hi = self.lo_F, self.hi_F
        width = np.where(hi > lo, hi - lo, 1.0)
        v64 = vals.astype(np.float64)
        bins = np.clip(((v64 - lo[cols]) / width[cols] * self.n_bins).astype(np.int64), 0, None)
        bins = np.minimum(bins, self.n_bins - 1)
        flat = np.bincount(cols * self.n_bins + bins, minlength=self.n_feat * self.n_bins)
        self.hist_FB += flat.reshape(self.n_feat, self.n_bins)

    def ranks(self) -> np.ndarray:
        """Rank of each kept example within its feature (the state is sorted by feature, rank)."""
        return np.arange(len(self.feat_M)) - np.searchsorted(self.feat_M, self.feat_M)

    def top_frame(self) -> pd.DataFrame:
        """(feature_id, rank, row, activation, seq_id, pos), sorted by feature then rank."""
        return pd.DataFrame(
            {
                "feature_id": self.feat_M.astype(np.int32),
                "rank": self.ranks().astype(np.int16),
                "row": self.row_M,
                "activation": self.val_M,
                "seq_id": self.seq_M,
                "pos": self.pos_M,
            }
        )

    def stats_frame(self) -> pd.DataFrame:
        """Per-feature firing counts, density, max/mean activation and the histogram."""
        n_active = self.n_active_F
        mean = np.divide(self.total_F, n_active, out=np.zeros(self.n_feat), where=n_active > 0)
        return pd.DataFrame(
            {
                "feature_id": np.arange(self.n_feat, dtype=np.int32),
                "n_active": n_active.astype(np.int64),
                "density": n_active / max(self.n_tokens, 1),
                "max_act": self.hi_F.astype(np.float32),
                "mean_act": mean.astype(np.float32),
                "hist_lo": self.lo_F.astype(np.float32),
                "hist_hi": self.hi_F.astype(np.float32),
                "hist_counts": list(self.hist_FB.astype(np.int32)),
            }
        )


def top_activations(codes_NF: sp.csr_matrix, n_examples: int) -> pd.DataFrame:
    """The `n_examples` largest non-zero activations of every feature of an in-memory matrix.

    Returns rows (feature_id, rank, row, activation) sorted by feature then rank; ties are broken
    by token order, so the result is deterministic.
    """
    csr = as_csr(codes_NF)
    state = TopExamplesState(csr.shape[1], n_examples)
    n = csr.shape[0]
    state.update(csr, np.zeros(n, np.int32), np.zeros(n, np.int32))
    return state.top_frame()[["feature_id", "rank", "row", "activation"]]


def feature_stats(codes_NF: sp.csr_matrix, n_bins: int = 30) -> pd.DataFrame:
    """Per-feature firing counts, density, max/mean activation and an activation histogram.

    The histogram of each feature spans [min(0, lowest), highest] of its non-zero values in
    `n_bins` equal bins (the SAEDashboard "activations density" plot). Features that never fire
    get zeros, not NaN.
    """
    csr = as_csr(codes_NF)
    state = TopExamplesState(csr.shape[1], 1, n_bins)
    n = csr.shape[0]
    state.update(csr, np.zeros(n, np.int32), np.zeros(n, np.int32))
    state.update_hist(csr)
    return state.stats_frame()


class ContextLookup:
    """Values codes[(seq_id, pos), feature] for many queries, answered block by block.

    Queries are deduplicated into sorted keys `token_slot * F + feature`; each block's stored
    entries of queried tokens are found with one `searchsorted`. Memory is O(queries), never
    O(tokens); tokens no block holds give 0.
    """

    def __init__(self, seq: np.ndarray, pos: np.ndarray, feat: np.ndarray, n_feat: int) -> None:
        self.n_feat = int(n_feat)
        tok_keys = _token_keys(seq, pos)
        self.tokens, tok_slot = np.unique(tok_keys, return_inverse=True)
        keys = tok_slot.astype(np.int64) * self.n_feat + np.asarray(feat, np.int64)
        self.keys, self.inverse = np.unique(keys, return_inverse=True)
        self.values = np.zeros(len(self.keys), np.float32)

    def update(self, codes_NF: Any, seq_ids: np.ndarray, positions: np.ndarray) -> None:
        if len(self.tokens) == 0 or len(seq_ids) == 0:
            return
        keys = _token_keys(seq_ids, positions)
        slot = np.clip(np.searchsorted(self.tokens, keys), 0, len(self.tokens) - 1)
        hit = self.tokens[slot] == keys
        if not hit.any():
            return
        rows = np.flatnonzero(hit)
        sub = as_csr(codes_NF)[rows]
        entry = np.repeat(slot[rows], np.diff(sub.indptr)) * self.n_feat + sub.indices
        at = np.clip(np.searchsorted(self.keys, entry), 0, len(self.keys) - 1)
        found = self.keys[at] == entry
        self.values[at[found]] = sub.data[found]

    def result(self) -> np.ndarray:
        """One value per query, in query order."""
        return self.values[self.inverse]


def _token_keys(seq_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
    return (np.asarray(seq_ids, np.int64) << 32) | np.asarray(positions, np.int64)


def csr_lookup(codes_NF: sp.csr_matrix, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Values codes_NF[rows[i], cols[i]] for many (row, col) pairs at once (0 where absent).

    With sorted indices, `row * F + col` over the stored entries is ascending, so one
    `searchsorted` answers every query; rows < 0 (no such token) give 0.
    """
    csr = as_csr(codes_NF)
    n_feat = csr.shape[1]
    row_of = np.repeat(np.arange(csr.shape[0], dtype=np.int64), np.diff(csr.indptr))
    keys = row_of * n_feat + csr.indices.astype(np.int64)
    rows = np.asarray(rows, dtype=np.int64)
    query = rows * n_feat + np.asarray(cols, dtype=np.int64)
    out = np.zeros(len(query), dtype=np.float32)
    if len(keys) == 0:
        return out
    at = np.clip(np.searchsorted(keys, query), 0, len(keys) - 1)
    hit = (keys[at] == query) & (rows >= 0)
    out[hit] = csr.data[at[hit]]
    return out


def visible_token(token: str) -> str:
    """A decoded token with newlines made visible (dashboards show one line per example)."""
    return str(token).replace("\r\n", NEWLINE_MARK).replace("\n", NEWLINE_MARK)


def context_html(
    tokens: Sequence[str], center: int, acts: Sequence[float] | None = None, scale: float = 0.0
) -> str:
    """One example as safe HTML: escaped tokens, the activating one in <b>, others shaded.

    Escaping happens BEFORE any tag is added, so dataset text cannot inject markup.
    """
    from saeflow.report.common import esc

    parts = []
    for i, token in enumerate(tokens):
        text = esc(visible_token(token))
        if i == center:
            text = f"<b>{text}</b>"
        value = float(acts[i]) if acts is not None else 0.0
        if scale > 0 and value > 0:
            alpha = min(1.0, value / scale)
            text = (
                f'<span style="background:rgba(255,140,0,{alpha:.2f})" '
                f'title="{value:.3g}">{text}</span>'
            )
        parts.append(text)
    return "".join(parts)


def parse_window(window: Any) -> tuple[int, int]:
    """`window`: an int (that many tokens on each side) or [before, after]."""
    if isinstance(window, int | np.integer) and not isinstance(window, bool):
        before = after = int(window)
    elif isinstance(window, list | tuple) and len(window) == 2:
        before, after = (int(w) for w in window)
    else:
        raise ConfigError(f"window: expected an int or [before, after], got {window!r}")
    if before < 0 or after < 0:
        raise ConfigError(f"window: sizes must be >= 0, got {window!r}")
    return before, after


def _tokens_by_seq(tokens_df: pd.DataFrame) -> dict[int, Any]:
    if "tokens" not in tokens_df.columns or "seq_id" not in tokens_df.columns:
        raise DataError("tokens table: needs columns seq_id and tokens")
    return dict(zip(tokens_df["seq_id"].astype(np.int64), tokens_df["tokens"], strict=True))


def plan_contexts(
    feature_ids: np.ndarray,
    ex_seq: np.ndarray,
    ex_pos: np.ndarray,
    by_seq: dict[int, Any],
    window: Any,
) -> dict[str, np.ndarray]:
    """Context window [start, stop) of every example and the flat (seq, pos, feature) queries."""
    before, after = parse_window(window)
    ex_seq = np.asarray(ex_seq, np.int64)
    ex_pos = np.asarray(ex_pos, np.int64)
    missing = sorted(set(np.unique(ex_seq).tolist()) - set(by_seq))
    if missing:
        raise DataError(f"tokens table: no row for seq_id {missing[0]} that the codes cover")
    n_tok = np.array([len(by_seq[s]) for s in ex_seq], dtype=np.int64)
    if np.any(ex_pos >= n_tok):
        bad = int(np.flatnonzero(ex_pos >= n_tok)[0])
        raise DataError(
            f"tokens table: seq_id {ex_seq[bad]} has {n_tok[bad]} tokens but codes have "
            f"pos {ex_pos[bad]} (codes and tokens come from different tokenizations)"
        )
    start = np.maximum(ex_pos - before, 0)
    stop = np.minimum(ex_pos + after + 1, n_tok)
    lengths = stop - start
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat_pos = np.repeat(start, lengths) + (
        np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)
    )
    return {
        "ex_seq": ex_seq,
        "ex_pos": ex_pos,
        "start": start,
        "stop": stop,
        "offsets": offsets,
        "flat_seq": np.repeat(ex_seq, lengths),
        "flat_pos": flat_pos,
        "flat_feat": np.repeat(np.asarray(feature_ids, np.int64), lengths),
    }


def assemble_examples(
    top_df: pd.DataFrame,
    plan: dict[str, np.ndarray],
    flat_acts: np.ndarray,
    by_seq: dict[int, Any],
    scales: np.ndarray,
) -> pd.DataFrame:
    """The examples table: context tokens, per-token activations and safe HTML per example."""
    ex_seq, ex_pos, start, stop, offsets = (
        plan[k] for k in ("ex_seq", "ex_pos", "start", "stop", "offsets")
    )
    ctx_tokens, ctx_acts, centers, html_rows, center_tokens = [], [], [], [], []
    it = tqdm(range(len(top_df)), desc="contexts", file=sys.stderr, mininterval=5)
    for i in it:
        toks = by_seq[int(ex_seq[i])]
        window_tokens = [str(t) for t in toks[start[i] : stop[i]]]
        acts = flat_acts[offsets[i] : offsets[i + 1]]
        center = int(ex_pos[i] - start[i])
        ctx_tokens.append(window_tokens)
        ctx_acts.append(acts)
        centers.append(center)
        center_tokens.append(window_tokens[center])
        html_rows.append(context_html(window_tokens, center, acts, float(scales[i])))
    out = top_df[["feature_id", "rank", "activation"]].copy()
    out["seq_id"] = ex_seq.astype(np.int32)
    out["pos"] = ex_pos.astype(np.int32)
    out["token"] = center_tokens
    out["center"] = np.asarray(centers, dtype=np.int16)
    out["context_tokens"] = ctx_tokens
    out["context_acts"] = ctx_acts
    out["context_html"] = html_rows
    return out.reset_index(drop=True)


def build_examples(
    top_df: pd.DataFrame,
    codes_NF: sp.csr_matrix,
    seq_ids: np.ndarray,
    positions: np.ndarray,
    tokens_df: pd.DataFrame,
    *,
    window: Any = (8, 4),
    max_act_F: np.ndarray | None = None,
) -> pd.DataFrame:
    """Attach each top activation's context window, per-token activations and safe HTML.

    In-memory form (`top_df` has a `row` column into `codes_NF`); the stage streams instead.
    """
    by_seq = _tokens_by_seq(tokens_df)
    rows = top_df["row"].to_numpy()
    feats = top_df["feature_id"].to_numpy()
    seq_ids, positions = np.asarray(seq_ids), np.asarray(positions)
    plan = plan_contexts(feats, seq_ids[rows], positions[rows], by_seq, window)
    lookup = ContextLookup(plan["flat_seq"], plan["flat_pos"], plan["flat_feat"], codes_NF.shape[1])
    lookup.update(codes_NF, seq_ids, positions)
    scales = max_act_F[feats] if max_act_F is not None else top_df["activation"].to_numpy()
    return assemble_examples(top_df, plan, lookup.result(), by_seq, scales.astype(np.float64))


def norm_token(token: Any) -> str:
    """The form tokens are compared in: surrounding whitespace dropped, otherwise EXACT.

    Decoded tokens often carry a leading space (" king"), so a user typing `king` must match
    it; but "talking" never matches "king" (no substring search). The page's JS uses the same rule
    (`String.prototype.trim`).
    """
    return str(token).strip()


def token_summary(
    examples_df: pd.DataFrame, n_feat: int
) -> tuple[list[list[str]], list[list[int]]]:
    """Distinct activating tokens of each feature's top examples, most frequent first."""
    tokens: list[list[str]] = [[] for _ in range(n_feat)]
    counts: list[list[int]] = [[] for _ in range(n_feat)]
    if examples_df.empty:
        return tokens, counts
    frame = pd.DataFrame(
        {"feature_id": examples_df["feature_id"].to_numpy(), "token": examples_df["token"]}
    )
    frame["order"] = np.arange(len(frame))
    grouped = (
        frame.groupby(["feature_id", "token"], sort=False)
        .agg(count=("order", "size"), first=("order", "min"))
        .reset_index()
        .sort_values(["feature_id", "count", "first"], ascending=[True, False, True])
    )
    for fid, tok, cnt in zip(
        grouped["feature_id"], grouped["token"], grouped["count"], strict=True
    ):
        tokens[int(fid)].append(str(tok))
        counts[int(fid)].append(int(cnt))
    return tokens, counts


def logit_lens(
    W_dec_FD: np.ndarray,
    W_U_VD: np.ndarray,
    k: int = 10,
    *,
    batch_size: int = 512,
    device: Any = "cpu",
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Top and bottom `k` logits of `W_dec · W_U^T` per feature, batched over features.

    The full [F, V] product would be 16k x 256k = 16 GB for Gemma, so only one batch of
    features is materialised at a time. Returns (top_ids, top_vals, bottom_ids, bottom_vals),
    each [F, k]; bottom is ordered from the most negative.
    """
    import torch

    W_dec_FD = np.asarray(W_dec_FD, dtype=np.float32)
    W_U_VD = np.asarray(W_U_VD, dtype=np.float32)
    if W_dec_FD.shape[1] != W_U_VD.shape[1]:
        raise DataError(
            f"SAE decoder has d_in={W_dec_FD.shape[1]} but the model's unembedding has "
            f"d_model={W_U_VD.shape[1]}: the SAE belongs to another model"
        )
    n_feat, n_vocab = W_dec_FD.shape[0], W_U_VD.shape[0]
    k = min(int(k), n_vocab)
    device = torch.device(device)
    W_U = torch.from_numpy(W_U_VD).to(device)
    out = [np.zeros((n_feat, k), np.int32), np.zeros((n_feat, k), np.float32)]
    out += [np.zeros((n_feat, k), np.int32), np.zeros((n_feat, k), np.float32)]
    for lo in range(0, n_feat, batch_size):
        hi = min(lo + batch_size, n_feat)
        logits = torch.from_numpy(W_dec_FD[lo:hi]).to(device) @ W_U.T
        top = logits.topk(k, dim=1)
        bot = logits.topk(k, dim=1, largest=False)
        out[0][lo:hi] = top.indices.cpu().numpy()
        out[1][lo:hi] = top.values.cpu().numpy()
        out[2][lo:hi] = bot.indices.cpu().numpy()
        out[3][lo:hi] = bot.values.cpu().numpy()
    return out[0], out[1], out[2], out[3]


def build_index(
    stats_df: pd.DataFrame,
    examples_df: pd.DataFrame,
    *,
    sae: str = "",
    logits: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None,
    vocab: dict[int, str] | None = None,
) -> pd.DataFrame:
    """One row per feature: stats, histogram, distinct activating tokens, logit tables."""
    n_feat = len(stats_df)
    index = stats_df.copy()
    index.insert(0, "sae", sae)
    tokens, counts = token_summary(examples_df, n_feat)
    index["top_tokens"] = tokens
    index["top_token_counts"] = counts
    if logits is not None:
        vocab = vocab or {}
        top_ids, top_vals, bot_ids, bot_vals = logits
        index["top_logit_ids"] = list(top_ids)
        index["top_logit_values"] = list(top_vals)
        index["top_logit_tokens"] = [[vocab.get(int(i), str(i)) for i in row] for row in top_ids]
        index["bottom_logit_ids"] = list(bot_ids)
        index["bottom_logit_values"] = list(bot_vals)
        index["bottom_logit_tokens"] = [[vocab.get(int(i), str(i)) for i in row] for row in bot_ids]
    return index


def search_features(
    index_df: pd.DataFrame, feature_id: int | None = None, token: str | None = None
) -> pd.DataFrame:
    """Features by id and/or by EXACT activating token (whitespace-trimmed, no substrings).

    A token search ranks features by how many of their top examples activate on that token.
    """
    out = index_df
    if feature_id is not None:
        out = out[out["feature_id"].to_numpy() == int(feature_id)]
    if token is not None:
        want = norm_token(token)
        hits = []
        for toks, cnts in zip(out["top_tokens"], out["top_token_counts"], strict=True):
            hits.append(
                sum(int(c) for t, c in zip(toks, cnts, strict=True) if norm_token(t) == want)
            )
        hits_arr = np.asarray(hits, dtype=np.int64)
        out = out.assign(token_hits=hits_arr)[hits_arr > 0]
        out = out.sort_values(["token_hits", "feature_id"], ascending=[False, True], kind="stable")
    return out.reset_index(drop=True)


# ----------------------------------------------------------------------------- I/O


EXAMPLES_SCHEMA = pa.schema(
    [
        ("feature_id", pa.int32()),
        ("rank", pa.int16()),
        ("activation", pa.float32()),
        ("seq_id", pa.int32()),
        ("pos", pa.int32()),
        ("token", pa.string()),
        ("center", pa.int16()),
        ("context_tokens", pa.list_(pa.string())),
        ("context_acts", pa.list_(pa.float32())),
        ("context_html", pa.string()),
    ]
)


def _index_schema(with_logits: bool) -> pa.Schema:
    fields = [
        ("sae", pa.string()),
        ("feature_id", pa.int32()),
        ("n_active", pa.int64()),
        ("density", pa.float64()),
        ("max_act", pa.float32()),
        ("mean_act", pa.float32()),
        ("hist_lo", pa.float32()),
        ("hist_hi", pa.float32()),
        ("hist_counts", pa.list_(pa.int32())),
        ("top_tokens", pa.list_(pa.string())),
        ("top_token_counts", pa.list_(pa.int32())),
    ]
    if with_logits:
        for side in ("top", "bottom"):
            fields += [
                (f"{side}_logit_ids", pa.list_(pa.int32())),
                (f"{side}_logit_values", pa.list_(pa.float32())),
                (f"{side}_logit_tokens", pa.list_(pa.string())),
            ]
    return pa.schema(fields)


def _to_table(df: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    arrays = []
    for field in schema:
        col = df[field.name]
        if pa.types.is_list(field.type):
            # lists and numpy arrays convert as they are (no per-element Python copies)
            arrays.append(pa.array(list(col), type=field.type))
        else:
            arrays.append(pa.array(col.to_numpy(), type=field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def write_parquet(df: pd.DataFrame, path: str | Path, schema: pa.Schema) -> None:
    """Atomic, byte-stable Parquet (explicit schema, no pandas metadata)."""
    with atomic_path(path) as tmp:
        pq.write_table(_to_table(df, schema), tmp, **PARQUET_OPTS)


def write_examples(df: pd.DataFrame, path: str | Path) -> None:
    write_parquet(df, path, EXAMPLES_SCHEMA)


def write_index(df: pd.DataFrame, path: str | Path) -> None:
    write_parquet(df, path, _index_schema("top_logit_ids" in df.columns))


def read_index(path: str | Path) -> pd.DataFrame:
    """A feature_index.parquet with list columns as Python lists."""
    table = pq.read_table(path)
    return pd.DataFrame({name: table.column(name).to_pylist() for name in table.column_names})


# ----------------------------------------------------------------------------- pipeline


def analysis_params(analysis: dict[str, Any]) -> dict[str, Any]:
    """The analysis entry with defaults filled in."""
    return {**DEFAULTS, **{k: v for k, v in analysis.items() if v is not None}}


CodeBlocks = Callable[[], Iterable[tuple[Any, np.ndarray, np.ndarray]]]


def stream_top_examples(
    blocks: CodeBlocks,
    n_feat: int,
    tokens: pd.DataFrame | Callable[[np.ndarray], pd.DataFrame],
    *,
    n_examples: int = 20,
    window: Any = (8, 4),
    n_bins: int = 30,
    n_blocks: int | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, TopExamplesState]:
    """(examples, stats, state) from codes read as a stream of (codes, seq_ids, positions) blocks.

    `blocks()` is called twice (two passes: top-n and ranges, then histograms and context
    values), so memory is one block plus O(features x n_examples), never O(tokens x features).
    `tokens` is the tokens table, or a function returning the rows of the given seq_ids (so only
    sequences that hold a top example are ever decoded).
    """
    state = TopExamplesState(n_feat, n_examples, n_bins)
    for csr, seq, pos in tqdm(blocks(), desc="top-n pass", total=n_blocks, file=sys.stderr):
        state.update(csr, seq, pos)
    top = state.top_frame()
    wanted = np.unique(top["seq_id"].to_numpy())
    tokens_df = tokens(wanted) if callable(tokens) else tokens
    by_seq = _tokens_by_seq(tokens_df)
    feats = top["feature_id"].to_numpy()
    plan = plan_contexts(feats, top["seq_id"].to_numpy(), top["pos"].to_numpy(), by_seq, window)
    lookup = ContextLookup(plan["flat_seq"], plan["flat_pos"], plan["flat_feat"], n_feat)
    for csr, seq, pos in tqdm(blocks(), desc="context pass", total=n_blocks, file=sys.stderr):
        state.update_hist(csr)
        lookup.update(csr, seq, pos)
    stats = state.stats_frame()
    scales = stats["max_act"].to_numpy()[feats].astype(np.float64)
    examples = assemble_examples(top, plan, lookup.result(), by_seq, scales)
    return examples, stats, state


def compute_top_examples(
    codes_NF: Any,
    seq_ids: np.ndarray,
    positions: np.ndarray,
    tokens_df: pd.DataFrame,
    *,
    n_examples: int = 20,
    window: Any = (8, 4),
    n_bins: int = 30,
    sae: str = "",
    W_dec_FD: np.ndarray | None = None,
    W_U_VD: np.ndarray | None = None,
    vocab_fn: Any = None,
    n_logits: int = 10,
    logit_batch_size: int = 512,
    device: Any = "cpu",
    blocks: CodeBlocks | None = None,
    n_feat: int | None = None,
    n_blocks: int | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(examples, feature index) of one SAE's codes; logits when W_dec and W_U are given.

    Codes are either one in-memory matrix (`codes_NF`, `seq_ids`, `positions`) or, with
    `codes_NF=None`, a stream `blocks` of `n_feat`-wide blocks (see `stream_top_examples`).
    `tokens_df` may be a function of the wanted seq_ids. `vocab_fn(ids) -> {id: string}` labels
    the logit tokens.
    """
    if codes_NF is not None:
        csr = as_csr(codes_NF)
        if len(seq_ids) != csr.shape[0] or len(positions) != csr.shape[0]:
            raise DataError(
                f"codes have {csr.shape[0]} rows but {len(seq_ids)} seq_ids / {len(positions)} pos"
            )
        n_feat = csr.shape[1]

        def blocks() -> list[tuple[Any, np.ndarray, np.ndarray]]:
            return [(csr, np.asarray(seq_ids), np.asarray(positions))]

    if blocks is None or n_feat is None:
        raise DataError("compute_top_examples: give codes_NF, or blocks and n_feat")
    examples, stats, state = stream_top_examples(
        blocks,
        int(n_feat),
        tokens_df,
        n_examples=n_examples,
        window=window,
        n_bins=n_bins,
        n_blocks=n_blocks,
    )
    logits = None
    vocab = None
    if W_dec_FD is not None and W_U_VD is not None:
        if W_dec_FD.shape[0] != n_feat:
            raise DataError(
                f"SAE {sae}: decoder has {W_dec_FD.shape[0]} features but codes have {n_feat}"
            )
        logits = logit_lens(W_dec_FD, W_U_VD, n_logits, batch_size=logit_batch_size, device=device)
        if vocab_fn is not None:
            vocab = vocab_fn(np.concatenate([logits[0].ravel(), logits[2].ravel()]))
    index = build_index(stats, examples, sae=sae, logits=logits, vocab=vocab)
    index.attrs["n_tokens"] = state.n_tokens
    return examples, index


def code_blocks(codes_path: str | Path, part: str | None) -> tuple[CodeBlocks, int, int]:
    """(blocks, d_sae, n_shards) of a code directory, read shard by shard on every call."""
    from saeflow.codes import iter_codes
    from saeflow.io import read_manifest

    directory = Path(codes_path)
    if directory.name == "manifest.json":
        directory = directory.parent
    manifest = read_manifest(directory)

    def blocks() -> Iterator[tuple[Any, np.ndarray, np.ndarray]]:
        for codes in iter_codes(directory, part):
            yield codes.to_scipy(), codes.seq_ids, codes.positions

    return blocks, int(manifest["d_sae"]), len(manifest.get("shards", []))


def tokens_reader(tokens_path: str | Path) -> Callable[[np.ndarray], pd.DataFrame]:
    """A function giving (seq_id, tokens) rows of the wanted seq_ids only.

    Only the two columns are read, as Arrow, and only the wanted rows become Python strings.
    """
    import pyarrow.compute as pc

    def read(seq_ids: np.ndarray) -> pd.DataFrame:
        try:
            table = pq.read_table(tokens_path, columns=["seq_id", "tokens"])
        except (OSError, pa.ArrowInvalid, KeyError) as err:
            raise DataError(f"{tokens_path}: cannot read seq_id, tokens ({err})") from None
        wanted = pa.array(np.asarray(seq_ids).astype(np.int64))
        mask = pc.is_in(table.column("seq_id").cast(pa.int64()), value_set=wanted)
        sub = table.filter(mask)
        return pd.DataFrame(
            {"seq_id": sub.column("seq_id").to_numpy(), "tokens": sub.column("tokens").to_pylist()}
        )

    return read


def run_top_examples(
    codes_path: str | Path,
    tokens_path: str | Path,
    *,
    analysis: dict[str, Any],
    model: dict[str, Any] | None,
    sae_spec: dict[str, Any] | None,
    runtime: dict[str, Any] | None,
    out_examples: str | Path,
    out_index: str | Path,
    out_page: str | Path | None,
    threads: int = 1,
    families: list[str] | None = None,
) -> dict[str, Any]:
    """The `top_examples` rule: stream codes, read tokens, SAE decoder and W_U; write outputs.

    Codes are read shard by shard, twice; only the sequences that hold a top example are decoded
    from the tokens table.
    """
    import torch

    from saeflow.devices import resolve_device
    from saeflow.geometry.weights import load_decoder, read_unembedding, token_strings_for
    from saeflow.utils import seed_everything

    params = analysis_params(analysis)
    seed_everything(int((runtime or {}).get("seed", 0)))
    torch.set_num_threads(max(1, int(threads)))
    blocks, d_sae, n_shards = code_blocks(codes_path, params.get("codes"))
    W_dec = W_U = None
    vocab_fn = None
    if model is not None and sae_spec is not None and params.get("n_logits", 0):
        W_dec = load_decoder(sae_spec)
        W_U = read_unembedding(
            model["path"],
            revision=model.get("revision"),
            fold_final_norm=bool(params["fold_final_norm"]),
        )

        def vocab_fn(ids: np.ndarray) -> dict[int, str]:
            return token_strings_for(
                model["path"],
                ids,
                revision=model.get("revision"),
                trust_remote_code=bool(model.get("trust_remote_code", False)),
            )

    device = resolve_device(runtime)
    examples, index = compute_top_examples(
        None,
        np.zeros(0),
        np.zeros(0),
        tokens_reader(tokens_path),
        n_examples=int(params["n_examples"]),
        window=params["window"],
        n_bins=int(params["n_bins"]),
        sae=str((sae_spec or {}).get("name", analysis.get("sae", ""))),
        W_dec_FD=W_dec,
        W_U_VD=W_U,
        vocab_fn=vocab_fn,
        n_logits=int(params["n_logits"]),
        logit_batch_size=int(params["logit_batch_size"]),
        device=device,
        blocks=blocks,
        n_feat=d_sae,
        n_blocks=n_shards,
    )
    write_examples(examples, out_examples)
    write_index(index, out_index)
    if out_page:
        from saeflow.report import write_dashboard_page

        write_dashboard_page(
            out_page,
            index,
            examples,
            analysis=analysis,
            page_features=int(params["page_features"]),
            page_examples=int(params["page_examples"]),
            families=families or [],
        )
    summary = {
        "n_tokens": int(index.attrs["n_tokens"]),
        "d_sae": int(d_sae),
        "dead": int((index["n_active"] == 0).sum()),
        "n_examples": int(len(examples)),
    }
    log.info("top_examples %s: %s", analysis.get("name"), summary)
    return summary
