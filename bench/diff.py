"""Diffing statistics: sparse bincounts vs a dense baseline measured in the same run.

Prints tokens/s for
  dense        the reference notebook's way: a dense [N, F] matrix, (X > 0).sum(0), X.mean(0), ...
  sparse       saeflow.diffing.feature_stats on the CSR codes (bincount over stored ids)
  read         saeflow.codes.iter_codes alone (Parquet decode of the shards)
  stage        the whole read path of diff_stats: code shards on disk -> gather the wanted rows
               -> feature_stats; every token wanted, and 2 per 128-token prompt (diffing)
Target (PERF.md 'Statistics'): sparse and stage >= 1M tokens/s on CPU.

    PYTHONPATH=src python bench/diff.py [--tokens 100000 --features 4096 --k 32]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from saeflow.codes import CODES_FORMAT, Codes, iter_codes, write_code_shard
from saeflow.diffing import STATS, feature_stats
from saeflow.embedding import gather_rows, iter_row_blocks
from saeflow.io import write_manifest


def topk_codes(n: int, f: int, k: int, seed: int = 0) -> sp.csr_matrix:
    """Random TopK-like codes: k distinct features per token, positive values."""
    rng = np.random.default_rng(seed)
    ids = np.argsort(rng.random((n, f), dtype=np.float32), axis=1)[:, :k] if f <= 8192 else None
    if ids is None:
        ids = rng.integers(0, f, size=(n, k))
    ids = np.sort(ids, axis=1).astype(np.int32)
    vals = (rng.random((n, k), dtype=np.float32) + 0.01).astype(np.float16).astype(np.float32)
    indptr = np.arange(0, n * k + 1, k, dtype=np.int64)
    return sp.csr_matrix((vals.ravel(), ids.ravel(), indptr), shape=(n, f))


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def dense_stats(X: np.ndarray) -> None:
    n = X.shape[0]
    active = X > 0
    num_active = active.sum(0)
    _ = (num_active / n, X.mean(0), X.std(0, ddof=1), X.max(0))


def write_dir(root: Path, codes: sp.csr_matrix, shard_tokens: int) -> Path:
    n = codes.shape[0]
    seq = (np.arange(n) // 128).astype(np.int32)
    pos = (np.arange(n) % 128).astype(np.int32)
    names = []
    for i, start in enumerate(range(0, n, shard_tokens)):
        block = codes[start : start + shard_tokens]
        c = Codes(
            seq[start : start + shard_tokens],
            pos[start : start + shard_tokens],
            block.indptr.astype(np.int64),
            block.indices.astype(np.int32),
            block.data.astype(np.float16),
            codes.shape[1],
        )
        names.append(f"part-{i:05d}.parquet")
        write_code_shard(root / names[-1], c)
    write_manifest(
        root,
        {"format": CODES_FORMAT, "d_sae": codes.shape[1], "parts": {"codes": "."}, "shards": names},
    )
    return root / "manifest.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--features", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    n, f, k = args.tokens, args.features, args.k
    codes = topk_codes(n, f, k)
    print(f"{n} tokens x {f} features, TopK {k}")

    t_dense = best_of(lambda: dense_stats(codes.toarray()), 1)
    dense_codes = codes.toarray()
    t_dense_only = best_of(lambda: dense_stats(dense_codes), 1)
    dense_codes = None
    t_default = best_of(
        lambda: feature_stats(codes, ("num_active", "all_mean", "sparsity")), args.repeat
    )
    t_all = best_of(lambda: feature_stats(codes, STATS), args.repeat)

    with tempfile.TemporaryDirectory() as tmp:
        manifest = write_dir(Path(tmp), codes, 16384)
        seq = (np.arange(n) // 128).astype(np.int64)
        pos = (np.arange(n) % 128).astype(np.int64)
        # diffing wants two positions (two token types) per 128-token prompt
        few = pos >= 126

        def stage(mask: np.ndarray) -> None:
            rows = gather_rows(iter_row_blocks(manifest, None), seq[mask], pos[mask])
            feature_stats(rows, ("num_active", "all_mean", "sparsity"))

        t_read = best_of(lambda: list(iter_codes(manifest)), args.repeat)
        t_stage_all = best_of(lambda: stage(np.ones(n, bool)), args.repeat)
        t_stage_few = best_of(lambda: stage(few), args.repeat)

    def line(name: str, seconds: float) -> None:
        print(
            f"{name:<34} {seconds * 1e3:9.1f} ms  {n / seconds / 1e6:8.2f} M tokens/s  "
            f"{t_dense / seconds:7.1f}x vs dense"
        )

    line("dense (densify + stats)", t_dense)
    line("dense (stats on a dense matrix)", t_dense_only)
    line("sparse feature_stats (default)", t_default)
    line("sparse feature_stats (all stats)", t_all)
    line("read only: saeflow.codes.iter_codes", t_read)
    line("stage, every token wanted", t_stage_all)
    line("stage, 2 tokens per prompt wanted", t_stage_few)


if __name__ == "__main__":
    main()
