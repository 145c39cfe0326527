"""Train SAEs on any model's cached activations, saved in their published layouts.

- `train_sae`: a TopK SAE (Gao et al. 2024 recipe at small scale) saved in the SAELens layout
  (`cfg.json` + `sae_weights.safetensors`).
- `train_temporal_sae`: a temporal SAE with MSE loss saved in the published temporal layout
  (`conf.yaml` + `latest_ckpt.safetensors`).

Both load back through `load_sae`, which is how everything downstream sees them, and write
`training.json` with the held-out variance explained (every 10th sequence is held out; position 0
is left out of the loss and of the metric, as in `sae_metrics`). Training runs on CPU in float32
with a seeded generator, so the same config gives the same bytes.

Activations are read as a stream (`SequenceStream`): training holds one window of at most
`train.buffer_tokens` tokens (shuffled, each token used once per pass) plus the shard being read,
so memory does not grow with the number of training tokens; data that fits in one window is read
once. Normalisation and held-out statistics are accumulated in float64 over the same stream.

Init (why it converges in a few hundred steps): inputs are rescaled so E||x||^2 = d_in, decoder
rows are unit norm (TopK) or norm sqrt(1/lam) so that a feature reconstructs itself (temporal,
whose encoder is lam * x @ D.T), W_enc = W_dec.T and the decoder bias is the data mean.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
import yaml
from safetensors.torch import save_file
from tqdm import tqdm

from saeflow import io as sio
from saeflow.errors import ConfigError, DataError
from saeflow.hooks import HookPoint
from saeflow.sae.encode import sequence_spans
from saeflow.sae.formats import load_sae
from saeflow.sae.temporal import TemporalSAE
from saeflow.utils import seed_everything

log = logging.getLogger("saeflow.train")

TOPK_DEFAULTS: dict[str, Any] = {
    "architecture": "topk",
    "width": 1024,
    "k": 16,
    "steps": 300,
    "batch_tokens": 512,
    "lr": 2e-3,
    "holdout_every": 10,
    "buffer_tokens": 262144,
}
TEMPORAL_DEFAULTS: dict[str, Any] = {
    "exp_factor": 4,
    "n_heads": 4,
    "bottleneck_factor": 4,
    "n_attn_layers": 1,
    "sae_diff_type": "topk",
    "kval_topk": 16,
    "tied_weights": True,
    "steps": 200,
    "batch_sequences": 8,
    "lr": 1e-2,
    "holdout_every": 10,
    "buffer_tokens": 262144,
}
PASSTHROUGH = ("datasets",)


def _settings(train_cfg: Mapping[str, Any] | None, defaults: dict[str, Any], key: str):
    cfg = {**defaults, **{k: v for k, v in dict(train_cfg or {}).items() if k not in PASSTHROUGH}}
    unknown = sorted(set(cfg) - set(defaults))
    if unknown:
        raise ConfigError(f"{key}: unknown key(s) {', '.join(unknown)}")
    for name in ("steps", "holdout_every", "buffer_tokens"):
        if not isinstance(cfg[name], int) or cfg[name] < 1:
            raise ConfigError(f"{key}.{name} = {cfg[name]!r}: must be an integer >= 1")
    return cfg


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    """Train on one intra-op thread: the GEMMs are tiny (<= 1024 x 1024), so thread sync costs
    more than it saves (6.8 s vs 44 s on a loaded 2-core machine), and the bytes written no longer
    depend on the thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -- data -------------------------------------------------------------------------------------
class SequenceStream:
    """The cached sequences of activation directories, read shard by shard.

    Every `every`-th sequence (counted over all directories in order) is held out. `windows()`
    yields the training sequences in windows of at most `cap` tokens, cycling through the shards,
    so what training holds at once is one window plus the shard being split, however many tokens
    the datasets have; `peak_tokens` records the most it held.
    """

    def __init__(self, paths: str | os.PathLike | Sequence, every: int, cap: int) -> None:
        self.paths = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
        if not self.paths:
            raise ConfigError("train: no activation inputs (train.datasets is empty)")
        self.every, self.cap = int(every), int(cap)
        self.peak_tokens = 0
        self._shard_rows = 0
        manifests = [sio.read_manifest(_acts_dir(p)) for p in self.paths]
        widths = {int(m["d_model"]) for m in manifests}
        if len(widths) != 1:
            raise DataError(
                f"train: the activation inputs have different widths {sorted(widths)} "
                f"({', '.join(map(str, self.paths))})"
            )
        first = manifests[0]
        self.info: dict[str, Any] = {
            "model": first.get("model"),
            "layer": first.get("layer"),
            "hook": first.get("hook", "resid_post"),
            "d_in": widths.pop(),
        }

    def sequences(self, *, held: bool) -> Iterator[torch.Tensor]:
        """Held-out (or training) sequences as float32 [L, D], in cache order."""
        from saeflow.activations import iter_activation_shards

        index = 0
        for path in self.paths:
            for seq_N, pos_N, acts_ND in iter_activation_shards(path):
                offsets = sequence_spans(np.asarray(seq_N), np.asarray(pos_N), str(path))
                acts_ND = acts_ND.float()
                self._shard_rows = len(acts_ND)
                for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True):
                    if b <= a:
                        continue
                    is_held = index % self.every == self.every - 1
                    index += 1
                    if is_held == held:
                        yield acts_ND[a:b]
                self._shard_rows = 0

    def windows(self) -> Iterator[list[torch.Tensor]]:
        """Training sequences, <= cap tokens per window, forever; read once if they all fit."""
        while True:
            window: list[torch.Tensor] = []
            n, passes = 0, 0
            for seq in self.sequences(held=False):
                if len(seq) > self.cap:
                    raise ConfigError(
                        f"train.buffer_tokens = {self.cap}: smaller than a sequence of "
                        f"{len(seq)} tokens"
                    )
                if window and n + len(seq) > self.cap:
                    passes += 1
                    yield window
                    window, n = [], 0
                window.append(seq)
                n += len(seq)
                self.peak_tokens = max(self.peak_tokens, n + self._shard_rows)
            if not window and not passes:
                raise DataError(f"{self.paths[0]}: no cached activations to train on")
            if not passes:
                while True:
                    yield window
            if window:
                yield window


def _acts_dir(path: str | os.PathLike) -> Path:
    return Path(path).parent if str(path).endswith(".json") else Path(path)


class _Moments:
    """Streaming sums for the mean, E||x||^2 and variance explained (float64)."""

    def __init__(self, d: int) -> None:
        self.n, self.sumsq, self.sse = 0, 0.0, 0.0
        self.sum_D = torch.zeros(d, dtype=torch.float64)

    def add(self, x_ND: torch.Tensor, recon_ND: torch.Tensor | None = None) -> None:
        x = x_ND.double()
        self.n += len(x)
        self.sumsq += float(x.pow(2).sum())
        self.sum_D += x.sum(0)
        if recon_ND is not None:
            self.sse += float((x - recon_ND.double()).pow(2).sum())

    def mean(self) -> torch.Tensor:
        return (self.sum_D / max(self.n, 1)).float()

    def variance_explained(self) -> float:
        """1 - SSE / sum ||x - mean(x)||^2, the formula `sae_metrics` uses."""
        sst = self.sumsq - float(self.sum_D.pow(2).sum()) / self.n
        return float(1 - self.sse / sst)


def _train_moments(stream: SequenceStream) -> _Moments:
    """Moments of the training tokens without position 0 (the attention sink)."""
    moments = _Moments(stream.info["d_in"])
    for seq in stream.sequences(held=False):
        moments.add(seq[1:])
    if moments.n == 0:
        raise DataError(f"train: {stream.paths[0]}: no training tokens after position 0")
    return moments


def variance_explained(x_ND: torch.Tensor, recon_ND: torch.Tensor) -> float:
    """1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (same formula as `sae_metrics`)."""
    x = x_ND.double()
    sse = ((x - recon_ND.double()) ** 2).sum()
    sst = ((x - x.mean(0)) ** 2).sum()
    return float(1 - sse / sst)


# -- TopK SAE ---------------------------------------------------------------------------------
def _saelens_files(out: Path, tensors: dict[str, torch.Tensor], k: int, info: dict) -> None:
    d_in, d_sae = tensors["W_enc"].shape
    cfg = {
        "architecture": "topk",
        "d_in": int(d_in),
        "d_sae": int(d_sae),
        "k": int(k),
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "rescale_acts_by_decoder_norm": False,
        "metadata": {
            "model_name": info.get("model"),
            "hook_name": HookPoint(int(info["layer"]), info["hook"]).tl_name,
            "hook_head_index": None,
            "prepend_bos": True,
            "sae_lens_version": "6.0.0",
            "sae_lens_training_version": None,
        },
    }
    (out / "cfg.json").write_text(sio.dumps_json(cfg))
    save_file(
        {k_: v.contiguous() for k_, v in tensors.items()}, str(out / "sae_weights.safetensors")
    )


def train_sae(
    acts_paths: str | os.PathLike | Sequence,
    out_dir: str | os.PathLike,
    train_cfg: Mapping[str, Any] | None = None,
    *,
    seed: int = 0,
) -> dict[str, Any]:
    """Train a TopK SAE on cached activations; write the SAELens folder; return training stats."""
    with _single_thread():
        return _train_topk(acts_paths, out_dir, train_cfg, seed)


def _train_topk(acts_paths, out_dir, train_cfg, seed: int) -> dict[str, Any]:
    cfg = _settings(train_cfg, TOPK_DEFAULTS, "train")
    if cfg["architecture"] != "topk":
        raise ConfigError(f"train.architecture = {cfg['architecture']!r}: only topk is trained")
    seed_everything(seed)
    stream = SequenceStream(acts_paths, cfg["holdout_every"], cfg["buffer_tokens"])
    info = stream.info
    d, width, k = info["d_in"], int(cfg["width"]), int(cfg["k"])
    if not 1 <= k <= width:
        raise ConfigError(f"train.k = {k}: must be between 1 and train.width = {width}")
    moments = _train_moments(stream)
    scale = float(np.sqrt(moments.sumsq / moments.n / d))

    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(width, d, generator=g)
    W_dec /= W_dec.norm(dim=-1, keepdim=True)
    W_enc = W_dec.T.clone()
    b_enc = torch.zeros(width)
    b_dec = moments.mean() / scale
    params = [p.requires_grad_() for p in (W_enc, b_enc, W_dec, b_dec)]
    opt = torch.optim.Adam(params, lr=float(cfg["lr"]))
    steps, batch = int(cfg["steps"]), int(cfg["batch_tokens"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, 5 * (1 - s / steps)))
    batches = _token_batches(stream, scale, batch, g)
    bar = tqdm(range(steps), desc="train topk SAE", file=sys.stderr, mininterval=5.0)
    loss = torch.zeros(())
    for _ in bar:
        x = next(batches)
        pre = (x - b_dec) @ W_enc + b_enc
        vals, idx = pre.topk(k, dim=-1)
        recon = F.embedding_bag(idx, W_dec, per_sample_weights=vals.relu(), mode="sum") + b_dec
        loss = ((recon - x) ** 2).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            W_dec.grad -= (W_dec.grad * W_dec).sum(-1, keepdim=True) * W_dec
        opt.step()
        sched.step()
        with torch.no_grad():
            W_dec /= W_dec.norm(dim=-1, keepdim=True)
    bar.close()
    batches.close()

    tensors = {
        "W_enc": (W_enc.detach() / scale),
        "b_enc": b_enc.detach().clone(),
        "W_dec": (W_dec.detach() * scale),
        "b_dec": (b_dec.detach() * scale),
    }
    out_dir = Path(out_dir)
    with sio.atomic_dir(out_dir) as tmp:
        _saelens_files(tmp, tensors, k, info)
        sae = load_sae({"format": "saelens", "path": str(tmp)})
        stats = _heldout_stats(sae, stream, temporal=False)
        stats.update(
            kind="topk",
            final_train_loss=float(loss.detach()) * scale**2,
            n_train_tokens=moments.n,
            norm_scale=scale,
            peak_buffer_tokens=stream.peak_tokens,
            seed=seed,
            config=cfg,
        )
        sio.write_json(tmp / "training.json", stats)
    log.info("topk SAE: held-out variance explained %.4f", stats["heldout_variance_explained"])
    return stats


def _token_batches(
    stream: SequenceStream, scale: float, batch: int, g: torch.Generator
) -> Iterator[torch.Tensor]:
    """Batches of normalised training tokens (no position 0): each window is shuffled and used
    once before the next is read; a window smaller than a batch is sampled with replacement."""
    for window in stream.windows():
        xn_ND = torch.cat([s[1:] for s in window]) / scale
        if len(xn_ND) == 0:
            continue
        if len(xn_ND) < batch:
            yield xn_ND[torch.randint(len(xn_ND), (batch,), generator=g)]
            continue
        order = torch.randperm(len(xn_ND), generator=g)
        for start in range(0, len(xn_ND) - batch + 1, batch):
            yield xn_ND[order[start : start + batch]]


@torch.inference_mode()
def _heldout_stats(sae, stream: SequenceStream, *, temporal: bool) -> dict[str, Any]:
    """Held-out reconstruction, one sequence at a time (position 0 left out, as in metrics)."""
    moments = _Moments(sae.d_in)
    fired = torch.zeros(sae.d_sae, dtype=torch.bool)
    n_seqs = 0
    for s in stream.sequences(held=True):
        out = sae(s.unsqueeze(0) if temporal else s)
        recon = out.recon[0] if temporal else out.recon
        novel = out.novel[0] if temporal else out.novel
        moments.add(s[1:], recon[1:])
        fired |= (novel[1:] != 0).any(0)
        n_seqs += 1
    if n_seqs == 0 or moments.n == 0:
        raise DataError(
            f"train: {stream.paths[0]}: too few sequences to hold out every {stream.every}th"
        )
    return {
        "heldout_variance_explained": moments.variance_explained(),
        "heldout_mse": moments.sse / (moments.n * sae.d_in),
        "heldout_dead_fraction": float(1 - fired.float().mean()),
        "n_heldout_tokens": moments.n,
        "n_heldout_sequences": n_seqs,
    }


# -- Temporal SAE -----------------------------------------------------------------------------
def _pad(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(s) for s in seqs)
    x = torch.zeros(len(seqs), L, seqs[0].shape[1])
    mask = torch.zeros(len(seqs), L, dtype=torch.bool)
    for i, s in enumerate(seqs):
        x[i, : len(s)] = s
        mask[i, 1 : len(s)] = True
    return x, mask


def train_temporal_sae(
    acts_paths: str | os.PathLike | Sequence,
    out_dir: str | os.PathLike,
    train_cfg: Mapping[str, Any] | None = None,
    *,
    seed: int = 0,
) -> dict[str, Any]:
    """Train a temporal SAE (MSE loss) on whole cached sequences; write conf.yaml + safetensors."""
    with _single_thread():
        return _train_temporal(acts_paths, out_dir, train_cfg, seed)


def _train_temporal(acts_paths, out_dir, train_cfg, seed: int) -> dict[str, Any]:
    cfg = _settings(train_cfg, TEMPORAL_DEFAULTS, "train")
    seed_everything(seed)
    stream = SequenceStream(acts_paths, cfg["holdout_every"], cfg["buffer_tokens"])
    info = stream.info
    d = info["d_in"]
    width = int(round(d * float(cfg["exp_factor"])))
    moments = _train_moments(stream)
    scaling = float(np.sqrt(d * moments.n / moments.sumsq))

    torch.manual_seed(seed)
    sae = TemporalSAE(
        d,
        width,
        n_heads=int(cfg["n_heads"]),
        sae_diff_type=str(cfg["sae_diff_type"]),
        kval_topk=cfg["kval_topk"],
        tied_weights=bool(cfg["tied_weights"]),
        n_attn_layers=int(cfg["n_attn_layers"]),
        bottleneck_factor=int(cfg["bottleneck_factor"]),
        scaling_factor=scaling,
        source="train",
    )
    with torch.no_grad():
        D = torch.randn(width, d)
        sae.D.copy_(D / D.norm(dim=-1, keepdim=True) * (1 / sae.lam) ** 0.5)
        sae.b.copy_(moments.mean() * scaling)
        if not sae.tied_weights:
            sae.E.copy_(sae.D.T)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(sae.parameters(), lr=float(cfg["lr"]))
    steps, batch = int(cfg["steps"]), int(cfg["batch_sequences"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, 5 * (1 - s / steps)))
    batches = _sequence_batches(stream, batch, g)
    bar = tqdm(range(steps), desc="train temporal SAE", file=sys.stderr, mininterval=5.0)
    loss = torch.zeros(())
    for _ in bar:
        x, mask = _pad(next(batches))
        out = sae(x)
        err = ((out.recon - x) * scaling) ** 2
        loss = err.sum(-1)[mask].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    bar.close()
    batches.close()
    sae.eval()

    out_dir = Path(out_dir)
    with sio.atomic_dir(out_dir) as tmp:
        conf = sae.config()
        conf["llm"].update(name=info.get("model"), layer=info.get("layer"), hook=info.get("hook"))
        (tmp / "conf.yaml").write_text(yaml.safe_dump(conf, sort_keys=True))
        state = {k: v.detach().contiguous() for k, v in sae.state_dict().items()}
        save_file(state, str(tmp / "latest_ckpt.safetensors"))
        loaded = load_sae({"format": "temporal", "path": str(tmp)})
        stats = _heldout_stats(loaded, stream, temporal=True)
        stats.update(
            kind="temporal",
            final_train_loss=float(loss.detach()) / scaling**2,
            n_train_tokens=moments.n,
            scaling_factor=scaling,
            peak_buffer_tokens=stream.peak_tokens,
            seed=seed,
            config=cfg,
        )
        sio.write_json(tmp / "training.json", stats)
    log.info("temporal SAE: held-out variance explained %.4f", stats["heldout_variance_explained"])
    return stats


def _sequence_batches(
    stream: SequenceStream, batch: int, g: torch.Generator
) -> Iterator[list[torch.Tensor]]:
    """Batches of whole training sequences; each window is shuffled and used once."""
    for window in stream.windows():
        if len(window) < batch:
            yield [window[i] for i in torch.randint(len(window), (batch,), generator=g).tolist()]
            continue
        order = torch.randperm(len(window), generator=g).tolist()
        for start in range(0, len(window) - batch + 1, batch):
            yield [window[i] for i in order[start : start + batch]]
