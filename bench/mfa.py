"""MFA training step: Woodbury + R x R Cholesky against the dense D x D covariance baseline.

Same data, parameters, optimiser and loss (the two NLLs are printed and agree); only the
log-likelihood differs. Each variant runs in its own spawned process so that its peak memory
(RSS growth on CPU, growth of max allocated on CUDA, over the data and parameters) is its own.
Prints seconds per epoch, peak memory and the ratios. Default size: D=256, K=64, R=10, N=2048,
batch 512, one timed epoch after a warm-up, one thread (the shared 2-core box suffers OpenMP
spin contention with two); about 45 s in all there.

    PYTHONPATH=src python bench/mfa.py [--device cpu|cuda] [--epochs 1] [--n 2048] [--threads 1]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time

import torch


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _run(variant: str, args: dict, queue) -> None:
    from saeflow.mfa.model import MFA, dense_log_prob_components

    torch.set_num_threads(args["threads"])
    device = torch.device(args["device"])
    K, D, R, N, B = args["K"], args["D"], args["R"], args["n"], args["batch"]
    g = torch.Generator().manual_seed(0)
    X = (3 * torch.randn(K, D, generator=g))[torch.randint(K, (N,), generator=g)]
    X = (X + torch.randn(N, D, generator=g)).to(device)
    model = MFA(K, D, R)
    model.set_params(X[:K].cpu(), 0.3 * torch.randn(K, D, R, generator=g), torch.ones(D))
    model.to(device)

    def nll(x: torch.Tensor) -> torch.Tensor:
        if variant == "woodbury":
            return model.nll(x)
        ll = dense_log_prob_components(x, model.mu, model.W, model.psi)
        return -torch.logsumexp(ll + model.log_pi_K(), dim=1).mean()

    with torch.no_grad():
        first = float(nll(X[:B]))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def epoch() -> None:
        for s in range(0, N, B):
            opt.zero_grad(set_to_none=True)
            loss = nll(X[s : s + B])
            loss.backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _rss_mb()
    epoch()  # warm-up (allocator, kernels); counted in the memory peak, not in the time
    t0 = time.perf_counter()
    for _ in range(args["epochs"]):
        epoch()
    sec = (time.perf_counter() - t0) / args["epochs"]
    if device.type == "cuda":
        mem = torch.cuda.max_memory_allocated() / 2**20 - base
    else:
        mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    queue.put((variant, sec, max(mem, 0.0), first))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--D", type=int, default=256)
    p.add_argument("--K", type=int, default=64)
    p.add_argument("--R", type=int, default=10)
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    args = vars(p.parse_args())
    ctx = mp.get_context("spawn")
    out = {}
    for variant in ("dense", "woodbury"):
        q = ctx.Queue()
        proc = ctx.Process(target=_run, args=(variant, args, q))
        proc.start()
        out[variant] = q.get()
        proc.join()
    print(
        f"MFA NLL training, D={args['D']} K={args['K']} R={args['R']} N={args['n']} "
        f"batch={args['batch']} on {args['device']} ({args['threads']} threads)"
    )
    mem_kind = "peak CUDA MB" if args["device"].startswith("cuda") else "peak RSS growth MB"
    print(f"{'variant':<10} {'s/epoch':>9} {mem_kind:>20} {'NLL(batch 0)':>14}")
    for variant in ("dense", "woodbury"):
        _, sec, mem, first = out[variant]
        print(f"{variant:<10} {sec:9.3f} {mem:20.1f} {first:14.5f}")
    d, w = out["dense"], out["woodbury"]
    print(f"speed-up (dense / woodbury time): {d[1] / w[1]:.1f}x")
    print(f"memory ratio (dense / woodbury):  {d[2] / max(w[2], 1e-3):.1f}x")
    cov_mb = args["K"] * args["D"] ** 2 * 4 / 2**20
    low_mb = args["K"] * args["D"] * args["R"] * 4 / 2**20
    print(f"covariance storage: dense K*D*D {cov_mb:.1f} MB vs K*D*R {low_mb:.2f} MB")


if __name__ == "__main__":
    main()
