"""Load HF causal LMs, find their blocks, and read or replace one block's output.

Caching reads the residual stream right after block L (resid_post), so the model is loaded with
only L+1 blocks and no LM head where the architecture allows, and a forward hook on block L stops
the forward pass: later blocks, the final norm and the LM head cost more than the cached layer.
SAE metrics and steering need the opposite, a full forward whose block-L output is replaced
(`splice_layer`). HF `hidden_states[-1]` is post-final-norm, so we never read layers through it.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from saeflow import verify
from saeflow.devices import resolve_device, resolve_dtype
from saeflow.errors import ConfigError

log = logging.getLogger("saeflow.models")

# Attribute paths of the block list, most common first.
_LAYER_PATHS = (
    "model.layers",
    "layers",
    "transformer.h",
    "h",
    "gpt_neox.layers",
    "model.decoder.layers",
    "decoder.layers",
    "model.language_model.layers",
    "language_model.layers",
    "language_model.model.layers",
    "transformer.blocks",
    "transformer.layers",
    "blocks",
)


def n_layers_of(hf_config: Any) -> int:
    """Number of transformer blocks declared by an HF config (text config for multimodal ones)."""
    for cfg in (hf_config, getattr(hf_config, "text_config", None)):
        if cfg is None:
            continue
        for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
            value = getattr(cfg, key, None)
            if isinstance(value, int) and value > 0:
                return value
    raise ConfigError(
        f"model config {type(hf_config).__name__}: cannot find the number of layers "
        "(num_hidden_layers / n_layer / num_layers)"
    )


def _get_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def layer_modules(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks of any HF causal LM (with or without LM head)."""
    for path in _LAYER_PATHS:
        found = _get_path(model, path)
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return found
    config = getattr(model, "config", None)
    n = n_layers_of(config) if config is not None else None
    lists = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (n is None or len(mod) == n)
    ]
    if not lists:
        raise ConfigError(f"model {type(model).__name__}: cannot find its list of blocks")
    return min(lists, key=lambda item: item[0].count("."))[1]


def _truncated_config(config: Any, n_keep: int) -> Any | None:
    """A copy of `config` declaring only `n_keep` blocks, or None if we do not know how."""
    if getattr(config, "text_config", None) is not None:
        return None
    n = n_layers_of(config)
    cfg = copy.deepcopy(config)
    for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        if isinstance(getattr(cfg, key, None), int):
            setattr(cfg, key, n_keep)
            break
    else:
        return None
    # Per-layer lists (e.g. Gemma-2 layer_types) must shrink with the block count.
    for key, value in list(vars(cfg).items()):
        if "layer" in key and isinstance(value, list | tuple) and len(value) == n:
            setattr(cfg, key, type(value)(value[:n_keep]))
    return cfg


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Mute the load report (a truncated load expects unused later-block weights)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _from_pretrained(cls: Any, path: str, config: Any, kwargs: dict[str, Any]) -> nn.Module:
    with _quiet_transformers():
        model, info = cls.from_pretrained(path, config=config, output_loading_info=True, **kwargs)
    missing = list(info.get("missing_keys") or [])
    if missing:
        log.warning(
            "%s: %d weights missing from the checkpoint, e.g. %s", path, len(missing), missing[:3]
        )
    return model


def split_gguf(path: str | os.PathLike, gguf_file: str | None = None) -> tuple[str, str | None]:
    """(folder, GGUF file name or None): a model path may name a `.gguf` file inside its folder.

    transformers reads GGUF as `from_pretrained(folder, gguf_file=name)`; accepting the file's own
    path lets every caller pass one string, as for a safetensors folder.
    """
    path = str(path)
    if gguf_file is None and path.lower().endswith(".gguf"):
        folder, name = os.path.split(path)
        return folder or ".", name
    return path, gguf_file


def hf_load_kwargs(
    path: str | os.PathLike,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    gguf_file: str | None = None,
) -> tuple[str, dict[str, Any]]:
    """The folder and the `from_pretrained` keywords shared by configs, tokenizers and models."""
    folder, gguf = split_gguf(path, gguf_file)
    kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
    if gguf is not None:
        kwargs["gguf_file"] = gguf
    return folder, kwargs


def load_lm(
    path: str | os.PathLike,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "bfloat16",
    upto_layer: int | None = None,
    with_head: bool = False,
    gguf_file: str | None = None,
) -> nn.Module:
    """Load a causal LM in eval mode, without gradients.

    With `upto_layer=L` and no head, only blocks 0..L are built and loaded (base model, no LM head)
    when the config allows; otherwise the full model loads and `capture_layer` stops the forward
    with a hook. `with_head=True` always loads the full causal LM (for CE loss and steering).
    `path` may be a `.gguf` file (or pass `gguf_file`): transformers dequantises it to `dtype`.
    On an accelerator the weights are loaded straight onto it (`device_map`, via accelerate), so
    host RAM never holds the whole model; on CPU the load is the plain one.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    path, common = hf_load_kwargs(
        path, revision=revision, trust_remote_code=trust_remote_code, gguf_file=gguf_file
    )
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if "gguf_file" not in common:
        verify.model_folder(path, trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(path, **common)
    except (OSError, ValueError) as err:
        raise verify.model_error(path, err) from None
    n_layers = n_layers_of(config)
    if upto_layer is not None and not 0 <= upto_layer < n_layers:
        raise ConfigError(f"layer: {upto_layer} is out of range for {path} ({n_layers} layers)")
    kwargs = {**common, "dtype": dtype, **device_map_kwargs(device)}

    model = None
    if with_head:
        model = _from_pretrained(AutoModelForCausalLM, path, config, kwargs)
    else:
        truncated = _truncated_config(config, upto_layer + 1) if upto_layer is not None else None
        for cfg in (truncated, config):
            if cfg is None:
                continue
            for cls in (AutoModel, AutoModelForCausalLM):
                try:
                    model = _from_pretrained(cls, path, cfg, kwargs)
                    break
                except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
                    log.warning("%s: %s load failed (%s); trying a fallback", path, cls.__name__, e)
            if model is not None:
                break
        if model is None:
            raise ConfigError(f"model {path}: could not be loaded (see warnings above)")
    if "device_map" not in kwargs:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    n_loaded = len(layer_modules(model))
    log.info(
        "loaded %s (%s, %d of %d blocks, %s on %s)",
        path,
        type(model).__name__,
        n_loaded,
        n_layers,
        str(dtype).removeprefix("torch."),
        device,
    )
    return model


def device_map_kwargs(device: torch.device) -> dict[str, Any]:
    """`device_map` for accelerators (weights stream onto the device); nothing for CPU.

    A single-device map puts every module on `device` without accelerate's dispatch hooks, so the
    loaded model is the same module tree as a CPU load moved there.
    """
    if torch.device(device).type == "cpu":
        return {}
    return {"device_map": {"": str(device)}}


def model_inputs(
    model: nn.Module, input_ids_BP: torch.Tensor, attention_mask_BP: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Forward kwargs with position ids counted over real tokens only.

    HF models number positions 0..P-1 regardless of padding, so a left-padded sequence would get
    shifted positions; counting from each sequence's first real token makes a sequence's
    activations independent of how it was batched and padded.
    """
    device = next(model.parameters()).device
    ids_BP = input_ids_BP.to(device)
    mask_BP = attention_mask_BP.to(device)
    kwargs = {"input_ids": ids_BP, "attention_mask": mask_BP}
    params = inspect.signature(model.forward).parameters
    if "position_ids" in params:
        kwargs["position_ids"] = (mask_BP.long().cumsum(-1) - 1).clamp(min=0)
    if "use_cache" in params:
        kwargs["use_cache"] = False
    return kwargs


def _block_hidden(output: Any) -> torch.Tensor:
    """Blocks return a tensor (transformers >= 5) or a tuple whose first item is the residual."""
    return output[0] if isinstance(output, tuple | list) else output


class _StopForwardError(Exception):
    """Raised by the capture hook so nothing after the hooked block runs."""


def capture_layer(
    model: nn.Module,
    layer: int,
    input_ids_BP: torch.Tensor,
    attention_mask_BP: torch.Tensor,
) -> torch.Tensor:
    """Raw output of block `layer` (resid_post, before any final norm), shape (B, P, D)."""
    blocks = layer_modules(model)
    if not 0 <= layer < len(blocks):
        raise ConfigError(f"layer: {layer} is out of range (model has {len(blocks)} blocks loaded)")
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, _args: Any, output: Any) -> None:
        captured.append(_block_hidden(output))
        raise _StopForwardError

    handle = blocks[layer].register_forward_hook(hook)
    try:
        with torch.inference_mode():
            model(**model_inputs(model, input_ids_BP, attention_mask_BP))
    except _StopForwardError:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"block {layer} did not run during the forward pass")
    return captured[0]


@contextlib.contextmanager
def splice_layer(
    model: nn.Module, layer: int, fn: Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[None]:
    """Within the block, every forward has block `layer`'s output replaced by `fn(acts_BPD)`."""
    blocks = layer_modules(model)
    if not 0 <= layer < len(blocks):
        raise ConfigError(f"layer: {layer} is out of range (model has {len(blocks)} blocks loaded)")

    def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
        acts_BPD = _block_hidden(output)
        new_BPD = fn(acts_BPD).to(acts_BPD.dtype)
        if isinstance(output, tuple | list):
            return type(output)((new_BPD, *output[1:]))
        return new_BPD

    handle = blocks[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by parameters and buffers (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
