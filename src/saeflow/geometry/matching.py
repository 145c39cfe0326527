"""Matching features of two SAEs by the Pearson correlation of their activations.

The full [F_a, F_b] correlation matrix of two 16k-32k SAEs does not fit in memory (and most of
it is never needed), and neither do the codes of a long run. So the codes are read as a stream of
aligned token blocks (shard by shard) and only sufficient statistics are kept: column sums and
sums of squares of both sides (O(F)) and, for one slice of B's columns per pass, the dense
cross-product block `A^T B[:, slice]` that every token block adds its sparse product into (N_s *
k_a * k_b multiply-adds per block: codes are sparse). Time is linear in tokens (each pass reads
every block once), memory flat: one block plus the Gram slice. The slice is then turned into
correlations with the column means and standard deviations in `batch_size`-column batches, and
only the top-k of each row and column is kept. A -> B is merged across batches; B -> A is complete
inside its batch. The two directions differ (argmax is not symmetric), so both are kept and mutual
nearest neighbours flagged.

Features with zero variance (dead, or constant) have no defined correlation: they are masked out of
the ranking and get no match rows, so no NaN ever reaches the outputs.

Memory: the largest objects alive are the Gram slice (F_a * pass columns float32), one block's
sparse product and the correlation batch; `peak_batch_bytes` in the stats is the sum of their
actual sizes, measured batch by batch (on CUDA also `torch.cuda.max_memory_allocated`).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
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

DEFAULTS: dict[str, Any] = {"top_k": 5, "batch_size": 1024, "codes": None}
PARQUET_OPTS: dict[str, Any] = {"compression": "zstd", "compression_level": 3}
MATCHES_SCHEMA = pa.schema(
    [
        ("direction", pa.string()),
        ("source_sae", pa.string()),
        ("source_feature", pa.int32()),
        ("rank", pa.int16()),
        ("target_sae", pa.string()),
        ("target_feature", pa.int32()),
        ("corr", pa.float32()),
        ("decoder_cos", pa.float32()),
        ("mutual", pa.bool_()),
    ]
)


@dataclass
class MatchResult:
    """Top-k matches in both directions; ids are -1 (and corr 0) where there is no match."""

    a_to_b_ids: np.ndarray  # int32 [F_a, k]
    a_to_b_corr: np.ndarray  # float32 [F_a, k]
    b_to_a_ids: np.ndarray  # int32 [F_b, k]
    b_to_a_corr: np.ndarray  # float32 [F_b, k]
    dead_a: np.ndarray  # bool [F_a]: zero variance
    dead_b: np.ndarray  # bool [F_b]
    stats: dict[str, Any] = field(default_factory=dict)

    def mutual_a(self) -> np.ndarray:
        """bool [F_a]: a's best b has a as its best a (mutual nearest neighbours)."""
        best = self.a_to_b_ids[:, 0]
        ok = best >= 0
        out = np.zeros(len(best), dtype=bool)
        out[ok] = self.b_to_a_ids[best[ok], 0] == np.flatnonzero(ok)
        return out


def column_moments(codes_NF: sp.spmatrix) -> tuple[np.ndarray, np.ndarray]:
    """Column mean and population std (float64) of a sparse matrix, zeros included."""
    n = codes_NF.shape[0]
    csc = sp.csc_matrix(codes_NF, dtype=np.float64)
    mean = np.asarray(csc.sum(axis=0)).ravel() / n
    sq = np.asarray(csc.multiply(csc).sum(axis=0)).ravel() / n
    var = np.maximum(sq - mean**2, 0.0)
    return mean, np.sqrt(var)


def zero_variance(mean: np.ndarray, std: np.ndarray, rtol: float = 1e-6) -> np.ndarray:
    """Features whose variance is zero up to rounding of E[x^2] - E[x]^2."""
    scale = np.sqrt(mean**2 + std**2)
    return ~(std > rtol * np.maximum(scale, 1e-30))


def _sparse_nbytes(mat: sp.spmatrix) -> int:
    return int(mat.data.nbytes + mat.indices.nbytes + mat.indptr.nbytes)


def _tensor_nbytes(t: Any) -> int:
    """Bytes held by a dense or sparse torch tensor (values plus index arrays)."""
    import torch

    if t.layout == torch.sparse_csr:
        parts = (t.values(), t.col_indices(), t.crow_indices())
    elif t.layout == torch.sparse_coo:
        parts = (t.values(), t.indices())
    else:
        parts = (t,)
    return int(sum(p.numel() * p.element_size() for p in parts))


def _torch_csr(mat: sp.csr_matrix, device: Any) -> Any:
    import torch

    return torch.sparse_csr_tensor(
        torch.from_numpy(mat.indptr.astype(np.int64)),
        torch.from_numpy(mat.indices.astype(np.int64)),
        torch.from_numpy(mat.data.astype(np.float32)),
        size=mat.shape,
        device=device,
    )


# A prepared block of aligned tokens: A^T as CSR [F_a, n] and B as CSC [n, F_b].
PairBlocks = Callable[[], Iterable[tuple[sp.csr_matrix, sp.csc_matrix]]]
# Columns of B per pass over the codes in the file-streaming stage: the pass's Gram block is
# F_a x columns float32, so this bounds the stage's memory whatever the number of tokens.
GRAM_PASS_BYTES = 256 * 2**20


def prepare_pair(A: sp.csr_matrix, B: sp.csr_matrix) -> tuple[sp.csr_matrix, sp.csc_matrix]:
    """One aligned block in the layout the Gram products want (A^T rows, B columns)."""
    return A.T.tocsr(), B.tocsc()


def match_features(
    codes_a: Any,
    codes_b: Any,
    *,
    top_k: int = 5,
    batch_size: int = 1024,
    device: Any = "cpu",
) -> MatchResult:
    """Top-k Pearson matches A -> B and B -> A of two code matrices over the same N tokens.

    `codes_a` [N, F_a] and `codes_b` [N, F_b] are scipy sparse (or `saeflow.codes.Codes`); the
    in-memory form of `match_features_stream` (one block, one batch of B's columns per pass).
    """
    if top_k < 1:
        raise ConfigError(f"top_k: must be >= 1, got {top_k}")
    if batch_size < 1:
        raise ConfigError(f"batch_size: must be >= 1, got {batch_size}")
    A = _csr(codes_a)
    B = _csr(codes_b)
    if A.shape[0] != B.shape[0]:
        raise DataError(f"codes cover {A.shape[0]} and {B.shape[0]} tokens; align them first")
    pair = prepare_pair(A, B)
    return match_features_stream(
        lambda: [pair],
        A.shape[1],
        B.shape[1],
        top_k=top_k,
        batch_size=batch_size,
        device=device,
    )


def match_features_stream(
    blocks: PairBlocks,
    fa: int,
    fb: int,
    *,
    top_k: int = 5,
    batch_size: int = 1024,
    device: Any = "cpu",
    pass_columns: int | None = None,
    n_blocks: int | None = None,
) -> MatchResult:
    """Top-k Pearson matches from aligned token blocks read as a stream.

    Sufficient statistics are accumulated block by block: column sums and sums of squares of A
    and B (O(F), first pass) and the cross-products A^T B for `pass_columns` columns of B at a time
    (a dense F_a x pass_columns block; each block adds its sparse product into it). Every pass
    reads the blocks once, so time is linear in tokens and memory flat: one block of codes plus
    the Gram block. Correlations and top-k then run in `batch_size`-column batches on the device.
    On CUDA the block products are sparse x sparse on the GPU.
    """
    import torch

    if top_k < 1:
        raise ConfigError(f"top_k: must be >= 1, got {top_k}")
    if batch_size < 1:
        raise ConfigError(f"batch_size: must be >= 1, got {batch_size}")
    width = max(batch_size, int(pass_columns or batch_size))
    width = -(-width // batch_size) * batch_size
    device = torch.device(device)
    k_ab, k_ba = min(top_k, fb), min(top_k, fa)
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    gpu_spgemm = on_cuda
    f32 = {"dtype": torch.float32, "device": device}
    neg_inf = float("-inf")
    sums = {"a": np.zeros(fa), "a2": np.zeros(fa), "b": np.zeros(fb), "b2": np.zeros(fb)}
    n = 0
    run_vals = torch.full((fa, k_ab), neg_inf, **f32)
    run_ids = torch.full((fa, k_ab), -1, dtype=torch.int64, device=device)
    b_ids = np.full((fb, k_ba), -1, dtype=np.int32)
    b_corr = np.zeros((fb, k_ba), dtype=np.float32)
    peak = 0
    passes = range(0, fb, width)
    moments: tuple[np.ndarray, ...] | None = None
    for p_lo in tqdm(passes, desc="match passes", file=sys.stderr, mininterval=5):
        p_hi = min(p_lo + width, fb)
        G = torch.zeros((fa, p_hi - p_lo), **f32)
        alive = _tensor_nbytes(G)
        block_peak = 0
        for A_T, B_csc in tqdm(
            blocks(), desc="blocks", total=n_blocks, file=sys.stderr, mininterval=5, leave=False
        ):
            if A_T.shape[1] != B_csc.shape[0]:
                raise DataError(f"code blocks cover {A_T.shape[1]} and {B_csc.shape[0]} tokens")
            if moments is None:
                n += A_T.shape[1]
                a64, b64 = A_T.data.astype(np.float64), B_csc.data.astype(np.float64)
                rows_a = np.repeat(np.arange(fa), np.diff(A_T.indptr))
                cols_b = np.repeat(np.arange(fb), np.diff(B_csc.indptr))
                sums["a"] += np.bincount(rows_a, weights=a64, minlength=fa)
                sums["a2"] += np.bincount(rows_a, weights=a64 * a64, minlength=fa)
                sums["b"] += np.bincount(cols_b, weights=b64, minlength=fb)
                sums["b2"] += np.bincount(cols_b, weights=b64 * b64, minlength=fb)
            block = B_csc[:, p_lo:p_hi].tocsr()
            here = _sparse_nbytes(block) + _sparse_nbytes(A_T)
            if gpu_spgemm:
                try:
                    gram = torch.sparse.mm(_torch_csr(A_T, device), _torch_csr(block, device))
                    here += _tensor_nbytes(gram)
                    G += gram.to_dense()
                    del gram
                    block_peak = max(block_peak, here + _tensor_nbytes(G))
                    continue
                except (RuntimeError, NotImplementedError) as err:
                    # a torch build without CUDA SpGEMM: products on CPU, the rest on the GPU
                    log.warning(
                        "sparse x sparse on %s failed (%s); Gram blocks on CPU", device, err
                    )
                    gpu_spgemm = False
            gram_sp = (A_T @ block).tocoo()  # [F_a, width] sparse, canonical: no duplicates
            here += int(gram_sp.data.nbytes + gram_sp.row.nbytes + gram_sp.col.nbytes)
            if device.type == "cpu":
                # canonical product: each (row, col) once, so a fancy-index add is exact
                flat = gram_sp.row.astype(np.int64) * G.shape[1] + gram_sp.col
                G.numpy().reshape(-1)[flat] += gram_sp.data
                block_peak = max(block_peak, here + flat.nbytes)
            else:
                index = (
                    torch.from_numpy(gram_sp.row.astype(np.int64)).to(device),
                    torch.from_numpy(gram_sp.col.astype(np.int64)).to(device),
                )
                G.index_put_(index, torch.from_numpy(gram_sp.data).to(device), accumulate=True)
                block_peak = max(block_peak, here + 2 * index[0].numel() * 8)
            del gram_sp
        if moments is None:
            if n < 2:
                raise DataError(f"need at least 2 shared tokens to correlate, got {n}")
            mean_a, mean_b = sums["a"] / n, sums["b"] / n
            std_a = np.sqrt(np.maximum(sums["a2"] / n - mean_a**2, 0.0))
            std_b = np.sqrt(np.maximum(sums["b2"] / n - mean_b**2, 0.0))
            dead_a, dead_b = zero_variance(mean_a, std_a), zero_variance(mean_b, std_b)
            moments = (mean_a, std_a, mean_b, std_b, dead_a, dead_b)
            mu_a = torch.as_tensor(mean_a, **f32)
            inv_sd_a = torch.as_tensor(
                np.where(dead_a, 0.0, 1.0 / np.where(dead_a, 1.0, std_a)), **f32
            )
            dead_a_t = torch.as_tensor(dead_a, device=device)
        mean_a, std_a, mean_b, std_b, dead_a, dead_b = moments
        for lo in range(p_lo, p_hi, batch_size):
            hi = min(lo + batch_size, p_hi)
            corr = G[:, lo - p_lo : hi - p_lo]
            batch_alive = alive + block_peak
            mu_b = torch.as_tensor(mean_b[lo:hi], **f32)
            inv_sd_b = torch.as_tensor(
                np.where(dead_b[lo:hi], 0.0, 1.0 / np.where(dead_b[lo:hi], 1.0, std_b[lo:hi])),
                **f32,
            )
            # corr = (G / N - mu_a mu_b^T) / (sd_a sd_b^T), computed in place on G
            corr.div_(n).sub_(mu_a[:, None] * mu_b[None, :])
            corr.mul_(inv_sd_a[:, None]).mul_(inv_sd_b[None, :]).clamp_(-1.0, 1.0)
            mask = dead_a_t[:, None] | torch.as_tensor(dead_b[lo:hi], device=device)[None, :]
            corr.masked_fill_(mask, neg_inf)
            batch_alive += _tensor_nbytes(mask) + 2 * _tensor_nbytes(mu_b)
            batch_alive += _tensor_nbytes(corr) if width > batch_size else 0
            # A -> B: merge this batch's best into the running top-k
            kb = min(k_ab, hi - lo)
            bv, bi = corr.topk(kb, dim=1)
            cand_v = torch.cat([run_vals, bv], dim=1)
            cand_i = torch.cat([run_ids, bi + lo], dim=1)
            sel_v, sel = cand_v.topk(k_ab, dim=1)
            run_vals, run_ids = sel_v, cand_i.gather(1, sel)
            # B -> A: complete within the batch
            av, ai = corr.topk(k_ba, dim=0)  # [k, bs]
            batch_alive += 2 * (_tensor_nbytes(bv) + _tensor_nbytes(bi) + _tensor_nbytes(av))
            batch_alive += 2 * (_tensor_nbytes(cand_v) + _tensor_nbytes(cand_i))
            av_np, ai_np = av.T.cpu().numpy(), ai.T.cpu().numpy()
            found = np.isfinite(av_np)
            b_ids[lo:hi] = np.where(found, ai_np, -1)
            b_corr[lo:hi] = np.where(found, av_np, 0.0)
            peak = max(peak, batch_alive)
            del corr, mask, bv, bi, av, ai, cand_v, cand_i
        del G
    if moments is None:
        raise DataError("need at least 2 shared tokens to correlate, got 0")
    dead_a, dead_b = moments[4], moments[5]
    vals = run_vals.cpu().numpy()
    found = np.isfinite(vals)
    a_ids = np.where(found, run_ids.cpu().numpy(), -1).astype(np.int32)
    a_corr = np.where(found, vals, 0.0).astype(np.float32)
    stats = {
        "n_tokens": int(n),
        "d_sae_a": int(fa),
        "d_sae_b": int(fb),
        "top_k": int(top_k),
        "batch_size": int(batch_size),
        "n_batches": len(range(0, fb, batch_size)),
        "n_passes": len(passes),
        "device": str(device),
        "peak_batch_bytes": int(peak),
        "full_matrix_bytes": int(fa) * int(fb) * 4,
    }
    if on_cuda:
        stats["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return MatchResult(a_ids, a_corr, b_ids, b_corr, dead_a, dead_b, stats)


def _csr(codes: Any) -> sp.csr_matrix:
    if hasattr(codes, "to_scipy"):
        codes = codes.to_scipy()
    return sp.csr_matrix(codes, dtype=np.float32)


def aligned_code_blocks(
    path_a: str | Path, part_a: str | None, path_b: str | Path, part_b: str | None
) -> tuple[PairBlocks, int, int, int, int]:
    """(blocks, F_a, F_b, n_blocks, n_dropped): shard-sized blocks of the tokens both hold.

    Only the (seq_id, pos) columns are read up front (8 bytes a token per side); each call of
    `blocks()` then walks A's shards and fetches the B rows of the same tokens from the B shards
    that hold them (at most the ones the current A shard needs are kept), so memory is one or two
    shards per side. Tokens present on one side only are dropped.
    """
    from saeflow.codes import shard_keys, shard_readers
    from saeflow.io import read_manifest

    keys_a = [row_keys(s, p) for s, p in shard_keys(path_a, part_a)]
    keys_b = [row_keys(s, p) for s, p in shard_keys(path_b, part_b)]
    read_a, read_b = shard_readers(path_a, part_a), shard_readers(path_b, part_b)
    widths = [
        int(read_manifest(Path(p).parent if Path(p).name == "manifest.json" else p)["d_sae"])
        for p in (path_a, path_b)
    ]
    flat_a = np.concatenate(keys_a) if keys_a else np.zeros(0, np.int64)
    flat_b = np.concatenate(keys_b) if keys_b else np.zeros(0, np.int64)
    shared = np.intersect1d(flat_a, flat_b, assume_unique=True)
    if len(shared) == 0:
        raise DataError("the two code sets share no (seq_id, pos) token; match needs one dataset")
    dropped = len(flat_a) + len(flat_b) - 2 * len(shared)
    b_order = np.argsort(flat_b, kind="stable")
    b_sorted = flat_b[b_order]
    b_offsets = np.cumsum([0] + [len(k) for k in keys_b])

    def blocks() -> Iterator[tuple[sp.csr_matrix, sp.csc_matrix]]:
        cache: dict[int, sp.csr_matrix] = {}
        for i, keys in enumerate(keys_a):
            in_shared = np.isin(keys, shared, assume_unique=True)
            if not in_shared.any():
                continue
            a_rows = np.flatnonzero(in_shared)
            b_glob = b_order[np.searchsorted(b_sorted, keys[a_rows])]
            b_shard = np.searchsorted(b_offsets, b_glob, side="right") - 1
            need = np.unique(b_shard).tolist()
            cache = {s: cache[s] if s in cache else read_b[s]().to_scipy() for s in need}
            pieces, where = [], []
            for s in need:
                idx = np.flatnonzero(b_shard == s)
                pieces.append(cache[s][b_glob[idx] - b_offsets[s]])
                where.append(idx)
            B = sp.vstack(pieces, format="csr") if len(pieces) > 1 else pieces[0]
            B = B[np.argsort(np.concatenate(where), kind="stable")]
            A = read_a[i]().to_scipy()
            A = A if len(a_rows) == A.shape[0] else A[a_rows]
            yield prepare_pair(A, sp.csr_matrix(B, dtype=np.float32))

    return blocks, widths[0], widths[1], len(keys_a), int(dropped)


def row_keys(seq_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """One int64 key per (seq_id, pos): seq_id in the high 32 bits."""
    return (np.asarray(seq_ids, np.int64) << 32) | np.asarray(positions, np.int64)


def align_codes(codes_a: Any, codes_b: Any) -> tuple[sp.csr_matrix, sp.csr_matrix, int]:
    """Rows of two `Codes` restricted to their shared (seq_id, pos) tokens, in the same order.

    Returns (A, B, n_dropped): tokens present in only one of the two are dropped.
    """
    key_a = codes_a.seq_ids.astype(np.int64) << 32 | codes_a.positions.astype(np.int64)
    key_b = codes_b.seq_ids.astype(np.int64) << 32 | codes_b.positions.astype(np.int64)
    if len(key_a) == len(key_b) and np.array_equal(key_a, key_b):
        return _csr(codes_a), _csr(codes_b), 0
    shared, ia, ib = np.intersect1d(key_a, key_b, assume_unique=True, return_indices=True)
    if len(shared) == 0:
        raise DataError("the two code sets share no (seq_id, pos) token; match needs one dataset")
    dropped = len(key_a) + len(key_b) - 2 * len(shared)
    return _csr(codes_a)[ia], _csr(codes_b)[ib], int(dropped)


def check_same_tokens(tokens_a: pd.DataFrame, tokens_b: pd.DataFrame, where: str = "") -> None:
    """Matching by position is only meaningful when both models saw the same token ids."""
    a = dict(zip(tokens_a["seq_id"].astype(int), tokens_a["token_ids"], strict=True))
    b = dict(zip(tokens_b["seq_id"].astype(int), tokens_b["token_ids"], strict=True))
    for seq in sorted(set(a) & set(b)):
        if not np.array_equal(np.asarray(a[seq]), np.asarray(b[seq])):
            raise DataError(
                f"{where}seq_id {seq} has different token ids in the two models' tokens "
                "(different tokenizers); features cannot be matched position by position"
            )


def decoder_cosine(
    W_a_FD: np.ndarray, W_b_FD: np.ndarray, ia: np.ndarray, ib: np.ndarray
) -> np.ndarray:
    """Cosine similarity of decoder rows W_a[ia[i]] and W_b[ib[i]] (0 for a zero row)."""
    a = np.asarray(W_a_FD, dtype=np.float32)[ia]
    b = np.asarray(W_b_FD, dtype=np.float32)[ib]
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    denom = na * nb
    dots = np.einsum("ij,ij->i", a, b)
    return np.divide(dots, denom, out=np.zeros_like(dots), where=denom > 0).astype(np.float32)


def matches_table(
    result: MatchResult,
    *,
    sae_a: str = "a",
    sae_b: str = "b",
    W_dec_a: np.ndarray | None = None,
    W_dec_b: np.ndarray | None = None,
) -> pd.DataFrame:
    """Long table: one row per (direction, source feature, rank) with a real match.

    `decoder_cos` is filled when both decoders are given and live in the same d_model space;
    otherwise it is null (not NaN). `mutual` is set on rank-0 rows of mutual pairs.
    """
    with_cos = W_dec_a is not None and W_dec_b is not None and W_dec_a.shape[1] == W_dec_b.shape[1]
    mutual_a = result.mutual_a()
    frames = []
    for direction, ids, corr, src, dst in (
        ("a_to_b", result.a_to_b_ids, result.a_to_b_corr, sae_a, sae_b),
        ("b_to_a", result.b_to_a_ids, result.b_to_a_corr, sae_b, sae_a),
    ):
        f, r = np.nonzero(ids >= 0)
        target = ids[f, r]
        if with_cos:
            pair = (f, target) if direction == "a_to_b" else (target, f)
            cos = decoder_cosine(W_dec_a, W_dec_b, pair[0], pair[1])
        else:
            cos = np.full(len(f), np.nan, np.float32)
        if direction == "a_to_b":
            mutual = (r == 0) & mutual_a[f]
        else:
            mutual = (
                (r == 0) & (target >= 0) & mutual_a[target] & (result.a_to_b_ids[target, 0] == f)
            )
        frames.append(
            pd.DataFrame(
                {
                    "direction": direction,
                    "source_sae": src,
                    "source_feature": f.astype(np.int32),
                    "rank": r.astype(np.int16),
                    "target_sae": dst,
                    "target_feature": target.astype(np.int32),
                    "corr": corr[f, r].astype(np.float32),
                    "decoder_cos": cos,
                    "mutual": mutual,
                }
            )
        )
    out = pd.concat(frames, ignore_index=True)
    out.attrs["has_decoder_cos"] = with_cos
    return out


def match_summary(result: MatchResult, table: pd.DataFrame) -> dict[str, Any]:
    """Headline numbers: dead counts, mutual pairs, top-1 correlation quantiles, splits."""

    def quantiles(x: np.ndarray) -> dict[str, float]:
        if len(x) == 0:
            return {}
        q = np.quantile(x, [0.1, 0.5, 0.9])
        return {"p10": float(q[0]), "median": float(q[1]), "p90": float(q[2])}

    top_ab = result.a_to_b_corr[result.a_to_b_ids[:, 0] >= 0, 0]
    top_ba = result.b_to_a_corr[result.b_to_a_ids[:, 0] >= 0, 0]
    best_a_of_b = result.b_to_a_ids[:, 0]
    counts = np.bincount(best_a_of_b[best_a_of_b >= 0], minlength=len(result.dead_a))
    mutual_rows = table[table["mutual"] & (table["direction"] == "a_to_b")]
    summary = {
        **result.stats,
        "dead_a": int(result.dead_a.sum()),
        "dead_b": int(result.dead_b.sum()),
        "n_mutual": int(len(mutual_rows)),
        "top1_corr_a_to_b": quantiles(top_ab),
        "top1_corr_b_to_a": quantiles(top_ba),
        "frac_a_top1_above_0.9": float(np.mean(top_ab > 0.9)) if len(top_ab) else 0.0,
        "frac_b_top1_above_0.9": float(np.mean(top_ba > 0.9)) if len(top_ba) else 0.0,
        # a feature of A that is the best match of >= 2 features of B: candidate split
        "n_a_split_candidates": int((counts >= 2).sum()),
    }
    if table.attrs.get("has_decoder_cos") and len(mutual_rows):
        summary["mutual_decoder_cos_median"] = float(np.median(mutual_rows["decoder_cos"]))
    return summary


def write_matches(table: pd.DataFrame, path: str | Path) -> None:
    """Atomic, byte-stable Parquet; decoder_cos is null where it was not computed."""
    arrays = []
    for fld in MATCHES_SCHEMA:
        values = table[fld.name].to_numpy()
        if fld.name == "decoder_cos":
            arrays.append(pa.array(values, type=fld.type, mask=np.isnan(values)))
        else:
            arrays.append(pa.array(values, type=fld.type))
    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_arrays(arrays, schema=MATCHES_SCHEMA), tmp, **PARQUET_OPTS)


def read_matches(path: str | Path) -> pd.DataFrame:
    return pq.read_table(path).to_pandas()


def run_match_features(
    codes_a_path: str | Path,
    codes_b_path: str | Path,
    *,
    analysis: dict[str, Any],
    sae_a_spec: dict[str, Any] | None,
    sae_b_spec: dict[str, Any] | None,
    runtime: dict[str, Any] | None,
    out_matches: str | Path,
    out_summary: str | Path,
    out_page: str | Path | None = None,
    tokens_a_path: str | Path | None = None,
    tokens_b_path: str | Path | None = None,
    threads: int = 1,
) -> dict[str, Any]:
    """The `match_features` rule: stream aligned codes, match, add decoder cosines, write outputs.

    Each pass over the codes covers `GRAM_PASS_BYTES / (4 F_a)` columns of B (at least one batch),
    so memory is bounded whatever the number of tokens.
    """
    import torch

    from saeflow.devices import resolve_device
    from saeflow.geometry.weights import load_decoder
    from saeflow.io import write_json
    from saeflow.tokenize import load_tokens
    from saeflow.utils import seed_everything

    params = {**DEFAULTS, **{k: v for k, v in analysis.items() if v is not None}}
    seed_everything(int((runtime or {}).get("seed", 0)))
    torch.set_num_threads(max(1, int(threads)))
    if tokens_a_path and tokens_b_path and str(tokens_a_path) != str(tokens_b_path):
        check_same_tokens(
            load_tokens(tokens_a_path), load_tokens(tokens_b_path), f"{analysis.get('name')}: "
        )
    part = params.get("codes")
    blocks, fa, fb, n_blocks, dropped = aligned_code_blocks(
        codes_a_path,
        params["a"].get("codes", part),
        codes_b_path,
        params["b"].get("codes", part),
    )
    if dropped:
        log.warning(
            "%s: %d tokens present in only one code set were dropped", codes_a_path, dropped
        )
    device = resolve_device(runtime)
    batch_size = int(params["batch_size"])
    result = match_features_stream(
        blocks,
        fa,
        fb,
        top_k=int(params["top_k"]),
        batch_size=batch_size,
        device=device,
        pass_columns=max(batch_size, GRAM_PASS_BYTES // (4 * max(fa, 1))),
        n_blocks=n_blocks,
    )
    W_a = load_decoder(sae_a_spec) if sae_a_spec else None
    W_b = load_decoder(sae_b_spec) if sae_b_spec else None
    name_a = side_label(params["a"])
    name_b = side_label(params["b"])
    table = matches_table(result, sae_a=name_a, sae_b=name_b, W_dec_a=W_a, W_dec_b=W_b)
    summary = match_summary(result, table)
    summary.update({"a": dict(params["a"]), "b": dict(params["b"]), "tokens_dropped": dropped})
    write_matches(table, out_matches)
    write_json(out_summary, summary)
    if out_page:
        from saeflow.report import write_match_page

        write_match_page(out_page, table, summary, analysis=analysis)
    log.info("match_features %s: %s", analysis.get("name"), summary)
    return summary


def side_label(side: dict[str, Any]) -> str:
    """The SAE name that identifies one side in the matches table (decoder UMAP keys on it)."""
    return str(side["sae"])
