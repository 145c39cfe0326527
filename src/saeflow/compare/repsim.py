"""The `rep_similarity` analysis: do two representations of the same tokens encode the same things?

A source is one representation of a dataset's tokens: a model's cached activations at a layer, or
an SAE's codes. Every pair of sources is aligned on their shared (seq_id, pos) tokens, after
checking that both models tokenised the dataset to the same ids, and compared with every measure of
`saeflow.compare.measures`, each with a token-permutation null. With several sources the result is
an S x S matrix per measure (a layer x layer heatmap when the sources are layers of one model).

Keyword mode (seed 003's "keyword subspaces"): for a pair of SAE-code sources, the features whose
top activating tokens mostly match a word list form a subspace on each side; the two subspaces are
compared against random feature subsets of the same sizes.
"""

from __future__ import annotations

import itertools
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from saeflow.compare import measures as ms
from saeflow.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class Source:
    """One loaded representation: token keys, the [N, d] matrix and (for codes) the sparse form."""

    label: str
    kind: str  # "activations" or "codes"
    keys: np.ndarray  # int64 seq_id << 32 | pos
    matrix: Any  # float32 [N, d]: dense activations, or scipy CSR codes (densified per sample)
    tokens_path: str | None = None

    @property
    def width(self) -> int:
        return int(self.matrix.shape[1])

    def rows(self, idx: np.ndarray) -> np.ndarray:
        """Dense float32 [len(idx), d] of the given rows (codes stay sparse until here)."""
        out = self.matrix[idx]
        return out.toarray() if hasattr(out, "toarray") else np.asarray(out)


def _keys(seq_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
    return seq_ids.astype(np.int64) << 32 | positions.astype(np.int64)


def source_label(spec: dict[str, Any]) -> str:
    """`model@layer` for activations, `model@layer:sae` for codes (plus `/part`)."""
    label = f"{spec['model']}@{spec['layer']}"
    if spec.get("sae"):
        label += f":{spec['sae']}"
        if spec.get("codes"):
            label += f"/{spec['codes']}"
    return label


def load_source(spec: dict[str, Any]) -> Source:
    """Activations (`path` a layer folder) or codes (an SAE code folder) as a dense matrix."""
    if spec.get("sae"):
        from saeflow.codes import load_codes

        codes = load_codes(spec["path"], part=spec.get("codes"))
        keys = _keys(codes.seq_ids, codes.positions)
        dense = codes.to_scipy()
        kind = "codes"
    else:
        from saeflow.activations import load_activations

        seq, pos, acts_ND = load_activations(spec["path"])
        keys = _keys(seq, pos)
        dense = acts_ND.float().numpy()
        kind = "activations"
    return Source(spec["label"], kind, keys, dense, spec.get("tokens"))


def shared_rows(
    sources: list[Source], *, skip_pos0: bool, max_tokens: int | None, seed: int
) -> dict[str, np.ndarray]:
    """Row indices into every source of the tokens all of them share (the same rows, same order).

    Position 0 (the attention sink, whose norm dwarfs the rest) is left out by default; at most
    `max_tokens` shared tokens are kept, a seeded sample in token order.
    """
    shared = sources[0].keys
    for s in sources[1:]:
        shared = np.intersect1d(shared, s.keys)
    if skip_pos0:
        shared = shared[(shared & 0xFFFFFFFF) != 0]
    if len(shared) < 8:
        raise DataError(
            f"rep_similarity: the sources share only {len(shared)} tokens; they must cover the "
            "same dataset"
        )
    if max_tokens and len(shared) > max_tokens:
        rng = np.random.default_rng(seed)
        shared = np.sort(rng.choice(shared, size=max_tokens, replace=False))
    out = {}
    for s in sources:
        order = np.argsort(s.keys, kind="stable")
        idx = order[np.searchsorted(s.keys[order], shared)]
        out[s.label] = idx
    return out


def check_tokens_agree(specs: list[dict[str, Any]]) -> None:
    """Position-by-position comparison is meaningless if two models tokenised differently."""
    from saeflow.geometry.matching import check_same_tokens
    from saeflow.tokenize import load_tokens

    paths = sorted({s["tokens"] for s in specs if s.get("tokens")})
    if len(paths) < 2:
        return
    first = load_tokens(paths[0])
    for other in paths[1:]:
        check_same_tokens(first, load_tokens(other), f"rep_similarity {paths[0]} vs {other}: ")


def token_strings(tokens_path: str, keys: np.ndarray) -> list[str]:
    """Decoded token of each (seq_id, pos) key."""
    from saeflow.tokenize import load_tokens

    df = load_tokens(tokens_path)
    by_seq = dict(zip(df["seq_id"].astype(int), df["tokens"], strict=True))
    seq = (keys >> 32).astype(int)
    pos = (keys & 0xFFFFFFFF).astype(int)
    return [str(by_seq[s][p]) for s, p in zip(seq, pos, strict=True)]


def keyword_features(
    codes_NF: Any, tokens: list[str], words: list[str], *, top_n: int, min_frac: float
) -> np.ndarray:
    """Features whose top-`top_n` activating tokens match a word in at least `min_frac` of them.

    Matching is exact after stripping whitespace and case (" King" matches `king`, "talking"
    does not), as the top-examples search does.
    """
    import scipy.sparse as sp

    from saeflow.geometry.top_examples import norm_token, top_activations

    wanted = {norm_token(w).lower() for w in words}
    top = top_activations(sp.csr_matrix(codes_NF, dtype=np.float32), top_n)
    if top.empty:
        return np.zeros(0, dtype=np.int64)
    hit = np.array([norm_token(tokens[r]).lower() in wanted for r in top["row"]])
    frac = pd.Series(hit).groupby(top["feature_id"].to_numpy()).mean()
    return np.sort(frac.index[frac.to_numpy() >= min_frac].to_numpy().astype(np.int64))


def run_rep_similarity(
    specs: list[dict[str, Any]],
    *,
    analysis: dict[str, Any],
    seed: int,
    out_measures: str | Path,
    out_summary: str | Path,
    out_page: str | Path | None = None,
    threads: int = 1,
) -> dict[str, Any]:
    """The rule: load every source, compare every pair (with nulls), keyword subspaces, page.

    BLAS runs on `threads` threads: OpenBLAS's spinning workers collapse on an oversubscribed
    CPU (a 4096 x 64 product took 190 ms with its default threads under load, 1.3 ms on one).
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=max(1, int(threads))):
        return _run(specs, analysis, seed, out_measures, out_summary, out_page)


def _run(
    specs: list[dict[str, Any]],
    analysis: dict[str, Any],
    seed: int,
    out_measures: str | Path,
    out_summary: str | Path,
    out_page: str | Path | None,
) -> dict[str, Any]:
    from saeflow.io import atomic_path, write_json

    check_tokens_agree(specs)
    for spec in specs:
        spec.setdefault("label", source_label(spec))
    labels = [s["label"] for s in specs]
    if len(set(labels)) != len(labels):
        raise DataError(f"rep_similarity {analysis['name']}: two sources are the same ({labels})")
    sources = [load_source(s) for s in specs]
    rows_of = shared_rows(
        sources,
        skip_pos0=bool(analysis["skip_pos0"]),
        max_tokens=analysis["max_tokens"],
        seed=seed,
    )
    opts = {
        "pca_dim": int(analysis["pca_dim"]),
        "svcca_variance": float(analysis["svcca_variance"]),
        "max_dim": int(analysis["max_dim"]),
        "knn_k": int(analysis["knn_k"]),
    }
    prepared = {}
    for s in tqdm(sources, desc="prepare sources", file=sys.stderr):
        prepared[s.label] = ms.prepare_side(s.rows(rows_of[s.label]), **opts)
    n_tokens = len(next(iter(rows_of.values())))
    records = []
    pairs = list(itertools.combinations(range(len(sources)), 2))
    for i, j in tqdm(pairs, desc="source pairs", file=sys.stderr):
        a, b = sources[i], sources[j]
        rng = np.random.default_rng([seed, i, j])
        res = ms.compare_with_permutations(
            prepared[a.label], prepared[b.label], n_perm=int(analysis["n_null"]), rng=rng
        )
        for m, r in res.items():
            records.append(
                {
                    "subspace": "all",
                    "a": a.label,
                    "b": b.label,
                    "measure": m,
                    "baseline": "permutation",
                    "dim_a": prepared[a.label].X.shape[1],
                    "dim_b": prepared[b.label].X.shape[1],
                    **r,
                }
            )
    keyword_info: list[dict[str, Any]] = []
    kw = analysis.get("keywords") or {}
    if kw.get("words"):
        keyword_info = _keyword_records(sources, rows_of, specs, kw, opts, analysis, seed, records)
    table = pd.DataFrame.from_records(records)
    table["n_tokens"] = n_tokens
    summary = {
        "name": analysis["name"],
        "sources": [{k: v for k, v in s.items() if k not in ("path", "tokens")} for s in specs],
        "labels": labels,
        "n_tokens": n_tokens,
        "measures": list(ms.MEASURES),
        "settings": {
            k: analysis[k] for k in sorted(analysis) if k not in ("sources", "name", "type")
        },
        "dims": {s.label: int(prepared[s.label].X.shape[1]) for s in sources},
        "dims_dropped": {s.label: int(s.width - prepared[s.label].X.shape[1]) for s in sources},
        "keywords": keyword_info,
    }
    with atomic_path(out_measures) as tmp:
        table.to_parquet(tmp, compression="zstd", index=False)
    write_json(out_summary, summary)
    if out_page:
        from saeflow.compare.pages import write_repsim_page

        write_repsim_page(out_page, table, summary)
    log.info("rep_similarity %s: %d pairs over %d tokens", analysis["name"], len(pairs), n_tokens)
    return summary


def _keyword_records(
    sources: list[Source],
    rows_of: dict[str, np.ndarray],
    specs: list[dict[str, Any]],
    kw: dict[str, Any],
    opts: dict[str, Any],
    analysis: dict[str, Any],
    seed: int,
    records: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """Keyword subspaces of every pair of code sources, against random subspaces of equal size."""
    code_sources = [s for s in sources if s.kind == "codes"]
    info = []
    if len(code_sources) < 2:
        log.warning("keywords: need two SAE-code sources; keyword mode skipped")
        return info
    tok_path = next(s["tokens"] for s in specs if s.get("tokens"))
    # keyword features are found on every token of a source, not on the compared sample, so the
    # subspaces do not change with max_tokens
    tokens = {s.label: token_strings(tok_path, s.keys) for s in code_sources}
    words_sets = {"+".join(kw["words"]): list(kw["words"])}
    if kw.get("each"):
        words_sets.update({w: [w] for w in kw["words"]})
    side_fn = lambda X: ms.prepare_side(X, **opts)  # noqa: E731 - a closure over the options
    for name, words in words_sets.items():
        feats = {}
        for s in code_sources:
            feats[s.label] = keyword_features(
                s.matrix,
                tokens[s.label],
                words,
                top_n=int(kw["top_n"]),
                min_frac=float(kw["min_frac"]),
            )
            info.append({"subspace": name, "source": s.label, "features": feats[s.label].tolist()})
        for (i, a), (j, b) in itertools.combinations(enumerate(code_sources), 2):
            fa, fb = feats[a.label], feats[b.label]
            if len(fa) == 0 or len(fb) == 0:
                log.warning("keywords %s: no feature of %s or %s matches", name, a.label, b.label)
                continue
            Xa, Xb = a.rows(rows_of[a.label]), b.rows(rows_of[b.label])
            live_a, live_b = Xa.std(axis=0) > 0, Xb.std(axis=0) > 0
            res = ms.compare_subspaces(
                Xa,
                Xb,
                fa,
                fb,
                n_random=int(analysis["n_null"]),
                rng=np.random.default_rng([seed, 7, i, j, len(info)]),
                side_fn=side_fn,
                live_x=live_a,
                live_y=live_b,
            )
            for m, r in res.items():
                records.append(
                    {
                        "subspace": name,
                        "a": a.label,
                        "b": b.label,
                        "measure": m,
                        "baseline": "random_subspace",
                        "dim_a": len(fa),
                        "dim_b": len(fb),
                        **r,
                    }
                )
    return info
