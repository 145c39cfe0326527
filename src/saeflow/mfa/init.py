"""Centroid initialisation for the MFA: reservoir pool -> random projection -> k-means++ -> Lloyd.

Follows the reference implementation of "From Directions to Regions" (ReservoirKMeans): k-means
with restarts runs on a uniform reservoir sample of the activations projected to `proj_dim`
dimensions by a random orthonormal matrix (cheap and distance-preserving in expectation), the
centroids are lifted back to D dimensions, then Lloyd epochs over *all* activations refine them
(assignment in the projected space, means in the full space). `method="random"` instead takes K
distinct points of the pool, which the paper reports also works. The rule streams the cache
shard by shard, so its memory is the pool plus one shard.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from saeflow.errors import ConfigError, DataError

BatchSource = Callable[[], Iterator[torch.Tensor]]
INIT_METHODS = ("kmeans", "random")


def reservoir_sample(
    batches: Iterable[torch.Tensor], pool_size: int, generator: torch.Generator
) -> torch.Tensor:
    """Uniform sample of `pool_size` rows from a stream of (B, D) batches, in O(pool) memory.

    Each row gets an i.i.d. uniform key and the pool keeps the smallest keys, so the result does
    not depend on how the stream is cut into batches (only on the row order).
    """
    pool_ND: torch.Tensor | None = None
    keys_N: torch.Tensor | None = None
    for x_BD in batches:
        x_BD = x_BD.to(torch.float32)
        k_B = torch.rand(x_BD.shape[0], generator=generator)
        if pool_ND is None:
            pool_ND, keys_N = x_BD, k_B
        else:
            pool_ND = torch.cat([pool_ND, x_BD])
            keys_N = torch.cat([keys_N, k_B])
        if pool_ND.shape[0] > pool_size:
            keep = torch.topk(keys_N, pool_size, largest=False, sorted=False).indices
            keep = keep.sort().values
            pool_ND, keys_N = pool_ND[keep], keys_N[keep]
    if pool_ND is None:
        raise DataError("no activations to sample from (empty activation cache)")
    return pool_ND.contiguous()


def orthonormal_projection(D: int, d: int, generator: torch.Generator) -> torch.Tensor:
    """A (D, d) matrix with orthonormal columns (QR of a Gaussian, signs fixed for determinism)."""
    A = torch.randn(D, d, generator=generator, dtype=torch.float64)
    Q, R = torch.linalg.qr(A, mode="reduced")
    signs = torch.sign(torch.diagonal(R))
    signs[signs == 0] = 1.0
    return (Q * signs).to(torch.float32)


def _sqdist(x_BD: torch.Tensor, c_KD: torch.Tensor) -> torch.Tensor:
    d2 = (x_BD * x_BD).sum(1, keepdim=True) + (c_KD * c_KD).sum(1)[None] - 2.0 * x_BD @ c_KD.T
    return d2.clamp_min_(0.0)


def _assign(x_ND: torch.Tensor, c_KD: torch.Tensor, block: int = 8192) -> tuple[torch.Tensor, ...]:
    """Nearest centroid and squared distance, in blocks of rows to bound memory."""
    labels, dists = [], []
    for s in range(0, x_ND.shape[0], block):
        d2 = _sqdist(x_ND[s : s + block], c_KD)
        v, i = d2.min(1)
        labels.append(i)
        dists.append(v)
    return torch.cat(labels), torch.cat(dists)


def kmeans_pp(x_ND: torch.Tensor, K: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each next centre drawn with probability proportional to D(x)^2."""
    N = x_ND.shape[0]
    first = int(torch.randint(N, (1,), generator=generator))
    idx = [first]
    d2_N = _sqdist(x_ND, x_ND[first : first + 1]).squeeze(1)
    for _ in range(1, K):
        total = d2_N.sum()
        if total <= 0:  # fewer distinct points than K: fall back to unused points
            rest = torch.ones(N, dtype=torch.bool)
            rest[idx] = False
            nxt = int(torch.nonzero(rest)[0])
        else:
            nxt = int(torch.multinomial(d2_N / total, 1, generator=generator))
        idx.append(nxt)
        d2_N = torch.minimum(d2_N, _sqdist(x_ND, x_ND[nxt : nxt + 1]).squeeze(1))
    return x_ND[idx].clone()


def _reseed_empty(c_KD: torch.Tensor, empty: torch.Tensor, pool_ND: torch.Tensor) -> torch.Tensor:
    """Move empty clusters onto the pool points farthest from their centroid (deterministic)."""
    if empty.numel() == 0:
        return c_KD
    _, d2 = _assign(pool_ND, c_KD)
    far = torch.topk(d2, min(empty.numel(), pool_ND.shape[0])).indices
    c_KD = c_KD.clone()
    c_KD[empty[: far.numel()]] = pool_ND[far]
    return c_KD


def kmeans(
    x_ND: torch.Tensor,
    K: int,
    *,
    restarts: int,
    iters: int,
    generator: torch.Generator,
    tol: float = 1e-4,
) -> tuple[torch.Tensor, float]:
    """k-means++ then Lloyd on an in-memory pool; the restart with the lowest inertia wins."""
    best_C, best_inertia = None, math.inf
    for _ in tqdm(range(restarts), desc="k-means restarts", file=sys.stderr, mininterval=5):
        C = kmeans_pp(x_ND, K, generator)
        for _ in range(iters):
            labels, _ = _assign(x_ND, C)
            sums = torch.zeros_like(C).index_add_(0, labels, x_ND)
            counts = torch.bincount(labels, minlength=K).to(C.dtype)
            newC = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], C)
            newC = _reseed_empty(newC, torch.nonzero(counts == 0).flatten(), x_ND)
            shift = (newC - C).norm(dim=1).max()
            C = newC
            if shift < tol:
                break
        inertia = float(_assign(x_ND, C)[1].sum())
        if inertia < best_inertia:
            best_C, best_inertia = C, inertia
    return best_C, best_inertia


def lloyd_refine(
    source: BatchSource,
    c_KD: torch.Tensor,
    proj_DP: torch.Tensor | None,
    *,
    iters: int,
    pool_ND: torch.Tensor,
    tol: float = 1e-4,
) -> torch.Tensor:
    """Lloyd epochs over the whole stream: assign (projected if `proj_DP`), average in full D."""
    K, D = c_KD.shape
    for _ in tqdm(range(iters), desc="Lloyd epochs", file=sys.stderr, mininterval=5):
        c_proj = c_KD if proj_DP is None else c_KD @ proj_DP
        sums = torch.zeros(K, D, dtype=torch.float64)
        counts = torch.zeros(K, dtype=torch.float64)
        for x_BD in source():
            x_BD = x_BD.to(torch.float32)
            x_proj = x_BD if proj_DP is None else x_BD @ proj_DP
            labels, _ = _assign(x_proj, c_proj)
            sums.index_add_(0, labels, x_BD.to(torch.float64))
            counts += torch.bincount(labels, minlength=K).to(torch.float64)
        newC = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], c_KD.double())
        newC = newC.to(torch.float32)
        empty = torch.nonzero(counts == 0).flatten()
        if empty.numel():
            newC = _reseed_empty(newC, empty, pool_ND)
        shift = float((newC - c_KD).norm(dim=1).max())
        c_KD = newC
        if shift < tol:
            break
    return c_KD


def init_centroids(
    source: BatchSource,
    K: int,
    *,
    method: str = "kmeans",
    pool_size: int = 50_000,
    proj_dim: int | None = 32,
    restarts: int = 3,
    lloyd_iters: int = 10,
    kmeans_iters: int = 50,
    seed: int = 0,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """K initial centroids (K, D) float32 and a JSON-able summary of how they were made."""
    if method not in INIT_METHODS:
        raise ConfigError(f"init = {method!r}: must be one of {', '.join(INIT_METHODS)}")
    if pool_size < K:
        raise ConfigError(f"pool_size = {pool_size}: must be at least K = {K}")
    gen = torch.Generator().manual_seed(int(seed))
    pool_ND = reservoir_sample(source(), pool_size, gen)
    N, D = pool_ND.shape
    if N < K:
        raise DataError(f"only {N} activations for K = {K} components: lower K")
    info: dict[str, Any] = {"method": method, "K": K, "D": D, "pool": N, "seed": int(seed)}
    if method == "random":
        idx = torch.randperm(N, generator=gen)[:K].sort().values
        return pool_ND[idx].clone(), info
    use_proj = proj_dim is not None and 0 < int(proj_dim) < D
    proj_DP = orthonormal_projection(D, int(proj_dim), gen) if use_proj else None
    sketch = pool_ND @ proj_DP if use_proj else pool_ND
    C, inertia = kmeans(sketch, K, restarts=restarts, iters=kmeans_iters, generator=gen)
    # Lift to D: the mean of each pool cluster (better than C @ P^T, which loses the complement).
    labels, _ = _assign(sketch, C)
    sums = torch.zeros(K, D).index_add_(0, labels, pool_ND)
    counts = torch.bincount(labels, minlength=K).to(torch.float32)
    lifted = sums / counts.clamp_min(1)[:, None]
    C_KD = torch.where(counts[:, None] > 0, lifted, C @ proj_DP.T if use_proj else C)
    C_KD = lloyd_refine(source, C_KD, proj_DP, iters=lloyd_iters, pool_ND=pool_ND)
    info.update(
        proj_dim=int(proj_dim) if use_proj else D,
        restarts=restarts,
        lloyd_iters=lloyd_iters,
        pool_inertia=inertia,
    )
    full_labels, full_d2 = _assign(pool_ND, C_KD)
    info["pool_sq_error"] = float(full_d2.mean())
    info["pool_cluster_sizes"] = torch.bincount(full_labels, minlength=K).tolist()
    return C_KD.contiguous(), info


def tensor_source(x_ND: torch.Tensor, batch_size: int = 8192) -> BatchSource:
    """A re-iterable stream of float32 batches over an in-memory (N, D) matrix."""

    def source() -> Iterator[torch.Tensor]:
        for s in range(0, x_ND.shape[0], batch_size):
            yield x_ND[s : s + batch_size].to(torch.float32)

    return source


def shard_source(acts_path: str | Path) -> BatchSource:
    """Stream the activation cache shard by shard (bounded memory; re-read for each pass)."""
    from saeflow.activations import iter_activation_shards

    def source() -> Iterator[torch.Tensor]:
        for _, _, acts_ND in iter_activation_shards(acts_path):
            if not bool(torch.isfinite(acts_ND).all()):
                raise DataError(f"{acts_path}: activations contain inf/NaN")
            yield acts_ND.to(torch.float32)

    return source


def save_centroids(path: str | Path, centroids_KD: torch.Tensor) -> None:
    from safetensors.torch import save_file

    from saeflow.io import atomic_path

    with atomic_path(path) as tmp:
        save_file({"centroids_KD": centroids_KD.to(torch.float32).contiguous()}, str(tmp))


def load_centroids(path: str | Path) -> torch.Tensor:
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: centroid file does not exist (rerun mfa_init)")
    with safe_open(str(path), framework="pt") as f:
        if "centroids_KD" not in f.keys():  # noqa: SIM118
            raise DataError(f"{path}: no 'centroids_KD' tensor (not written by mfa_init)")
        return f.get_tensor("centroids_KD")


def run_mfa_init(
    acts_path: str | Path,
    *,
    centroids_path: str | Path,
    info_path: str | Path,
    settings: dict[str, Any],
    seed: int = 0,
) -> dict[str, Any]:
    """mfa_init rule: centroids (safetensors) and a JSON summary of the initialisation."""
    from saeflow.io import read_manifest, write_json
    from saeflow.mfa import resolve_settings
    from saeflow.utils import seed_everything

    s = resolve_settings(settings)
    seed_everything(seed)
    source = shard_source(acts_path)
    centroids, info = init_centroids(
        source,
        s["K"],
        method=s["init"],
        pool_size=s["pool_size"],
        proj_dim=s["proj_dim"],
        restarts=s["restarts"],
        lloyd_iters=s["lloyd_iters"],
        seed=seed,
    )
    info["n_tokens"] = read_manifest(acts_path).get("n_tokens")
    save_centroids(centroids_path, centroids)
    write_json(info_path, info)
    return info
