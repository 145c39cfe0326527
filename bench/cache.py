"""Benchmark: activation caching vs its floor and the naive ways to get one layer's activations.

Usage: PYTHONPATH=src python bench/cache.py [--n-seqs 128] [--layer 1] [--repeats 5]

Model: tiny GPT-2 (d=256, 4 blocks, vocab 50257, random weights), whose LM head is large next to
its blocks, so stopping early matters. Data: B32 x T128 random token ids. Variants:
  cache    saeflow.activations.cache_activations (truncated load, hook + stop, parquet writes)
  floor    bare forward of the truncated model (L+1 blocks, no head), nothing stored: the floor
  naive    full AutoModelForCausalLM forward with output_hidden_states=True, hidden_states[L+1]
  nnsight  nnsight trace of the full model with .save() and tracer.stop() (if nnsight imports)
Memory: peak RSS of each variant alone in a fresh subprocess (2 batches). Speed: one process,
interleaved rounds, best kept, so machine load hits all variants alike.
Targets: cache >= 0.9x floor, >= 5x naive; cache weights ~ (L+1)/n_layers of the blocks.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

D_MODEL, N_LAYERS, VOCAB, T, B = 256, 4, 50257, 128, 32
VARIANTS = ("floor", "cache", "naive", "nnsight")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _batches(tokens_path: Path):
    import pyarrow.parquet as pq
    import torch

    ids = pq.read_table(tokens_path, columns=["token_ids"]).column("token_ids").to_pylist()
    all_NT = torch.tensor(ids, dtype=torch.long)
    return [(x, torch.ones_like(x)) for x in all_NT.split(B)]


def setup(name: str, model_dir: Path, tokens_path: Path, layer: int) -> dict:
    """Load what variant `name` needs; returns its runner(batches), weights and load time."""
    import torch

    from saeflow.models import layer_modules, load_lm, model_inputs, weight_bytes

    t0 = time.perf_counter()
    if name in ("floor", "cache"):
        model = load_lm(model_dir, device="cpu", upto_layer=layer)
    elif name == "naive":
        model = load_lm(model_dir, device="cpu", with_head=True)
    else:
        import warnings

        from nnsight import LanguageModel

        warnings.simplefilter("ignore")
        lm = LanguageModel(str(model_dir), dispatch=True, dtype=torch.float32)
        model = lm._module
    load_s = time.perf_counter() - t0

    def run(batches) -> None:
        if name == "floor":
            with torch.inference_mode():
                for ids, mask in batches:
                    model(**model_inputs(model, ids, mask))
        elif name == "cache":
            from saeflow.activations import cache_activations

            with tempfile.TemporaryDirectory() as tmp:
                cache_activations(
                    {"path": str(model_dir)}, tokens_path, tmp, layer=layer, batch_size=B,
                    fmt="parquet", shard_tokens=16384, device="cpu", model=model,
                )  # fmt: skip
        elif name == "naive":
            with torch.inference_mode():
                for ids, mask in batches:
                    hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
                    hs.hidden_states[layer + 1][mask.bool()].cpu()
        else:
            for ids, mask in batches:
                with torch.inference_mode():
                    with lm.trace({"input_ids": ids, "attention_mask": mask}) as tracer:
                        saved = lm.transformer.h[layer].output.save()
                        tracer.stop()
                    saved[mask.bool()].cpu()

    return {
        "run": run,
        "load_s": load_s,
        "weight_mb": weight_bytes(model) / 2**20,
        "block_weight_mb": weight_bytes(layer_modules(model)) / 2**20,
        "warm": lambda b: run(b) if name != "cache" else _warm(model, b),
    }


def _warm(model, batches) -> None:
    import torch

    from saeflow.models import model_inputs

    with torch.inference_mode():
        model(**model_inputs(model, *batches[0]))


def _nnsight_ok() -> str | None:
    try:
        import nnsight  # noqa: F401
    except ImportError as e:
        return f"nnsight does not import ({e})"
    return None


def memory(name: str, model_dir: Path, tokens_path: Path, layer: int) -> dict:
    """Peak RSS of one variant, alone in this process, over the batches of `tokens_path`."""
    batches = _batches(tokens_path)
    rss0 = _rss_mb()
    v = setup(name, model_dir, tokens_path, layer)
    v["run"](batches)
    return {"variant": name, "peak_rss_mb": _rss_mb(), "peak_above_data_mb": _rss_mb() - rss0}


def speed(names: list[str], model_dir: Path, tokens_path: Path, layer: int, repeats: int) -> dict:
    """tok/s per variant, best of `repeats` interleaved rounds so load noise hits all alike."""
    batches = _batches(tokens_path)
    n_tokens = sum(int(m.sum()) for _, m in batches)
    variants = {n: setup(n, model_dir, tokens_path, layer) for n in names}
    for v in variants.values():
        v["warm"](batches[:1])
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n, v in variants.items():
            if n == "naive" and r > 0:  # ~10x slower than the rest: one pass is enough
                continue
            t0 = time.perf_counter()
            v["run"](batches)
            times[n].append(time.perf_counter() - t0)
    return {
        n: {
            "tok_s": n_tokens / min(times[n]),
            "times": times[n],
            "load_s": v["load_s"],
            "weight_mb": v["weight_mb"],
            "block_weight_mb": v["block_weight_mb"],
        }
        for n, v in variants.items()
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-seqs", type=int, default=128)
    p.add_argument("--layer", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (best kept); naive: 1")
    p.add_argument("--memory", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--tokens", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory:
        print(json.dumps(memory(args.memory, args.model_dir, args.tokens, args.layer)))
        return

    import numpy as np
    import torch
    from _fixtures_models import make_tiny_model, write_tokens

    names = [v for v in VARIANTS if v != "nnsight" or _nnsight_ok() is None]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = make_tiny_model(
            "gpt2", tmp / "gpt2", vocab=VOCAB, d_model=D_MODEL, n_layers=N_LAYERS,
            n_heads=4, n_ctx=T, tokenizer=False,
        )  # fmt: skip
        ids = np.random.default_rng(0).integers(4, VOCAB, (args.n_seqs, T)).tolist()
        tokens = write_tokens(tmp / "tokens.parquet", ids)
        mem_tokens = write_tokens(tmp / "tokens_mem.parquet", ids[: 2 * B])
        mem = {}
        for v in names:
            cmd = [sys.executable, __file__, "--memory", v, "--layer", str(args.layer)]
            cmd += ["--model-dir", str(model_dir), "--tokens", str(mem_tokens)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if res.returncode == 0:
                mem[v] = json.loads(res.stdout.strip().splitlines()[-1])
            else:
                mem[v] = {"error": (res.stderr.strip().splitlines() or ["?"])[-1]}
        rows = speed(names, model_dir, tokens, args.layer, args.repeats)

    print(
        f"tiny GPT-2 d={D_MODEL} layers={N_LAYERS} vocab={VOCAB}, B{B}xT{T}, layer {args.layer}, "
        f"{args.n_seqs * T} tokens, torch threads={torch.get_num_threads()}, "
        f"best of {args.repeats} interleaved rounds (naive: 1)"
    )
    print(f"{'variant':<8} {'tok/s':>9} {'load s':>7} {'weights MB':>10} {'blocks MB':>9} "
          f"{'peak RSS MB':>11} {'above data':>10}")  # fmt: skip
    for v in VARIANTS:
        if v not in rows:
            print(f"{v:<8} skipped: {_nnsight_ok()}")
            continue
        r, m = rows[v], mem.get(v, {})
        rss = (
            f"{m['peak_rss_mb']:>11.0f} {m['peak_above_data_mb']:>10.0f}"
            if "peak_rss_mb" in m
            else m
        )
        print(
            f"{v:<8} {r['tok_s']:>9.0f} {r['load_s']:>7.2f} {r['weight_mb']:>10.1f} "
            f"{r['block_weight_mb']:>9.2f} {rss}"
        )
    c = rows["cache"]
    for base, target in (("floor", 0.9), ("naive", 5.0), ("nnsight", None)):
        if base in rows:
            goal = f" (target >= {target}x)" if target else ""
            print(f"cache / {base}: {c['tok_s'] / rows[base]['tok_s']:.2f}x tok/s{goal}")
    paired = sorted(f / t for f, t in zip(rows["floor"]["times"], c["times"], strict=True))
    print(
        f"cache / floor per round (paired, {len(paired)} rounds): min {paired[0]:.2f}x, "
        f"median {paired[len(paired) // 2]:.2f}x, max {paired[-1]:.2f}x"
    )
    n = rows["naive"]
    print(
        f"weights cache / full: {c['weight_mb'] / n['weight_mb']:.2f} (all), "
        f"{c['block_weight_mb'] / n['block_weight_mb']:.2f} (blocks; (L+1)/n_layers = "
        f"{(args.layer + 1) / N_LAYERS:.2f})"
    )


if __name__ == "__main__":
    main()
