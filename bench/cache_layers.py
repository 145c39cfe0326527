"""Benchmark: k hook points cached in one forward pass against k separate single-hook passes.

Usage: PYTHONPATH=src python bench/cache_layers.py [--n-seqs 64] [--repeats 3]

Model: tiny GPT-2 (d=256, 8 blocks, vocab 50257, random weights); data: B32 x T128 random ids.
For each case, in one process with interleaved rounds (best kept, so machine load hits all alike):
  one pass   saeflow.activations.cache_hookpoints with all k hook points (model truncated to the
             deepest layer, each batch stops after the deepest hook point)
  separate   k cache_activations runs, one per hook point, each with its own model truncated to
             that layer (what k single-layer model entries cost; model loads not counted)
  floor      one bare forward of the model truncated to the deepest layer, nothing stored (one
             per depth and round, shared by the cases of that depth)
Cases: k resid_post layers spread over the model (k = 2, 4, 8), and four hooks of one block.
Prints separate / one pass (the saving; the block count alone predicts sum(L+1)/(max L+1)) and
one pass / floor (what capturing and writing k hook points costs over a bare forward).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

D_MODEL, N_LAYERS, VOCAB, T, B = 256, 8, 50257, 128, 32
KW = {"batch_size": B, "fmt": "parquet", "shard_tokens": 16384, "device": "cpu"}


def _cases():
    from saeflow.hooks import HookPoint

    spread = {
        k: [HookPoint(N_LAYERS - 1 - i * (N_LAYERS // k)) for i in range(k)] for k in (2, 4, 8)
    }
    cases = {f"{k} layers {min(hp.layer for hp in hps)}..7": hps for k, hps in spread.items()}
    block = [HookPoint(3, h) for h in ("resid_pre", "attn_out", "mlp_out", "resid_post")]
    cases["4 hooks of block 3"] = block
    return cases


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-seqs", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    import numpy as np
    import torch
    from _fixtures_models import make_tiny_model, write_tokens

    from saeflow.activations import cache_activations, cache_hookpoints
    from saeflow.models import load_lm, model_inputs

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = make_tiny_model(
            "gpt2", tmp / "gpt2", vocab=VOCAB, d_model=D_MODEL, n_layers=N_LAYERS,
            n_heads=4, n_ctx=T, tokenizer=False,
        )  # fmt: skip
        ids = np.random.default_rng(0).integers(4, VOCAB, (args.n_seqs, T)).tolist()
        tokens = write_tokens(tmp / "tokens.parquet", ids)
        batches = [(x, torch.ones_like(x)) for x in torch.tensor(ids).split(B)]
        models = {L: load_lm(model_dir, device="cpu", upto_layer=L) for L in range(N_LAYERS)}
        spec = {"path": str(model_dir)}

        def one_pass(hps) -> None:
            deepest = max(hp.layer for hp in hps)
            with tempfile.TemporaryDirectory(dir=tmp) as out:
                cache_hookpoints(spec, tokens, out, hps, model=models[deepest], **KW)

        def separate(hps) -> None:
            for hp in hps:
                with tempfile.TemporaryDirectory(dir=tmp) as out:
                    cache_activations(spec, tokens, out, layer=hp.layer, hook=hp.hook,
                                      model=models[hp.layer], **KW)  # fmt: skip

        def floor(deepest: int) -> None:
            model = models[deepest]
            with torch.inference_mode():
                for x, mask in batches:
                    model(**model_inputs(model, x, mask))

        variants = {"one pass": one_pass, "separate": separate}
        cases = _cases()
        depths = sorted({max(hp.layer for hp in hps) for hps in cases.values()})
        floor(depths[0])  # warm up
        times = {(c, v): [] for c in cases for v in variants}
        floors: dict[int, list[float]] = {d: [] for d in depths}
        for _ in range(args.repeats):
            for c, hps in cases.items():
                for v, fn in variants.items():
                    t0 = time.perf_counter()
                    fn(hps)
                    times[c, v].append(time.perf_counter() - t0)
            for d in depths:  # one bare forward per depth and round, shared by its cases
                t0 = time.perf_counter()
                floor(d)
                floors[d].append(time.perf_counter() - t0)

    n_tokens = args.n_seqs * T
    print(
        f"tiny GPT-2 d={D_MODEL} layers={N_LAYERS} vocab={VOCAB}, B{B}xT{T}, {n_tokens} tokens, "
        f"torch threads={torch.get_num_threads()}, best of {args.repeats} interleaved rounds"
    )
    print(f"{'case':<20} {'one pass s':>10} {'separate s':>10} {'floor s':>8} "
          f"{'separate/one':>12} {'blocks predict':>14} {'one/floor':>9}")  # fmt: skip
    for c, hps in cases.items():
        best = {v: min(times[c, v]) for v in variants}
        best["floor"] = min(floors[max(hp.layer for hp in hps)])
        predict = sum(hp.layer + 1 for hp in hps) / (max(hp.layer for hp in hps) + 1)
        print(
            f"{c:<20} {best['one pass']:>10.2f} {best['separate']:>10.2f} {best['floor']:>8.2f} "
            f"{best['separate'] / best['one pass']:>11.2f}x {predict:>13.2f}x "
            f"{best['one pass'] / best['floor']:>8.2f}x"
        )


if __name__ == "__main__":
    main()
