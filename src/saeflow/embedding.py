"""UMAP of codes (or activations) at subsampled positions, laid out like the seed notebooks.

Positions follow canrager/dynamic_representations `exp/pred_umap.py` bit for bit:
  linear:  torch.linspace(min_p, max_p, num_p, dtype=int)
  log:     round(10 ** torch.linspace(log10(min_p), log10(max_p), num_p)).int()   (float32)
The log formula is undefined for min_p = 0, so there the `geometry_population.py` form is used:
  round(10 ** linspace(log10(1), log10(max_p + 1), num_p) - 1).clamp(0, max_p).
Like the notebooks, positions are neither deduplicated nor sorted again: a log grid over a short
range repeats positions, and every repeat is a point. Only sequences longer than max_p are used,
so every sequence has every position (the results.json arrays are B x P).

UMAP cost: umap-learn compiles numba kernels in every new process (PERF.md), and its own kNN
search (NN-descent) is slow and inexact on wide dense codes. So the kNN graph is computed here and
passed as `precomputed_knn`, which also skips NN-descent's ~50 s compile:
- up to EXACT_KNN_MAX_POINTS points (`knn: auto`), or always with `knn: exact`: exact brute force
  (scikit-learn, distance blocks of KNN_WORKING_MB);
- above, or with `knn: approximate`: for dense Euclidean input, candidates from an exact search in
  a seeded PCA projection re-ranked on their true distances (`approximate_knn`); for sparse input
  or other metrics, NN-descent (pynndescent). The log names the method used.
Gathered codes at least DENSE_ABOVE dense are handed over as a dense array, never as CSR.
Mitigation for the compile:
- `enable_numba_cache(dir)` turns on numba's on-disk cache for umap's own kernels (umap does not
  ask for it), so that a warm-up job (`warmup`) can compile them into a shared directory while
  earlier stages run. The cache only stores machine code; results are identical with or without.

This module also holds the row-gathering layer shared by the diffing and similarity stages:
`gather_rows` picks (seq_id, pos) rows out of a codes or activations directory, shard by shard.
"""

from __future__ import annotations

import contextlib
import html
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp
from tqdm import tqdm

from saeflow.errors import ConfigError, DataError
from saeflow.io import atomic_path, read_manifest, write_json

log = logging.getLogger("saeflow.embedding")

CODE_KINDS = ("pred", "novel", "total", "activations")
PARQUET_OPTS: dict[str, Any] = {"compression": "zstd", "compression_level": 3}
# Matches chat-template markers such as <start_of_turn>, <|im_start|>, <bos>: highlighted in hovers.
MARKER = re.compile(r"^<\|?[A-Za-z][A-Za-z0-9_]*\|?>$")
HOVER_LINE_TOKENS = 15  # a <br> every 15 tokens, as in the notebooks
KNN_WORKING_MB = 256
# kNN: exact (brute force) up to this many points, approximate above (see `knn_graph`). Brute
# force costs N^2 x D: at 10k points of 9216-wide codes about 40 s on 2 cores, 30k about 6 min.
EXACT_KNN_MAX_POINTS = 10_000
KNN_METHODS = ("auto", "exact", "approximate")
APPROX_PCA_DIMS = 512  # projection the approximate search finds candidates in
APPROX_CANDIDATES = 3  # candidates per neighbour re-ranked on true distances
PCA_SAMPLE = 4096  # points the projection's principal axes are estimated on
RERANK_BLOCK = 256  # points re-ranked together (one GEMM against their candidates' union)
# Gathered codes at least this dense go to the kNN search as a dense array: CSR kNN on dense
# codes is ~30x slower, and a CSR row costs 8 bytes a non-zero against 4 a column dense.
DENSE_ABOVE = 0.25
UMAP_DEFAULTS: dict[str, Any] = {
    "min_p": 0,
    "max_p": 49,
    "num_p": 20,
    "log_scale": False,
    "n_components": 3,
    "n_neighbors": 15,
    "min_dist": 0.1,
    "metric": "euclidean",
    "random_state": 42,
    "hover_window": 50,
    "n_epochs": None,
    "num_sequences": None,
    "knn": "auto",
}


# ----------------------------------------------------------------------------- row gathering


def _source_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.parent if path.name == "manifest.json" else path


def resolve_part(path: str | os.PathLike, kind: str | None, default: str | None) -> str | None:
    """The `saeflow.codes` part for a code kind, checked against the directory's parts.

    A per-token SAE has one part: kind None/total means it, pred/novel are errors. A temporal SAE
    has novel and pred; None means `default` (pred for umap/similarity, total for diffing).
    """
    manifest = read_manifest(_source_dir(path))
    parts = manifest.get("parts") or {}
    if "novel" in parts and "pred" in parts:
        chosen = kind or default or "total"
        if chosen not in ("pred", "novel", "total"):
            raise ConfigError(f"codes = {chosen!r}: one of pred, novel, total, activations")
        return chosen
    if kind in (None, "total", "codes"):
        return None
    raise ConfigError(
        f"codes = {kind!r}: needs a temporal SAE, but {_source_dir(path)} holds one code part"
    )


RowBlock = tuple[np.ndarray, np.ndarray, Callable[[np.ndarray], "sp.csr_matrix | np.ndarray"]]


def iter_row_blocks(path: str | os.PathLike, kind: str | None) -> Iterator[RowBlock]:
    """Yield (seq_ids, positions, take) per shard; `take(rows)` returns those rows only.

    Rows come back as CSR float32 codes, or dense float32 rows for activations and for dense code
    shards (exact predictable codes), which are never turned into CSR. `kind` is "activations"
    (an activations directory) or a part from `resolve_part`. Taking rows lazily means a shard's
    codes are never converted as a whole when only a few of its tokens are wanted.
    """
    if kind == "activations":
        from saeflow.activations import iter_activation_shards

        for seq_ids, positions, acts_ND in iter_activation_shards(path):
            yield seq_ids, positions, lambda rows, a=acts_ND: a[rows].float().numpy()
        return
    from saeflow.codes import DenseCodes, iter_codes

    def take(codes: Any, rows: np.ndarray) -> sp.csr_matrix | np.ndarray:
        if isinstance(codes, DenseCodes):
            return codes.codes_NF[rows].astype(np.float32, copy=False)
        if len(rows) == len(codes):
            return codes.to_scipy()
        mask = np.zeros(len(codes), bool)
        mask[rows] = True
        return codes.select(mask).to_scipy()

    for codes in iter_codes(path, kind):
        yield codes.seq_ids, codes.positions, lambda rows, c=codes: take(c, rows)


def row_keys(seq_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """One int64 key per (seq_id, pos): seq_id in the high 32 bits."""
    return (np.asarray(seq_ids, np.int64) << 32) | np.asarray(positions, np.int64)


def gather_rows(
    blocks: Iterable[RowBlock],
    seq_ids: np.ndarray,
    positions: np.ndarray,
    *,
    source: str = "codes",
) -> sp.csr_matrix | np.ndarray:
    """Rows for the wanted (seq_id, pos) pairs, in the wanted order (repeats allowed).

    Streams the shards and keeps only the wanted rows, so memory is O(wanted rows). A wanted pair
    that no shard holds, or that two rows hold, is a DataError naming the first such pair.
    """
    wanted = row_keys(seq_ids, positions)
    uniq, inverse = np.unique(wanted, return_inverse=True)
    found_at = np.full(len(uniq), -1, np.int64)
    pieces: list[Any] = []
    n_found = 0
    for block_seq, block_pos, take in blocks:
        if len(block_seq) == 0 or len(uniq) == 0:
            continue
        keys = row_keys(block_seq, block_pos)
        idx = np.searchsorted(uniq, keys)
        idx[idx == len(uniq)] = 0
        hit = uniq[idx] == keys
        if not hit.any():
            continue
        slots = idx[hit]
        seen = found_at[slots] >= 0
        if seen.any() or len(np.unique(slots)) != len(slots):
            dup = slots[seen][0] if seen.any() else np.sort(slots)[np.diff(np.sort(slots)) == 0][0]
            key = int(uniq[dup])
            raise DataError(f"{source}: (seq_id {key >> 32}, pos {key & 0xFFFFFFFF}) occurs twice")
        found_at[slots] = n_found + np.arange(len(slots))
        n_found += len(slots)
        pieces.append(take(np.flatnonzero(hit)))
    if (found_at < 0).any():
        key = int(uniq[np.flatnonzero(found_at < 0)[0]])
        raise DataError(
            f"{source}: no row for seq_id {key >> 32}, pos {key & 0xFFFFFFFF} "
            "(were the codes computed on the same tokens?)"
        )
    if not pieces:
        return np.zeros((0, 0), np.float32)
    if sp.issparse(pieces[0]):
        stacked = (
            sp.vstack(pieces, format="csr", dtype=np.float32) if len(pieces) > 1 else pieces[0]
        )
    else:
        stacked = np.concatenate(pieces).astype(np.float32, copy=False)
    order = found_at[inverse]
    if len(order) == stacked.shape[0] and np.array_equal(order, np.arange(len(order))):
        return stacked
    return stacked[order]


# ----------------------------------------------------------------------------- positions


def _positions_numpy(min_p: int, max_p: int, num_p: int, log_scale: bool) -> np.ndarray:
    """float32 re-implementation of the torch formulas (used only when torch is missing)."""

    def linspace32(a: np.float32, b: np.float32, n: int) -> np.ndarray:
        # torch's linspace: the first half counts up from a, the second half down from b.
        if n == 1:
            return np.array([a], np.float32)
        step = np.float32((b - a) / np.float32(n - 1))
        i = np.arange(n)
        up = a + step * i.astype(np.float32)
        down = b - step * (n - 1 - i).astype(np.float32)
        return np.where(i < n // 2, up, down).astype(np.float32)

    if not log_scale:
        if num_p == 1:
            return np.array([min_p], np.int64)
        step = (max_p - min_p) / (num_p - 1)
        i = np.arange(num_p)
        vals = np.where(i < num_p // 2, min_p + step * i, max_p - step * (num_p - 1 - i))
        return vals.astype(np.int64)
    if min_p == 0:
        steps = linspace32(np.float32(0.0), np.log10(np.float32(max_p) + np.float32(1)), num_p)
        vals = np.round(np.power(np.float32(10), steps) - np.float32(1))
        return np.clip(vals.astype(np.int64), 0, max_p)
    steps = linspace32(np.log10(np.float32(min_p)), np.log10(np.float32(max_p)), num_p)
    return np.round(np.power(np.float32(10), steps)).astype(np.int64)


def sample_positions(min_p: int, max_p: int, num_p: int, log_scale: bool) -> np.ndarray:
    """Positions to embed, exactly as the notebooks compute them (see the module docstring).

    Uses torch (the notebooks' own arithmetic, bit-exact) when it is importable; the float32 numpy
    fallback can differ by one position on about 0.1% of log-scale grids.
    """
    if num_p < 1 or min_p < 0 or max_p < min_p:
        raise ConfigError(
            f"min_p/max_p/num_p = {min_p}/{max_p}/{num_p}: need 0 <= min_p <= max_p, num_p >= 1"
        )
    try:
        import torch as th
    except ImportError:
        log.warning("torch is not installed: log-scale positions use a float32 numpy fallback")
        return _positions_numpy(min_p, max_p, num_p, log_scale)
    if not log_scale:
        ps = th.linspace(min_p, max_p, num_p, dtype=th.int)
    elif min_p == 0:
        log_start = th.log10(th.tensor(0, dtype=th.float) + 1)
        log_end = th.log10(th.tensor(max_p, dtype=th.float) + 1)
        log_steps = th.linspace(log_start, log_end, num_p)
        ps = th.round(10**log_steps - 1).long().clamp(0, max_p)
    else:
        log_start = th.log10(th.tensor(min_p, dtype=th.float))
        log_end = th.log10(th.tensor(max_p, dtype=th.float))
        log_steps = th.linspace(log_start, log_end, num_p)
        ps = th.round(10**log_steps).int()
    return ps.numpy().astype(np.int64)


# ----------------------------------------------------------------------------- hover text


def _token_html(token: str) -> str:
    """Escape one decoded token; chat markers in italics, newlines shown as a visible arrow."""
    text = html.escape(str(token), quote=True)
    if MARKER.match(str(token)):
        return f"<i>{text}</i>"
    return text.replace("\n", "\u21b5")


def hover_text(tokens: Sequence[str], pos: int, window: int, seq_id: int) -> str:
    """Up to `window` preceding tokens, then the current one in bold; all text escaped first."""
    start = max(0, pos - window)
    out = []
    for count, i in enumerate(range(start, min(pos + 1, len(tokens)))):
        if count and count % HOVER_LINE_TOKENS == 0:
            out.append("<br>")
        piece = _token_html(tokens[i])
        out.append(f"<b>{piece}</b>" if i == pos else piece)
    return f"Sequence: {seq_id}<br>Position: {pos}<br>Story: {''.join(out)}"


# ----------------------------------------------------------------------------- numba / umap


def enable_numba_cache(cache_dir: str | os.PathLike) -> int:
    """Point numba's cache at `cache_dir` and turn it on for umap-learn's kernels.

    umap-learn does not ask numba to cache its kernels, so every process recompiles them (20-70 s).
    A dispatcher's `enable_caching()` stores the compiled code on disk, keyed by source file and
    CPU, so later processes load it in a second. Call before the first fit. Returns the number of
    kernels switched over.
    """
    # Import umap first: pynndescent compiles (and caches) its own kernels at import, in its own
    # cache; redirecting that to a fresh directory would recompile them all (~60 s).
    import numba.core.config
    import umap.layouts
    import umap.spectral
    import umap.umap_
    import umap.utils
    from numba.core.dispatcher import Dispatcher

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    dispatchers = {
        id(obj): obj
        for module in (umap.umap_, umap.layouts, umap.utils, umap.spectral)
        for obj in vars(module).values()
        if isinstance(obj, Dispatcher)
    }
    # numba's cache key is (signature, CPU, bytecode): it ignores the `parallel` flag. umap wraps
    # one layout function twice (serial and parallel), so caching the parallel twin could hand its
    # threaded code to a seeded, serial fit. Only the serial twin is cached.
    twins: dict[Any, int] = {}
    for obj in dispatchers.values():
        twins[obj.py_func] = twins.get(obj.py_func, 0) + 1
    # The cache directory is read when a dispatcher's cache is created, so the environment is
    # only borrowed for that and restored afterwards.
    previous = os.environ.get("NUMBA_CACHE_DIR")
    os.environ["NUMBA_CACHE_DIR"] = str(cache_dir.resolve())
    numba.core.config.reload_config()
    count = 0
    try:
        for obj in dispatchers.values():
            if twins[obj.py_func] > 1 and obj.targetoptions.get("parallel"):
                continue
            obj.enable_caching()
            count += 1
    finally:
        if previous is None:
            os.environ.pop("NUMBA_CACHE_DIR", None)
        else:
            os.environ["NUMBA_CACHE_DIR"] = previous
        numba.core.config.reload_config()
    return count


@contextlib.contextmanager
def seeded_eigsh(seed: int | None) -> Iterator[None]:
    """Seed scipy's ARPACK restarts during a UMAP fit.

    scipy >= 1.17 draws eigsh's restart vectors from an unseeded generator even when `v0` is
    given, and umap's spectral init calls eigsh without `rng`: on data with repeated points (common
    in sparse codes) a seeded fit then differs from process to process.
    """
    if seed is None:
        yield
        return
    import scipy.sparse.linalg as spla

    original = spla.eigsh

    def eigsh(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("rng", np.random.default_rng(seed))
        return original(*args, **kwargs)

    spla.eigsh = eigsh
    try:
        yield
    finally:
        spla.eigsh = original


def exact_knn(X: sp.csr_matrix | np.ndarray, n_neighbors: int, metric: str):
    """Exact kNN graph (self included, as umap expects): indices int64, distances float32."""
    import sklearn
    from sklearn.neighbors import NearestNeighbors

    k = min(n_neighbors, X.shape[0])
    nn = NearestNeighbors(n_neighbors=k, metric=metric, algorithm="brute")
    # Distance blocks of at most KNN_WORKING_MB, so memory stays flat as the point count grows.
    with sklearn.config_context(working_memory=KNN_WORKING_MB):
        dists, idx = nn.fit(X).kneighbors(X)
    return idx.astype(np.int64), dists.astype(np.float32)


def _gemm_knn(P: Any, k: int, block: int = 2048) -> Any:
    """Exact Euclidean kNN indices [N, k] of the rows of a dense torch matrix (blocked GEMM)."""
    import torch

    sq = (P * P).sum(1)
    out = torch.empty((P.shape[0], k), dtype=torch.int64)
    for lo in range(0, P.shape[0], block):
        d = sq[lo : lo + block, None] + sq[None, :] - 2.0 * (P[lo : lo + block] @ P.T)
        out[lo : lo + block] = d.topk(k, dim=1, largest=False).indices
    return out


def _projects(n: int, d: int, dims: int) -> bool:
    """Whether the approximate search projects (narrow inputs are searched as they are)."""
    return d > 2 * dims and n > 2 * dims


def _pca_project(X_t: Any, dims: int) -> Any:
    """Rows projected on the top `dims` principal axes of a random subsample (torch RNG).

    A randomized range finder with one power iteration on PCA_SAMPLE rows: five GEMMs of
    PCA_SAMPLE x D x dims (torch.svd_lowrank does the same work about 4x slower here).
    """
    import torch

    sample = X_t[torch.randperm(X_t.shape[0])[:PCA_SAMPLE]]
    mean = sample.mean(0)
    centred = sample - mean
    basis = torch.linalg.qr(centred @ torch.randn(X_t.shape[1], dims + 8)).Q
    basis = torch.linalg.qr(centred @ (centred.T @ basis)).Q
    B = basis.T @ centred  # [dims + 8, D]
    evals, U = torch.linalg.eigh(B @ B.T)
    top = evals.flip(0)[:dims].clamp(min=1e-12).sqrt()
    V = (B.T @ U.flip(1)[:, :dims]) / top  # [D, dims], orthonormal columns
    return (X_t - mean) @ V


def approximate_knn(
    X: np.ndarray, n_neighbors: int, *, seed: int = 0, dims: int = APPROX_PCA_DIMS
) -> tuple[np.ndarray, np.ndarray]:
    """Approximate Euclidean kNN of dense rows: PCA candidates, then exact re-ranking.

    1. Project onto the top `dims` principal axes (seeded randomized PCA of a subsample).
    2. Exact kNN in that space gives APPROX_CANDIDATES x k candidates per point (a GEMM over
       N x N x dims instead of N x N x D).
    3. Candidates are re-ranked on their true distances in the full space. Points are visited in
       the order of a k-means clustering of the projection, so a block of nearby points shares
       most of its candidates and one dense GEMM (block x union of candidates x D) scores them.
    Distances are exact for the neighbours returned; recall against exact kNN is what
    `bench/scale.py` prints. Deterministic for a seed. Self is always the first neighbour.
    """
    import torch

    X_t = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
    n, d = X_t.shape
    k = min(n_neighbors, n)
    m = min(n, APPROX_CANDIDATES * k)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        P = _pca_project(X_t, dims) if _projects(n, d, dims) else X_t
        cand = _gemm_knn(P, m)
        # k-means order of the projection (a few Lloyd steps from seeded points)
        n_clusters = max(1, n // RERANK_BLOCK)
        cent = P[torch.randperm(n)[:n_clusters]].clone()
        p_sq = (P * P).sum(1)
        for _ in range(8):
            dist = p_sq[:, None] + (cent * cent).sum(1)[None, :] - 2.0 * P @ cent.T
            label = dist.argmin(1)
            counts = torch.bincount(label, minlength=n_clusters).clamp_(min=1)
            cent = torch.zeros_like(cent).index_add_(0, label, P) / counts[:, None]
    order = torch.argsort(label * n + torch.arange(n))
    x_sq = (X_t * X_t).sum(1)
    idx = np.empty((n, k), np.int64)
    dst = np.empty((n, k), np.float32)
    for lo in range(0, n, RERANK_BLOCK):
        rows = order[lo : lo + RERANK_BLOCK]
        c = cand[rows]
        union, local = torch.unique(c, return_inverse=True)
        scores = X_t[rows] @ X_t[union].T  # [b, |union|]
        d2 = x_sq[rows, None] + x_sq[c] - 2.0 * torch.gather(scores, 1, local)
        d2 = d2.clamp_(min=0.0)
        d2[c == rows[:, None]] = -1.0  # self first, at distance 0
        top_d, top_j = d2.topk(k, dim=1, largest=False)
        idx[rows.numpy()] = torch.gather(c, 1, top_j).numpy()
        dst[rows.numpy()] = top_d.clamp_(min=0.0).sqrt_().numpy()
    return idx, dst


def knn_graph(
    X: sp.csr_matrix | np.ndarray,
    n_neighbors: int,
    metric: str,
    *,
    method: str = "auto",
    seed: int | None = 0,
) -> tuple[tuple[np.ndarray, np.ndarray], str]:
    """(kNN graph, how): exact up to EXACT_KNN_MAX_POINTS points, approximate above.

    Approximate kNN is `approximate_knn` for dense Euclidean input and NN-descent (pynndescent)
    otherwise (sparse codes or another metric). `method` forces exact or approximate.
    """
    if method not in KNN_METHODS:
        raise ConfigError(f"knn = {method!r}: one of {', '.join(KNN_METHODS)}")
    n = X.shape[0]
    exact = method == "exact" or (method == "auto" and n <= EXACT_KNN_MAX_POINTS)
    if exact:
        return exact_knn(X, n_neighbors, metric), "exact (scikit-learn brute force)"
    if not sp.issparse(X) and metric == "euclidean":
        graph = approximate_knn(X, n_neighbors, seed=0 if seed is None else int(seed))
        space = f"PCA-{APPROX_PCA_DIMS}" if _projects(*X.shape, APPROX_PCA_DIMS) else "full-space"
        return graph, f"approximate ({space} candidates, exact re-ranking)"
    from pynndescent import NNDescent

    nnd = NNDescent(
        X,
        n_neighbors=min(n_neighbors, n),
        metric=metric,
        random_state=seed,
        n_jobs=1 if seed is not None else -1,
        low_memory=True,
        compressed=True,
    )
    idx, dists = nnd.neighbor_graph
    return (idx.astype(np.int64), dists.astype(np.float32)), "approximate (NN-descent)"


def densify_if_dense(X: sp.csr_matrix | np.ndarray) -> sp.csr_matrix | np.ndarray:
    """Dense codes as a dense array: CSR only pays off for sparse ones (see DENSE_ABOVE)."""
    if sp.issparse(X) and X.shape[0] * X.shape[1] and X.nnz >= DENSE_ABOVE * np.prod(X.shape):
        return np.asarray(X.toarray(), dtype=np.float32)
    return X


def fit_umap(
    X: sp.csr_matrix | np.ndarray,
    *,
    n_components: int,
    n_neighbors: int,
    min_dist: float,
    metric: str,
    random_state: int | None,
    n_epochs: int | None = None,
    knn: str = "auto",
    knn_out: dict[str, Any] | None = None,
) -> np.ndarray:
    """UMAP embedding [N, n_components] float32 on a precomputed kNN graph (see `knn_graph`).

    `knn_out`, when given, receives the graph (`indices`, `distances`), `how` and `seconds`.
    """
    import time

    import umap

    if X.shape[0] <= n_neighbors:
        raise DataError(
            f"umap: {X.shape[0]} points but n_neighbors = {n_neighbors}; embed more points"
        )
    X = densify_if_dense(X)
    start = time.perf_counter()
    graph, how = knn_graph(X, n_neighbors, metric, method=knn, seed=random_state)
    if knn_out is not None:
        knn_out.update(
            indices=graph[0], distances=graph[1], how=how, seconds=time.perf_counter() - start
        )
    log.info(
        "umap: kNN graph %s of %d %s points x %d dims in %.1f s",
        how,
        X.shape[0],
        "sparse" if sp.issparse(X) else "dense",
        X.shape[1],
        time.perf_counter() - start,
    )
    reducer = umap.UMAP(
        n_components=n_components,
        n_neighbors=n_neighbors,
        min_dist=min_dist,
        metric=metric,
        random_state=random_state,
        n_epochs=n_epochs,
        precomputed_knn=graph,
    )
    with warnings.catch_warnings():
        # "n_jobs overridden by random_state" and "no NNDescent search index": both expected.
        warnings.filterwarnings("ignore", category=UserWarning, module=r"umap\.")
        with seeded_eigsh(random_state):
            embedding = reducer.fit_transform(X)
    return np.asarray(embedding, dtype=np.float32)


def warmup(cache_dir: str | os.PathLike) -> dict[str, Any]:
    """Compile umap's kernels into `cache_dir` with a tiny seeded fit.

    Uses the same dtypes and code path as `fit_umap`, so later fits find every kernel cached.
    (Fits without random_state use umap's parallel layout kernel, which is never cached.)
    """
    import time

    start = time.perf_counter()
    kernels = enable_numba_cache(cache_dir)
    rng = np.random.default_rng(0)
    X = sp.random(300, 64, density=0.2, format="csr", dtype=np.float32, random_state=rng)
    fit_umap(
        X,
        n_components=2,
        n_neighbors=10,
        min_dist=0.1,
        metric="euclidean",
        random_state=0,
        n_epochs=5,
    )
    return {"kernels": kernels, "seconds": round(time.perf_counter() - start, 1)}


# ----------------------------------------------------------------------------- the stage


def umap_options(analysis: Mapping[str, Any]) -> dict[str, Any]:
    """The analysis' UMAP options with defaults filled in, checked."""
    opts = {k: analysis.get(k, v) for k, v in UMAP_DEFAULTS.items()}
    name = analysis.get("name", "?")
    if opts["n_components"] not in (2, 3):
        raise ConfigError(f"analyses[{name}].n_components = {opts['n_components']}: 2 or 3")
    if opts["hover_window"] < 0:
        raise ConfigError(f"analyses[{name}].hover_window = {opts['hover_window']}: must be >= 0")
    return opts


def read_tokens_table(path: str | os.PathLike) -> pa.Table:
    """seq_id, n_tokens, roles, tokens columns of a tokens parquet."""
    try:
        return pq.read_table(path, columns=["seq_id", "n_tokens", "roles", "tokens"])
    except (OSError, pa.ArrowInvalid, KeyError) as err:
        raise DataError(f"{path}: cannot read seq_id, n_tokens, roles, tokens ({err})") from None


def _act_path_label(kind: str | None) -> str:
    """The notebooks' `act_path` name of a code kind (for their plot titles)."""
    return {"activations": "activations", "pred": "pred_codes", "novel": "novel_codes"}.get(
        kind or "", "codes"
    )


def run_umap(
    analysis: Mapping[str, Any],
    codes_path: str | os.PathLike,
    tokens_path: str | os.PathLike,
    embedding_out: str | os.PathLike,
    results_out: str | os.PathLike,
    *,
    numba_cache_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Subsample positions, fit UMAP, write embedding.parquet and the notebook-style results.json.

    `codes_path` is the codes manifest, or the activations manifest when `codes: activations`.
    """
    opts = umap_options(analysis)
    if numba_cache_dir is not None:
        enable_numba_cache(numba_cache_dir)
    kind = analysis.get("codes")
    part = "activations" if kind == "activations" else resolve_part(codes_path, kind, "pred")

    ps = sample_positions(opts["min_p"], opts["max_p"], opts["num_p"], opts["log_scale"])
    table = read_tokens_table(tokens_path)
    seq_all = table.column("seq_id").to_numpy().astype(np.int64)
    n_tok = table.column("n_tokens").to_numpy().astype(np.int64)
    eligible = np.flatnonzero(n_tok > opts["max_p"])
    if opts["num_sequences"] is not None:
        eligible = eligible[: int(opts["num_sequences"])]
    if len(eligible) == 0:
        raise DataError(
            f"{tokens_path}: no sequence has more than max_p = {opts['max_p']} tokens "
            f"(longest: {int(n_tok.max()) if len(n_tok) else 0})"
        )
    log.info(
        "umap %s: %d of %d sequences are longer than max_p=%d; positions %s",
        analysis.get("name"),
        len(eligible),
        len(seq_all),
        opts["max_p"],
        ps.tolist(),
    )
    B, P = len(eligible), len(ps)
    seq_BP = np.repeat(seq_all[eligible], P)
    pos_BP = np.tile(ps, B)
    X = gather_rows(iter_row_blocks(codes_path, part), seq_BP, pos_BP, source=str(codes_path))
    log.info("umap %s: fitting %d points x %d dims", analysis.get("name"), *X.shape)
    emb = fit_umap(
        X,
        n_components=opts["n_components"],
        n_neighbors=opts["n_neighbors"],
        min_dist=opts["min_dist"],
        metric=opts["metric"],
        random_state=opts["random_state"],
        n_epochs=opts["n_epochs"],
        knn=opts["knn"],
    )

    roles_col = table.column("roles").to_pylist()
    tokens_col = table.column("tokens").to_pylist()
    hovers, roles = [], []
    for b in tqdm(eligible, desc="hover", file=sys.stderr, mininterval=5):
        toks, rls = tokens_col[b], roles_col[b]
        for p in ps.tolist():
            hovers.append(hover_text(toks, p, opts["hover_window"], int(seq_all[b])))
            roles.append(rls[p])

    axes = ["x", "y", "z"][: opts["n_components"]]
    columns = {
        "seq_id": pa.array(seq_BP.astype(np.int32)),
        "pos": pa.array(pos_BP.astype(np.int32)),
        **{ax: pa.array(emb[:, i]) for i, ax in enumerate(axes)},
        "role": pa.array(np.asarray(roles, np.int8)),
        "hover": pa.array(hovers, pa.string()),
    }
    with atomic_path(embedding_out) as tmp:
        pq.write_table(pa.table(columns), tmp, **PARQUET_OPTS)

    config = dict(analysis)
    config.update({k: v for k, v in opts.items()})
    config.update(
        {
            "do_log_scale": opts["log_scale"],
            "act_path": _act_path_label(part),
            "llm": {"name": analysis.get("model")},
            "data": {"name": analysis.get("dataset")},
            "sae": {"name": analysis["sae"]} if analysis.get("sae") else None,
        }
    )
    emb_BPk = emb.reshape(B, P, -1).astype(np.float64)
    results = {
        "embedding": emb_BPk.tolist(),
        "pos_labels": np.tile(ps, (B, 1)).tolist(),
        "pos_indices": ps.tolist(),
        "hover_texts": hovers,
        "seq_ids": seq_all[eligible].tolist(),
        "config": config,
    }
    write_json(results_out, results)
    return {"n_sequences": B, "n_positions": P, "n_points": B * P, "dims": int(X.shape[1])}
