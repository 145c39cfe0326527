"""EleutherAI sparsify SAEs and transcoders, read from the layout `SparseCoder.save_to_disk` writes.

A sparsify run is a folder with one folder per hookpoint (the module name inside the model's base
model, e.g. `layers.6`, `layers.6.mlp`), each holding

- `cfg.json`: `activation` (`topk` | `groupmax`), `k`, `num_latents` / `expansion_factor`,
  `d_in`, `transcode`, `skip_connection`, plus training-only keys (`normalize_decoder`,
  `multi_topk`);
- `sae.safetensors`: `encoder.weight` [F, D], `encoder.bias` [F], `W_dec` [F, D], `b_dec` [D] and,
  with `skip_connection`, `W_skip` [D, D].

The arithmetic (sparsify's `SparseCoder.encode` / `decode` / `forward`):

    x' = x - b_dec                       (autoencoders; transcoders encode x as it is)
    pre = relu(x' @ encoder.weight.T + encoder.bias)
    topk: the k largest of pre;  groupmax: the largest of each of k contiguous groups
    y = codes @ W_dec + b_dec (+ x @ W_skip.T)

which is SAELens' TopK with `apply_b_dec_to_input = not transcode` (relu then top-k keeps the same
non-zero codes as top-k then relu). There is no input normalisation. The hookpoint is the folder's
name; it is returned in `sae.metadata` (`hookpoint`, SAELens-style `hook_name`, `layer`, and for
transcoders `hook_name_out`, the module output they predict). Variants without an inference
counterpart here (cross-layer transcoders, embedding skips, low-rank encoders, other activations)
are refused with one line naming the file and the key.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from saeflow.errors import ConfigError, DataError
from saeflow.sae.models import SAE
from saeflow.sae.sparse import CSR, csr_from_dense

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
ACTIVATIONS = ("topk", "groupmax")
# cfg.json keys that only steer training: any value is fine for inference.
TRAINING_KEYS = ("normalize_decoder", "multi_topk", "dtype", "expansion_factor", "num_latents")
# Keys whose non-default value is a variant we cannot run (value shown is the supported one).
VARIANT_KEYS = {"n_targets": 0, "n_sources": 0, "embed_skip": False, "encoder_rank": 0}
KNOWN_KEYS = {"activation", "k", "d_in", "transcode", "skip_connection"}
_BLOCK = r"(?:.*\.)?(?:layers|h|blocks|layer)\.(\d+)"
_HOOKS = (
    (re.compile(_BLOCK + r"$"), "resid_post"),
    (re.compile(_BLOCK + r"\.(?:mlp|feed_forward|ffn)$"), "mlp_out"),
    (re.compile(_BLOCK + r"\.(?:self_attn|attn|attention)$"), "attn_out"),
)


def hook_of(hookpoint: str, *, transcode: bool) -> dict[str, Any]:
    """SAELens-style hook names of a sparsify hookpoint (the module's output, or for a transcoder
    its input, with the output it predicts as `hook_name_out`)."""
    meta: dict[str, Any] = {"hookpoint": hookpoint, "hook_name": hookpoint, "layer": None}
    for pattern, hook in _HOOKS:
        match = pattern.match(hookpoint)
        if match is None:
            continue
        layer = int(match.group(1))
        meta.update(layer=layer, hook=hook, hook_name=f"blocks.{layer}.hook_{hook}")
        if transcode:
            into = {"resid_post": "hook_resid_pre", "mlp_out": "ln2.hook_normalized"}.get(hook)
            into = into or "ln1.hook_normalized"
            meta.update(
                hook=f"{hook}_input",
                hook_name=f"blocks.{layer}.{into}",
                hook_name_out=meta["hook_name"],
            )
        break
    return meta


class SparsifySAE(SAE):
    """A sparsify SparseCoder: TopK or GroupMax codes, optional skip connection (transcoders)."""

    def __init__(
        self,
        W_enc_DF: torch.Tensor,
        b_enc_F: torch.Tensor,
        W_dec_FD: torch.Tensor,
        b_dec_D: torch.Tensor,
        *,
        activation: str,
        k: int,
        transcode: bool,
        W_skip_DD: torch.Tensor | None = None,
        source: str = "",
    ) -> None:
        super().__init__(
            W_enc_DF,
            b_enc_F,
            W_dec_FD,
            b_dec_D,
            activation="topk",
            k=k,
            apply_b_dec_to_input=not transcode,
            source=source,
        )
        if activation == "groupmax" and self.d_sae % self.k:
            raise DataError(f"{source}: groupmax needs num_latents ({self.d_sae}) divisible by k")
        self.sparsify_activation = activation
        self.transcode = bool(transcode)
        skip = W_skip_DD.float().contiguous() if W_skip_DD is not None else None
        self.register_buffer("W_skip", skip)
        self.metadata: dict[str, Any] = {}

    def describe(self) -> dict:
        return {
            **super().describe(),
            "activation": self.sparsify_activation,
            "transcode": self.transcode,
            "skip_connection": self.W_skip is not None,
        }

    def encode(self, x_ND: torch.Tensor) -> torch.Tensor:
        if self.sparsify_activation == "topk":
            return super().encode(x_ND)
        pre = self.pre_acts(x_ND).relu()
        vals, idx = pre.unflatten(-1, (self.k, -1)).max(dim=-1)
        offsets = torch.arange(0, self.d_sae, self.d_sae // self.k, device=pre.device)
        return torch.zeros_like(pre).scatter_(-1, idx + offsets, vals)

    def encode_sparse(self, x_ND: torch.Tensor) -> CSR:
        if self.sparsify_activation == "topk":
            return super().encode_sparse(x_ND)
        return csr_from_dense(self.encode(x_ND))

    def decode(self, codes_NF: torch.Tensor, x_ND: torch.Tensor | None = None) -> torch.Tensor:
        out = super().decode(codes_NF, x_ND)
        if self.W_skip is None:
            return out
        if x_ND is None:
            raise ValueError(f"{self.source}: decoding with a skip connection needs x")
        return out + x_ND.float() @ self.W_skip.T


def _check_cfg(cfg: dict[str, Any], path: Path) -> None:
    activation = cfg.get("activation", "topk")
    if activation not in ACTIVATIONS:
        raise ConfigError(
            f"{path}: activation={activation!r} is not supported ({', '.join(ACTIVATIONS)})"
        )
    for key, ok in VARIANT_KEYS.items():
        if cfg.get(key, ok) not in (ok, None):
            raise ConfigError(f"{path}: {key}={cfg[key]!r} is not supported (only {ok!r})")
    for key, value in cfg.items():
        if key in KNOWN_KEYS or key in TRAINING_KEYS or key in VARIANT_KEYS:
            continue
        if value not in (None, False, 0, "", "none"):
            raise ConfigError(f"{path}: unknown key {key}={value!r}; refusing to guess its meaning")


def load_sparsify(spec: dict[str, Any]) -> SparsifySAE:
    """One hookpoint folder (`path`, local or inside a hub `repo`) of a sparsify run."""
    from saeflow.sae.formats import _describe, _fetch, _key, _read_json, _tensor, read_safetensors

    source = _describe(spec)
    folder = Path(str(spec.get("path") or "").rstrip("/"))
    if folder.suffix in (".json", ".safetensors"):
        folder = folder.parent
    if not spec.get("repo") and folder.is_dir() and not (folder / CFG_FILE).exists():
        hooks = sorted(p.name for p in folder.iterdir() if (p / CFG_FILE).exists())
        if hooks:
            raise ConfigError(
                f"SAE folder {folder} is a sparsify run with one folder per hookpoint: set path "
                f"to one of {', '.join(f'{folder}/{h}' for h in hooks[:8])}"
            )
    fetch_spec = {**spec, "path": str(folder)}
    cfg_path = _fetch(fetch_spec, CFG_FILE)
    cfg = _read_json(cfg_path)
    _check_cfg(cfg, cfg_path)
    d_in, k = int(_key(cfg, "d_in", cfg_path)), int(_key(cfg, "k", cfg_path))
    transcode = bool(cfg.get("transcode", False))
    w_path = _fetch(fetch_spec, WEIGHTS_FILE)
    weights = read_safetensors(w_path)
    enc = _tensor(weights, "encoder.weight", w_path)
    if enc.dim() != 2 or enc.shape[1] != d_in:
        raise DataError(
            f"{w_path}: 'encoder.weight' has shape {tuple(enc.shape)}, expected (F, {d_in})"
        )
    d_sae = int(enc.shape[0])
    want_latents = int(cfg.get("num_latents") or 0) or d_in * int(cfg.get("expansion_factor") or 0)
    if want_latents and want_latents != d_sae:
        raise DataError(
            f"{w_path}: encoder has {d_sae} latents but {cfg_path.name} says {want_latents}"
        )
    skip = bool(cfg.get("skip_connection", False))
    expected = {"encoder.weight", "encoder.bias", "W_dec", "b_dec"} | (
        {"W_skip"} if skip else set()
    )
    extra = sorted(set(weights) - expected)
    if extra:
        raise ConfigError(
            f"{w_path}: tensor {extra[0]!r} is not supported with {cfg_path.name} as written"
        )
    sae = SparsifySAE(
        enc.float().T,
        _tensor(weights, "encoder.bias", w_path, (d_sae,)).float(),
        _tensor(weights, "W_dec", w_path, (d_sae, d_in)).float(),
        _tensor(weights, "b_dec", w_path, (d_in,)).float(),
        activation=str(cfg.get("activation", "topk")),
        k=k,
        transcode=transcode,
        W_skip_DD=_tensor(weights, "W_skip", w_path, (d_in, d_in)) if skip else None,
        source=source,
    )
    sae.metadata = {**hook_of(folder.name, transcode=transcode), "transcoder": transcode}
    return sae
