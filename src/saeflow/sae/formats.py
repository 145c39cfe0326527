"""`load_sae(spec)`: the five published SAE layouts, from a local folder or a hub repo.

- saelens: `cfg.json` + `sae_weights.safetensors` (W_enc [d_in, d_sae], W_dec [d_sae, d_in],
  b_enc, b_dec, threshold); architectures standard (ReLU), topk, jumprelu.
- gemmascope: `params.npz` (W_enc, W_dec, b_enc, b_dec, threshold); JumpReLU, raw input.
- temporal: `conf.yaml` + `latest_ckpt.safetensors` (or `latest_ckpt.pt`, weights only).
- dictionary_learning: `ae.pt` (weights only) + `config.json` (`trainer.dict_class`): AutoEncoder,
  AutoEncoderTopK, BatchTopKSAE, MatryoshkaBatchTopKSAE, JumpReluAutoEncoder.
- sparsify: one folder per hookpoint with `cfg.json` + `sae.safetensors` (EleutherAI sparsify
  TopK / GroupMax SAEs and transcoders; `saeflow.sae.sparsify`).

A spec is `{format, path}` (a local folder, or a weights file inside one) or
`{format, repo, path, revision}` (hub; files are fetched with `huggingface_hub.hf_hub_download`).
Optional keys: `norm_scaling_factor` (SAELens `expected_average_only_in` SAEs, whose factor is
not in cfg.json) and `normalize_decoder` (dictionary_learning `AutoEncoder`, default true as in its
`from_pretrained`). Every defect in the files raises a one-line `DataError` naming file and key.
"""

from __future__ import annotations

import json
import logging
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from saeflow import verify
from saeflow.errors import ConfigError, DataError
from saeflow.hooks import recorded_hook
from saeflow.sae.models import SAE, BaseSAE
from saeflow.sae.temporal import TemporalSAE

log = logging.getLogger(__name__)

FORMATS = ("saelens", "gemmascope", "temporal", "dictionary_learning", "sparsify")
FILE_SUFFIXES = (".npz", ".safetensors", ".pt", ".pth", ".json", ".yaml", ".yml")


# -- locating files ---------------------------------------------------------------------------
def _describe(spec: dict[str, Any]) -> str:
    if spec.get("repo"):
        rev = f"@{spec['revision']}" if spec.get("revision") else ""
        return f"hub:{spec['repo']}{rev}/{spec.get('path') or ''}".rstrip("/")
    return str(spec.get("path"))


def _split(spec: dict[str, Any]) -> tuple[str, str | None]:
    """(folder, file name) of the spec's path; file name is None when the path is a folder."""
    path = str(spec.get("path") or "").rstrip("/")
    if Path(path).suffix.lower() in FILE_SUFFIXES:
        parent = str(Path(path).parent)
        return ("" if parent == "." else parent), Path(path).name
    return path, None


def _fetch(spec: dict[str, Any], filename: str, *, required: bool = True) -> Path | None:
    """Local path of `filename` in the spec's folder, downloading it from the hub if needed."""
    folder, _ = _split(spec)
    if spec.get("repo"):
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError

        name = f"{folder}/{filename}" if folder else filename
        try:
            return Path(
                hf_hub_download(
                    repo_id=spec["repo"], filename=name, revision=spec.get("revision") or None
                )
            )
        except RemoteEntryNotFoundError:
            if not required:
                return None
            raise DataError(f"{_describe(spec)}: the repo has no file {name}") from None
        except LocalEntryNotFoundError:
            raise DataError(
                f"{_describe(spec)}: {name} is not in the local hub cache and the hub cannot be "
                "reached (offline?)"
            ) from None
        except OSError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DataError(f"{_describe(spec)}: cannot download {name}: {first}") from None
    path = Path(folder) / filename
    if path.exists():
        return path
    if not Path(folder).exists():
        raise DataError(f"SAE path {folder} does not exist")
    if required:
        have = ", ".join(sorted(p.name for p in Path(folder).iterdir())) or "nothing"
        raise DataError(f"SAE folder {folder} has no {filename} (it holds: {have})")
    return None


# -- reading files ----------------------------------------------------------------------------
def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a truncated or corrupt file is one clear error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        size = path.stat().st_size if path.exists() else 0
        raise DataError(
            f"{path}: not a readable safetensors file ({size} bytes; {str(err).splitlines()[0]}); "
            "it is probably truncated, delete it and download it again"
        ) from None


def read_pt(path: Path) -> Any:
    """torch.load with weights_only=True: plain tensors and containers only, never code."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0]
        raise DataError(
            f"{path}: refused to load: it holds pickled Python objects, not only tensors "
            f"(torch.load weights_only=True: {first[:160]})"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{path}: not a readable torch checkpoint ({first[:160]})") from None


def _read_npz(path: Path) -> dict[str, torch.Tensor]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: torch.from_numpy(np.array(data[key])) for key in data.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(f"{path}: not a readable .npz file ({str(err).splitlines()[0]})") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object")
    return data


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise DataError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a YAML mapping")
    return data


def _tensor(weights: dict[str, Any], key: str, path: Path, shape: tuple | None = None):
    if key not in weights:
        have = ", ".join(sorted(weights)) or "nothing"
        raise DataError(f"{path}: missing tensor {key!r} (it holds: {have})")
    value = weights[key]
    if not isinstance(value, torch.Tensor):
        raise DataError(f"{path}: {key!r} is a {type(value).__name__}, not a tensor")
    if shape is not None:
        want = tuple(shape)
        if tuple(value.shape) != want and value.numel() == int(np.prod(want)) and len(want) == 1:
            value = value.reshape(want)
        if tuple(value.shape) != want:
            raise DataError(
                f"{path}: tensor {key!r} has shape {tuple(value.shape)}, expected {want}"
            )
    return value


def _key(cfg: dict[str, Any], dotted: str, path: Path) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise DataError(f"{path}: missing key {dotted!r}")
        node = node[part]
    return node


# -- SAELens ----------------------------------------------------------------------------------
def saelens_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Normalise pre-6.0 SAELens configs to the 6.x keys (as SAELens' handle_pre_6_0_config)."""
    cfg = dict(cfg)
    if "activation_fn_str" in cfg and "activation_fn" not in cfg:
        cfg["activation_fn"] = cfg["activation_fn_str"]
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if cfg.get("activation_fn") == "topk" and kwargs.get("k") is not None:
        cfg.setdefault("architecture", "topk")
        if cfg.get("architecture") == "standard":
            cfg["architecture"] = "topk"
        cfg.setdefault("k", kwargs["k"])
    cfg.setdefault("architecture", "standard")
    cfg.setdefault("apply_b_dec_to_input", True)
    norm = cfg.get("normalize_activations")
    if isinstance(norm, bool):
        norm = "expected_average_only_in" if norm else "none"
    cfg["normalize_activations"] = norm or "none"
    return cfg


def _load_saelens(spec: dict[str, Any]) -> SAE:
    cfg_path = _fetch(spec, "cfg.json")
    cfg = saelens_config(_read_json(cfg_path))
    d_in, d_sae = int(_key(cfg, "d_in", cfg_path)), int(_key(cfg, "d_sae", cfg_path))
    arch = cfg["architecture"]
    if arch not in ("standard", "topk", "jumprelu"):
        raise ConfigError(
            f"{cfg_path}: architecture={arch!r} is not supported (standard, topk, jumprelu)"
        )
    w_path = _fetch(spec, "sae_weights.safetensors")
    weights = read_safetensors(w_path)
    W_enc = _tensor(weights, "W_enc", w_path, (d_in, d_sae))
    W_dec = _tensor(weights, "W_dec", w_path, (d_sae, d_in))
    b_enc = _tensor(weights, "b_enc", w_path, (d_sae,))
    b_dec = _tensor(weights, "b_dec", w_path, (d_in,))
    threshold = _tensor(weights, "threshold", w_path, (d_sae,)) if arch == "jumprelu" else None
    for key in ("scaling_factor", "finetuning_scaling_factor"):
        if key in weights:
            scale = _tensor(weights, key, w_path, (d_sae,)).float()
            W_dec = W_dec.float() * scale[:, None]
    norm = cfg["normalize_activations"]
    scale = 1.0
    if norm == "expected_average_only_in":
        factor = spec.get("norm_scaling_factor", cfg.get("norm_scaling_factor"))
        if factor is None:
            log.warning(
                "%s: normalize_activations=expected_average_only_in but no norm_scaling_factor "
                "(SAELens folds it on load from its directory); using the raw activations",
                cfg_path,
            )
            norm = "none"
        else:
            norm, scale = "scalar", float(factor)
    elif norm == "constant_scalar_rescale":
        norm, scale = "scalar", float(_key(cfg, "activation_normalization_factor", cfg_path))
    elif norm not in ("none", "constant_norm_rescale", "layer_norm"):
        raise ConfigError(f"{cfg_path}: normalize_activations={norm!r} is not supported")
    k = None
    if arch == "topk":
        k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
        if k is None:
            raise DataError(f"{cfg_path}: missing key 'k' for a topk SAE")
    activation = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}[arch]
    return SAE(
        W_enc,
        b_enc,
        W_dec,
        b_dec,
        activation=activation,
        k=k,
        threshold_F=threshold,
        apply_b_dec_to_input=bool(cfg["apply_b_dec_to_input"]),
        normalize=norm,
        input_scale=scale,
        rescale_acts_by_decoder_norm=bool(cfg.get("rescale_acts_by_decoder_norm", False)),
        source=_describe(spec),
    )


# -- GemmaScope -------------------------------------------------------------------------------
def _load_gemmascope(spec: dict[str, Any]) -> SAE:
    _, name = _split(spec)
    path = _fetch(spec, name or "params.npz")
    raw = _read_npz(path) if path.suffix == ".npz" else read_safetensors(path)
    weights = {("W_" + k[2:] if k.startswith("w_") else k): v for k, v in raw.items()}
    W_enc = _tensor(weights, "W_enc", path)
    if W_enc.dim() != 2:
        raise DataError(f"{path}: tensor 'W_enc' has shape {tuple(W_enc.shape)}, expected 2-D")
    d_in, d_sae = W_enc.shape
    return SAE(
        W_enc,
        _tensor(weights, "b_enc", path, (d_sae,)),
        _tensor(weights, "W_dec", path, (d_sae, d_in)),
        _tensor(weights, "b_dec", path, (d_in,)),
        activation="jumprelu",
        threshold_F=_tensor(weights, "threshold", path, (d_sae,)),
        apply_b_dec_to_input=False,
        source=_describe(spec),
    )


# -- dictionary_learning ----------------------------------------------------------------------
DL_CLASSES = (
    "AutoEncoder",
    "AutoEncoderTopK",
    "BatchTopKSAE",
    "MatryoshkaBatchTopKSAE",
    "JumpReluAutoEncoder",
)


def _dl_class(config: dict[str, Any] | None, weights: dict[str, Any], path: Path) -> str:
    if config is not None:
        trainer = config.get("trainer", config)
        name = trainer.get("dict_class")
        if name is not None:
            return str(name)
    if "encoder.weight" in weights and "bias" in weights:
        return "AutoEncoder"
    if "encoder.weight" in weights and "k" in weights:
        return "AutoEncoderTopK"
    if "W_enc" in weights and "k" in weights:
        return "MatryoshkaBatchTopKSAE"
    if "W_enc" in weights and "threshold" in weights:
        return "JumpReluAutoEncoder"
    raise DataError(f"{path}: cannot tell the dictionary class (no config.json trainer.dict_class)")


def _load_dictionary_learning(spec: dict[str, Any]) -> SAE:
    _, name = _split(spec)
    ae_path = _fetch(spec, name or "ae.pt")
    cfg_path = _fetch(spec, "config.json", required=False)
    config = _read_json(cfg_path) if cfg_path is not None else None
    weights = read_pt(ae_path)
    if not isinstance(weights, dict):
        raise DataError(f"{ae_path}: expected a state dict, got {type(weights).__name__}")
    cls = _dl_class(config, weights, ae_path)
    if cls not in DL_CLASSES:
        raise ConfigError(
            f"{cfg_path}: dict_class={cls!r} is not supported ({', '.join(DL_CLASSES)})"
        )
    source = _describe(spec)
    if cls in ("AutoEncoder", "AutoEncoderTopK", "BatchTopKSAE"):
        enc = _tensor(weights, "encoder.weight", ae_path)
        d_sae, d_in = enc.shape
        W_enc = enc.T.float()
        b_enc = _tensor(weights, "encoder.bias", ae_path, (d_sae,)).float()
        W_dec = _tensor(weights, "decoder.weight", ae_path, (d_in, d_sae)).T.float()
        b_dec_key = "bias" if cls == "AutoEncoder" else "b_dec"
        b_dec = _tensor(weights, b_dec_key, ae_path, (d_in,))
    else:
        W_enc = _tensor(weights, "W_enc", ae_path).float()
        d_in, d_sae = W_enc.shape
        b_enc = _tensor(weights, "b_enc", ae_path, (d_sae,))
        W_dec = _tensor(weights, "W_dec", ae_path, (d_sae, d_in))
        b_dec = _tensor(weights, "b_dec", ae_path, (d_in,))
    if cls == "AutoEncoder":
        if spec.get("normalize_decoder", True):
            norms = W_dec.norm(dim=1)
            W_dec = W_dec / norms[:, None]
            W_enc = W_enc * norms
            b_enc = b_enc * norms
        return SAE(W_enc, b_enc, W_dec, b_dec, activation="relu", source=source)
    if cls == "JumpReluAutoEncoder":
        thr = _tensor(weights, "threshold", ae_path, (d_sae,))
        return SAE(
            W_enc,
            b_enc,
            W_dec,
            b_dec,
            activation="jumprelu",
            threshold_F=thr,
            apply_b_dec_to_input=False,
            source=source,
        )
    if cls == "AutoEncoderTopK":
        k = weights.get("k")
        k = int(k) if k is not None else int(_key(config or {}, "trainer.k", cfg_path or ae_path))
        return SAE(W_enc, b_enc, W_dec, b_dec, activation="topk", k=k, source=source)
    thr = float(_tensor(weights, "threshold", ae_path).reshape(-1)[0])
    return SAE(
        W_enc,
        b_enc,
        W_dec,
        b_dec,
        activation="jumprelu",
        threshold_F=torch.full((d_sae,), thr),
        source=source,
    )


# -- Temporal SAE -----------------------------------------------------------------------------
def temporal_from_conf(
    conf: dict[str, Any], path: Path, source: str = "", inf_k: int | None = None
) -> TemporalSAE:
    """An (untrained) TemporalSAE with the architecture of a published conf.yaml (+ `inf_k`)."""
    dimin = int(_key(conf, "llm.dimin", path))
    exp_factor = float(_key(conf, "sae.exp_factor", path))
    sae_cfg = conf["sae"]
    diff = str(_key(conf, "sae.sae_diff_type", path))
    if diff not in ("topk", "relu", "nullify"):
        raise ConfigError(f"{path}: sae.sae_diff_type={diff!r} is not one of topk, relu, nullify")
    return TemporalSAE(
        dimin,
        int(dimin * exp_factor),
        n_heads=int(_key(conf, "sae.n_heads", path)),
        sae_diff_type=diff,
        kval_topk=sae_cfg.get("kval_topk"),
        tied_weights=bool(_key(conf, "sae.tied_weights", path)),
        n_attn_layers=int(_key(conf, "sae.n_attn_layers", path)),
        bottleneck_factor=int(_key(conf, "sae.bottleneck_factor", path)),
        scaling_factor=float(sae_cfg.get("scaling_factor") or 1.0),
        inf_k=inf_k,
        source=source,
    )


def _load_temporal(spec: dict[str, Any]) -> TemporalSAE:
    _, name = _split(spec)
    conf_path = _fetch(spec, "conf.yaml")
    conf = _read_yaml(conf_path)
    sae = temporal_from_conf(conf, conf_path, _describe(spec), inf_k=spec.get("inf_k"))
    if name is not None:
        ckpt_path = _fetch(spec, name)
    else:
        ckpt_path = _fetch(spec, "latest_ckpt.safetensors", required=False) or _fetch(
            spec, "latest_ckpt.pt"
        )
    if ckpt_path.suffix == ".safetensors":
        state = read_safetensors(ckpt_path)
    else:
        state = read_pt(ckpt_path)
        if isinstance(state, dict) and isinstance(state.get("sae"), dict):
            state = state["sae"]
        if not isinstance(state, dict):
            raise DataError(f"{ckpt_path}: expected a state dict, got {type(state).__name__}")
    expected = sae.state_dict()
    fixed: dict[str, torch.Tensor] = {}
    for key, ref in expected.items():
        value = _tensor(state, key, ckpt_path)
        if key == "b" and value.numel() == ref.numel():
            value = value.reshape(ref.shape)
        if tuple(value.shape) != tuple(ref.shape):
            raise DataError(
                f"{ckpt_path}: tensor {key!r} has shape {tuple(value.shape)}, expected "
                f"{tuple(ref.shape)} from {conf_path.name}"
            )
        fixed[key] = value.float()
    extra = sorted(set(state) - set(expected))
    if extra:
        raise DataError(f"{ckpt_path}: unexpected tensor(s) {', '.join(extra[:5])} for {conf_path}")
    sae.load_state_dict(fixed)
    return sae


# -- EleutherAI sparsify ----------------------------------------------------------------------
def _load_sparsify(spec: dict[str, Any]) -> BaseSAE:
    """One hookpoint folder of a sparsify run (`saeflow.sae.sparsify`)."""
    from saeflow.sae.sparsify import load_sparsify

    return load_sparsify(spec)


LOADERS = {
    "sparsify": _load_sparsify,
    "saelens": _load_saelens,
    "gemmascope": _load_gemmascope,
    "temporal": _load_temporal,
    "dictionary_learning": _load_dictionary_learning,
}


def load_sae(spec: dict[str, Any], *, device: str | torch.device | None = None) -> BaseSAE:
    """Load an SAE for inference (float32, no gradients) from its published layout."""
    if not isinstance(spec, dict):
        raise ConfigError(f"SAE spec must be a mapping with format and path, got {spec!r}")
    fmt = spec.get("format")
    if fmt not in LOADERS:
        raise ConfigError(f"SAE spec format={fmt!r} is not one of {', '.join(FORMATS)}")
    if not spec.get("path") and not spec.get("repo"):
        raise ConfigError("SAE spec needs path (local) or repo (+ path) (hub)")
    sae = LOADERS[fmt](spec)
    verify.finite_weights(f"saes.{spec.get('name', '?')} ({_describe(spec)})", sae.state_dict())
    # Where the SAE was trained, as its files record it (checked against the activations); hub
    # files are read from the cache the loader just filled, with no further download.
    sae.recorded_hook = recorded_hook(spec)
    sae.eval()
    sae.requires_grad_(False)
    if device is not None:
        sae = sae.to(device)
    return sae
