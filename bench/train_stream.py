"""Benchmark: peak memory of SAE training as the number of training tokens grows, in one run.

Usage: PYTHONPATH=src python bench/train_stream.py [--d 256 --tokens 40000 --scales 1 8]

For each scale s, a cache of s * tokens activations (float32 parquet shards of 4096 rows) is
written, then child processes report their peak RSS (`ru_maxrss`) above an `imports` child
(python + torch + saeflow, nothing run):
  saeflow   train_sae with train.buffer_tokens = 16384 (a few steps): shards are streamed
  load_all  load_activations of the same cache into one tensor, as training did before streaming
Target: saeflow's peak RSS above imports does not grow with the tokens (ratio largest/smallest
scale ~1.0), while load_all grows with them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src")]

CHILD = r"""
import json, resource, sys
sys.path.insert(0, {src!r})
mode, acts, out = sys.argv[1:4]
from saeflow.sae.train import train_sae
from saeflow.activations import load_activations
if mode == "saeflow":
    cfg = {{"width": 1024, "k": 16, "steps": 20, "batch_tokens": 512, "buffer_tokens": 16384}}
    train_sae([acts], out, cfg, seed=0)
elif mode == "load_all":
    _, _, acts_ND = load_activations(acts)
    acts_ND.float().sum()
print(json.dumps({{"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def write_cache(folder: Path, n_tokens: int, d: int, seq_len: int = 64) -> Path:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from saeflow import io as sio

    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    n_seq = n_tokens // seq_len
    per_shard = 4096 // seq_len
    shards = []
    for i, first in enumerate(range(0, n_seq, per_shard)):
        n = min(per_shard, n_seq - first)
        acts = torch.randn(n * seq_len, d, generator=g)
        raw = acts.numpy().view(np.uint8).reshape(n * seq_len, -1)
        col = pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(4 * d), n * seq_len, [None, pa.py_buffer(raw)]
        )
        seq = np.repeat(np.arange(first, first + n), seq_len).astype(np.int32)
        pos = np.tile(np.arange(seq_len), n).astype(np.int32)
        name = sio.shard_name(i, "parquet")
        pq.write_table(pa.table({"seq_id": seq, "pos": pos, "act": col}), folder / name)
        shards.append({"file": name, "n_tokens": n * seq_len, "n_sequences": n})
    sio.write_manifest(
        folder,
        {
            "format": "parquet",
            "dtype": "float32",
            "d_model": d,
            "n_tokens": n_seq * seq_len,
            "n_sequences": n_seq,
            "layer": 0,
            "model": "bench",
            "shards": shards,
        },
    )
    return folder / "manifest.json"


def child(mode: str, acts: Path, out: Path) -> float:
    code = CHILD.format(src=str(ROOT / "src"))
    res = subprocess.run(
        [sys.executable, "-c", code, mode, str(acts), str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(json.loads(res.stdout.strip().splitlines()[-1])["rss_mb"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=40000)
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 8])
    args = ap.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for s in args.scales:
            acts = write_cache(Path(tmp) / f"acts{s}", s * args.tokens, args.d)
            base = child("imports", acts, Path(tmp) / "none")
            rows[s] = {
                "saeflow": child("saeflow", acts, Path(tmp) / f"sae{s}") - base,
                "load_all": child("load_all", acts, Path(tmp) / "none") - base,
            }
            mb = s * args.tokens * args.d * 4 / 2**20
            print(
                f"{s * args.tokens:>8} tokens ({mb:6.0f} MB of activations): "
                f"saeflow +{rows[s]['saeflow']:5.0f} MB peak RSS over imports, "
                f"load_all +{rows[s]['load_all']:5.0f} MB"
            )
    lo, hi = min(args.scales), max(args.scales)
    grow = {m: rows[hi][m] / rows[lo][m] for m in ("saeflow", "load_all")}
    print(
        f"peak RSS growth for x{hi // lo} tokens: saeflow {grow['saeflow']:.2f}x (target ~1.0), "
        f"load_all {grow['load_all']:.2f}x"
    )


if __name__ == "__main__":
    main()
