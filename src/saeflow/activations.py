"""Cache the activations of many hook points (saeflow.hooks) in one forward pass, to resumable
shards, one folder per hook point.

Layout of `root` = results/activations/{model}/{dataset}/:
  manifest.json       the set: every hook point with its folder and manifest, written last.
  layer_{L}/{hook}/   one hook point (`HookPoint.folder`), holding:
    part-NNNNN.parquet  columns seq_id int32, pos int32, act fixed_size_binary(itemsize*d): the
                        raw row bytes (bf16 on CUDA, fp32 on CPU). One binary column reads and
                        writes ~10x faster than fixed_size_list<halffloat>.
    part-NNNNN.pt       or: torch.save({"seq_id", "pos", "act"}) tensors, read with weights_only.
    .progress.json      finished shards under the resume key that made them, so a killed job
                        resumes; each hook point has its own key.
    manifest.json       written last; the rules declare only the set manifest and publish this
                        one from it, so shards survive a kill.

The shard plan depends only on the tokens file and `shard_tokens` (consecutive runs of whole
sequences), and batches never cross shards, so a resumed run writes the same bytes as an
uninterrupted one, whichever hook points it had left.
"""

from __future__ import annotations

import io
import logging
import mmap
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import xxhash
from torch import nn
from tqdm import tqdm

from saeflow import io as sio
from saeflow import verify
from saeflow.codes import list_column_csr
from saeflow.devices import resolve_device, resolve_dtype
from saeflow.errors import ConfigError, DataError
from saeflow.hooks import DEFAULT_HOOK, HOOKS, HookPoint, sort_hookpoints
from saeflow.models import capture_hooks, load_lm
from saeflow.utils import seed_everything

log = logging.getLogger("saeflow.activations")

FORMATS = ("parquet", "pt")
PROGRESS = sio.PROGRESS
# Seconds to sleep after each finished shard: lets the kill test catch a run between shards.
TEST_DELAY_ENV = "SAEFLOW_TEST_SHARD_DELAY"
_FULL_HASH_LIMIT = 1 << 30
# Rows per streamed Parquet row group, at least: small batches of short sequences are coalesced
# so readers never face thousands of tiny row groups.
ROW_GROUP_ROWS = 2048
_STORE_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


# ----------------------------------------------------------------------------- planning


def plan_shards(lengths: np.ndarray, shard_tokens: int) -> list[tuple[int, int]]:
    """Row ranges [start, stop) of consecutive whole sequences holding <= shard_tokens tokens.

    A sequence longer than shard_tokens gets a shard of its own; an empty sequence never starts
    a shard, so no shard is empty unless the whole file is.
    """
    shards: list[tuple[int, int]] = []
    start, total = 0, 0
    for i, n in enumerate(lengths.tolist()):
        if i > start and n > 0 and total + n > shard_tokens:
            shards.append((start, i))
            start, total = i, 0
        total += n
    if len(lengths) > start:
        shards.append((start, len(lengths)))
    return shards


def _read_tokens(tokens_path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """seq_ids (S,), token offsets (S+1,) and flat token ids from the tokens parquet."""
    try:
        table = pq.read_table(tokens_path, columns=["seq_id", "token_ids"])
    except (OSError, pa.ArrowInvalid, KeyError) as e:
        raise DataError(f"{tokens_path}: cannot read columns seq_id, token_ids ({e})") from e
    seq_ids = table.column("seq_id").to_numpy().astype(np.int32)
    tokens = table.column("token_ids").combine_chunks()
    if tokens.null_count:
        raise DataError(f"{tokens_path}: token_ids has null rows")
    offsets, flat = list_column_csr(tokens)
    return seq_ids, offsets, flat.astype(np.int64)


def _model_fingerprint(path: str, revision: str | None) -> dict[str, Any]:
    """Identify the weights, so a retrained model in the same folder invalidates old shards.

    Local folders hash config.json and the weight files: contents when they total <= 1 GiB,
    otherwise names, sizes and safetensors headers; hub names rely on name + revision. Contents
    go through xxh3-128 over an mmap (~10 GB/s, no copy): this is change detection, not
    security, and a sha256 of the weights alone cost a short caching job ~5% of its time.
    """
    folder = Path(path)
    if not folder.is_dir():
        return {"hub": path, "revision": revision}
    weights = sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin", ".pt")
    )
    h = xxhash.xxh3_128()
    config = folder / "config.json"
    if config.exists():
        h.update(config.read_bytes())
    full = sum(p.stat().st_size for p in weights) <= _FULL_HASH_LIMIT
    for p in weights:
        size = p.stat().st_size
        h.update(f"{p.name}:{size}".encode())
        if full and size:
            with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                h.update(m)
        elif not full and p.suffix == ".safetensors":
            with open(p, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                h.update(f.read(min(n, 1 << 26)))
    return {"local_xxh3": h.hexdigest()}


# ----------------------------------------------------------------------------- shard i/o


class _ParquetShard:
    """One Parquet shard written a row group at a time under a temporary name.

    Row groups are appended as batches finish, so the writer thread overlaps the disk write with
    the next batch's forward instead of writing the whole shard after its last batch. Fixed
    writer settings and row-group boundaries (set by the batches, and batch_size is in the
    config hash) make equal inputs give equal bytes. Only `commit` moves the file to its real name.
    """

    def __init__(self, path: Path, width: int) -> None:
        self.path = path
        self.tmp = sio.tmp_sibling(path)
        fields = [("seq_id", pa.int32()), ("pos", pa.int32()), ("act", pa.binary(width))]
        schema = pa.schema(fields)
        self.writer = pq.ParquetWriter(
            self.tmp,
            schema,
            compression={"seq_id": "zstd", "pos": "zstd", "act": "none"},
            use_dictionary=["seq_id", "pos"],
            write_statistics=["seq_id", "pos"],
        )
        self.schema = schema
        self.closed = False

    def append(self, seq_N: np.ndarray, pos_N: np.ndarray, acts_ND: torch.Tensor) -> None:
        n = acts_ND.shape[0]
        raw = acts_ND.contiguous().view(torch.uint8).numpy()
        act = pa.FixedSizeBinaryArray.from_buffers(
            self.schema.field("act").type, n, [None, pa.py_buffer(raw)]
        )
        arrays = [pa.array(seq_N, pa.int32()), pa.array(pos_N, pa.int32()), act]
        self.writer.write_table(pa.Table.from_arrays(arrays, schema=self.schema))

    def commit(self, appends: Sequence[Future] = ()) -> None:
        """Rename into place, but only if every row group in `appends` was written."""
        try:
            for f in appends:
                f.result()
            self.writer.close()
            self.closed = True
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        if not self.closed:
            self.writer.close()
            self.closed = True
        self.tmp.unlink(missing_ok=True)


def _write_shard(
    path: Path, fmt: str, seq_N: np.ndarray, pos_N: np.ndarray, acts_ND: torch.Tensor
) -> None:
    """Write one whole shard atomically (one row group for Parquet)."""
    if fmt == "parquet":
        shard = _ParquetShard(path, acts_ND.shape[1] * acts_ND.element_size())
        try:
            shard.append(seq_N, pos_N, acts_ND)
        except BaseException:
            shard.abort()
            raise
        shard.commit()
        return
    with sio.atomic_path(path) as tmp:
        buf = io.BytesIO()  # not the file name: torch.save embeds it in the archive
        torch.save(
            {
                "seq_id": torch.from_numpy(seq_N),
                "pos": torch.from_numpy(pos_N),
                "act": acts_ND.contiguous(),
            },
            buf,
        )
        tmp.write_bytes(buf.getvalue())


def _read_shard(
    path: Path, fmt: str, dtype: torch.dtype, d_model: int
) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    if fmt == "pt":
        data = verify.read_pt(path)
        return data["seq_id"].numpy(), data["pos"].numpy(), data["act"]
    table = verify.read_parquet(path)
    seq_N = table.column("seq_id").to_numpy()
    pos_N = table.column("pos").to_numpy()
    act = table.column("act").combine_chunks()
    n = len(act)
    width = d_model * torch.empty((), dtype=dtype).element_size()
    if act.type.byte_width != width:
        raise DataError(f"{path}: act rows are {act.type.byte_width} bytes, expected {width}")
    raw = np.frombuffer(act.buffers()[1], np.uint8, count=n * width, offset=act.offset * width)
    acts_ND = torch.from_numpy(raw.reshape(n, width).copy()).view(dtype)
    return seq_N, pos_N, acts_ND


def _resolve_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.parent if path.name == sio.MANIFEST else path


def iter_activation_shards(
    path: str | os.PathLike,
) -> Iterator[tuple[np.ndarray, np.ndarray, torch.Tensor]]:
    """Yield (seq_ids_N int32, positions_N int32, acts_ND) per shard, so memory stays bounded.

    `path` is the layer directory or its manifest.json; acts_ND is in the stored dtype.
    """
    directory = _resolve_dir(path)
    manifest = verify.read_manifest(directory)
    verify.activation_manifest(directory, manifest)
    dtype = getattr(torch, manifest["dtype"])
    for shard in manifest["shards"]:
        file, d_model = directory / shard["file"], manifest["d_model"]
        rows = _read_shard(file, manifest["format"], dtype, d_model)
        verify.activation_shard(file, rows, shard, dtype, d_model)
        yield rows


def load_activations(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """All cached rows at once: (seq_ids_N, positions_N, acts_ND) in shard order."""
    directory = _resolve_dir(path)
    manifest = verify.read_manifest(directory)
    parts = list(iter_activation_shards(directory))
    if not parts:
        dtype = getattr(torch, manifest["dtype"])
        empty = np.zeros(0, np.int32)
        return empty, empty.copy(), torch.zeros(0, manifest["d_model"], dtype=dtype)
    return (
        np.concatenate([p[0] for p in parts]),
        np.concatenate([p[1] for p in parts]),
        torch.cat([p[2] for p in parts]),
    )


# ----------------------------------------------------------------------------- resume state


def _reconcile(out_dir: Path, chash: str, ext: str) -> dict[str, Any]:
    """Keep the finished shards of this config hash; delete everything else a run left behind."""
    progress = sio.load_progress(out_dir, chash)
    done = progress["shards"]
    for name, rec in list(done.items()):
        f = out_dir / name
        if not name.endswith(f".{ext}") or not f.exists() or f.stat().st_size != rec.get("bytes"):
            del done[name]
    removed = sio.remove_stale_shards(out_dir, done)
    if removed:
        log.info("removed %d stale shard files", removed)
    return progress


# ----------------------------------------------------------------------------- caching


def _batch_inputs(
    lens_B: np.ndarray, flat: np.ndarray, padding_side: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad a batch to its longest sequence; real tokens fill the mask in row-major order."""
    P = int(lens_B.max())
    ar = np.arange(P)
    if padding_side == "left":
        mask_BP = ar[None, :] >= (P - lens_B)[:, None]
    else:
        mask_BP = ar[None, :] < lens_B[:, None]
    ids_BP = np.zeros(mask_BP.shape, np.int64)
    ids_BP[mask_BP] = flat
    return torch.from_numpy(ids_BP), torch.from_numpy(mask_BP.astype(np.int64))


def _gather_rows(acts_BPD: torch.Tensor, mask_BP: torch.Tensor, out_ND: torch.Tensor) -> None:
    """Copy the non-pad rows straight into the shard buffer (no per-batch list, no concat)."""
    idx_N = mask_BP.reshape(-1).nonzero().squeeze(1).to(acts_BPD.device)
    flat_MD = acts_BPD.reshape(-1, acts_BPD.shape[-1])
    if flat_MD.device == out_ND.device:
        torch.index_select(flat_MD, 0, idx_N, out=out_ND)
    else:
        out_ND.copy_(flat_MD.index_select(0, idx_N))


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def cache_activations(
    model_spec: Mapping[str, Any],
    tokens_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    layer: int,
    batch_size: int,
    fmt: str = "parquet",
    shard_tokens: int = 16384,
    device: str = "auto",
    dtype: str = "bfloat16",
    seed: int = 0,
    padding_side: str = "right",
    threads: int | None = None,
    model: nn.Module | None = None,
    hook: str = DEFAULT_HOOK,
) -> dict[str, Any]:
    """Cache one hook point (default: block `layer`'s output) for every non-pad token into
    `out_dir` itself; `cache_hookpoints` caches many in one pass. Returns the manifest.

    model_spec: {path, revision?, trust_remote_code?, name?} (name goes into the manifest).
    Sequences are batched in file order (no sorting: deterministic), padded to the longest in the
    batch, and only real tokens are stored. Other keys of model_spec (layer, batch_size, ...) are
    ignored: the keyword arguments decide. `threads` sets torch's CPU threads; `model` lets a
    caller reuse a loaded model (bench, tests).
    """
    hp = _hookpoint(layer, hook)
    opts = _Options(fmt, batch_size, shard_tokens, device, dtype, seed, padding_side, threads)
    return _cache(model_spec, tokens_path, [(hp, Path(out_dir))], opts, model)[0]


def cache_hookpoints(
    model_spec: Mapping[str, Any],
    tokens_path: str | os.PathLike,
    root: str | os.PathLike,
    hookpoints: Sequence[HookPoint | Mapping[str, Any]],
    *,
    batch_size: int,
    fmt: str = "parquet",
    shard_tokens: int = 16384,
    device: str = "auto",
    dtype: str = "bfloat16",
    seed: int = 0,
    padding_side: str = "right",
    threads: int | None = None,
    model: nn.Module | None = None,
) -> dict[str, Any]:
    """Cache every hook point in one forward pass per batch, into `root`/layer_L/hook/.

    The model is loaded up to the deepest layer still to do, and each batch's forward stops
    after the last hook point it needs. Each hook point keeps its own shards, progress file and
    resume key (adding a hook point never invalidates another's shards; a resumed run does only
    the shards each one lacks). `root`/manifest.json, written last, lists every hook point with
    its manifest; the rules publish each from there.
    """
    if not hookpoints:
        raise ConfigError("cache_hookpoints: no hook points to cache")
    hps = sort_hookpoints(
        _hookpoint(int(h["layer"]), str(h.get("hook", DEFAULT_HOOK)))
        if isinstance(h, Mapping)
        else h
        for h in hookpoints
    )
    root = Path(root)
    (root / sio.MANIFEST).unlink(missing_ok=True)  # the set is complete only when rewritten
    opts = _Options(fmt, batch_size, shard_tokens, device, dtype, seed, padding_side, threads)
    manifests = _cache(model_spec, tokens_path, [(hp, root / hp.folder) for hp in hps], opts, model)
    first = manifests[0]
    entry_keys = ("n_tokens", "n_sequences", "model", "revision")
    set_manifest = {
        **{k: first[k] for k in entry_keys},
        "hookpoints": [
            {**hp.as_dict(), "folder": hp.folder, "manifest": m}
            for hp, m in zip(hps, manifests, strict=True)
        ],
    }
    sio.write_manifest(root, set_manifest)
    return set_manifest


def _hookpoint(layer: Any, hook: str) -> HookPoint:
    if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
        raise ConfigError(f"layer: {layer!r} must be a non-negative integer")
    if hook not in HOOKS:
        raise ConfigError(f"hook: {hook!r} is not one of {', '.join(HOOKS)}")
    return HookPoint(layer, hook)


@dataclass(frozen=True)
class _Options:
    """The caching parameters shared by every hook point of one job."""

    fmt: str
    batch_size: int
    shard_tokens: int
    device: str
    dtype: str
    seed: int
    padding_side: str
    threads: int | None


class _HookJob:
    """One hook point's output folder, resume key, progress and shards still to do."""

    def __init__(self, hp: HookPoint, out_dir: Path, chash: str, progress: dict[str, Any]):
        self.hp, self.out_dir, self.chash, self.progress = hp, out_dir, chash, progress
        self.todo: set[int] = set()


def _cache(
    model_spec: Mapping[str, Any],
    tokens_path: str | os.PathLike,
    targets: list[tuple[HookPoint, Path]],
    opts: _Options,
    model: nn.Module | None,
) -> list[dict[str, Any]]:
    if not isinstance(model_spec, Mapping) or not model_spec.get("path"):
        raise ConfigError(f"model spec {model_spec!r}: needs a 'path' (local folder or hub name)")
    fmt, batch_size, shard_tokens = opts.fmt, opts.batch_size, opts.shard_tokens
    if fmt not in FORMATS:
        raise ConfigError(f"activations.format: {fmt!r} is not one of {FORMATS}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size: {batch_size!r} must be a positive integer")
    if not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise ConfigError(f"activations.shard_tokens: {shard_tokens!r} must be a positive integer")
    if opts.padding_side not in ("left", "right"):
        raise ConfigError(f"padding_side: {opts.padding_side!r} must be 'left' or 'right'")
    seed_everything(opts.seed)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    path = str(model_spec["path"])
    revision = model_spec.get("revision")
    trust = bool(model_spec.get("trust_remote_code", False))
    dev = next(model.parameters()).device if model is not None else resolve_device(opts.device)
    torch_dtype = _model_dtype(model) if model is not None else resolve_dtype(opts.dtype, dev)
    dtype_name = _DTYPE_NAMES[torch_dtype]

    tokens_path = Path(tokens_path)
    seq_ids, offsets, flat = _read_tokens(tokens_path)
    lengths = np.diff(offsets)
    if lengths.sum() == 0:
        raise DataError(f"{tokens_path}: no tokens to cache")
    fingerprint = _model_fingerprint(path, revision)
    tokens_sha = sio.file_sha256(tokens_path)
    plan = plan_shards(lengths, shard_tokens)
    names = [sio.shard_name(i, fmt) for i in range(len(plan))]
    jobs: list[_HookJob] = []
    for hp, out_dir in targets:
        chash = sio.config_hash(
            {"model": path, "revision": revision, "trust_remote_code": trust},
            fingerprint,
            {
                "layer": hp.layer,
                "batch_size": batch_size,
                "format": fmt,
                "shard_tokens": shard_tokens,
            },
            {
                "dtype": dtype_name,
                "device_type": dev.type,
                "seed": opts.seed,
                "padding_side": opts.padding_side,
            },
            {"tokens_sha256": tokens_sha, "hook": hp.hook, "version": 2},
            {"row_group_rows": ROW_GROUP_ROWS},
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        job = _HookJob(hp, out_dir, chash, _reconcile(out_dir, chash, fmt))
        job.todo = {i for i, name in enumerate(names) if name not in job.progress["shards"]}
        where = f"{hp}: " if len(targets) > 1 else ""
        log.info(
            "%sskipped %d of %d shards (config hash %s)",
            where,
            len(plan) - len(job.todo),
            len(plan),
            chash,
        )
        jobs.append(job)

    busy = [j for j in jobs if j.todo]
    if busy:
        if model is None:
            model = load_lm(
                path,
                revision=revision,
                trust_remote_code=trust,
                device=dev,
                dtype=torch_dtype,
                upto_layer=max(j.hp.layer for j in busy),
            )
        _run_shards(
            model,
            busy,
            plan,
            names,
            seq_ids,
            offsets,
            flat,
            fmt,
            batch_size=batch_size,
            padding_side=opts.padding_side,
            dtype_name=dtype_name,
        )

    manifests = []
    for job in jobs:
        progress = job.progress
        shards = [{"file": name, **_shard_counts(progress["shards"][name])} for name in names]
        manifest = {
            "format": fmt,
            "dtype": progress["dtype"],
            "itemsize": torch.empty((), dtype=getattr(torch, progress["dtype"])).element_size(),
            "d_model": progress["d_model"],
            "n_tokens": int(lengths.sum()),
            "n_sequences": len(seq_ids),
            "layer": job.hp.layer,
            "hook": job.hp.hook,
            "hook_name": job.hp.tl_name,
            "model": model_spec.get("name", path),
            "revision": revision,
            "padding_side": opts.padding_side,
            "seed": opts.seed,
            "shards": shards,
            "config_hash": job.chash,
        }
        sio.write_manifest(job.out_dir, manifest)
        log.info(
            "wrote %d tokens in %d shards to %s", manifest["n_tokens"], len(shards), job.out_dir
        )
        manifests.append(manifest)
    return manifests


def _shard_counts(rec: Mapping[str, Any]) -> dict[str, int]:
    return {"n_tokens": rec["n_tokens"], "n_sequences": rec["n_sequences"]}


def _run_shards(
    model: nn.Module,
    jobs: list[_HookJob],
    plan: list[tuple[int, int]],
    names: list[str],
    seq_ids: np.ndarray,
    offsets: np.ndarray,
    flat: np.ndarray,
    fmt: str,
    *,
    batch_size: int,
    padding_side: str,
    dtype_name: str,
) -> None:
    """Forward the shards any hook point lacks, capturing every hook point that lacks each one
    in the same pass; a single writer thread overlaps disk writes with compute.

    Parquet shards stream a row group whenever ROW_GROUP_ROWS rows have accumulated (batch
    boundaries only, so the layout is deterministic); `.pt` shards are saved whole. The writer
    runs tasks in submission order, and a shard's record goes into its hook point's progress
    file only after its file has its real name.
    """
    delay = float(os.environ.get(TEST_DELAY_ENV, "0") or 0)
    lengths = np.diff(offsets)
    union = sorted(set().union(*(j.todo for j in jobs)))
    total = int(sum(offsets[plan[i][1]] - offsets[plan[i][0]] for i in union))
    bar = tqdm(total=total, unit="tok", unit_scale=True, file=sys.stderr, mininterval=2.0)

    def finish(
        job: _HookJob,
        name: str,
        n_seqs: int,
        shard: _ParquetShard | None,
        appends: list[Future],
        rows: tuple[np.ndarray, np.ndarray, torch.Tensor],
        last: bool,
    ) -> None:
        if shard is not None:
            shard.commit(appends)
        else:
            _write_shard(job.out_dir / name, fmt, *rows)
        job.progress["shards"][name] = {
            "n_tokens": len(rows[0]),
            "n_sequences": n_seqs,
            "bytes": (job.out_dir / name).stat().st_size,
        }
        sio.write_json(job.out_dir / PROGRESS, job.progress)
        if delay and last:
            time.sleep(delay)

    opened: list[_ParquetShard] = []
    with ThreadPoolExecutor(max_workers=1) as writer:
        pending: list[Future] = []
        try:
            for i in union:
                active = [j for j in jobs if i in j.todo]
                sites = [(j.hp.layer, j.hp.hook) for j in active]
                start, stop = plan[i]
                n_shard = int(offsets[stop] - offsets[start])
                lens_S = lengths[start:stop]
                seq_N = np.repeat(seq_ids[start:stop], lens_S).astype(np.int32)
                pos_N = np.arange(n_shard) - np.repeat(offsets[start:stop] - offsets[start], lens_S)
                pos_N = pos_N.astype(np.int32)
                # Allocated once each hook point's width and dtype are known.
                bufs: list[torch.Tensor | None] = [None] * len(active)
                shards: list[_ParquetShard | None] = [None] * len(active)
                appends: list[list[Future]] = [[] for _ in active]
                row = flushed = 0
                for b0 in range(start, stop, batch_size):
                    b1 = min(b0 + batch_size, stop)
                    lens_B = lengths[b0:b1]
                    if lens_B.max() == 0:
                        continue
                    ids_BP, mask_BP = _batch_inputs(
                        lens_B, flat[offsets[b0] : offsets[b1]], padding_side
                    )
                    captured = capture_hooks(model, sites, ids_BP, mask_BP)
                    n = int(lens_B.sum())
                    for k, acts_BPD in enumerate(captured):
                        if bufs[k] is None:
                            bufs[k] = torch.empty(n_shard, acts_BPD.shape[-1], dtype=acts_BPD.dtype)
                            if fmt == "parquet":
                                width = acts_BPD.shape[-1] * acts_BPD.element_size()
                                shards[k] = _ParquetShard(active[k].out_dir / names[i], width)
                                opened.append(shards[k])
                        _gather_rows(acts_BPD, mask_BP, bufs[k][row : row + n])
                    row += n
                    bar.update(n)
                    if fmt == "parquet" and (row - flushed >= ROW_GROUP_ROWS or row == n_shard):
                        rows = slice(flushed, row)
                        for k, shard in enumerate(shards):
                            args = (seq_N[rows], pos_N[rows], bufs[k][rows])
                            appends[k].append(writer.submit(shard.append, *args))
                        flushed = row
                assert row == n_shard and all(b is not None for b in bufs), (
                    "plan and batches differ"
                )
                for job, buf in zip(active, bufs, strict=True):
                    if "d_model" not in job.progress:
                        job.progress["d_model"] = int(buf.shape[1])
                        job.progress["dtype"] = _DTYPE_NAMES[buf.dtype]
                for f in pending:  # bounds memory to two shards and surfaces errors
                    f.result()
                pending = [
                    writer.submit(
                        finish,
                        job,
                        names[i],
                        stop - start,
                        shards[k],
                        appends[k],
                        (seq_N, pos_N, bufs[k]),
                        k == len(active) - 1,
                    )
                    for k, job in enumerate(active)
                ]
            for f in pending:
                f.result()
        except BaseException:
            writer.shutdown(wait=True, cancel_futures=True)
            for shard in opened:
                if not shard.closed:
                    shard.abort()
            raise
    bar.close()
    for job in jobs:
        if job.progress.get("dtype") != dtype_name:
            log.warning(
                "%s: cached dtype %s differs from the requested %s",
                job.hp,
                job.progress.get("dtype"),
                dtype_name,
            )
