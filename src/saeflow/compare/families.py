"""The `feature_families` analysis: how features of a narrow SAE split in a wider one.

Built on a `match_features` analysis between two widths of SAE over the same tokens. The narrower
SAE's features are parents; a parent's children are the wider SAE's features among its top-k
matches whose activation correlation with it passes `threshold`. A parent with at least
`min_children` children is a family. Reported per family and child:
- `split_ratio`: number of children (a 1 -> n split);
- `decoder_cos`: cosine of the child's decoder direction with the parent's (from the matches);
- `density_ratio`: the child's firing frequency over the parent's. Children of a "general to
  specific" split fire on subsets of the parent's tokens, so their ratios are below 1 and sum to
  about 1;
- co-activation: P(child | parent), P(parent | child), the fraction of the parent's tokens covered
  by any child (`coverage`), and the mean pairwise Jaccard of the children's token sets
  (`children_jaccard`: near 0 when the children split the parent's tokens between them);
- `child_parents`: in how many families the child appears (above 1 the wider SAE merged what the
  narrower one split, or the narrower SAE has redundant parents).
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

log = logging.getLogger(__name__)


def families_table(
    matches: pd.DataFrame,
    P: sp.csr_matrix,
    C: sp.csr_matrix,
    *,
    parent_sae: str,
    threshold: float,
    min_children: int,
) -> pd.DataFrame:
    """One row per (parent, child) of every family; P and C are parent and child codes [N, F]."""
    rows = matches[(matches["source_sae"] == parent_sae) & (matches["corr"] >= threshold)]
    rows = rows[rows["target_sae"] != parent_sae] if matches["target_sae"].nunique() > 1 else rows
    counts = rows.groupby("source_feature")["target_feature"].transform("size")
    rows = rows[counts >= min_children].sort_values(["source_feature", "rank"])
    if rows.empty:
        return pd.DataFrame(
            columns=[
                "parent",
                "child",
                "rank",
                "corr",
                "decoder_cos",
                "split_ratio",
                "parent_density",
                "child_density",
                "density_ratio",
                "p_child_given_parent",
                "p_parent_given_child",
                "coverage",
                "children_jaccard",
            ]
        )
    n = P.shape[0]
    Pb = (P.tocsc() > 0).astype(np.int32)
    Cb = (C.tocsc() > 0).astype(np.int32)
    out = []
    for parent, g in rows.groupby("source_feature", sort=True):
        p_col = Pb[:, int(parent)]
        children = g["target_feature"].to_numpy()
        c_cols = Cb[:, children]  # [N, n_children]
        n_p = int(p_col.sum())
        n_c = np.asarray(c_cols.sum(axis=0)).ravel()
        both = np.asarray((c_cols.multiply(p_col)).sum(axis=0)).ravel()
        any_child = (c_cols.sum(axis=1) > 0).astype(np.int32)
        coverage = float(np.asarray(any_child.T @ p_col.toarray()).item() / n_p) if n_p else 0.0
        jac = []
        for i, j in itertools.combinations(range(len(children)), 2):
            inter = float(c_cols[:, i].multiply(c_cols[:, j]).sum())
            union = float(n_c[i] + n_c[j] - inter)
            jac.append(inter / union if union else 0.0)
        children_jaccard = float(np.mean(jac)) if jac else 0.0
        for k, r in enumerate(g.itertuples()):
            out.append(
                {
                    "parent": int(parent),
                    "child": int(r.target_feature),
                    "rank": int(r.rank),
                    "corr": float(r.corr),
                    "decoder_cos": float(r.decoder_cos) if pd.notna(r.decoder_cos) else None,
                    "split_ratio": len(children),
                    "parent_density": n_p / n,
                    "child_density": float(n_c[k]) / n,
                    "density_ratio": float(n_c[k]) / n_p if n_p else None,
                    "p_child_given_parent": float(both[k]) / n_p if n_p else None,
                    "p_parent_given_child": float(both[k]) / n_c[k] if n_c[k] else None,
                    "coverage": coverage,
                    "children_jaccard": children_jaccard,
                }
            )
    table = pd.DataFrame(out)
    # a child under several parents is a merge as much as a split
    table["child_parents"] = table.groupby("child")["parent"].transform("size").astype(int)
    return table


def families_summary(table: pd.DataFrame, n_parents: int) -> dict[str, Any]:
    fam = table.drop_duplicates("parent")
    hist = fam["split_ratio"].value_counts().sort_index()
    med = lambda col: float(table[col].dropna().median()) if table[col].notna().any() else None  # noqa: E731
    return {
        "n_parents": int(n_parents),
        "n_families": int(len(fam)),
        "split_ratio_counts": {str(int(k)): int(v) for k, v in hist.items()},
        "median_decoder_cos": med("decoder_cos") if len(table) else None,
        "median_density_ratio": med("density_ratio") if len(table) else None,
        "median_p_child_given_parent": med("p_child_given_parent") if len(table) else None,
        "median_coverage": float(fam["coverage"].median()) if len(fam) else None,
        "median_child_parents": med("child_parents") if len(table) else None,
        "median_children_jaccard": float(fam["children_jaccard"].median()) if len(fam) else None,
    }


def run_feature_families(
    *,
    matches_path: str,
    codes_a_path: str,
    codes_b_path: str,
    tokens_path: str,
    analysis: dict[str, Any],
    match: dict[str, Any],
    out_families: str | Path,
    out_summary: str | Path,
    out_page: str | Path | None,
    out_links: str | Path | None = None,
) -> dict[str, Any]:
    """The rule: parents are the narrower SAE's features; table, summary, the tree page and the
    links file that the parent SAE's feature dashboards load."""
    from saeflow.codes import load_codes
    from saeflow.compare.pairs import top_token_sets
    from saeflow.geometry.matching import DEFAULTS as MATCH_DEFAULTS
    from saeflow.geometry.matching import align_codes, read_matches, side_label
    from saeflow.io import atomic_path, write_json
    from saeflow.tokenize import load_tokens

    part = match.get("codes")
    ca = load_codes(codes_a_path, part=match["a"].get("codes", part))
    cb = load_codes(codes_b_path, part=match["b"].get("codes", part))
    A, B, _ = align_codes(ca, cb)
    ka = ca.seq_ids.astype(np.int64) << 32 | ca.positions.astype(np.int64)
    kb = cb.seq_ids.astype(np.int64) << 32 | cb.positions.astype(np.int64)
    keys = ka if np.array_equal(ka, kb) else np.intersect1d(ka, kb)
    names = (side_label(match["a"]), side_label(match["b"]))
    if A.shape[1] <= B.shape[1]:
        P, C, parent_sae, child_sae = A, B, names[0], names[1]
    else:
        P, C, parent_sae, child_sae = B, A, names[1], names[0]
    table = families_table(
        read_matches(matches_path),
        P,
        C,
        parent_sae=parent_sae,
        threshold=float(analysis["threshold"]),
        min_children=int(analysis["min_children"]),
    )
    tok_df = load_tokens(tokens_path)
    by_seq = dict(zip(tok_df["seq_id"].astype(int), tok_df["tokens"], strict=True))
    tokens = [str(by_seq[int(k >> 32)][int(k & 0xFFFFFFFF)]) for k in keys]
    top_n = int(analysis["top_tokens"])
    parents = table["parent"].drop_duplicates().to_numpy() if len(table) else np.zeros(0, int)
    labels_p = dict(zip(parents.tolist(), top_token_sets(P, parents, tokens, top_n), strict=True))
    kids = table["child"].drop_duplicates().to_numpy() if len(table) else np.zeros(0, int)
    labels_c = dict(zip(kids.tolist(), top_token_sets(C, kids, tokens, top_n), strict=True))
    table["parent_tokens"] = [sorted(labels_p[p]) for p in table["parent"]]
    table["child_tokens"] = [sorted(labels_c[c]) for c in table["child"]]
    summary = {
        "name": analysis["name"],
        "match": match["name"],
        "parent_sae": parent_sae,
        "child_sae": child_sae,
        "d_parent": int(P.shape[1]),
        "d_child": int(C.shape[1]),
        "threshold": float(analysis["threshold"]),
        # children come from the match's top-k lists, so no parent can have more than top_k
        "max_children": int(match.get("top_k") or MATCH_DEFAULTS["top_k"]),
        **families_summary(table, P.shape[1]),
    }
    with atomic_path(out_families) as tmp:
        table.to_parquet(tmp, compression="zstd", index=False)
    write_json(out_summary, summary)
    if out_page:
        from saeflow.compare.pages import write_families_page

        write_families_page(out_page, table, summary, max_families=int(analysis["page_families"]))
    if out_links:
        from saeflow.compare.pages import write_family_links

        write_family_links(out_links, table, summary, max_families=int(analysis["page_families"]))
    log.info("feature_families %s: %s", analysis["name"], summary)
    return summary
