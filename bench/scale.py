"""How each heavy stage scales: time, peak RSS and output bytes at N and 4N, with growth exponents.

Every measurement runs in its own subprocess, which reads its inputs from disk (written here
first, synthetic but of the real shapes), runs the stage and reports its wall time, its peak RSS
(`ru_maxrss`) and the RSS it had after imports and before the stage (`base`), so `peak - base`
is what the stage itself held. The growth exponent of a quantity q is log(q(4N) / q(N)) / log 4:
0 is flat, 1 linear.

  stage          N grows in          targets
  top_examples   tokens              memory flat (exponent <= 0.25), time <= linear (<= 1.15)
  diffing        tokens (prompts)    memory flat, time <= linear
  matching       tokens              memory flat, time <= linear
  mfa_post       tokens              memory flat, time <= linear (posteriors streamed)
  umap           points              time <= linear (exact kNN below 10k points, approximate
                                     above); the 30k point is seed 000's size (target < 120 s),
                                     printed with its neighbour recall against exact kNN
  page           features            first-load bytes flat in features

    PYTHONPATH=src python bench/scale.py [--only top_examples,matching] [--scale 1.0] [--width F]

`--scale` multiplies every N (0.25 for a quick look). Children run with a fixed glibc mmap
threshold (MMAP_THRESHOLD below: the default dynamic one lets freed temporaries fragment the heap,
which reads as growth). The page's first load is measured by
`page_first_load_bytes` below, through saeflow.report.first_load_bytes: the HTML, its local
scripts and styles and the shards it loads at start (plotly.min.js, shipped once for every page,
is counted apart).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

SIZES: dict[str, int] = {
    "top_examples": 32_768,
    "diffing": 32_768,
    "matching": 32_768,
    "mfa_post": 8_192,
    "umap": 7_500,
    "page": 4_096,
}
# glibc raises its mmap threshold as large blocks are freed, after which per-batch temporaries
# (tens of MB each) fragment the heap: RSS then creeps up with the number of batches although no
# state grows (MFA posteriors: +120 MB from 4k to 16k tokens by default, +0.6 MB with this).
# A fixed threshold measures what the stage holds; set MALLOC_MMAP_THRESHOLD_ to override.
MMAP_THRESHOLD = "131072"
WIDTH = int(os.environ.get("SAEFLOW_BENCH_WIDTH", 16_384))  # SAE features of the code stages
TOPK = 32
SHARD = 8_192  # tokens per code shard
SEQ_LEN = 128
UMAP_DIMS = 9_216  # seed 000's predictable codes
MFA_SHAPE = {"K": 500, "D": 768, "R": 10}
TARGETS = {
    "top_examples": {"mem": 0.25, "time": 1.15},
    "diffing": {"mem": 0.25, "time": 1.15},
    "matching": {"mem": 0.25, "time": 1.15},
    "mfa_post": {"mem": 0.25, "time": 1.15},
    "umap": {"time": 1.15},
    "page": {"first_load": 0.1},
}


# ----------------------------------------------------------------------------- inputs


def topk_codes(n: int, f: int, k: int, seed: int):
    """TopK-like CSR codes: k distinct features per token (Zipf-ish popularity), float16 values."""
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, f + 1) ** 0.6
    cdf = np.cumsum(weights) / weights.sum()
    ids = np.searchsorted(cdf, rng.random((n, 2 * k)))
    ids = np.minimum(ids, f - 1)
    rows = []
    for r in range(n):  # distinct ids per row, k of them
        u = np.unique(ids[r])
        if len(u) < k:
            u = np.unique(np.concatenate([u, rng.choice(f, k, replace=False)]))
        rows.append(np.sort(rng.permutation(u)[:k]))
    cols = np.concatenate(rows).astype(np.int32)
    vals = rng.exponential(1.0, n * k).astype(np.float16).astype(np.float32) + np.float32(0.01)
    return sp.csr_matrix((vals, cols, np.arange(0, n * k + 1, k)), shape=(n, f))


def write_codes(path: Path, csr, seq: np.ndarray, pos: np.ndarray) -> Path:
    from saeflow.codes import CODES_FORMAT, Codes, write_code_shard
    from saeflow.io import write_manifest

    path.mkdir(parents=True, exist_ok=True)
    names = []
    for i, lo in enumerate(range(0, csr.shape[0], SHARD)):
        part = csr[lo : lo + SHARD]
        names.append(f"part-{i:05d}.parquet")
        write_code_shard(
            path / names[-1],
            Codes(
                seq[lo : lo + SHARD].astype(np.int32),
                pos[lo : lo + SHARD].astype(np.int32),
                part.indptr.astype(np.int64),
                part.indices.astype(np.int32),
                part.data.astype(np.float16),
                csr.shape[1],
            ),
        )
    meta = {"format": CODES_FORMAT, "d_sae": csr.shape[1], "parts": {"codes": "."}}
    return write_manifest(path, {**meta, "shards": names, "n_tokens": csr.shape[0]})


def write_tokens(path: Path, lists: list[list[str]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    vocab: dict[str, int] = {}
    ids = [[vocab.setdefault(t, len(vocab)) for t in toks] for toks in lists]
    table = pa.table(
        {
            "seq_id": pa.array(np.arange(len(lists)), pa.int32()),
            "token_ids": pa.array(ids, pa.list_(pa.int32())),
            "roles": pa.array([[0] * len(t) for t in lists], pa.list_(pa.int8())),
            "n_tokens": pa.array([len(t) for t in lists], pa.int32()),
            "tokens": pa.array(lists, pa.list_(pa.string())),
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def prepare(stage: str, n: int, root: Path) -> dict[str, Any]:
    """Write the inputs of one measurement under `root`; returns what the child needs."""
    root.mkdir(parents=True, exist_ok=True)
    if stage in ("top_examples", "matching"):
        n_seq = n // SEQ_LEN
        seq = np.repeat(np.arange(n_seq), SEQ_LEN)
        pos = np.tile(np.arange(SEQ_LEN), n_seq)
        toks = [[f" w{(s * 31 + p) % 5000}" for p in range(SEQ_LEN)] for s in range(n_seq)]
        write_tokens(root / "tokens.parquet", toks)
        write_codes(root / "a", topk_codes(n, WIDTH, TOPK, seed=1), seq, pos)
        if stage == "matching":
            write_codes(root / "b", topk_codes(n, WIDTH, TOPK, seed=2), seq, pos)
    elif stage == "diffing":
        length = SEQ_LEN
        n_prompts = n // (2 * length)
        body = ["<bos>", "<start_of_turn>", "user", "\n"]
        tail = ["<end_of_turn>", "\n", "<start_of_turn>", "model", "\n"]
        for s, seed in (("target", 3), ("control", 4)):
            toks = [
                body + [f" w{(i * 7 + p) % 900}" for p in range(length - 9)] + tail
                for i in range(n_prompts)
            ]
            write_tokens(root / f"{s}.parquet", toks)
            seq = np.repeat(np.arange(n_prompts), length)
            pos = np.tile(np.arange(length), n_prompts)
            for m, shift in (("base", 0), ("chat", 10)):
                write_codes(
                    root / f"{s}_{m}", topk_codes(len(seq), WIDTH, TOPK, seed + shift), seq, pos
                )
    return {"stage": stage, "n": n, "root": str(root)}


# ----------------------------------------------------------------------------- children


def dir_bytes(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def page_first_load_bytes(page: Path) -> dict[str, int]:
    """Bytes a browser reads to open `page` (`saeflow.report.first_load_bytes`: the HTML, its
    local scripts and styles and the shards it loads at start); plotly.min.js, shipped once for
    all pages, is reported apart."""
    from saeflow.report import first_load_bytes

    page = Path(page)
    plotly = page.parent / "plotly.min.js"
    return {
        "first_load": first_load_bytes(page),
        "plotly": plotly.stat().st_size if plotly.is_file() else 0,
    }


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one measurement (in a fresh process) and return its figures."""
    import torch

    torch.set_num_threads(2)
    stage, n, root = spec["stage"], int(spec["n"]), Path(spec["root"])
    # What the stages import lazily is imported first, so `base` holds the code, not the data.
    import pyarrow.compute  # noqa: F401
    import sklearn.neighbors  # noqa: F401

    import saeflow.codes  # noqa: F401
    import saeflow.devices  # noqa: F401
    import saeflow.geometry.weights  # noqa: F401
    import saeflow.tokenize  # noqa: F401

    out = root / "out"
    out.mkdir(exist_ok=True)
    extra: dict[str, Any] = {}
    if stage == "top_examples":
        from saeflow.geometry.top_examples import run_top_examples

        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        run_top_examples(
            root / "a" / "manifest.json",
            root / "tokens.parquet",
            analysis={"name": "bench", "sae": "s", "n_examples": 10, "window": [8, 4]},
            model=None,
            sae_spec=None,
            runtime={"device": "cpu", "seed": 0},
            out_examples=out / "examples.parquet",
            out_index=out / "feature_index.parquet",
            out_page=None,
            threads=2,
        )
    elif stage == "matching":
        from saeflow.geometry.matching import run_match_features

        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        summary = run_match_features(
            root / "a" / "manifest.json",
            root / "b" / "manifest.json",
            analysis={"name": "bench", "a": {"sae": "a"}, "b": {"sae": "b"}},
            sae_a_spec=None,
            sae_b_spec=None,
            runtime={"device": "cpu", "seed": 0},
            out_matches=out / "matches.parquet",
            out_summary=out / "summary.json",
            threads=2,
        )
        extra["passes"] = summary["n_passes"]
    elif stage == "diffing":
        from saeflow.diffing import run_diffing

        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        run_diffing(
            {
                "name": "bench",
                "models": ["base", "chat"],
                "target": "target",
                "control": "control",
                "token_types": {"model": -1, "newline": 0},
            },
            {
                s: {m: root / f"{s}.parquet" for m in ("base", "chat")}
                for s in ("target", "control")
            },
            {
                s: {m: root / f"{s}_{m}" / "manifest.json" for m in ("base", "chat")}
                for s in ("target", "control")
            },
            out / "features.parquet",
            out / "summary.json",
        )
    elif stage == "mfa_post":
        from saeflow.mfa.fit import write_posteriors_stream
        from saeflow.mfa.model import MFA

        K, D, R = MFA_SHAPE["K"], MFA_SHAPE["D"], MFA_SHAPE["R"]
        g = torch.Generator().manual_seed(0)
        model = MFA(K, D, R)
        model.set_params(
            torch.randn(K, D, generator=g),
            0.3 * torch.randn(K, D, R, generator=g),
            0.5 + torch.rand(D, generator=g),
        )

        def shards():  # activation shards of 4096 tokens, generated one at a time
            for lo in range(0, n, 4096):
                size = min(4096, n - lo)
                x = torch.randn(size, D, generator=g).to(torch.float16)
                seq = np.arange(lo, lo + size) // SEQ_LEN
                yield seq, np.arange(lo, lo + size) % SEQ_LEN, np.zeros(size, np.int8), x

        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        write_posteriors_stream(
            model,
            shards(),
            out / "posteriors.parquet",
            top=4,
            batch_size=256,
            device=torch.device("cpu"),
        )
    elif stage == "umap":
        from saeflow.embedding import fit_umap

        rng = np.random.default_rng(0)
        D = UMAP_DIMS
        scale = (rng.random(D) ** 3).astype(np.float32)
        centres = rng.standard_normal((200, D)).astype(np.float32) * scale
        W = rng.standard_normal((256, D)).astype(np.float32)
        spectrum = (np.arange(1, 257) ** -0.7).astype(np.float32)
        X = np.empty((n, D), np.float32)
        for lo in range(0, n, 2048):  # clusters, a decaying spectrum, noise; ReLU'd like codes
            m = min(2048, n - lo)
            z = rng.standard_normal((m, 256)).astype(np.float32) * spectrum
            noise = 0.2 * rng.standard_normal((m, D)).astype(np.float32)
            X[lo : lo + m] = np.maximum(centres[rng.integers(0, 200, m)] + 0.5 * (z @ W) + noise, 0)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        knn: dict[str, Any] = {}
        emb = fit_umap(
            X,
            n_components=3,
            n_neighbors=15,
            min_dist=0.1,
            metric="euclidean",
            random_state=42,
            knn_out=knn,
        )
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        np.save(out / "embedding.npy", emb)
        idx = knn["indices"]
        queries = np.random.default_rng(1).choice(n, min(n, 1000), replace=False)
        Xt = torch.from_numpy(X)
        sq = (Xt * Xt).sum(1)
        q = torch.from_numpy(queries)
        d = sq[q, None] + sq[None, :] - 2.0 * (Xt[q] @ Xt.T)
        exact = d.topk(15, dim=1, largest=False).indices.numpy()
        recall = np.mean(
            [len(set(a) & set(b)) / 15 for a, b in zip(idx[queries], exact, strict=True)]
        )
        extra = {
            "knn": knn["how"].split(" ")[0],
            "knn_s": round(knn["seconds"], 1),
            "recall": round(float(recall), 4),
        }
        return {
            "seconds": seconds,
            "peak": peak * 1024,
            "base": base * 1024,
            "out_bytes": dir_bytes(out),
            **extra,
        }
    elif stage == "page":
        import pandas as pd

        from saeflow.report import write_dashboard_page

        rng = np.random.default_rng(0)
        f = n
        index = pd.DataFrame(
            {
                "sae": "s",
                "feature_id": np.arange(f, dtype=np.int32),
                "n_active": rng.integers(0, 5000, f),
                "density": rng.random(f) / 100,
                "max_act": rng.random(f).astype(np.float32) * 10,
                "mean_act": rng.random(f).astype(np.float32),
                "hist_lo": np.zeros(f, np.float32),
                "hist_hi": rng.random(f).astype(np.float32) * 10,
                "hist_counts": [rng.integers(0, 100, 30) for _ in range(f)],
                "top_tokens": [[f" w{i}", f" v{i}"] for i in range(f)],
                "top_token_counts": [[3, 1] for _ in range(f)],
            }
        )
        examples = pd.DataFrame(
            {
                "feature_id": np.repeat(np.arange(f, dtype=np.int32), 10),
                "rank": np.tile(np.arange(10, dtype=np.int16), f),
                "activation": rng.random(10 * f).astype(np.float32),
                "context_html": [" a b c <b>d</b> e f g h i j k l"] * (10 * f),
            }
        )
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        page = write_dashboard_page(
            out / "dashboard.html", index, examples, analysis={"name": "bench", "sae": "s"}
        )
        extra = page_first_load_bytes(Path(page))
    else:
        raise SystemExit(f"unknown stage {stage}")
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "seconds": seconds,
        "peak": peak * 1024,
        "base": base * 1024,
        "out_bytes": dir_bytes(out),
        **extra,
    }


# ----------------------------------------------------------------------------- driver


def measure(stage: str, n: int, work: Path) -> dict[str, Any]:
    spec = prepare(stage, n, work / f"{stage}-{n}")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    env.setdefault("MALLOC_MMAP_THRESHOLD_", MMAP_THRESHOLD)
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{stage} at {n}: child failed\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def exponent(small: float, big: float) -> float:
    if small <= 0 or big <= 0:
        return float("nan")
    return math.log(big / small) / math.log(4)


def mb(x: float) -> str:
    return f"{x / 2**20:.1f}"


def main() -> None:
    global WIDTH
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=",".join(SIZES))
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--width", type=int, default=WIDTH, help="SAE features (131072: seed 001)")
    parser.add_argument("--child")
    args = parser.parse_args()
    WIDTH = args.width
    os.environ["SAEFLOW_BENCH_WIDTH"] = str(args.width)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    stages = [s for s in args.only.split(",") if s]
    print(
        "stage         N        time_s   peak_MB  stage_MB  out_MB   | 4N: time_s  peak_MB  "
        "stage_MB  out_MB   | exponents (target)"
    )
    with tempfile.TemporaryDirectory(prefix="saeflow-scale-") as tmp:
        for stage in stages:
            step = 1 if stage in ("umap", "page") else 2 * SEQ_LEN
            n = max(step, int(SIZES[stage] * args.scale) // step * step)
            a = measure(stage, n, Path(tmp))
            b = measure(stage, 4 * n, Path(tmp))
            held_a, held_b = a["peak"] - a["base"], b["peak"] - b["base"]
            t = TARGETS[stage]
            parts = [f"time {exponent(a['seconds'], b['seconds']):.2f} (<= {t.get('time', 1)})"]
            if "mem" in t:
                parts.append(
                    f"stage mem {exponent(max(held_a, 1), max(held_b, 1)):.2f} (<= {t['mem']})"
                )
            else:
                parts.append(f"peak mem {exponent(a['peak'], b['peak']):.2f}")
            if stage == "page":
                parts = [
                    f"first load {exponent(a['first_load'], b['first_load']):.2f} "
                    f"(<= {t['first_load']}); first load {mb(a['first_load'])} -> "
                    f"{mb(b['first_load'])} MB (plotly {mb(a['plotly'])} MB apart)"
                ]
            if stage == "umap":
                parts.append(
                    f"kNN {a['knn']} ({a['knn_s']} s) -> {b['knn']} ({b['knn_s']} s); "
                    f"recall at 4N {b['recall']} (N: {a['recall']}); "
                    f"4N fit {b['seconds']:.0f} s (target < 120 s)"
                )
            if stage == "matching":
                parts.append(f"passes {a['passes']} -> {b['passes']}")
            print(
                f"{stage:<13} {n:<8} {a['seconds']:>7.1f} {mb(a['peak']):>9} {mb(held_a):>9} "
                f"{mb(a['out_bytes']):>7}  | {b['seconds']:>10.1f} {mb(b['peak']):>8} "
                f"{mb(held_b):>9} {mb(b['out_bytes']):>7}  | " + "; ".join(parts),
                flush=True,
            )


if __name__ == "__main__":
    main()
