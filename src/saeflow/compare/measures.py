"""Representation-similarity measures of two matrices over the same N tokens, and their baselines.

Every measure takes X [N, p] and Y [N, q] whose rows are the same tokens (the caller aligns them by
(seq_id, pos)). Zero-variance columns (dead features, constant dimensions) carry no information and
make correlations 0/0, so `prepare` drops them before anything is computed: no NaN can reach a
result. All arithmetic is float64.

- mean CCA: mean of the canonical correlations between the top-`pca_dim` principal components of
  each side. CCA on the raw columns overfits as soon as p or q nears N (every correlation tends to
  1), so both sides are first reduced by PCA to the same fixed number of components. The canonical
  correlations are the cosines of the principal angles between the two column spaces (singular
  values of Q_x^T Q_y with Q orthonormal bases); this is the quantity the seed's plan wanted, not
  sklearn's `CCA.score`, which is the R^2 of predicting Y's canonical scores from X's.
- SVCCA (Raghu et al. 2017): the same, but each side keeps the fewest components that explain
  `svcca_variance` (0.99) of its variance, capped at `max_dim`; the mean runs over min(k_x, k_y).
- linear CKA (Kornblith et al. 2019): ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) on centred columns.
- debiased CKA: the same ratio with the unbiased HSIC estimator of Song et al. (2012), computed in
  feature space (no N x N Gram matrix).
- mutual kNN alignment (Huh et al. 2024): mean over tokens of |N_X(i) ∩ N_Y(i)| / k, neighbours by
  cosine similarity of the centred rows.
- Procrustes distance: sqrt(2 - 2 ||X^T Y||_*) of centred, Frobenius-normalised X and Y, the
  residual of the best orthogonal map between them (0 for identical inputs, sqrt(2) at most). In
  `all_measures` X and Y are each side's top-`max_dim` PC scores, which keep the bulk of the
  variance and make the SVD small.

Baselines: a token permutation (rows of Y shuffled; the null of "no shared structure over these
tokens") or random column subsets of the same size (the keyword-subspace null). z = (obs - mean) /
std of the null; p is the one-sided permutation p-value (1 + #null at least as extreme) / (1 + n).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

SIMILARITIES = ("cca", "svcca", "cka", "cka_debiased", "mknn")
DISTANCES = ("procrustes",)
MEASURES = SIMILARITIES + DISTANCES


def prepare(X_NP: np.ndarray, rtol: float = 1e-8) -> np.ndarray:
    """Centred float64 copy without zero-variance columns (dropped, not NaN-producing)."""
    X = np.asarray(X_NP, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {X.shape}")
    X = X - X.mean(axis=0, keepdims=True)
    sd = X.std(axis=0)
    scale = max(float(sd.max(initial=0.0)), 1e-300)
    return np.ascontiguousarray(X[:, sd > rtol * scale])


def pca_basis(
    X_NP: np.ndarray, dim: int | None = None, variance: float | None = None
) -> np.ndarray:
    """Orthonormal [N, k] basis of the top principal components of centred X.

    `dim` fixes k; `variance` takes the fewest components whose explained variance reaches it
    (then `dim` is the cap). Components with a negligible singular value are never kept.
    """
    if X_NP.shape[1] == 0:
        return np.zeros((X_NP.shape[0], 0))
    U, S, _ = np.linalg.svd(X_NP, full_matrices=False)
    keep = int((S[0] * 1e-10 < S).sum()) if S.size and S[0] > 0 else 0
    if variance is not None:
        ev = np.cumsum(S[:keep] ** 2) / max(float((S[:keep] ** 2).sum()), 1e-300)
        keep = min(keep, int(np.searchsorted(ev, variance - 1e-12) + 1))
    if dim is not None:
        keep = min(keep, int(dim))
    return U[:, :keep]


def canonical_correlations(Qx_NK: np.ndarray, Qy_NK: np.ndarray) -> np.ndarray:
    """Canonical correlations of two orthonormal bases (descending, clipped to [0, 1])."""
    if Qx_NK.shape[1] == 0 or Qy_NK.shape[1] == 0:
        return np.zeros(0)
    s = np.linalg.svd(Qx_NK.T @ Qy_NK, compute_uv=False)
    return np.clip(s, 0.0, 1.0)


def _mean(x: np.ndarray) -> float:
    return float(x.mean()) if x.size else 0.0


def linear_cka(X: np.ndarray, Y: np.ndarray) -> float:
    """Standard linear CKA of centred X, Y (feature-space form, O(N p q))."""
    xy = np.linalg.norm(X.T @ Y) ** 2
    xx = np.linalg.norm(X.T @ X)
    yy = np.linalg.norm(Y.T @ Y)
    denom = xx * yy
    return float(xy / denom) if denom > 0 else 0.0


def _hsic_unbiased_parts(X: np.ndarray, Y: np.ndarray) -> float:
    """Unbiased HSIC (Song et al. 2012) of linear kernels K = X X^T, L = Y Y^T without forming them.

    HSIC_u = [tr(K~L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3)), K~ = K - diag.
    """
    n = X.shape[0]
    kd = np.einsum("ij,ij->i", X, X)
    ld = np.einsum("ij,ij->i", Y, Y)
    tr = np.linalg.norm(X.T @ Y) ** 2 - float(kd @ ld)
    k1 = X @ X.sum(axis=0) - kd  # K~ 1
    l1 = Y @ Y.sum(axis=0) - ld
    sk, sl = float(k1.sum()), float(l1.sum())
    return (tr + sk * sl / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * float(k1 @ l1)) / (n * (n - 3))


def debiased_cka(X: np.ndarray, Y: np.ndarray) -> float:
    """CKA with unbiased HSIC estimates; near 0 for independent data even when p, q >> N."""
    if X.shape[0] < 4:
        return 0.0
    xy = _hsic_unbiased_parts(X, Y)
    xx = _hsic_unbiased_parts(X, X)
    yy = _hsic_unbiased_parts(Y, Y)
    denom = np.sqrt(max(xx, 0.0) * max(yy, 0.0))
    return float(xy / denom) if denom > 0 else 0.0


def knn_sets(X: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
    """[N, k] indices of each row's k nearest rows by cosine similarity (itself excluded)."""
    n = X.shape[0]
    k = min(k, n - 1)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    Z = np.divide(X, norms, out=np.zeros_like(X), where=norms > 0)
    out = np.empty((n, k), dtype=np.int64)
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        sim = Z[lo:hi] @ Z.T
        sim[np.arange(hi - lo), np.arange(lo, hi)] = -np.inf
        part = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        out[lo:hi] = np.sort(part, axis=1)
    return out


def mutual_knn(nx_NK: np.ndarray, ny_NK: np.ndarray, perm: np.ndarray | None = None) -> float:
    """Mean |N_X(i) ∩ N_Y(i)| / k; with `perm`, Y's row i is token perm[i] (a shuffled pairing)."""
    n, k = nx_NK.shape
    if k == 0:
        return 0.0
    if perm is None:
        ny = ny_NK
    else:
        inv = np.empty(n, dtype=np.int64)
        inv[perm] = np.arange(n)
        ny = inv[ny_NK[perm]]  # neighbours of row i of Y[perm], renumbered as rows of Y[perm]
    hits = (nx_NK[:, :, None] == ny[:, None, :]).any(axis=2).sum()  # [N, k, k] compare
    return float(hits / (n * k))


def procrustes_distance(X: np.ndarray, Y: np.ndarray) -> float:
    """sqrt(2 - 2 ||X^T Y||_*) of Frobenius-normalised centred X, Y (orthogonal Procrustes)."""
    nx, ny = np.linalg.norm(X), np.linalg.norm(Y)
    if nx == 0 or ny == 0:
        return float(np.sqrt(2.0))
    nuc = float(np.linalg.svd((X / nx).T @ (Y / ny), compute_uv=False).sum())
    return float(np.sqrt(max(0.0, 2.0 - 2.0 * min(nuc, 1.0))))


@dataclass
class Prepared:
    """One side, prepared once; everything a permutation does not change is computed here.

    `K` (the N x N Gram of the centred rows) is kept only for wide sides (p > N / 8), where the
    permuted cross terms are cheaper as an N^2 gather than as an N p q product.
    """

    X: np.ndarray  # centred, zero-variance columns dropped [N, p]
    q_cca: np.ndarray  # orthonormal top-pca_dim PC basis [N, k]
    q_svcca: np.ndarray  # orthonormal basis of the PCs keeping svcca_variance [N, k']
    scores: np.ndarray  # top-max_dim PC scores (U S) [N, m], for Procrustes
    knn: np.ndarray  # [N, knn_k] neighbour indices
    K: np.ndarray | None
    kd: np.ndarray  # diag of K: squared row norms
    k1: np.ndarray  # K~ 1 (zero-diagonal Gram times ones)
    gram_fro: float  # ||X^T X||_F = ||K||_F
    hsic_u: float  # unbiased HSIC(K, K)


def _nonzero(sv: np.ndarray) -> np.ndarray:
    """Singular values above 1e-7 of the largest (none when all are 0)."""
    floor = sv[0] * 1e-7 if sv[0] > 0 else np.inf
    return sv > floor


def _pca(X: np.ndarray, K: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(U, S) of centred X, descending, from the smaller of X^T X [p, p] and the Gram X X^T."""
    n, p = X.shape
    if p == 0:
        return np.zeros((n, 0)), np.zeros(0)
    if p <= n:
        evals, V = np.linalg.eigh(X.T @ X)
        order = np.argsort(evals)[::-1]
        S = np.sqrt(np.clip(evals[order], 0.0, None))
        keep = _nonzero(S)
        return (X @ V[:, order[keep]]) / S[keep], S[keep]
    evals, U = np.linalg.eigh(X @ X.T if K is None else K)
    order = np.argsort(evals)[::-1]
    S = np.sqrt(np.clip(evals[order], 0.0, None))
    keep = _nonzero(S)
    return U[:, order[keep]], S[keep]


def _basis(U: np.ndarray, S: np.ndarray, dim: int | None, variance: float | None) -> np.ndarray:
    keep = len(S)
    if variance is not None and keep:
        ev = np.cumsum(S**2) / float((S**2).sum())
        keep = min(keep, int(np.searchsorted(ev, variance - 1e-12) + 1))
    if dim is not None:
        keep = min(keep, int(dim))
    return U[:, :keep]


def _knn_from_gram(K: np.ndarray, kd: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
    n = K.shape[0]
    k = min(k, n - 1)
    inv = np.divide(1.0, np.sqrt(kd), out=np.zeros_like(kd), where=kd > 0)
    out = np.empty((n, k), dtype=np.int64)
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        sim = K[lo:hi] * inv[lo:hi, None] * inv[None, :]
        sim[np.arange(hi - lo), np.arange(lo, hi)] = -np.inf
        out[lo:hi] = np.sort(np.argpartition(-sim, k - 1, axis=1)[:, :k], axis=1)
    return out


def prepare_side(
    X_NP: np.ndarray, *, pca_dim: int, svcca_variance: float, max_dim: int, knn_k: int
) -> Prepared:
    X = prepare(X_NP)
    n, p = X.shape
    kd = np.einsum("ij,ij->i", X, X)
    K = X @ X.T if p > n / 8 else None
    U, S = _pca(X, K)
    if K is not None:
        gram_fro = float(np.sqrt((K * K).sum()))
        knn = _knn_from_gram(K, kd, knn_k) if p and n > 1 else np.zeros((n, 0), int)
    else:
        gram_fro = float(np.linalg.norm(X.T @ X))
        knn = knn_sets(X, knn_k) if p and n > 1 else np.zeros((n, 0), int)
    k1 = X @ X.sum(axis=0) - kd
    side = Prepared(
        X=X,
        q_cca=_basis(U, S, pca_dim, None),
        q_svcca=_basis(U, S, max_dim, svcca_variance),
        scores=U[:, :max_dim] * S[:max_dim],
        knn=knn,
        K=K,
        kd=kd,
        k1=k1,
        gram_fro=gram_fro,
        hsic_u=0.0,
    )
    side.hsic_u = _hsic_u_cross(side, side, None)
    return side


def _cross_trace(a: Prepared, b: Prepared, perm: np.ndarray | None) -> float:
    """tr(K L_perm) = ||X^T Y_perm||_F^2, as an N^2 gather when both Grams exist."""
    if a.K is not None and b.K is not None:
        L = b.K if perm is None else b.K[np.ix_(perm, perm)]
        return float(np.einsum("ij,ij->", a.K, L))
    Y = b.X if perm is None else b.X[perm]
    return float(np.linalg.norm(a.X.T @ Y) ** 2)


def _hsic_u_cross(a: Prepared, b: Prepared, perm: np.ndarray | None) -> float:
    """Unbiased HSIC of the linear kernels (Song et al. 2012), see `_hsic_unbiased_parts`."""
    n = a.X.shape[0]
    if n < 4:
        return 0.0
    ld = b.kd if perm is None else b.kd[perm]
    l1 = b.k1 if perm is None else b.k1[perm]
    tr = _cross_trace(a, b, perm) - float(a.kd @ ld)
    sk, sl = float(a.k1.sum()), float(l1.sum())
    return (tr + sk * sl / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * float(a.k1 @ l1)) / (n * (n - 3))


def all_measures(a: Prepared, b: Prepared, perm: np.ndarray | None = None) -> dict[str, float]:
    """Every measure of a vs b; with `perm`, b's rows are re-paired as b[perm].

    Procrustes runs on the top-`max_dim` PC scores of each side (the full p x q SVD would cost
    more than everything else together for wide codes).
    """
    if a.X.shape[1] == 0 or b.X.shape[1] == 0:
        return {m: (float(np.sqrt(2.0)) if m in DISTANCES else 0.0) for m in MEASURES}

    def rows(M: np.ndarray) -> np.ndarray:
        return M if perm is None else M[perm]

    qy_cca, qy_sv = rows(b.q_cca), rows(b.q_svcca)
    k = min(a.q_cca.shape[1], qy_cca.shape[1])
    cca = canonical_correlations(a.q_cca[:, :k], qy_cca[:, :k])
    sv = canonical_correlations(a.q_svcca, qy_sv)
    sv = sv[: min(a.q_svcca.shape[1], qy_sv.shape[1])]
    denom = a.gram_fro * b.gram_fro
    cka = _cross_trace(a, b, perm) / denom if denom > 0 else 0.0
    dden = np.sqrt(max(a.hsic_u, 0.0) * max(b.hsic_u, 0.0))
    dcka = _hsic_u_cross(a, b, perm) / dden if dden > 0 else 0.0
    return {
        "cca": _mean(cca),
        "svcca": _mean(sv),
        "cka": float(cka),
        "cka_debiased": float(dcka),
        "mknn": mutual_knn(a.knn, b.knn, perm),
        "procrustes": procrustes_distance(a.scores, rows(b.scores)),
    }


def null_stats(observed: float, null: np.ndarray, *, larger_is_similar: bool) -> dict[str, Any]:
    """Null mean/std, z-score and one-sided permutation p-value of one observed value."""
    null = np.asarray(null, dtype=np.float64)
    n = null.size
    if n == 0:
        return {"null_mean": None, "null_std": None, "z": None, "p": None, "n_null": 0}
    mean, std = float(null.mean()), float(null.std(ddof=1)) if n > 1 else 0.0
    z = (observed - mean) / std if std > 0 else None
    extreme = (null >= observed) if larger_is_similar else (null <= observed)
    p = float((1 + int(extreme.sum())) / (1 + n))
    return {"null_mean": mean, "null_std": std, "z": z, "p": p, "n_null": int(n)}


def compare_with_permutations(
    a: Prepared, b: Prepared, *, n_perm: int, rng: np.random.Generator
) -> dict[str, dict[str, Any]]:
    """Observed measures of a vs b, each with its token-permutation null."""
    obs = all_measures(a, b)
    n = a.X.shape[0]
    nulls = {m: [] for m in MEASURES}
    for _ in range(n_perm):
        perm = rng.permutation(n)
        for m, v in all_measures(a, b, perm).items():
            nulls[m].append(v)
    return {
        m: {
            "value": obs[m],
            **null_stats(obs[m], np.array(nulls[m]), larger_is_similar=m not in DISTANCES),
        }
        for m in MEASURES
    }


def compare_subspaces(
    X_NF: np.ndarray,
    Y_NG: np.ndarray,
    cols_x: np.ndarray,
    cols_y: np.ndarray,
    *,
    n_random: int,
    rng: np.random.Generator,
    side_fn: Callable[[np.ndarray], Prepared],
    live_x: np.ndarray | None = None,
    live_y: np.ndarray | None = None,
) -> dict[str, dict[str, Any]]:
    """Measures on the column subsets (the keyword subspaces) against random subsets of equal size.

    Random subsets are drawn from the live columns (`live_x`/`live_y`, default all) so that a
    keyword subspace of live features is not compared with dead ones.
    """
    obs = all_measures(side_fn(X_NF[:, cols_x]), side_fn(Y_NG[:, cols_y]))
    pool_x = np.arange(X_NF.shape[1]) if live_x is None else np.flatnonzero(live_x)
    pool_y = np.arange(Y_NG.shape[1]) if live_y is None else np.flatnonzero(live_y)
    nulls = {m: [] for m in MEASURES}
    for _ in range(n_random):
        rx = rng.choice(pool_x, size=min(len(cols_x), len(pool_x)), replace=False)
        ry = rng.choice(pool_y, size=min(len(cols_y), len(pool_y)), replace=False)
        for m, v in all_measures(
            side_fn(X_NF[:, np.sort(rx)]), side_fn(Y_NG[:, np.sort(ry)])
        ).items():
            nulls[m].append(v)
    return {
        m: {
            "value": obs[m],
            **null_stats(obs[m], np.array(nulls[m]), larger_is_similar=m not in DISTANCES),
        }
        for m in MEASURES
    }
