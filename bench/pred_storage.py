"""Benchmark: storing a temporal SAE's predictable codes exactly (dense) vs the lossy top-k cut.

Usage: PYTHONPATH=src python bench/pred_storage.py [--seqs 100 --len 50 --width 9216]

Predictable codes at the 2-2B config's shape (width 9216, sequences of 50 tokens; the config has
1000 of them = 50,000 tokens), synthetic: ReLU(N(0, 1)) times a per-token projection scale of
either sign, i.e. about half the features non-zero, as ReLU(c_proj(...)) * proj_scale gives.
Variants, measured on `--seqs` sequences and extrapolated linearly to `--full-tokens`:
  dense32   pred_storage: dense, pred_dtype: float32 (the default; exact)
  dense16   pred_storage: dense, pred_dtype: float16
  sparse    pred_storage: sparse, pred_k: null (every non-zero, float16 values, int32 ids)
  top64     pred_storage: sparse, pred_k: 64 (the old default; lossy)
For each: bytes on disk, write time (the encode stage's share), a full read (`iter_codes`), and
the UMAP gather of 30 positions per sequence (`gather_rows`). Best of `--rounds`, interleaved.
The SAE forward itself is the same for every variant and is not measured here.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, default=100)
    ap.add_argument("--len", type=int, default=50)
    ap.add_argument("--width", type=int, default=9216)
    ap.add_argument("--full-tokens", type=int, default=50_000)
    ap.add_argument("--shard-tokens", type=int, default=16384)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    import numpy as np
    import torch

    from saeflow import io as sio
    from saeflow.codes import CODES_FORMAT, DenseCodes, iter_codes, write_code_shard
    from saeflow.embedding import gather_rows, iter_row_blocks, sample_positions
    from saeflow.sae.encode import _to_codes
    from saeflow.sae.sparse import topk_by_magnitude

    S, L, F = args.seqs, args.len, args.width
    N = S * L
    g = torch.Generator().manual_seed(0)
    pred_NF = torch.relu(torch.randn(N, F, generator=g)) * torch.randn(N, 1, generator=g)
    seq_N = np.repeat(np.arange(S, dtype=np.int32), L)
    pos_N = np.tile(np.arange(L, dtype=np.int32), S)
    density = float((pred_NF != 0).float().mean())
    ps = sample_positions(0, 40, 30, False)
    want_seq, want_pos = np.repeat(np.arange(S), len(ps)), np.tile(ps, S)

    def variant(name: str):
        if name.startswith("dense"):
            dtype = np.float32 if name == "dense32" else np.float16
            return lambda rows: DenseCodes(
                seq_N[rows], pos_N[rows], pred_NF[rows].numpy().astype(dtype), F, "pred"
            )
        k = None if name == "sparse" else 64
        return lambda rows: _to_codes(
            topk_by_magnitude(pred_NF[rows], k), seq_N[rows], pos_N[rows], F, "pred"
        )

    names = ["dense32", "dense16", "sparse", "top64"]
    best = {n: {"write": 1e9, "read": 1e9, "gather": 1e9} for n in names}
    size = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for name in names:
                out = Path(tmp) / name
                (out / "pred").mkdir(parents=True, exist_ok=True)
                make = variant(name)
                shards = []
                t0 = time.perf_counter()
                for i, start in enumerate(range(0, N, args.shard_tokens)):
                    rows = np.arange(start, min(N, start + args.shard_tokens))
                    shard = sio.shard_name(i, "parquet")
                    write_code_shard(out / "pred" / shard, make(rows))
                    shards.append(shard)
                best[name]["write"] = min(best[name]["write"], time.perf_counter() - t0)
                sio.write_manifest(
                    out,
                    {
                        "format": CODES_FORMAT,
                        "d_sae": F,
                        "parts": {"novel": "pred", "pred": "pred"},
                        "shards": shards,
                        "n_tokens": N,
                    },
                )
                size[name] = sum(p.stat().st_size for p in (out / "pred").iterdir())
                t0 = time.perf_counter()
                for _codes in iter_codes(out, "pred"):
                    pass
                best[name]["read"] = min(best[name]["read"], time.perf_counter() - t0)
                t0 = time.perf_counter()
                gather_rows(iter_row_blocks(out, "pred"), want_seq, want_pos)
                best[name]["gather"] = min(best[name]["gather"], time.perf_counter() - t0)

    scale = args.full_tokens / N
    print(
        f"{N} tokens x width {F}, {density:.1%} non-zero; extrapolated x{scale:.0f} to "
        f"{args.full_tokens} tokens (1000 seq x 50)"
    )
    print(
        f"{'variant':8} {'B/token':>9} {'disk@full':>10} {'write@full':>11} "
        f"{'read@full':>10} {'umap gather@full':>17} {'write/top64':>12}"
    )
    for name in names:
        b = best[name]
        print(
            f"{name:8} {size[name] / N:9.0f} {size[name] * scale / 1e9:9.2f}G "
            f"{b['write'] * scale:10.1f}s {b['read'] * scale:9.1f}s {b['gather'] * scale:16.1f}s "
            f"{b['write'] / best['top64']['write']:11.2f}x"
        )


if __name__ == "__main__":
    main()
