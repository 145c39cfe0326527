"""Fit an MFA by minibatch NLL with Adam, then write the model, the NLL curve and the posteriors.

Design choices (see also model.py):
- Each component starts at its k-means centroid with the local PPCA solution of its cluster
  (top-R principal directions, Psi from the residual), so a few epochs suffice; an all-zero W is
  a saddle point of the likelihood, so tiny clusters get small random loadings instead.
- The validation split is by sequence (tokens of one sequence are strongly correlated), falling
  back to a token split when there are too few sequences.
- The model with the lowest validation NLL is kept; training stops after `patience` epochs
  without improvement. A non-finite NLL raises at once: the NLL table never holds a NaN.
- Loadings stay in their fitted order (as the tutorial keeps them, so its axis indices, e.g. the
  scatter of axes (0, 8) and z[0], z[8], mean the same axes); `sort_loadings: true` reorders each
  W_k's columns by decreasing norm instead.
- Per-token outputs are bounded: the top `top_resp` responsibilities and the argmax component's
  posterior mean E[z|x,k] (R floats), never the (N, K, R) tensor.
"""

from __future__ import annotations

import copy
import logging
import math
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from saeflow.devices import resolve_device
from saeflow.errors import DataError
from saeflow.mfa.model import MFA, PSI_FLOOR, save_mfa

log = logging.getLogger("saeflow.mfa")

MIN_SEQS_FOR_SEQ_SPLIT = 10
INIT_POINTS = 65_536
PCA_POINTS_PER_COMPONENT = 4_096


class NonFiniteNLLError(DataError):
    """The NLL became NaN/inf: the fit is garbage and must not be written."""


class FitResult(NamedTuple):
    model: MFA
    history: list[dict[str, Any]]  # one row per epoch, epoch 0 = initialisation
    summary: dict[str, Any]  # JSON-able facts for model.json
    split_N: np.ndarray  # noqa: N815 - int8 per token: 0 train, 1 validation


# ---- data helpers ------------------------------------------------------------------------------
def split_train_val(
    seq_ids_N: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, str]:
    """Indices of the train and validation tokens, and how the split was made."""
    N = len(seq_ids_N)
    rng = np.random.default_rng(seed)
    if val_fraction <= 0 or N < 2:
        return np.arange(N), np.arange(0), "none"
    seqs = np.unique(seq_ids_N)
    if len(seqs) >= MIN_SEQS_FOR_SEQ_SPLIT:
        n_val = max(1, int(round(val_fraction * len(seqs))))
        val_seqs = rng.permutation(seqs)[:n_val]
        is_val = np.isin(seq_ids_N, val_seqs)
        return np.nonzero(~is_val)[0], np.nonzero(is_val)[0], "sequence"
    n_val = max(1, int(round(val_fraction * N)))
    perm = rng.permutation(N)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val]), "token"


def _batches(x_ND: torch.Tensor, batch_size: int, device: torch.device, order=None):
    """Float32 batches on `device` (data may be stored in fp16/bf16 to halve memory)."""
    n = x_ND.shape[0]
    for s in range(0, n, batch_size):
        idx = slice(s, s + batch_size) if order is None else order[s : s + batch_size]
        yield x_ND[idx].to(device=device, dtype=torch.float32, non_blocking=True)


def standardisation(
    x_ND: torch.Tensor, max_points: int = INIT_POINTS
) -> tuple[torch.Tensor, float]:
    """Global mean and one scalar scale (RMS of the per-dimension standard deviations)."""
    step = max(1, x_ND.shape[0] // max_points)
    x = x_ND[::step].to(torch.float64)
    center = x.mean(0)
    scale = float(((x - center) ** 2).mean().sqrt())
    if not math.isfinite(scale) or scale <= 0:
        raise DataError(f"activations have no variance (scale={scale}); cannot fit an MFA")
    return center.to(torch.float32), scale


@torch.no_grad()
def init_model(
    x_ND: torch.Tensor,
    centroids_KD: torch.Tensor,
    R: int,
    *,
    psi: str,
    center_D: torch.Tensor,
    scale: float,
    seed: int,
) -> MFA:
    """MFA at the centroids with each cluster's PPCA solution as W_k and the residual as Psi."""
    K, D = centroids_KD.shape
    gen = torch.Generator().manual_seed(seed)
    step = max(1, x_ND.shape[0] // INIT_POINTS)
    X = (x_ND[::step].to(torch.float32) - center_D) / scale
    C = (centroids_KD.to(torch.float32) - center_D) / scale
    from saeflow.mfa.init import _assign

    labels, _ = _assign(X, C)
    counts = torch.bincount(labels, minlength=K)
    W = torch.zeros(K, D, R)
    res_sq_KD = torch.zeros(K, D)
    res_n_K = torch.zeros(K)
    eig_K = torch.zeros(K)
    for k in range(K):
        members = X[labels == k][:PCA_POINTS_PER_COMPONENT]
        if members.shape[0] <= R:
            continue
        r = members - C[k]
        _, S, Vh = torch.linalg.svd(r, full_matrices=False)
        V_DR = Vh[:R].T
        resid = r - (r @ V_DR) @ V_DR.T
        res_sq_KD[k] = (resid**2).sum(0)
        res_n_K[k] = r.shape[0]
        sigma2 = float(res_sq_KD[k].mean() / r.shape[0])
        lam = S[:R] ** 2 / r.shape[0]
        W[k] = V_DR * (lam - sigma2).clamp_min(1e-2 * max(sigma2, PSI_FLOOR)).sqrt()
        eig_K[k] = lam.mean()
    total_n = res_n_K.sum()
    if total_n > 0:
        psi_shared = (res_sq_KD.sum(0) / total_n).clamp_min(PSI_FLOOR)
    else:
        psi_shared = X.var(0).clamp_min(PSI_FLOOR)
    small = res_n_K == 0
    if small.any():
        # Small random loadings: W = 0 is a stationary point of the likelihood.
        amp = 0.1 * psi_shared.mean().sqrt()
        W[small] = amp * torch.randn(int(small.sum()), D, R, generator=gen) / math.sqrt(R)
    if psi == "shared":
        psi_std = psi_shared
    else:
        per = res_sq_KD / res_n_K.clamp_min(1)[:, None]
        psi_std = torch.where(small[:, None], psi_shared[None], per).clamp_min(PSI_FLOOR)
    log_pi = torch.log((counts.to(torch.float32) + 1.0) / (counts.sum() + K))
    model = MFA(K, D, R, psi=psi, center_D=center_D, scale=scale)
    model.set_params(
        center_D + scale * C, scale * W, scale**2 * psi_std, log_pi - log_pi.logsumexp(0)
    )
    return model


@torch.no_grad()
def evaluate_nll(model: MFA, x_ND: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """Mean NLL per token over a whole split (float64 accumulation)."""
    if x_ND.shape[0] == 0:
        return float("nan")
    total = 0.0
    for x in _batches(x_ND, batch_size, device):
        total += float(-model.log_prob(x).double().sum())
    return total / x_ND.shape[0]


def _check_finite(value: float, what: str, epoch: int, lr: float) -> None:
    if not math.isfinite(value):
        raise NonFiniteNLLError(
            f"fit_mfa: {what} NLL is {value} at epoch {epoch} (lr={lr}); lower lr, set clip, "
            "or check the activations for inf/NaN"
        )


def train_mfa(
    model: MFA,
    x_train: torch.Tensor,
    x_val: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    clip: float | None,
    patience: int | None,
    seed: int,
    device: torch.device,
) -> tuple[list[dict[str, Any]], int]:
    """Adam on the NLL; returns the per-epoch history (epoch 0 = init) and the best epoch.

    The model ends holding the best parameters (lowest validation NLL, or train NLL without a
    validation split). Epoch 0's train NLL is a full evaluation at the initialisation; later
    epochs report the mean over the epoch's minibatches (as the reference does), and the
    validation NLL is always a full evaluation after the epoch.
    """
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    has_val = x_val.shape[0] > 0

    def select(row: dict[str, Any]) -> float:
        return row["val_nll"] if has_val else row["train_nll"]

    row0 = {
        "epoch": 0,
        "train_nll": evaluate_nll(model, x_train, batch_size, device),
        "val_nll": evaluate_nll(model, x_val, batch_size, device) if has_val else None,
    }
    _check_finite(row0["train_nll"], "train", 0, lr)
    if has_val:
        _check_finite(row0["val_nll"], "validation", 0, lr)
    history = [row0]
    best, best_epoch = select(row0), 0
    best_state = copy.deepcopy(model.state_dict())
    since_best = 0
    n = x_train.shape[0]
    seconds = 0.0
    bar = tqdm(range(1, epochs + 1), desc="fit_mfa", file=sys.stderr, mininterval=5)
    for epoch in bar:
        t0 = time.perf_counter()
        model.train()
        order = torch.randperm(n, generator=gen)
        total, seen = 0.0, 0
        for x in _batches(x_train, batch_size, device, order):
            opt.zero_grad(set_to_none=True)
            loss = model.nll(x)
            value = loss.item()
            _check_finite(value, "train batch", epoch, lr)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            total += value * x.shape[0]
            seen += x.shape[0]
        model.eval()
        row = {
            "epoch": epoch,
            "train_nll": total / max(seen, 1),
            "val_nll": evaluate_nll(model, x_val, batch_size, device) if has_val else None,
        }
        _check_finite(row["train_nll"], "train", epoch, lr)
        if has_val:
            _check_finite(row["val_nll"], "validation", epoch, lr)
        history.append(row)
        seconds += time.perf_counter() - t0
        log.info(
            "epoch %d train NLL %.4f val NLL %s (%.2f s)",
            epoch,
            row["train_nll"],
            "—" if row["val_nll"] is None else f"{row['val_nll']:.4f}",
            time.perf_counter() - t0,
        )
        if select(row) < best:
            best, best_epoch, since_best = select(row), epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            since_best += 1
            if patience and since_best >= patience:
                log.info("early stop at epoch %d (best epoch %d)", epoch, best_epoch)
                break
    n_epochs = len(history) - 1
    log.info(
        "fit_mfa: %d epochs, %.3f s/epoch (train + validation), best epoch %d",
        n_epochs,
        seconds / max(1, n_epochs),
        best_epoch,
    )
    model.load_state_dict(best_state)
    for row in history:
        row["best"] = row["epoch"] == best_epoch
    return history, best_epoch


def history_table(history: list[dict[str, Any]]) -> pd.DataFrame:
    """The NLL table; refuses to hold a NaN in any finite-required column."""
    df = pd.DataFrame(history, columns=["epoch", "train_nll", "val_nll", "best"])
    df["epoch"] = df["epoch"].astype("int32")
    df["train_nll"] = df["train_nll"].astype("float64")
    df["val_nll"] = df["val_nll"].astype("float64")
    if not np.isfinite(df["train_nll"]).all():
        raise NonFiniteNLLError("fit_mfa: the train NLL table has non-finite values")
    if df["val_nll"].notna().any() and not np.isfinite(df["val_nll"]).all():
        raise NonFiniteNLLError("fit_mfa: the validation NLL table has non-finite values")
    return df


# ---- posteriors ----------------------------------------------------------------------------------
def posterior_schema(top: int, R: int) -> pa.Schema:
    return pa.schema(
        [
            ("seq_id", pa.int32()),
            ("pos", pa.int32()),
            ("split", pa.int8()),
            ("component", pa.int32()),
            ("log_lik", pa.float32()),
            ("top_components", pa.list_(pa.int32(), top)),
            ("top_resp", pa.list_(pa.float32(), top)),
            ("z", pa.list_(pa.float32(), R)),
        ]
    )


# Posterior rows are buffered into row groups of this many tokens (one per batch would make
# thousands of tiny row groups); memory stays bounded by one row group.
POSTERIOR_ROW_GROUP = 65_536
# Tokens per posterior step at least (per-call overheads dominate below; results are per row).
POSTERIOR_BATCH = 1024


def _argmax_posterior(model: MFA, x_BD: torch.Tensor, top: int) -> dict[str, torch.Tensor]:
    """Top responsibilities and E[z|x,k] of the argmax component only.

    `MFA.posterior` solves for E[z|x,k] in all K components (a (K, R, B) solve that costs as much
    as the likelihoods at K=500); only the argmax one is written, so only it is solved for.
    """
    ll_BK, v_BKR, L_KRR = model._core(x_BD)
    joint_BK = ll_BK + model.log_pi_K()
    log_px_B = torch.logsumexp(joint_BK, dim=1)
    top_r, top_k = (joint_BK - log_px_B[:, None]).exp().topk(top, dim=1)
    arg = top_k[:, 0]
    v_BR = v_BKR[torch.arange(x_BD.shape[0], device=x_BD.device), arg]
    z_BR = torch.cholesky_solve(v_BR[:, :, None], L_KRR[arg], upper=False)[:, :, 0]
    return {"top_resp": top_r, "top_k": top_k, "z_BR": z_BR, "log_px_B": log_px_B}


def token_batches(
    x_ND: torch.Tensor, seq_ids_N: np.ndarray, pos_N: np.ndarray, split_N: np.ndarray, size: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, torch.Tensor]]:
    """(seq_ids, positions, split, x) slices of in-memory tokens."""
    for s in range(0, x_ND.shape[0], size):
        yield (
            seq_ids_N[s : s + size],
            pos_N[s : s + size],
            split_N[s : s + size],
            x_ND[s : s + size],
        )


@torch.no_grad()
def write_posteriors_stream(
    model: MFA,
    batches: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray, torch.Tensor]],
    path: str | Path,
    *,
    top: int,
    batch_size: int,
    device: torch.device,
) -> np.ndarray:
    """Stream per-token posteriors to Parquet from (seq_ids, pos, split, x) batches of any size
    (e.g. activation shards); memory is one batch plus one row group. Returns argmax sizes."""
    from saeflow.io import atomic_path

    K, R = model.K, model.R
    top = min(top, K)
    step = max(int(batch_size), POSTERIOR_BATCH)
    schema = posterior_schema(top, R)
    sizes = np.zeros(K, dtype=np.int64)
    model.eval().to(device)
    pending: list[pa.Table] = []
    n_pending = 0
    with atomic_path(path) as tmp:
        writer = pq.ParquetWriter(str(tmp), schema, compression="zstd")
        try:
            for seq_b, pos_b, split_b, x_b in tqdm(
                batches, desc="posteriors", file=sys.stderr, mininterval=5
            ):
                for s in range(0, x_b.shape[0], step):
                    x = x_b[s : s + step].to(device=device, dtype=torch.float32)
                    post = _argmax_posterior(model, x, top)
                    top_r, top_k, z_BR = post["top_resp"], post["top_k"], post["z_BR"]
                    arg = top_k[:, 0]
                    arg_np = arg.cpu().numpy().astype(np.int32)
                    sizes += np.bincount(arg_np, minlength=K)
                    cols = [
                        pa.array(np.asarray(seq_b[s : s + step]).astype(np.int32)),
                        pa.array(np.asarray(pos_b[s : s + step]).astype(np.int32)),
                        pa.array(np.asarray(split_b[s : s + step]).astype(np.int8)),
                        pa.array(arg_np),
                        pa.array(post["log_px_B"].float().cpu().numpy()),
                        _fixed(top_k.cpu().numpy().astype(np.int32), top),
                        _fixed(top_r.float().cpu().numpy(), top),
                        _fixed(z_BR.float().cpu().numpy(), R),
                    ]
                    pending.append(pa.Table.from_arrays(cols, schema=schema))
                    n_pending += x.shape[0]
                    if n_pending >= POSTERIOR_ROW_GROUP:
                        writer.write_table(pa.concat_tables(pending), POSTERIOR_ROW_GROUP)
                        pending, n_pending = [], 0
            if pending:
                writer.write_table(pa.concat_tables(pending), POSTERIOR_ROW_GROUP)
        finally:
            writer.close()
    return sizes


def write_posteriors(
    model: MFA,
    x_ND: torch.Tensor,
    seq_ids_N: np.ndarray,
    pos_N: np.ndarray,
    split_N: np.ndarray,
    path: str | Path,
    *,
    top: int,
    batch_size: int,
    device: torch.device,
) -> np.ndarray:
    """Stream per-token posteriors of in-memory tokens to Parquet; return argmax sizes."""
    return write_posteriors_stream(
        model,
        token_batches(x_ND, seq_ids_N, pos_N, split_N, POSTERIOR_ROW_GROUP),
        path,
        top=top,
        batch_size=batch_size,
        device=device,
    )


def _fixed(values_BX: np.ndarray, width: int) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(values_BX.reshape(-1)), width)


# ---- the whole stage -----------------------------------------------------------------------------
def fit_mfa(
    acts_ND: torch.Tensor,
    seq_ids_N: np.ndarray,
    centroids_KD: torch.Tensor,
    settings: dict[str, Any],
    *,
    seed: int,
    device: torch.device,
) -> FitResult:
    """Split, initialise, train; the model returned holds the best epoch's parameters."""
    N, D = acts_ND.shape
    K = centroids_KD.shape[0]
    if centroids_KD.shape[1] != D:
        raise DataError(f"centroids have D={centroids_KD.shape[1]} but the activations D={D}")
    if N < K:
        raise DataError(f"only {N} activations for K = {K} components: lower K")
    if not bool(torch.isfinite(acts_ND[:: max(1, N // INIT_POINTS)]).all()):
        raise DataError("activations contain inf/NaN; cannot fit an MFA")
    train_idx, val_idx, how = split_train_val(seq_ids_N, settings["val_fraction"], seed)
    x_train, x_val = acts_ND[torch.from_numpy(train_idx)], acts_ND[torch.from_numpy(val_idx)]
    center_D, scale = standardisation(x_train)
    model = init_model(
        x_train,
        centroids_KD,
        settings["R"],
        psi=settings["psi"],
        center_D=center_D,
        scale=scale,
        seed=seed,
    )
    if device.type == "cuda":
        # Kept in the stored dtype (fp16/bf16 halves memory); batches are cast to float32.
        x_train, x_val = x_train.to(device), x_val.to(device)
    history, best_epoch = train_mfa(
        model,
        x_train,
        x_val,
        epochs=settings["epochs"],
        lr=settings["lr"],
        batch_size=settings["batch_size"],
        clip=settings["clip"],
        patience=settings["patience"],
        seed=seed,
        device=device,
    )
    model.cpu()
    if settings.get("sort_loadings", False):
        model.sort_loadings()
    best = history[best_epoch]
    summary = {
        "n_tokens": int(N),
        "n_train": int(len(train_idx)),
        "n_val": int(len(val_idx)),
        "split": how,
        "best_epoch": int(best_epoch),
        "epochs_run": len(history) - 1,
        "best_train_nll": best["train_nll"],
        "best_val_nll": best["val_nll"],
        "stopped_early": len(history) - 1 < settings["epochs"],
    }
    split_N = np.zeros(N, dtype=np.int8)
    split_N[val_idx] = 1
    return FitResult(model, history, summary, split_N)


def run_fit_mfa(
    acts_path: str | Path,
    centroids_path: str | Path,
    *,
    model_path: str | Path,
    config_path: str | Path,
    nll_path: str | Path,
    posteriors_path: str | Path,
    settings: dict[str, Any],
    seed: int = 0,
    device: str = "auto",
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """fit_mfa rule: read activations + centroids, fit, write model/config/NLL/posteriors."""
    from saeflow.io import atomic_path, config_hash, write_json
    from saeflow.mfa import resolve_settings
    from saeflow.mfa.init import load_centroids
    from saeflow.utils import seed_everything

    settings = resolve_settings(settings)
    seed_everything(seed)
    dev = resolve_device(device)
    seq_ids, positions, acts_ND = load_acts(acts_path)
    centroids = load_centroids(centroids_path)
    model, history, summary, split_N = fit_mfa(
        acts_ND, seq_ids, centroids, settings, seed=seed, device=dev
    )
    table = history_table(history)
    sizes = write_posteriors(
        model,
        acts_ND,
        seq_ids,
        positions,
        split_N,
        posteriors_path,
        top=settings["top_resp"],
        batch_size=settings["batch_size"],
        device=dev,
    )
    config = save_mfa(model.cpu(), model_path)
    with torch.no_grad():
        pi = model.log_pi_K().exp().tolist()
    config.update(
        summary,
        settings=settings,
        seed=seed,
        pi=pi,
        component_sizes=sizes.tolist(),
        config_hash=config_hash(settings, seed, meta or {}),
        **(meta or {}),
    )
    with atomic_path(nll_path) as tmp:
        table.to_parquet(tmp, compression="zstd", index=False)
    write_json(config_path, config)
    return config


def load_acts(path: str | Path) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """Activations as (seq_ids int64, positions int64, acts (N, D) in their stored dtype)."""
    from saeflow.activations import load_activations

    seq_ids, positions, acts = load_activations(path)
    acts_ND = acts if isinstance(acts, torch.Tensor) else torch.from_numpy(np.asarray(acts))
    if acts_ND.ndim != 2 or acts_ND.shape[0] == 0:
        raise DataError(
            f"{path}: expected a non-empty (N, D) activation matrix, got {tuple(acts_ND.shape)}"
        )
    return _np(seq_ids), _np(positions), acts_ND


def _np(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.cpu().numpy()
    return np.asarray(values).astype(np.int64)
