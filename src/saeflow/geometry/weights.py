"""Model and SAE weights the geometry analyses need, read without loading whole models.

The logit lens of a feature (`W_dec · W_U`) needs only the unembedding (and the final norm's
scale), so it is read tensor-by-tensor with `safetensors.safe_open` instead of instantiating the
model: for a 9B model that is one [V, D] matrix instead of 18 GB of weights.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from saeflow.errors import DataError

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Untied output heads first; then the input embeddings that tied models reuse as the unembedding.
UNEMBED_KEYS = ("lm_head.weight", "embed_out.weight", "model.lm_head.weight")
TIED_KEYS = (
    "model.embed_tokens.weight",
    "transformer.wte.weight",
    "gpt_neox.embed_in.weight",
    "model.language_model.embed_tokens.weight",
    "language_model.model.embed_tokens.weight",
    "embed_tokens.weight",
    "wte.weight",
)
FINAL_NORM_KEYS = (
    "model.norm.weight",
    "transformer.ln_f.weight",
    "gpt_neox.final_layer_norm.weight",
    "model.final_layernorm.weight",
    "model.language_model.norm.weight",
    "language_model.model.norm.weight",
    "norm.weight",
    "ln_f.weight",
)


def _model_file(model_path: str, filename: str, revision: str | None) -> Path | None:
    """A file of a local model folder, or of a hub repo (downloaded alone); None if absent."""
    local = Path(model_path)
    if local.is_dir():
        path = local / filename
        return path if path.exists() else None
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return None
    try:
        return Path(hf_hub_download(model_path, filename, revision=revision))
    except EntryNotFoundError:
        return None
    except Exception as exc:  # noqa: BLE001 - network/auth errors become one line
        raise DataError(f"{model_path}: cannot fetch {filename} ({exc})") from None


def _weight_files(model_path: str, revision: str | None) -> dict[str, Path]:
    """Map tensor name -> safetensors file that holds it (single file or sharded index)."""
    single = _model_file(model_path, SINGLE_FILE, revision)
    if single is not None:
        from safetensors import safe_open

        with safe_open(str(single), framework="numpy") as f:
            return dict.fromkeys(f.keys(), single)
    index = _model_file(model_path, INDEX_FILE, revision)
    if index is None:
        raise DataError(f"{model_path}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
    weight_map = json.loads(index.read_text()).get("weight_map", {})
    wanted = set(UNEMBED_KEYS + TIED_KEYS + FINAL_NORM_KEYS)
    files: dict[str, Path] = {}
    for key, shard in weight_map.items():
        if key in wanted:
            shard_path = _model_file(model_path, shard, revision)
            if shard_path is None:
                raise DataError(f"{model_path}: shard {shard} named in {INDEX_FILE} is missing")
            files[key] = shard_path
    return files


def _read_tensor(path: Path, key: str) -> np.ndarray:
    """One tensor as float32 numpy (bf16 goes through torch, which numpy cannot read)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(key).float().numpy()


def _model_type(model_path: str, revision: str | None) -> str:
    cfg = _model_file(model_path, "config.json", revision)
    if cfg is None:
        return ""
    data = json.loads(cfg.read_text())
    text_cfg = data.get("text_config") or {}
    return str(text_cfg.get("model_type") or data.get("model_type") or "")


def read_unembedding(
    model_path: str | os.PathLike, *, revision: str | None = None, fold_final_norm: bool = True
) -> np.ndarray:
    """The unembedding W_U [V, D] (float32), with the final norm's scale folded in.

    Tied models (GPT-2 `wte`, Llama/Gemma `embed_tokens`) store no `lm_head.weight`; their input
    embedding is the unembedding. Folding the final RMS/LayerNorm gain makes `W_dec · W_U` the
    logit effect of a feature direction up to the norm's per-token scale (as TransformerLens'
    `fold_ln` does for SAEDashboard); Gemma's norms scale by `1 + w`.
    """
    model_path = str(model_path)
    if model_path.lower().endswith(".gguf"):
        return _gguf_unembedding(model_path, fold_final_norm)
    files = _weight_files(model_path, revision)
    key = next((k for k in UNEMBED_KEYS if k in files), None)
    if key is None:
        key = next((k for k in TIED_KEYS if k in files), None)
        if key is None:
            raise DataError(
                f"{model_path}: no unembedding tensor (looked for {', '.join(UNEMBED_KEYS)} and "
                f"tied {', '.join(TIED_KEYS)})"
            )
        log.info("%s: no lm_head.weight, using tied embedding %s", model_path, key)
    W_U_VD = _read_tensor(files[key], key)
    if fold_final_norm:
        norm_key = next((k for k in FINAL_NORM_KEYS if k in files), None)
        if norm_key is not None:
            gain_D = _read_tensor(files[norm_key], norm_key)
            if "gemma" in _model_type(model_path, revision):
                gain_D = 1.0 + gain_D
            if gain_D.shape == (W_U_VD.shape[1],):
                W_U_VD = W_U_VD * gain_D[None, :]
    return np.ascontiguousarray(W_U_VD, dtype=np.float32)


def _gguf_unembedding(path: str, fold_final_norm: bool) -> np.ndarray:
    """W_U [V, D] from a GGUF file: `output.weight`, or the tied `token_embd.weight`.

    Only these two tensors are dequantised. llama.cpp stores the final norm's full gain (Gemma's
    `1 + w` already added), so it is folded in as stored.
    """
    from gguf import GGUFReader, dequantize

    if not Path(path).is_file():
        raise DataError(f"{path}: GGUF file not found")
    tensors = {t.name: t for t in GGUFReader(path).tensors}
    key = "output.weight" if "output.weight" in tensors else "token_embd.weight"
    if key not in tensors:
        raise DataError(f"{path}: no output.weight or token_embd.weight tensor")
    t = tensors[key]
    W_U_VD = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
    if fold_final_norm and "output_norm.weight" in tensors:
        n = tensors["output_norm.weight"]
        gain_D = np.asarray(dequantize(n.data, n.tensor_type), dtype=np.float32).reshape(-1)
        if gain_D.shape == (W_U_VD.shape[1],):
            W_U_VD = W_U_VD * gain_D[None, :]
    return np.ascontiguousarray(W_U_VD, dtype=np.float32)


def decoder_weights(sae: Any) -> np.ndarray:
    """Decoder directions [d_sae, d_in] (float32 numpy) of a loaded SAE."""
    if hasattr(sae, "decoder_directions"):
        W = sae.decoder_directions()
    elif hasattr(sae, "W_dec"):
        W = sae.W_dec
    else:
        raise DataError(f"{type(sae).__name__}: SAE has no decoder_directions() or W_dec")
    if hasattr(W, "detach"):
        W = W.detach().float().cpu().numpy()
    W = np.asarray(W, dtype=np.float32)
    d_sae = getattr(sae, "d_sae", None)
    if d_sae is not None and W.shape[0] != int(d_sae) and W.shape[1] == int(d_sae):
        W = W.T
    return np.ascontiguousarray(W)


def load_decoder(spec: dict[str, Any]) -> np.ndarray:
    """Load an SAE through `saeflow.load_sae(spec)` and return its decoder [d_sae, d_in]."""
    from saeflow import load_sae

    return decoder_weights(load_sae(spec))


def token_strings_for(
    model_path: str | os.PathLike,
    ids: np.ndarray,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> dict[int, str]:
    """Decode each distinct vocabulary id on its own (labels for logit tables)."""
    from saeflow.tokenize import load_tokenizer

    tok = load_tokenizer(str(model_path), revision=revision, trust_remote_code=trust_remote_code)
    uniq = sorted({int(i) for i in np.asarray(ids).ravel() if int(i) >= 0})
    decoded = tok.batch_decode(
        [[i] for i in uniq], skip_special_tokens=False, clean_up_tokenization_spaces=False
    )
    return dict(zip(uniq, decoded, strict=True))
