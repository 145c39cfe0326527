"""Interpret MFA components: top-likelihood contexts and members' coordinates in the loadings.

Follows the reference tutorial of "From Directions to Regions":
- contexts: every token is scored by log p(x | k) (`score="likelihood"`), the best `top_pool`
  tokens of each component form its pool, and `top_n` of them are drawn at random (seeded,
  without replacement) so the shown lines are not near-duplicates of the single best one. We
  keep the whole pool (flag `shown`) and store the preceding `context_tokens` tokens as context.
- subspace: each token belongs to its argmax-responsibility component ("hard" assignment) and is
  projected by least squares onto the unit-normalised loading directions U_k of that component,
  c = (U^T U)^-1 U^T (x - mu_k). The reference projects x itself; we centre at mu_k so the
  centroid sits at the origin (the reference's coordinates minus the centroid's). `ratio` is the
  share of ||x - mu_k||^2 that the subspace captures.
"""

from __future__ import annotations

import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from saeflow.errors import DataError
from saeflow.mfa.model import MFA

log = logging.getLogger("saeflow.mfa")


@torch.no_grad()
def scan(
    model: MFA, x_ND: torch.Tensor, *, top_pool: int, batch_size: int, device: torch.device
) -> dict[str, Any]:
    """One streaming pass: per-component top pools and per-token subspace coordinates."""
    model.eval().to(device)
    K, D, R = model.K, model.D, model.R
    N = x_ND.shape[0]
    P = min(top_pool, N)
    W = model.W
    U_KDR = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    G_KRR = U_KDR.transpose(1, 2) @ U_KDR
    G_inv_KRR = torch.linalg.inv(G_KRR + 1e-6 * torch.eye(R, device=G_KRR.device))
    mu_KD = model.mu
    muU_KR = torch.einsum("kd,kdr->kr", mu_KD, U_KDR)
    U_flat = U_KDR.permute(1, 0, 2).reshape(D, K * R)
    best_s = torch.full((0, K), -torch.inf, device=device)
    best_i = torch.zeros((0, K), dtype=torch.long, device=device)
    comp_N = np.zeros(N, dtype=np.int32)
    coords_NR = np.zeros((N, R), dtype=np.float32)
    ratio_N = np.zeros(N, dtype=np.float32)
    loglik_N = np.zeros(N, dtype=np.float32)
    resp_N = np.zeros(N, dtype=np.float32)
    for s in tqdm(range(0, N, batch_size), desc="mfa_interpret", file=sys.stderr, mininterval=5):
        x = x_ND[s : s + batch_size].to(device=device, dtype=torch.float32)
        B = x.shape[0]
        ll_BK = model.log_prob_components(x)
        joint = ll_BK + model.log_pi_K()
        arg = joint.argmax(1)
        # Top pools: merge the running best with this batch, per component.
        cand_s = torch.cat([best_s, ll_BK])
        cand_i = torch.cat([best_i, torch.arange(s, s + B, device=device)[:, None].expand(B, K)])
        keep = cand_s.topk(min(P, cand_s.shape[0]), dim=0).indices
        best_s, best_i = cand_s.gather(0, keep), cand_i.gather(0, keep)
        # Coordinates of each token in its own component's loading directions.
        rows = torch.arange(B, device=device)
        xU = (x @ U_flat).view(B, K, R)[rows, arg] - muU_KR[arg]
        c_BR = torch.einsum("brs,bs->br", G_inv_KRR[arg], xU)
        diff = x - mu_KD[arg]
        captured = torch.einsum("br,brs,bs->b", c_BR, G_KRR[arg], c_BR)
        ratio = captured / (diff * diff).sum(1).clamp_min(1e-12)
        sl = slice(s, s + B)
        comp_N[sl] = arg.cpu().numpy()
        coords_NR[sl] = c_BR.cpu().numpy()
        ratio_N[sl] = ratio.cpu().numpy()
        loglik_N[sl] = ll_BK[rows, arg].cpu().numpy()
        resp_N[sl] = (joint - joint.logsumexp(1, keepdim=True)).exp()[rows, arg].cpu().numpy()
    return {
        "pool_scores_PK": best_s.cpu().numpy(),
        "pool_index_PK": best_i.cpu().numpy(),
        "component_N": comp_N,
        "coords_NR": coords_NR,
        "ratio_N": ratio_N,
        "loglik_N": loglik_N,
        "resp_N": resp_N,
    }


def token_lookup(tokens: pd.DataFrame) -> dict[int, list[str]]:
    """seq_id -> per-token strings, from the tokens table (column `tokens`)."""
    for col in ("seq_id", "tokens"):
        if col not in tokens.columns:
            raise DataError(f"tokens table has no column {col!r} (columns: {list(tokens.columns)})")
    return {int(s): list(t) for s, t in zip(tokens["seq_id"], tokens["tokens"], strict=True)}


def _token_at(lookup: dict[int, list[str]], seq_id: int, pos: int) -> list[str]:
    toks = lookup.get(int(seq_id))
    if toks is None:
        raise DataError(f"seq_id {seq_id} of the activations is missing from the tokens table")
    if not 0 <= pos < len(toks):
        raise DataError(f"seq_id {seq_id}: position {pos} is outside its {len(toks)} tokens")
    return toks


def context_of(
    lookup: dict[int, list[str]], seq_id: int, pos: int, n_before: int
) -> tuple[str, str]:
    """(preceding context, the token itself) as plain text; escaping is the page's job."""
    toks = _token_at(lookup, seq_id, pos)
    return "".join(toks[max(0, pos - n_before) : pos]), toks[pos]


def top_contexts(
    scan_out: dict[str, Any],
    seq_ids_N: np.ndarray,
    pos_N: np.ndarray,
    lookup: dict[int, list[str]],
    *,
    top_n: int,
    context_tokens: int,
    seed: int,
) -> pd.DataFrame:
    """The pool of each component with `top_n` rows drawn at random (seeded) marked `shown`."""
    scores, index = scan_out["pool_scores_PK"], scan_out["pool_index_PK"]
    P, K = scores.shape
    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []
    for k in range(K):
        shown = set(rng.choice(P, size=min(top_n, P), replace=False).tolist())
        for rank in range(P):
            i = int(index[rank, k])
            ctx, tok = context_of(lookup, seq_ids_N[i], pos_N[i], context_tokens)
            rows.append(
                {
                    "component": k,
                    "rank": rank,
                    "shown": rank in shown,
                    "seq_id": int(seq_ids_N[i]),
                    "pos": int(pos_N[i]),
                    "log_lik": float(scores[rank, k]),
                    "member": bool(scan_out["component_N"][i] == k),
                    "context": ctx,
                    "token": tok,
                }
            )
    df = pd.DataFrame(rows)
    return df.astype(
        {
            "component": "int32",
            "rank": "int32",
            "seq_id": "int32",
            "pos": "int32",
            "log_lik": "float32",
        }
    )


def subspace_table(
    scan_out: dict[str, Any], seq_ids_N: np.ndarray, pos_N: np.ndarray, lookup: dict[int, list[str]]
) -> pa.Table:
    R = scan_out["coords_NR"].shape[1]
    tokens = [_token_at(lookup, s, p)[p] for s, p in zip(seq_ids_N, pos_N, strict=True)]
    return pa.table(
        {
            "seq_id": pa.array(seq_ids_N.astype(np.int32)),
            "pos": pa.array(pos_N.astype(np.int32)),
            "component": pa.array(scan_out["component_N"]),
            "resp": pa.array(scan_out["resp_N"]),
            "log_lik": pa.array(scan_out["loglik_N"]),
            "ratio": pa.array(scan_out["ratio_N"]),
            "coords": pa.FixedSizeListArray.from_arrays(
                pa.array(scan_out["coords_NR"].reshape(-1)), R
            ),
            "token": pa.array(tokens, pa.string()),
        }
    )


def component_summary(model: MFA, sub: pa.Table, n_tokens: int = 8) -> list[dict[str, Any]]:
    """Per component: weight, member count, mean log-lik and captured ratio, frequent tokens."""
    comp = sub.column("component").to_numpy()
    loglik = sub.column("log_lik").to_numpy()
    ratio = sub.column("ratio").to_numpy()
    toks = sub.column("token").to_pylist()
    with torch.no_grad():
        pi = model.log_pi_K().exp().cpu().tolist()
        wnorm = model.W.norm(dim=1).cpu().numpy()
    out = []
    for k in range(model.K):
        members = np.nonzero(comp == k)[0]
        counts = Counter(toks[i] for i in members).most_common(n_tokens)
        out.append(
            {
                "component": k,
                "pi": pi[k],
                "size": int(members.size),
                "mean_log_lik": float(loglik[members].mean()) if members.size else None,
                "mean_ratio": float(ratio[members].mean()) if members.size else None,
                "loading_norms": [float(v) for v in wnorm[k]],
                "top_tokens": [[t, int(c)] for t, c in counts],
            }
        )
    return out


def run_mfa_interpret(
    model_path: str | Path,
    acts_path: str | Path,
    tokens_path: str | Path,
    *,
    contexts_path: str | Path,
    subspace_path: str | Path,
    summary_path: str | Path,
    settings: dict[str, Any],
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, Any]:
    """mfa_interpret rule: top contexts (parquet), subspace coordinates (parquet), summary."""
    from saeflow.devices import resolve_device
    from saeflow.io import atomic_path, write_json
    from saeflow.mfa import resolve_settings
    from saeflow.mfa.fit import load_acts
    from saeflow.mfa.model import load_mfa

    s = resolve_settings(settings)
    dev = resolve_device(device)
    model = load_mfa(model_path, device=dev)
    seq_ids, positions, acts_ND = load_acts(acts_path)
    lookup = token_lookup(pd.read_parquet(tokens_path, columns=["seq_id", "tokens"]))
    out = scan(model, acts_ND, top_pool=s["top_pool"], batch_size=s["batch_size"], device=dev)
    contexts = top_contexts(
        out,
        seq_ids,
        positions,
        lookup,
        top_n=s["top_n"],
        context_tokens=s["context_tokens"],
        seed=seed,
    )
    sub = subspace_table(out, seq_ids, positions, lookup)
    summary = {
        "K": model.K,
        "R": model.R,
        "D": model.D,
        "n_tokens": int(len(seq_ids)),
        "top_pool": s["top_pool"],
        "top_n": s["top_n"],
        "context_tokens": s["context_tokens"],
        "seed": seed,
        "components": component_summary(model.cpu(), sub),
    }
    with atomic_path(contexts_path) as tmp:
        contexts.to_parquet(tmp, compression="zstd", index=False)
    with atomic_path(subspace_path) as tmp:
        pq.write_table(sub, tmp, compression="zstd")
    write_json(summary_path, summary)
    return summary
