"""`encode_sae`: cached activations -> sparse code shards, resumable like the activation cache.

Shard plan: code shard i holds exactly the tokens of activation shard i, in the same order, so the
plan is fixed by the activation manifest and a resumed run writes the same bytes. Every shard is
written atomically; `.progress.json` records finished shards under the config hash (SAE weights
digest, encode settings, activation config hash). Shards of another hash are deleted on start.
`manifest.json` is written last and is the only file Snakemake declares.

Per-token SAEs encode token chunks of `batch_tokens` rows. A temporal SAE needs whole sequences in
order (position t attends to positions < t): activation shards hold whole sequences, so rows are
grouped by consecutive `seq_id` and batched by sequence, right-padded (exact, the attention is
causal), never shuffled. Its predictable codes are dense, and by default (`pred_storage: dense`)
they are stored exactly as dense rows (`pred_dtype` float32, or float16 at half the disk), as the
seed notebooks keep them. `pred_storage: sparse` is the explicit lossy option: `pred_k` keeps the
largest |value| per token (None or 0 keeps all non-zeros, in float16) and `pred_threshold` drops
|value| <= threshold.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from saeflow import io as sio
from saeflow.codes import (
    CODES_FORMAT,
    DENSE_DTYPES,
    SHARD_EXT,
    TEMPORAL_PARTS,
    Codes,
    DenseCodes,
    write_code_shard,
)
from saeflow.errors import ConfigError, DataError
from saeflow.hooks import check_sae_hook
from saeflow.sae.formats import load_sae
from saeflow.sae.models import BaseSAE, check_sae_matches
from saeflow.sae.sparse import CSR, csr_from_dense, topk_by_magnitude

log = logging.getLogger("saeflow.encode")

PROGRESS = sio.PROGRESS
VERSION = 1
DEFAULTS = {
    "batch_tokens": 4096,
    "values_dtype": "float16",
    "pred_storage": "dense",
    "pred_dtype": "float32",
    "pred_k": None,
    "pred_threshold": 0.0,
    "attention_maps": [],
}
PRED_STORAGES = ("dense", "sparse")
ATTENTION_DIR = "attention"
FP16_MAX = float(np.finfo(np.float16).max)


def encode_settings(encode_cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """Defaults filled in and checked: batch_tokens >= 1, pred_k None or >= 0 (sparse only)."""
    cfg = {**DEFAULTS, **dict(encode_cfg or {})}
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"encode: unknown key(s) {', '.join(unknown)}")
    if not isinstance(cfg["batch_tokens"], int) or cfg["batch_tokens"] < 1:
        raise ConfigError(f"encode.batch_tokens = {cfg['batch_tokens']!r}: must be an integer >= 1")
    if cfg["pred_k"] is not None and (not isinstance(cfg["pred_k"], int) or cfg["pred_k"] < 0):
        raise ConfigError(f"encode.pred_k = {cfg['pred_k']!r}: must be null or an integer >= 0")
    cfg["pred_threshold"] = float(cfg["pred_threshold"])
    maps = cfg["attention_maps"]
    if not isinstance(maps, list) or not all(isinstance(s, int) for s in maps):
        raise ConfigError(f"encode.attention_maps = {maps!r}: must be a list of seq_ids")
    cfg["attention_maps"] = sorted(set(maps))
    if cfg["pred_storage"] not in PRED_STORAGES:
        raise ConfigError(
            f"encode.pred_storage = {cfg['pred_storage']!r}: one of {', '.join(PRED_STORAGES)}"
        )
    if cfg["values_dtype"] not in DENSE_DTYPES:
        raise ConfigError(
            f"encode.values_dtype = {cfg['values_dtype']!r}: one of {', '.join(DENSE_DTYPES)}"
        )
    if cfg["pred_dtype"] not in DENSE_DTYPES:
        raise ConfigError(
            f"encode.pred_dtype = {cfg['pred_dtype']!r}: one of {', '.join(DENSE_DTYPES)}"
        )
    lossy = cfg["pred_k"] or cfg["pred_threshold"] > 0
    if cfg["pred_storage"] == "dense" and lossy:
        raise ConfigError(
            f"encode.pred_k = {cfg['pred_k']!r} / pred_threshold = {cfg['pred_threshold']}: "
            "cutting predictable codes needs encode.pred_storage: sparse (dense keeps them exact)"
        )
    return cfg


def state_digest(sae: BaseSAE) -> str:
    """Hash of the SAE's architecture and weights: a retrained SAE invalidates old shards."""
    h = hashlib.sha256(repr(sorted(sae.describe().items())).encode())
    for key, value in sorted(sae.state_dict().items()):
        t = value.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{key}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def sequence_spans(seq_N: np.ndarray, pos_N: np.ndarray, where: str) -> np.ndarray:
    """Row offsets of runs of consecutive equal seq_id; each run must be positions 0..L-1."""
    n = len(seq_N)
    if n == 0:
        return np.zeros(1, np.int64)
    starts = np.flatnonzero(np.diff(seq_N.astype(np.int64)) != 0) + 1
    offsets = np.concatenate([[0], starts, [n]]).astype(np.int64)
    lengths = np.diff(offsets)
    expected = np.arange(n) - np.repeat(offsets[:-1], lengths)
    if not np.array_equal(pos_N.astype(np.int64), expected):
        bad = int(np.flatnonzero(pos_N != expected)[0])
        raise DataError(
            f"{where}: row {bad} (seq_id {int(seq_N[bad])}) has pos {int(pos_N[bad])}, expected "
            f"{int(expected[bad])}; a temporal SAE needs whole sequences in order"
        )
    return offsets


def sequence_batches(offsets: np.ndarray, batch_tokens: int) -> list[tuple[int, int]]:
    """Consecutive runs of sequences [s0, s1) with n_seqs * longest <= batch_tokens (>= 1 seq)."""
    batches: list[tuple[int, int]] = []
    lengths = np.diff(offsets)
    s0 = 0
    longest = 0
    for s, length in enumerate(lengths):
        longest_new = max(longest, int(length))
        if s > s0 and (s - s0 + 1) * longest_new > batch_tokens:
            batches.append((s0, s))
            s0, longest_new = s, int(length)
        longest = longest_new
    if len(lengths):
        batches.append((s0, len(lengths)))
    return batches


def _to_codes(
    csr: CSR, seq_N: np.ndarray, pos_N: np.ndarray, d_sae: int, part: str, dtype: str = "float16"
) -> Codes:
    """Sparse `Codes` with values in `dtype` (float16 clipped to its range, or exact float32)."""
    if dtype == "float32":
        vals = csr.vals.astype(np.float32)
    else:
        vals = np.clip(csr.vals, -FP16_MAX, FP16_MAX).astype(np.float16)
    return Codes(
        seq_N.astype(np.int32), pos_N.astype(np.int32), csr.indptr, csr.ids, vals, d_sae, part
    )


@torch.inference_mode()
def encode_per_token(
    sae: BaseSAE, acts_ND: torch.Tensor, batch_tokens: int, device: torch.device
) -> CSR:
    """Sparse codes of a per-token SAE, `batch_tokens` rows at a time."""
    parts = []
    for start in range(0, acts_ND.shape[0], batch_tokens):
        chunk = acts_ND[start : start + batch_tokens].to(device, torch.float32)
        parts.append(sae.encode_sparse(chunk))
    return CSR.concat(parts)


@torch.inference_mode()
def encode_temporal(
    sae: BaseSAE,
    acts_ND: torch.Tensor,
    offsets: np.ndarray,
    cfg: Mapping[str, Any],
    device: torch.device,
) -> tuple[CSR, CSR | np.ndarray]:
    """(novel, pred) codes of whole sequences, batched by sequence in order.

    pred is a dense [N, F] array in `pred_dtype` for `pred_storage: dense`, else a (cut) CSR.
    """
    dense = cfg.get("pred_storage", "dense") == "dense"
    pred_dtype = getattr(torch, cfg.get("pred_dtype", "float32"))
    novel_parts, pred_parts = [], []
    lengths = np.diff(offsets)
    for s0, s1 in sequence_batches(offsets, int(cfg["batch_tokens"])):
        lens = lengths[s0:s1]
        L = int(lens.max()) if len(lens) else 0
        if L == 0:
            continue
        x_BLD = torch.zeros(s1 - s0, L, sae.d_in, device=device)
        mask_BL = torch.arange(L)[None, :] < torch.from_numpy(lens)[:, None]
        rows = acts_ND[int(offsets[s0]) : int(offsets[s1])].to(device, torch.float32)
        x_BLD[mask_BL.to(device)] = rows
        novel_BLF, pred_BLF = sae.encode(x_BLD)
        valid = mask_BL.to(device)
        novel_parts.append(csr_from_dense(novel_BLF[valid]))
        if dense:
            pred_parts.append(pred_BLF[valid].to("cpu", pred_dtype).numpy())
        else:
            pred_parts.append(
                topk_by_magnitude(pred_BLF[valid], cfg["pred_k"], cfg["pred_threshold"])
            )
    if dense:
        width = sae.d_sae
        empty = np.zeros((0, width), np.dtype(cfg.get("pred_dtype", "float32")))
        return CSR.concat(novel_parts), np.concatenate(pred_parts) if pred_parts else empty
    return CSR.concat(novel_parts), CSR.concat(pred_parts)


def _reconcile(out_dir: Path, chash: str, part_dirs: list[str]) -> dict[str, Any]:
    """Keep finished shards of this config hash; remove every other leftover."""
    progress = sio.load_progress(out_dir, chash)
    done = progress["shards"]
    for name, rec in list(done.items()):
        sizes = rec.get("bytes", {})
        files = {d: out_dir / d / name for d in part_dirs}
        if not all(f.exists() and f.stat().st_size == sizes.get(d) for d, f in files.items()):
            del done[name]
    for d in (".", *TEMPORAL_PARTS):
        folder = out_dir / d
        if not folder.is_dir():
            continue
        sio.remove_stale_shards(folder, done if d in part_dirs else (), drop_manifest=d == ".")
        if d != "." and d not in part_dirs:
            shutil.rmtree(folder, ignore_errors=True)
    return progress


def encode_sae(
    acts_path: str | os.PathLike,
    sae_spec: Mapping[str, Any],
    out_manifest: str | os.PathLike,
    *,
    runtime: Mapping[str, Any] | None = None,
    encode_cfg: Mapping[str, Any] | None = None,
    sae: BaseSAE | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Encode every cached activation of `acts_path` with the SAE; returns the manifest."""
    from saeflow.activations import iter_activation_shards
    from saeflow.devices import resolve_device

    cfg = encode_settings(encode_cfg)
    if threads:
        torch.set_num_threads(threads)
    acts_dir = Path(acts_path)
    acts_dir = acts_dir.parent if acts_dir.name == sio.MANIFEST else acts_dir
    acts_manifest = sio.read_manifest(acts_dir)
    device = resolve_device(runtime)
    name = sae_spec.get("name", "sae")
    sae = load_sae(dict(sae_spec), device=device) if sae is None else sae.to(device)
    check_sae_hook(sae, acts_manifest, f"saes.{name} on {acts_dir}")
    check_sae_matches(sae, int(acts_manifest["d_model"]), f"saes.{name} on {acts_dir}")
    temporal = bool(sae.is_temporal)
    part_dirs = list(TEMPORAL_PARTS) if temporal else ["."]
    used = {"batch_tokens": cfg["batch_tokens"], "values_dtype": cfg["values_dtype"]}
    vdt = cfg["values_dtype"]
    if temporal:
        # attention maps are written beside the shards: changing them re-encodes nothing
        used.update({k: cfg[k] for k in DEFAULTS if k not in ("batch_tokens", "attention_maps")})
    chash = sio.config_hash(
        {"sae": state_digest(sae), "encode": used},
        {"acts": acts_manifest.get("config_hash"), "n_tokens": acts_manifest.get("n_tokens")},
        {"version": VERSION},
    )

    out_dir = Path(out_manifest).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    for d in part_dirs:
        (out_dir / d).mkdir(exist_ok=True)
    progress = _reconcile(out_dir, chash, part_dirs)
    shard_names = [sio.shard_name(i, SHARD_EXT) for i in range(len(acts_manifest["shards"]))]
    todo = [n for n in shard_names if n not in progress["shards"]]
    log.info(
        "encoding %d of %d shards with %s (config hash %s)",
        len(todo),
        len(shard_names),
        sae.source or name,
        chash,
    )
    total = sum(
        int(rec.get("n_tokens", 0))
        for rec, n in zip(acts_manifest["shards"], shard_names, strict=True)
        if n in todo
    )
    bar = tqdm(total=total, unit="tok", unit_scale=True, file=sys.stderr, mininterval=2.0)
    if todo:
        for shard_name, (seq_N, pos_N, acts_ND) in zip(
            shard_names, iter_activation_shards(acts_dir), strict=True
        ):
            if shard_name not in todo:
                continue
            seq_N, pos_N = np.asarray(seq_N), np.asarray(pos_N)
            acts_ND = torch.as_tensor(acts_ND)
            if temporal:
                offsets = sequence_spans(seq_N, pos_N, f"{acts_dir}/{shard_name}")
                novel, pred = encode_temporal(sae, acts_ND, offsets, cfg, device)
                outputs = {
                    "novel": _to_codes(novel, seq_N, pos_N, sae.d_sae, "novel", vdt),
                    "pred": (
                        DenseCodes(
                            seq_N.astype(np.int32), pos_N.astype(np.int32), pred, sae.d_sae, "pred"
                        )
                        if isinstance(pred, np.ndarray)
                        else _to_codes(pred, seq_N, pos_N, sae.d_sae, "pred", vdt)
                    ),
                }
            else:
                csr = encode_per_token(sae, acts_ND, cfg["batch_tokens"], device)
                outputs = {".": _to_codes(csr, seq_N, pos_N, sae.d_sae, "codes", vdt)}
            sizes, nnz = {}, {}
            for d, codes in outputs.items():
                write_code_shard(out_dir / d / shard_name, codes)
                sizes[d] = (out_dir / d / shard_name).stat().st_size
                nnz["codes" if d == "." else d] = codes.nnz
            progress["shards"][shard_name] = {
                "n_tokens": len(seq_N),
                "n_sequences": int(len(np.unique(seq_N))),
                "nnz": nnz,
                "bytes": sizes,
            }
            sio.write_json(out_dir / PROGRESS, progress)
            time.sleep(float(os.environ.get("SAEFLOW_TEST_SHARD_DELAY", "0") or 0))
            bar.update(len(seq_N))
            if shard_name == todo[-1]:
                break
    bar.close()
    if temporal and cfg["attention_maps"]:
        progress["attention"] = write_attention_maps(
            sae, acts_dir, cfg["attention_maps"], out_dir / ATTENTION_DIR, device
        )
    return _finish(out_dir, progress, shard_names, sae, sae_spec, cfg, acts_manifest, chash)


@torch.inference_mode()
def write_attention_maps(
    sae: BaseSAE, acts_dir: Path, seq_ids: list[int], out: Path, device: torch.device
) -> dict[str, str]:
    """`{seq_id}.safetensors` with `attn_graphs` [n_attn_layers, n_heads, L, L] per wanted sequence.

    The reference forward's `return_graph` maps, for the few sequences named in
    `encode.attention_maps` (a dataset's other sequences are skipped): cheap, and read back with
    `saeflow.codes.load_attention`.
    """
    from safetensors.torch import save_file

    from saeflow.activations import iter_activation_shards

    out.mkdir(exist_ok=True)
    sio.remove_stale_shards(out, (), drop_manifest=False)
    wanted = set(seq_ids)
    files: dict[str, str] = {}
    for seq_N, pos_N, acts_ND in iter_activation_shards(acts_dir):
        seq_N = np.asarray(seq_N)
        for s in sorted(wanted & set(np.unique(seq_N).tolist())):
            rows = np.flatnonzero(seq_N == s)
            x_LD = torch.as_tensor(acts_ND)[rows[np.argsort(np.asarray(pos_N)[rows])]]
            maps = sae.attention_maps(x_LD.to(device, torch.float32).unsqueeze(0))[0]
            name = f"{s}.safetensors"
            with sio.atomic_path(out / name) as tmp:
                save_file({"attn_graphs": maps.float().cpu().contiguous()}, str(tmp))
            files[str(s)] = f"{ATTENTION_DIR}/{name}"
    for old in out.iterdir():
        if old.suffix == ".safetensors" and f"{ATTENTION_DIR}/{old.name}" not in files.values():
            old.unlink()
    return files


def _finish(
    out_dir: Path,
    progress: dict[str, Any],
    shard_names: list[str],
    sae: BaseSAE,
    sae_spec: Mapping[str, Any],
    cfg: Mapping[str, Any],
    acts_manifest: Mapping[str, Any],
    chash: str,
) -> dict[str, Any]:
    recs = [progress["shards"][n] for n in shard_names]
    parts = {"novel": "novel", "pred": "pred"} if sae.is_temporal else {"codes": "."}
    n_tokens = sum(r["n_tokens"] for r in recs)
    nnz = {p: sum(r["nnz"][p] for r in recs) for p in parts}
    size = {p: sum(r["bytes"][d] for r in recs) for p, d in parts.items()}
    manifest = {
        "format": CODES_FORMAT,
        "d_sae": sae.d_sae,
        "d_in": sae.d_in,
        "parts": parts,
        "storage": {
            p: ("dense" if p == "pred" and cfg["pred_storage"] == "dense" else "sparse")
            for p in parts
        },
        "shards": shard_names,
        "shard_tokens": [r["n_tokens"] for r in recs],
        "n_tokens": n_tokens,
        "n_sequences": int(acts_manifest.get("n_sequences", sum(r["n_sequences"] for r in recs))),
        "nnz": nnz,
        "mean_l0": {p: (nnz[p] / n_tokens if n_tokens else 0.0) for p in parts},
        "bytes_per_nonzero": {p: (size[p] / nnz[p] if nnz[p] else 0.0) for p in parts},
        "sae": {
            k: v for k, v in sae_spec.items() if k in ("name", "format", "repo", "path", "revision")
        },
        "sae_arch": sae.describe(),
        "encode": (
            dict(cfg)
            if sae.is_temporal
            else {"batch_tokens": cfg["batch_tokens"], "values_dtype": cfg["values_dtype"]}
        ),
        "model": acts_manifest.get("model"),
        "layer": acts_manifest.get("layer"),
        "attention": progress.get("attention", {}),
        "acts_config_hash": acts_manifest.get("config_hash"),
        "config_hash": chash,
    }
    sio.write_manifest(out_dir, manifest)
    (out_dir / PROGRESS).unlink(missing_ok=True)
    log.info("wrote %d tokens of codes in %d shards to %s", n_tokens, len(shard_names), out_dir)
    return manifest
