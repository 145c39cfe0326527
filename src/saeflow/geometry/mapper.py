"""Mapper graphs of SAE codes or activations, with a random baseline of the same shape.

Mapper: a lens f: X -> R^d (PCA or UMAP, d = 1 or 2) is covered by overlapping hypercubes
(`n_intervals` per dimension, neighbouring intervals sharing a fraction `overlap` of their length);
the points of each cover element are clustered, every cluster is a node, and two nodes are joined
when they share points. Two things the seed notebooks got wrong are fixed by construction:

* the cover really overlaps: with overlap p each interval has length L = R / (n - (n-1) p) and
  stride L (1 - p), so consecutive intervals share p L of the lens range. With p = 0 intervals are
  half-open and consecutive cover elements share no point (hence no edges).
* clustering never runs on raw 16k-dimensional codes: X is reduced once by PCA to
  `cluster_dims` and every cover element is clustered in that space.

Baseline (`baseline: permute`, the default): every column of X is permuted independently across
rows. The result has the same shape, the same per-column (per-feature) distribution and sparsity,
but no joint structure, so topology found in it (components, cycles) is what the procedure finds in
structureless data of this shape. It runs through the same lens, cover and clustering parameters.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
from tqdm import tqdm

from saeflow.errors import ConfigError, DataError

log = logging.getLogger(__name__)

FORMAT = "saeflow.mapper/1"
LENSES = ("pca", "umap")
CLUSTERERS = ("dbscan", "single")
BASELINES = ("permute", "none")
DEFAULTS: dict[str, Any] = {
    "codes": None,
    "lens": "pca",
    "lens_dim": 1,
    "n_intervals": 10,
    "overlap": 0.3,
    "clusterer": "dbscan",
    "cluster_dims": 5,
    "eps": "auto",
    "eps_quantile": 0.5,
    "min_samples": 5,
    "distance_threshold": "auto",
    "min_points": 3,
    "max_points": 20000,
    "lens_pca_dims": 50,
    "n_neighbors": 15,
    "min_dist": 0.1,
    "baseline": "permute",
    "color_by": "pos",
    "seed": 0,
}


@dataclass
class MapperGraph:
    """Nodes (cover element, cluster, member rows), edges with shared-member counts, stats."""

    nodes: list[dict[str, Any]]
    edges: list[tuple[int, int, int]]
    n_points: int
    params: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """V, E, components C, independent cycles E - V + C, coverage."""
        n_v, n_e = len(self.nodes), len(self.edges)
        n_c = n_components(n_v, self.edges)
        covered = set()
        for node in self.nodes:
            covered.update(node["members"])
        degree = np.zeros(n_v, dtype=np.int64)
        for u, v, _ in self.edges:
            degree[u] += 1
            degree[v] += 1
        return {
            "n_nodes": n_v,
            "n_edges": n_e,
            "n_components": n_c,
            "n_cycles": n_e - n_v + n_c,
            "n_isolated": int((degree == 0).sum()),
            "coverage": len(covered) / max(self.n_points, 1),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "n_points": self.n_points,
            "params": self.params,
            "summary": self.summary(),
            "nodes": self.nodes,
            "edges": [{"source": u, "target": v, "shared": s} for u, v, s in self.edges],
        }


def n_components(n_nodes: int, edges: list[tuple[int, int, int]]) -> int:
    """Connected components of an undirected graph given as an edge list."""
    if n_nodes == 0:
        return 0
    from scipy.sparse.csgraph import connected_components

    rows = np.array([e[0] for e in edges], dtype=np.int64)
    cols = np.array([e[1] for e in edges], dtype=np.int64)
    adj = sp.coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n_nodes, n_nodes))
    return int(connected_components(adj, directed=False)[0])


# ----------------------------------------------------------------------------- cover


def interval_bounds(lo: float, hi: float, n_intervals: int, overlap: float) -> np.ndarray:
    """[n, 2] interval bounds covering [lo, hi] with a real fractional overlap.

    Length L = (hi - lo) / (n - (n - 1) p), stride L (1 - p): interval i is
    [lo + i L (1-p), lo + i L (1-p) + L], the last one ends exactly at hi.
    """
    if n_intervals < 1:
        raise ConfigError(f"n_intervals: must be >= 1, got {n_intervals}")
    if not 0.0 <= overlap < 1.0:
        raise ConfigError(f"overlap: must be in [0, 1), got {overlap}")
    span = hi - lo
    length = span / (n_intervals - (n_intervals - 1) * overlap)
    stride = length * (1.0 - overlap)
    starts = lo + stride * np.arange(n_intervals)
    bounds = np.stack([starts, starts + length], axis=1)
    bounds[-1, 1] = hi
    return bounds


def cover_masks(lens_1d: np.ndarray, n_intervals: int, overlap: float) -> np.ndarray:
    """bool [N, n]: which intervals of one lens dimension hold each point.

    With overlap 0, intervals are half-open [a, b) (the last closed) so each point lies in
    exactly one; with overlap > 0 they are closed. The first/last are open-ended so no point is
    lost to rounding.
    """
    lens_1d = np.asarray(lens_1d, dtype=np.float64)
    lo, hi = float(lens_1d.min()), float(lens_1d.max())
    if hi <= lo:
        return np.ones((len(lens_1d), 1), dtype=bool)
    bounds = interval_bounds(lo, hi, n_intervals, overlap)
    lower = bounds[:, 0].copy()
    upper = bounds[:, 1].copy()
    lower[0], upper[-1] = -np.inf, np.inf
    x = lens_1d[:, None]
    if overlap == 0:
        return (x >= lower[None, :]) & (x < upper[None, :])
    return (x >= lower[None, :]) & (x <= upper[None, :])


def cover_elements(
    lens_Nd: np.ndarray, n_intervals: int, overlap: float
) -> list[tuple[tuple[int, ...], np.ndarray]]:
    """Non-empty cover elements (hypercube index, member rows) of a 1-D or 2-D lens."""
    lens_Nd = np.asarray(lens_Nd, dtype=np.float64)
    if lens_Nd.ndim == 1:
        lens_Nd = lens_Nd[:, None]
    masks = [cover_masks(lens_Nd[:, d], n_intervals, overlap) for d in range(lens_Nd.shape[1])]
    out = []
    for idx in np.ndindex(*[m.shape[1] for m in masks]):
        inside = np.ones(len(lens_Nd), dtype=bool)
        for d, i in enumerate(idx):
            inside &= masks[d][:, i]
        rows = np.flatnonzero(inside)
        if len(rows):
            out.append((tuple(int(i) for i in idx), rows))
    return out


# ----------------------------------------------------------------------------- reduction


def pca_reduce(X: Any, n_components: int, seed: int = 0) -> np.ndarray:
    """PCA of dense or scipy-sparse X (sparse: centred implicitly, never densified)."""
    from sklearn.decomposition import PCA

    n, d = X.shape
    k = max(1, min(int(n_components), d, n - 1))
    if sp.issparse(X):
        if k >= min(n, d):
            X = X.toarray()
        else:
            return PCA(k, svd_solver="arpack", random_state=seed).fit_transform(
                sp.csr_matrix(X, dtype=np.float64)
            )
    X = np.asarray(X, dtype=np.float64)
    return PCA(k, svd_solver="full").fit_transform(X)


def compute_lens(X: Any, params: Mapping[str, Any]) -> np.ndarray:
    """[N, lens_dim] lens: the first principal components, or UMAP of a PCA reduction."""
    lens, dim, seed = params["lens"], int(params["lens_dim"]), int(params["seed"])
    if lens not in LENSES:
        raise ConfigError(f"lens: {lens!r} is not one of {', '.join(LENSES)}")
    if dim not in (1, 2):
        raise ConfigError(f"lens_dim: must be 1 or 2, got {dim}")
    if lens == "pca":
        out = pca_reduce(X, dim, seed)
        if out.shape[1] < dim:
            out = np.pad(out, ((0, 0), (0, dim - out.shape[1])))
        return out
    import umap

    Z = pca_reduce(X, int(params["lens_pca_dims"]), seed)
    reducer = umap.UMAP(
        n_components=dim,
        n_neighbors=int(params["n_neighbors"]),
        min_dist=float(params["min_dist"]),
        random_state=seed,
        n_jobs=1,
    )
    from saeflow.embedding import seeded_eigsh

    with seeded_eigsh(seed):
        return reducer.fit_transform(Z)


def auto_scale(Z: np.ndarray, k: int, quantile: float, seed: int = 0) -> float:
    """A clustering radius from the data: the `quantile` of distances to the k-th neighbour.

    Computed on at most 2000 points (seeded), so it is cheap and the same run gives the same eps.
    """
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(seed)
    sample = Z if len(Z) <= 2000 else Z[np.sort(rng.choice(len(Z), 2000, replace=False))]
    k = max(1, min(k, len(sample) - 1))
    dist, _ = NearestNeighbors(n_neighbors=k + 1).fit(sample).kneighbors(sample)
    value = float(np.quantile(dist[:, k], quantile))
    return value if value > 0 else 1e-12


def cluster_rows(Z: np.ndarray, params: Mapping[str, Any], scale: float) -> np.ndarray:
    """Cluster labels of the points of one cover element (-1 = noise, dropped)."""
    if params["clusterer"] == "dbscan":
        from sklearn.cluster import DBSCAN

        return DBSCAN(eps=scale, min_samples=int(params["min_samples"])).fit_predict(Z)
    from scipy.cluster.hierarchy import fcluster, linkage

    if len(Z) == 1:
        return np.zeros(1, dtype=np.int64)
    tree = linkage(Z, method="single")
    return fcluster(tree, t=scale, criterion="distance").astype(np.int64) - 1


def _scale(Z: np.ndarray, params: Mapping[str, Any]) -> float:
    key = "eps" if params["clusterer"] == "dbscan" else "distance_threshold"
    value = params[key]
    if value == "auto":
        return auto_scale(
            Z, int(params["min_samples"]), float(params["eps_quantile"]), int(params["seed"])
        )
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected a number or 'auto', got {value!r}") from None
    if value <= 0:
        raise ConfigError(f"{key}: must be > 0, got {value}")
    return value


def check_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults filled in and values checked (one-line ConfigError naming the key)."""
    out = {**DEFAULTS, **{k: v for k, v in params.items() if v is not None}}
    if out["clusterer"] not in CLUSTERERS:
        raise ConfigError(f"clusterer: {out['clusterer']!r} is not one of {', '.join(CLUSTERERS)}")
    if out["baseline"] not in BASELINES:
        raise ConfigError(f"baseline: {out['baseline']!r} is not one of {', '.join(BASELINES)}")
    if out["lens"] not in LENSES:
        raise ConfigError(f"lens: {out['lens']!r} is not one of {', '.join(LENSES)}")
    interval_bounds(0.0, 1.0, int(out["n_intervals"]), float(out["overlap"]))
    if int(out["cluster_dims"]) < 1:
        raise ConfigError(f"cluster_dims: must be >= 1, got {out['cluster_dims']}")
    return out


def mapper_graph(
    X: Any,
    params: Mapping[str, Any] | None = None,
    *,
    statistics: Mapping[str, np.ndarray] | None = None,
    lens: np.ndarray | None = None,
) -> MapperGraph:
    """The Mapper graph of the rows of X (dense [N, D] or scipy sparse codes_NF).

    `statistics`: per-point arrays; each node gets their mean over its members. `lens` overrides
    the computed lens (tests, or a lens computed elsewhere).
    """
    params = check_params(params or {})
    n = X.shape[0]
    if n < 2:
        raise DataError(f"Mapper needs at least 2 points, got {n}")
    seed = int(params["seed"])
    lens_Nd = compute_lens(X, params) if lens is None else np.asarray(lens, dtype=np.float64)
    if lens_Nd.ndim == 1:
        lens_Nd = lens_Nd[:, None]
    Z = pca_reduce(X, int(params["cluster_dims"]), seed)
    scale = _scale(Z, params)
    stats = {k: np.asarray(v, dtype=np.float64) for k, v in (statistics or {}).items()}
    for d in range(lens_Nd.shape[1]):
        stats.setdefault(f"lens{d}", lens_Nd[:, d])
    min_points = int(params["min_points"])
    nodes: list[dict[str, Any]] = []
    elements = cover_elements(lens_Nd, int(params["n_intervals"]), float(params["overlap"]))
    for cube, rows in tqdm(elements, desc="mapper cover", file=sys.stderr, mininterval=5):
        if len(rows) < min_points:
            continue
        labels = cluster_rows(Z[rows], params, scale)
        for label in _ordered_labels(labels):
            members = rows[labels == label]
            if len(members) < min_points:
                continue
            nodes.append(
                {
                    "id": len(nodes),
                    "cover": list(cube),
                    "size": int(len(members)),
                    "members": members.astype(np.int64).tolist(),
                    "stats": {k: float(v[members].mean()) for k, v in sorted(stats.items())},
                }
            )
    edges = shared_edges(nodes, n)
    record = {
        **{k: v for k, v in params.items() if k != "codes"},
        "scale": scale,
        "n_cover_elements": len(elements),
    }
    return MapperGraph(nodes, edges, int(n), record)


def _ordered_labels(labels: np.ndarray) -> list[int]:
    """Cluster labels (noise dropped) in order of first appearance, for stable node ids."""
    _, first = np.unique(labels, return_index=True)
    order = np.unique(labels)[np.argsort(first)]
    return [int(lab) for lab in order if lab >= 0]


def shared_edges(nodes: list[dict[str, Any]], n_points: int) -> list[tuple[int, int, int]]:
    """(u, v, shared members) for every pair of nodes with at least one point in common."""
    if not nodes:
        return []
    rows = np.concatenate([np.full(len(nd["members"]), i) for i, nd in enumerate(nodes)])
    cols = np.concatenate([np.asarray(nd["members"], dtype=np.int64) for nd in nodes])
    incidence = sp.csr_matrix(
        (np.ones(len(rows), dtype=np.int64), (rows, cols)), shape=(len(nodes), n_points)
    )
    shared = sp.triu(incidence @ incidence.T, k=1).tocoo()
    order = np.lexsort((shared.col, shared.row))
    return [
        (int(shared.row[i]), int(shared.col[i]), int(shared.data[i]))
        for i in order
        if shared.data[i] > 0
    ]


# ----------------------------------------------------------------------------- baseline


def permute_columns(X: Any, seed: int = 0) -> Any:
    """Each column permuted independently across rows: same shape, marginals and sparsity.

    Sparse input stays sparse: a column's non-zeros are moved to a random set of rows of the
    same size, so a 16k-wide code matrix is never densified.
    """
    rng = np.random.default_rng(seed)
    n, d = X.shape
    if sp.issparse(X):
        csc = sp.csc_matrix(X)
        indices = np.empty_like(csc.indices)
        for j in range(d):
            a, b = csc.indptr[j], csc.indptr[j + 1]
            if b > a:
                indices[a:b] = np.sort(rng.choice(n, b - a, replace=False))
        out = sp.csc_matrix((csc.data.copy(), indices, csc.indptr.copy()), shape=(n, d))
        return out.tocsr()
    X = np.asarray(X)
    out = np.empty_like(X)
    for j in range(d):
        out[:, j] = X[rng.permutation(n), j]
    return out


def point_statistics(X: Any, positions: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Default per-point statistics: position, L2 norm, L0 (non-zeros)."""
    if sp.issparse(X):
        csr = sp.csr_matrix(X)
        norm = np.sqrt(np.asarray(csr.multiply(csr).sum(axis=1)).ravel())
        l0 = np.diff(csr.indptr).astype(np.float64)
    else:
        arr = np.asarray(X, dtype=np.float64)
        norm = np.linalg.norm(arr, axis=1)
        l0 = (arr != 0).sum(axis=1).astype(np.float64)
    out = {"norm": norm, "l0": l0}
    if positions is not None:
        out["pos"] = np.asarray(positions, dtype=np.float64)
    return out


def subsample(n: int, max_points: int, seed: int) -> np.ndarray:
    """Sorted row indices of a seeded subsample (all rows when n <= max_points)."""
    if max_points <= 0 or n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))


def mapper_with_baseline(
    X: Any,
    params: Mapping[str, Any] | None = None,
    *,
    positions: np.ndarray | None = None,
    seq_ids: np.ndarray | None = None,
    extra_statistics: Mapping[str, np.ndarray] | None = None,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(graph JSON, baseline graph JSON or None) of X, subsampled to `max_points` rows."""
    params = check_params(params or {})
    seed = int(params["seed"])
    keep = subsample(X.shape[0], int(params["max_points"]), seed)
    X = X[keep]
    pos = None if positions is None else np.asarray(positions)[keep]
    stats = point_statistics(X, pos)
    for name, values in (extra_statistics or {}).items():
        stats[name] = np.asarray(values, dtype=np.float64)[keep]
    graph = mapper_graph(X, params, statistics=stats).to_json()
    graph["points"] = {
        "row": keep.astype(np.int64).tolist(),
        "seq_id": None if seq_ids is None else np.asarray(seq_ids)[keep].astype(np.int64).tolist(),
        "pos": None if pos is None else pos.astype(np.int64).tolist(),
    }
    graph["baseline"] = params["baseline"]
    if params["baseline"] == "none":
        return graph, None
    Xb = permute_columns(X, seed + 1)
    base_stats = point_statistics(Xb, pos)
    base = mapper_graph(Xb, params, statistics=base_stats).to_json()
    base["baseline"] = (
        "permute: every column independently permuted across rows (same shape, per-column "
        "marginals and sparsity; no joint structure)"
    )
    return graph, base


def load_points(path: str | Path, part: str | None = None) -> tuple[Any, np.ndarray, np.ndarray]:
    """(X, seq_ids, positions) from a code directory (sparse) or an activation cache (dense).

    The directory's manifest says which it is; `part` picks a temporal SAE's novel/pred/total.
    """
    from saeflow.codes import CODES_FORMAT, load_codes
    from saeflow.io import read_manifest

    directory = Path(path)
    if directory.name == "manifest.json":
        directory = directory.parent
    if read_manifest(directory).get("format") == CODES_FORMAT:
        codes = load_codes(directory, part=None if part in (None, "codes", "activations") else part)
        return codes.to_scipy(), codes.seq_ids, codes.positions
    from saeflow.activations import load_activations

    seq_ids, positions, acts = load_activations(directory)
    return acts.float().numpy(), np.asarray(seq_ids), np.asarray(positions)


def run_mapper(
    input_path: str | Path,
    *,
    analysis: dict[str, Any],
    runtime: dict[str, Any] | None,
    out_graph: str | Path,
    out_baseline: str | Path,
    out_page: str | Path | None = None,
    tokens_path: str | Path | None = None,
) -> dict[str, Any]:
    """The `mapper` rule: load points, build graph + baseline, write JSON and the page."""
    from saeflow.io import write_json

    # Every random step takes this seed explicitly (numpy Generators, PCA/UMAP random_state), so
    # torch (and its 10 s import) is not needed here.
    params = check_params(analysis)
    params["seed"] = int(analysis.get("seed", (runtime or {}).get("seed", 0)))
    X, seq_ids, positions = load_points(input_path, params.get("codes"))
    extra = role_statistics(tokens_path, seq_ids, positions) if tokens_path else None
    graph, base = mapper_with_baseline(
        X, params, positions=positions, seq_ids=seq_ids, extra_statistics=extra
    )
    graph["analysis"] = {k: v for k, v in analysis.items()}
    write_json(out_graph, graph)
    write_json(out_baseline, base if base is not None else {"format": FORMAT, "baseline": "none"})
    if out_page:
        from saeflow.report import write_mapper_page

        write_mapper_page(out_page, graph, base, analysis=analysis)
    log.info(
        "mapper %s: graph %s baseline %s",
        analysis.get("name"),
        graph["summary"],
        base["summary"] if base else None,
    )
    return graph["summary"]


def role_statistics(
    tokens_path: str | Path, seq_ids: np.ndarray, positions: np.ndarray
) -> dict[str, np.ndarray]:
    """Per-point `model_role` (1 where the token is the model's turn) from the tokens table."""
    from saeflow.tokenize import load_tokens

    df = load_tokens(tokens_path)
    seqs = df["seq_id"].to_numpy().astype(np.int64)
    lengths = np.array([len(r) for r in df["roles"]], dtype=np.int64)
    flat = (
        np.concatenate([np.asarray(r, dtype=np.int64) for r in df["roles"]])
        if len(df)
        else np.zeros(0, np.int64)
    )
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(df) else np.zeros(0, np.int64)
    order = np.argsort(seqs)
    seq_ids = np.asarray(seq_ids, dtype=np.int64)
    positions = np.asarray(positions, dtype=np.int64)
    at = np.clip(np.searchsorted(seqs[order], seq_ids), 0, max(len(seqs) - 1, 0))
    out = np.zeros(len(seq_ids), dtype=np.float64)
    if not len(seqs):
        return {"model_role": out}
    row = order[at]
    ok = (seqs[row] == seq_ids) & (positions >= 0) & (positions < lengths[row])
    out[ok] = (flat[starts[row[ok]] + positions[ok]] == 2).astype(np.float64)
    return {"model_role": out}
