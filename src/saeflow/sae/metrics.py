"""`sae_metrics`: reconstruction quality, sparsity and CE-loss recovered of an SAE on a dataset.

Reconstruction metrics run the SAE (float32) over the cached activations of the dataset; every
token except position 0 counts (position 0 is the BOS/first token, whose residual is an outlier
and which a temporal SAE cannot predict):

    variance_explained      = 1 - sum_t ||x_t - x_hat_t||^2 / sum_t ||x_t - mean(x)||^2
                              (mean(x) is the mean token vector: per-dimension centring)
    variance_explained_flat = 1 - mean_{t,i} (x_ti - x_hat_ti)^2 / var_{t,i}(x_ti)
                              seed 002's `1 - mean(err**2) / x.var()`: the variance of all
                              n_tokens * d_in entries around their one scalar mean, unbiased
                              (torch's default correction=1), pooled over the dataset
    mse                     = sum_t ||x_t - x_hat_t||^2 / (n_tokens * d_in)
    l0_{novel,pred,total} = mean number of non-zero codes per token (a per-token SAE has
                            pred = 0 and total = novel); computed from the SAE's dense codes, so
                            l0_pred is the true count, whatever `encode` stores
    dead_fraction      = fraction of features whose novel codes are zero on every counted token

A temporal SAE also reports both definitions for the reconstruction from each part alone,
`variance_explained[_flat]_pred` and `..._novel`: x_hat_pred = (D^T z_pred + b) / scaling_factor
and likewise for novel (the bias belongs to every reconstruction; the reference's `pred_recons`
and `novel_recons` are these without b). How much of the variance the predictable part explains.

CE loss: the model runs on up to `ce_max_sequences` sequences of the tokens table three times:
clean; with block `layer`'s output replaced by the SAE reconstruction; with it replaced by zeros
(both replacements at positions >= 1, position 0 kept as above). Each is the mean next-token
cross-entropy over real tokens, and

    ce_recovered = (ce_loss_zero - ce_loss_recon) / (ce_loss_zero - ce_loss_clean)

The ratio only means "fraction of the loss gap closed" when zero-ablation hurts, so when
ce_loss_zero <= ce_loss_clean it is null and `ce_recovered_reason` says why (the three losses are
still reported).

All sums are float64 running sums over streamed shards: O(d_in + d_sae) state, whatever the
number of tokens.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from tqdm import tqdm

from saeflow import io as sio
from saeflow.errors import ConfigError, DataError
from saeflow.hooks import DEFAULT_HOOK, check_sae_hook
from saeflow.sae.encode import sequence_batches, sequence_spans
from saeflow.sae.formats import load_sae
from saeflow.sae.models import BaseSAE, check_sae_matches

log = logging.getLogger("saeflow.metrics")

DEFAULTS = {"ce_batch_size": 16, "ce_max_sequences": 200, "batch_tokens": 4096}


class _Accumulator:
    """Running sums (float64) for variance explained, MSE, L0 and feature usage."""

    def __init__(self, d_in: int, d_sae: int) -> None:
        self.n = 0
        self.sum_x = torch.zeros(d_in, dtype=torch.float64)
        self.sum_sq = 0.0
        self.sse = 0.0
        self.sse_part = {"pred": 0.0, "novel": 0.0}
        self.has_parts = False
        self.l0 = {"novel": 0, "pred": 0, "total": 0}
        self.fired = torch.zeros(d_sae, dtype=torch.bool)
        self.d_in = d_in

    def add(self, x_ND, recon_ND, novel_NF, pred_NF, part_recons=None) -> None:
        """One batch; `part_recons` = (pred_recon_ND, novel_recon_ND) for a temporal SAE."""
        x = x_ND.double().cpu()
        self.n += len(x)
        self.sum_x += x.sum(0)
        self.sum_sq += float((x**2).sum())
        self.sse += float(((x - recon_ND.double().cpu()) ** 2).sum())
        if part_recons is not None:
            self.has_parts = True
            for name, r in zip(("pred", "novel"), part_recons, strict=True):
                self.sse_part[name] += float(((x - r.double().cpu()) ** 2).sum())
        novel_nz = novel_NF != 0
        self.l0["novel"] += int(novel_nz.sum())
        self.fired |= novel_nz.any(0).cpu()
        if pred_NF is None:
            self.l0["total"] += int(novel_nz.sum())
        else:
            self.l0["pred"] += int((pred_NF != 0).sum())
            self.l0["total"] += int(((novel_NF + pred_NF) != 0).sum())

    def result(self) -> dict[str, Any]:
        if self.n == 0:
            raise DataError("sae_metrics: no tokens beyond position 0 to evaluate")
        mean = self.sum_x / self.n
        sst = self.sum_sq - self.n * float((mean**2).sum())
        m = self.n * self.d_in
        var_flat = (self.sum_sq - float(self.sum_x.sum()) ** 2 / m) / (m - 1) if m > 1 else 0.0

        def ve(sse: float) -> float | None:
            return 1.0 - sse / sst if sst > 0 else None

        def ve_flat(sse: float) -> float | None:
            return 1.0 - (sse / m) / var_flat if var_flat > 0 else None

        parts = {}
        if self.has_parts:
            for name, sse in self.sse_part.items():
                parts[f"variance_explained_{name}"] = ve(sse)
                parts[f"variance_explained_flat_{name}"] = ve_flat(sse)
        return {
            "variance_explained": ve(self.sse),
            "variance_explained_flat": ve_flat(self.sse),
            **parts,
            "mse": self.sse / (self.n * self.d_in),
            "l0_novel": self.l0["novel"] / self.n,
            "l0_pred": self.l0["pred"] / self.n,
            "l0_total": self.l0["total"] / self.n,
            "dead_fraction": float(1 - self.fired.float().mean()),
            "n_tokens": self.n,
        }


@torch.inference_mode()
def reconstruction_metrics(
    sae: BaseSAE, acts_path: str | os.PathLike, device: torch.device, batch_tokens: int = 4096
) -> dict[str, Any]:
    """Stream the cached activations through the SAE; see the module docstring for formulas."""
    from saeflow.activations import iter_activation_shards

    acc = _Accumulator(sae.d_in, sae.d_sae)
    acts_dir = Path(acts_path).parent if str(acts_path).endswith(".json") else Path(acts_path)
    manifest = sio.read_manifest(acts_dir)
    bar = tqdm(total=int(manifest.get("n_tokens", 0)), unit="tok", file=sys.stderr, mininterval=5)
    for seq_N, pos_N, acts_ND in iter_activation_shards(acts_path):
        seq_N, pos_N = np.asarray(seq_N), np.asarray(pos_N)
        acts_ND = torch.as_tensor(acts_ND)
        if sae.is_temporal:
            offsets = sequence_spans(seq_N, pos_N, str(acts_path))
            lengths = np.diff(offsets)
            for s0, s1 in sequence_batches(offsets, batch_tokens):
                lens = torch.from_numpy(lengths[s0:s1])
                L = int(lens.max())
                x = torch.zeros(s1 - s0, L, sae.d_in, device=device)
                valid = torch.arange(L)[None, :] < lens[:, None]
                x[valid.to(device)] = acts_ND[offsets[s0] : offsets[s1]].to(device, torch.float32)
                out = sae(x)
                keep = (valid & (torch.arange(L)[None, :] > 0)).to(device)
                bias = sae.b / sae.scaling_factor
                pred_r, novel_r = sae.split_recon(out.novel[keep], out.pred[keep])
                acc.add(
                    x[keep],
                    out.recon[keep],
                    out.novel[keep],
                    out.pred[keep],
                    (pred_r + bias, novel_r + bias),
                )
        else:
            keep = torch.from_numpy(pos_N > 0)
            for start in range(0, len(acts_ND), batch_tokens):
                x = acts_ND[start : start + batch_tokens].to(device, torch.float32)
                k = keep[start : start + batch_tokens].to(device)
                out = sae(x)
                acc.add(x[k], out.recon[k], out.novel[k], None)
        bar.update(len(seq_N))
    bar.close()
    return acc.result()


def _ce_sum(logits_BPV: torch.Tensor, ids_BP: torch.Tensor, mask_BP: torch.Tensor):
    """Summed next-token cross-entropy over pairs of real tokens, and their count."""
    logits = logits_BPV[:, :-1].float()
    target = ids_BP[:, 1:]
    valid = (mask_BP[:, 1:] & mask_BP[:, :-1]).bool()
    loss = F.cross_entropy(logits[valid], target[valid], reduction="sum")
    return float(loss), int(valid.sum())


def ce_recovered(clean: float, recon: float, zero: float) -> tuple[float | None, str | None]:
    """(zero - recon) / (zero - clean), or (None, why) when zeroing is not worse than clean."""
    if not zero > clean + 1e-12:
        return None, (
            f"zero-ablation loss {zero:.4g} is not above the clean loss {clean:.4g}: zeroing the "
            "layer does not hurt, so the fraction of the gap recovered is undefined"
        )
    return (zero - recon) / (zero - clean), None


@torch.inference_mode()
def ce_metrics(
    sae: BaseSAE,
    model: torch.nn.Module,
    layer: int,
    tokens_path: str | os.PathLike,
    *,
    batch_size: int,
    max_sequences: int,
    hook: str = DEFAULT_HOOK,
) -> dict[str, Any]:
    """Clean, spliced-reconstruction and zero-ablation CE loss (module docstring), with the SAE
    spliced in at (layer, hook)."""
    from saeflow.models import model_inputs, splice_hook
    from saeflow.tokenize import load_tokens

    table = load_tokens(tokens_path)
    seqs = [np.asarray(t, dtype=np.int64) for t in table["token_ids"]]
    seqs = [s for s in seqs if len(s) >= 2][:max_sequences]
    if not seqs:
        raise DataError(f"{tokens_path}: no sequence with at least 2 tokens for the CE loss")
    device = next(model.parameters()).device
    totals = {"clean": [0.0, 0], "recon": [0.0, 0], "zero": [0.0, 0]}

    def recon_fn(acts_BPD: torch.Tensor) -> torch.Tensor:
        x = acts_BPD.float()
        out = sae(x).recon if sae.is_temporal else sae(x.reshape(-1, sae.d_in)).recon
        new = out.reshape(x.shape)
        new[:, 0] = x[:, 0]
        return new

    def zero_fn(acts_BPD: torch.Tensor) -> torch.Tensor:
        new = torch.zeros_like(acts_BPD)
        new[:, 0] = acts_BPD[:, 0]
        return new

    for start in tqdm(range(0, len(seqs), batch_size), desc="CE loss", file=sys.stderr):
        batch = seqs[start : start + batch_size]
        P = max(len(s) for s in batch)
        ids = torch.zeros(len(batch), P, dtype=torch.long)
        mask = torch.zeros(len(batch), P, dtype=torch.long)
        for i, s in enumerate(batch):
            ids[i, : len(s)] = torch.from_numpy(s)
            mask[i, : len(s)] = 1
        inputs = model_inputs(model, ids, mask)
        ids_d, mask_d = ids.to(device), mask.to(device)
        for name, fn in (("clean", None), ("recon", recon_fn), ("zero", zero_fn)):
            if fn is None:
                logits = model(**inputs).logits
            else:
                with splice_hook(model, layer, hook, fn):
                    logits = model(**inputs).logits
            loss, count = _ce_sum(logits, ids_d, mask_d)
            totals[name][0] += loss
            totals[name][1] += count
    ce = {name: s / n for name, (s, n) in totals.items()}
    recovered, reason = ce_recovered(ce["clean"], ce["recon"], ce["zero"])
    return {
        "ce_loss_clean": ce["clean"],
        "ce_loss_recon": ce["recon"],
        "ce_loss_zero": ce["zero"],
        "ce_recovered": recovered,
        "ce_recovered_reason": reason,
        "n_tokens_ce": totals["clean"][1],
        "n_sequences_ce": len(seqs),
    }


def sae_metrics(
    acts_path: str | os.PathLike,
    codes_path: str | os.PathLike,
    sae_spec: Mapping[str, Any],
    model_spec: Mapping[str, Any],
    tokens_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    runtime: Mapping[str, Any] | None = None,
    metrics_cfg: Mapping[str, Any] | None = None,
    sae: BaseSAE | None = None,
    model: torch.nn.Module | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Write `metrics/{model}/{dataset}/{sae}.json` (see the module docstring)."""
    from saeflow.devices import resolve_device, resolve_dtype
    from saeflow.models import load_lm

    cfg = {**DEFAULTS, **dict(metrics_cfg or {})}
    if threads:
        torch.set_num_threads(threads)
    device = resolve_device(runtime)
    acts_dir = Path(acts_path).parent if str(acts_path).endswith(".json") else Path(acts_path)
    acts_manifest = sio.read_manifest(acts_dir)
    codes_dir = Path(codes_path).parent if str(codes_path).endswith(".json") else Path(codes_path)
    codes_manifest = sio.read_manifest(codes_dir)
    name = sae_spec.get("name", "sae")
    sae = load_sae(dict(sae_spec), device=device) if sae is None else sae.to(device)
    check_sae_hook(sae, acts_manifest, f"saes.{name} on {acts_dir}")
    check_sae_matches(sae, int(acts_manifest["d_model"]), f"saes.{name} on {acts_dir}")
    if getattr(sae, "transcode", False):
        raise ConfigError(
            f"saes.{name}: a transcoder predicts {sae.metadata.get('hook_name_out')}, not its "
            "input; reconstruction metrics against its input are not defined (drop eval_datasets)"
        )
    if int(codes_manifest["n_tokens"]) != int(acts_manifest["n_tokens"]):
        raise DataError(
            f"{codes_path}: {codes_manifest['n_tokens']} tokens of codes but the activations have "
            f"{acts_manifest['n_tokens']}; rerun encode_sae"
        )
    result = reconstruction_metrics(sae, acts_dir, device, int(cfg["batch_tokens"]))
    # The SAE is spliced where its activations were read, which the activations record.
    layer = int(acts_manifest.get("layer", model_spec["layer"]))
    hook = str(acts_manifest.get("hook", DEFAULT_HOOK))
    if model is None:
        model = load_lm(
            model_spec["path"],
            revision=model_spec.get("revision"),
            trust_remote_code=bool(model_spec.get("trust_remote_code", False)),
            device=device,
            dtype=resolve_dtype(runtime, device),
            with_head=True,
        )
    result.update(
        ce_metrics(
            sae,
            model,
            layer,
            tokens_path,
            hook=hook,
            batch_size=int(cfg["ce_batch_size"]),
            max_sequences=int(cfg["ce_max_sequences"]),
        )
    )
    result.update(
        sae=name,
        model=model_spec.get("name", acts_manifest.get("model")),
        layer=layer,
        hook=hook,
        d_sae=sae.d_sae,
        kind="temporal" if sae.is_temporal else "per_token",
        excluded_positions=[0],
        codes_mean_l0=codes_manifest.get("mean_l0"),
    )
    sio.write_json(out_path, result)
    log.info(
        "%s: variance explained %.4f (flat %.4f), CE recovered %s",
        name,
        result["variance_explained"],
        result["variance_explained_flat"],
        result["ce_recovered"]
        if result["ce_recovered"] is not None
        else result["ce_recovered_reason"],
    )
    return result
