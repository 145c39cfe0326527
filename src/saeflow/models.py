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


# ----------------------------------------------------------------------------- hook points
#
# Canonical hooks (saeflow.hooks) resolve onto the modules of one block. Sequential blocks run
# attention, then the MLP, each added to the residual; "sandwich" blocks (Gemma-2, OLMo-2) norm
# each sublayer's output before adding it, so attn_out / mlp_out are those norms' outputs.
# Parallel blocks (GPT-NeoX with use_parallel_residual, GPT-J, Phi) have no resid_mid.

_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")
_ATTN_OUT_PROJ = ("o_proj", "c_proj", "dense", "out_proj")
_MLP_DOWN_PROJ = ("down_proj", "c_proj", "dense_4h_to_h", "fc2", "w2")
_PRE_MLP_NORMS = ("pre_feedforward_layernorm", "post_attention_layernorm", "ln_2", "ln2")


def _child(module: nn.Module, names: tuple[str, ...]) -> nn.Module | None:
    for name in names:
        found = getattr(module, name, None)
        if isinstance(found, nn.Module):
            return found
    return None


def _is_parallel(model: nn.Module, block: nn.Module) -> bool:
    config = getattr(model, "config", None)
    for key in ("use_parallel_residual", "parallel_attn", "parallel_residual"):
        if getattr(config, key, False) is True:
            return True
    return (
        _child(block, _PRE_MLP_NORMS) is None
        and _child(block, ("post_feedforward_layernorm",)) is None
    )


def hook_site(model: nn.Module, layer: int, hook: str) -> tuple[nn.Module, str]:
    """(module, "input" | "output") whose input or output is `hook` of block `layer`."""
    from saeflow.hooks import HOOKS

    blocks = layer_modules(model)
    if not 0 <= layer < len(blocks):
        raise ConfigError(f"layer: {layer} is out of range (model has {len(blocks)} blocks loaded)")
    if hook not in HOOKS:
        raise ConfigError(f"hook {hook!r} is not one of {', '.join(HOOKS)}")
    block = blocks[layer]
    if hook == "resid_pre":
        return block, "input"
    if hook == "resid_post":
        return block, "output"
    what = f"{type(block).__name__} (block {layer} of {type(model).__name__})"
    attn, mlp = _child(block, _ATTN_NAMES), _child(block, _MLP_NAMES)
    sandwich = _child(block, ("post_feedforward_layernorm",)) is not None
    site: tuple[nn.Module | None, str]
    if hook == "attn_out":
        site = (block.post_attention_layernorm if sandwich else attn), "output"
    elif hook == "mlp_out":
        site = (block.post_feedforward_layernorm if sandwich else mlp), "output"
    elif hook == "mlp_in":
        site = mlp, "input"
    elif hook == "attn_z":
        site = (_child(attn, _ATTN_OUT_PROJ) if attn is not None else None), "input"
    elif hook == "mlp_post":
        site = (_child(mlp, _MLP_DOWN_PROJ) if mlp is not None else None), "input"
    else:  # resid_mid: the input of the pre-MLP norm (or of the MLP when it has none)
        if _is_parallel(model, block):
            raise ConfigError(
                f"hook resid_mid: {what} is a parallel attention/MLP block, which has no "
                "residual stream between attention and MLP"
            )
        norm = _child(block, ("pre_feedforward_layernorm",)) if sandwich else None
        if not sandwich:
            norm = _child(block, _PRE_MLP_NORMS)
        site = (norm if norm is not None else mlp), "input"
    if site[0] is None:
        raise ConfigError(f"hook {hook}: cannot find its module in {what}")
    return site[0], site[1]


def _first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    for value in kwargs.values():
        if isinstance(value, torch.Tensor):
            return value
    raise RuntimeError("hooked module was called without a tensor input")


def _replace_input(args: tuple, kwargs: dict, new: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (new, *args[1:]), kwargs
    key = (
        "hidden_states"
        if "hidden_states" in kwargs
        else next(k for k, v in kwargs.items() if isinstance(v, torch.Tensor))
    )
    return args, {**kwargs, key: new}


def _replace_output(output: Any, new: torch.Tensor) -> Any:
    if isinstance(output, tuple | list):
        return type(output)((new, *output[1:]))
    return new


def capture_hooks(
    model: nn.Module,
    hookpoints: list[tuple[int, str]],
    input_ids_BP: torch.Tensor,
    attention_mask_BP: torch.Tensor,
) -> list[torch.Tensor]:
    """Activations (B, P, D_h) of every (layer, hook), from one forward pass that stops as soon
    as the last of them has been read (nothing after it runs)."""
    sites = [hook_site(model, layer, hook) for layer, hook in hookpoints]
    captured: list[torch.Tensor | None] = [None] * len(sites)
    left = [len(sites)]
    handles = []

    def make(i: int, mode: str) -> Callable:
        def on_output(_module: nn.Module, _args: Any, output: Any) -> None:
            take(_block_hidden(output))

        def on_input(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            take(_first_input(args, kwargs))

        def take(acts_BPD: torch.Tensor) -> None:
            if captured[i] is None:
                captured[i] = acts_BPD
                left[0] -= 1
            if left[0] == 0:
                raise _StopForwardError

        return on_output if mode == "output" else on_input

    for i, (module, mode) in enumerate(sites):
        if mode == "output":
            handles.append(module.register_forward_hook(make(i, mode)))
        else:
            handles.append(module.register_forward_pre_hook(make(i, mode), with_kwargs=True))
    try:
        with torch.inference_mode():
            model(**model_inputs(model, input_ids_BP, attention_mask_BP))
    except _StopForwardError:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [hp for hp, acts in zip(hookpoints, captured, strict=True) if acts is None]
    if missing:
        raise RuntimeError(f"hook points {missing} did not run during the forward pass")
    return captured  # type: ignore[return-value]


@contextlib.contextmanager
def splice_hook(
    model: nn.Module, layer: int, hook: str, fn: Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[None]:
    """Within the block, every forward has (layer, hook) replaced by `fn(acts_BPD)`.

    resid_mid is read at the pre-MLP norm's input, after the residual branch was taken, so its
    replacement also adds (new - old) to the MLP's contribution: the block output becomes
    new + mlp(norm(new)), as if the residual stream itself had been replaced.
    """
    module, mode = hook_site(model, layer, hook)
    handles = []
    delta: list[torch.Tensor | None] = [None]

    def on_output(_module: nn.Module, _args: Any, output: Any) -> Any:
        acts_BPD = _block_hidden(output)
        return _replace_output(output, fn(acts_BPD).to(acts_BPD.dtype))

    def on_input(_module: nn.Module, args: tuple, kwargs: dict) -> Any:
        acts_BPD = _first_input(args, kwargs)
        new_BPD = fn(acts_BPD).to(acts_BPD.dtype)
        if hook == "resid_mid":
            delta[0] = new_BPD - acts_BPD
        return _replace_input(args, kwargs, new_BPD)

    def add_delta(_module: nn.Module, _args: Any, output: Any) -> Any:
        if delta[0] is None:
            return output
        out_BPD = _block_hidden(output)
        shifted = out_BPD + delta[0].to(out_BPD.dtype)
        delta[0] = None
        return _replace_output(output, shifted)

    if mode == "output":
        handles.append(module.register_forward_hook(on_output))
    else:
        handles.append(module.register_forward_pre_hook(on_input, with_kwargs=True))
    if hook == "resid_mid":
        out_module, _ = hook_site(model, layer, "mlp_out")
        handles.append(out_module.register_forward_hook(add_delta))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
