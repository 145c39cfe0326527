"""Hook points: where in a transformer block an activation is read, named one way everywhere.

A hook point is (layer, hook), with `hook` one of the canonical names below. Each maps onto the
TransformerLens/SAELens name that the field's SAEs record, and onto HF modules (resolved in
`saeflow.models.hook_site`):

  resid_pre   blocks.L.hook_resid_pre       input of block L (= HF hidden_states[L])
  attn_z      blocks.L.attn.hook_z          input of the attention output projection (heads
                                            concatenated: n_heads * head_dim wide)
  attn_out    blocks.L.hook_attn_out        what attention adds to the residual stream (after
                                            Gemma-2's post-attention norm)
  resid_mid   blocks.L.hook_resid_mid       residual stream between attention and MLP
                                            (sequential blocks only)
  mlp_in      blocks.L.ln2.hook_normalized  input of the MLP (after its pre-norm)
  mlp_post    blocks.L.mlp.hook_post        input of the MLP down projection (d_mlp wide)
  mlp_out     blocks.L.hook_mlp_out         what the MLP adds to the residual stream (after
                                            Gemma-2's post-feedforward norm)
  resid_post  blocks.L.hook_resid_post      output of block L (= hidden_states[L+1] except for
                                            the last block, whose HF entry is post-final-norm)

Activations of one hook point live in `activations/{model}/{dataset}/layer_{L}/{hook}/`
(`HookPoint.folder`), so two hooks never share a folder. An SAE's hook point comes from its own
files when they record it (`recorded_hook`), else from `saes.<name>.hook` / `.layer`, else from
the model's `layer` at resid_post; a recorded hook point that disagrees with the configured one
is a config error naming both. This module does not import torch: the Snakefile uses it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from saeflow.errors import ConfigError, DataError

# Canonical name -> TransformerLens name inside `blocks.L.`, in forward order within a block.
HOOKS: dict[str, str] = {
    "resid_pre": "hook_resid_pre",
    "attn_z": "attn.hook_z",
    "attn_out": "hook_attn_out",
    "resid_mid": "hook_resid_mid",
    "mlp_in": "ln2.hook_normalized",
    "mlp_post": "mlp.hook_post",
    "mlp_out": "hook_mlp_out",
    "resid_post": "hook_resid_post",
}
DEFAULT_HOOK = "resid_post"
_ORDER = {name: i for i, name in enumerate(HOOKS)}
_TL_NAMES = {tl: name for name, tl in HOOKS.items()} | {
    "hook_mlp_in": "resid_mid",  # TransformerLens' use_hook_mlp_in: the MLP's un-normed input
    "attn.hook_result_sum": "attn_out",
}
_TL_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
# dictionary_learning's `submodule_name`, e.g. resid_post_layer_3 (its demo's naming).
_DL_RE = re.compile(r"^(" + "|".join(HOOKS) + r")_layer_(\d+)$")
# HF module paths (sparsify hookpoints, nnsight-style names): prefixes, block list, submodule.
_HF_PREFIXES = (
    "base_model.model.",
    "model.language_model.",
    "language_model.model.",
    "language_model.",
    "model.",
    "transformer.",
    "gpt_neox.",
)
_HF_RE = re.compile(r"^(?:layers|h|blocks)\.(\d+)(?:\.(.+))?$")
_HF_OUTPUT = {
    "": "resid_post",
    "mlp": "mlp_out",
    "feed_forward": "mlp_out",
    "ffn": "mlp_out",
    "self_attn": "attn_out",
    "attn": "attn_out",
    "attention": "attn_out",
}
_HF_INPUT = {"": "resid_pre", "mlp": "mlp_in", "feed_forward": "mlp_in", "ffn": "mlp_in"}
# GemmaScope repositories: google/gemma-scope-2b-pt-res, -mlp, -att (optionally -canonical).
_GEMMASCOPE_RE = re.compile(r"gemma-scope-[^/]*?-(res|mlp|att)(?:-canonical)?$")
_GEMMASCOPE_HOOKS = {"res": "resid_post", "mlp": "mlp_out", "att": "attn_z"}
_LAYER_DIR_RE = re.compile(r"(?:^|/)layer_(\d+)(?:/|$)")


@dataclass(frozen=True)
class HookPoint:
    """One place to read activations: block `layer`, canonical `hook`."""

    layer: int
    hook: str = DEFAULT_HOOK

    def __post_init__(self) -> None:
        if self.hook not in HOOKS:
            raise ConfigError(f"hook {self.hook!r} is not one of {', '.join(HOOKS)}")
        if not isinstance(self.layer, int) or self.layer < 0:
            raise ConfigError(f"layer {self.layer!r} must be a non-negative integer")

    @property
    def folder(self) -> str:
        """Path of its activation folder relative to activations/{model}/{dataset}/."""
        return f"layer_{self.layer}/{self.hook}"

    @property
    def tl_name(self) -> str:
        """The TransformerLens/SAELens name, e.g. blocks.6.hook_mlp_out."""
        return f"blocks.{self.layer}.{HOOKS[self.hook]}"

    def key(self) -> tuple[int, int]:
        """Forward order: a deeper layer, or a later hook in the same block, comes later."""
        return (self.layer, _ORDER[self.hook])

    def as_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "hook": self.hook}

    def __str__(self) -> str:
        return f"layer {self.layer} {self.hook}"


def sort_hookpoints(hps: Iterable[HookPoint]) -> list[HookPoint]:
    """Unique hook points in forward order."""
    return sorted(set(hps), key=HookPoint.key)


def hookpoint_from(obj: Mapping[str, Any] | HookPoint) -> HookPoint:
    """A HookPoint from {layer, hook} (params, manifests) or a HookPoint."""
    if isinstance(obj, HookPoint):
        return obj
    return HookPoint(int(obj["layer"]), str(obj.get("hook") or DEFAULT_HOOK))


# ----------------------------------------------------------------------------- names


def parse_hook_name(name: str) -> tuple[int | None, str] | None:
    """(layer or None, canonical hook) of a hook name in any of the field's spellings, else None.

    Accepts canonical names (`mlp_out`), TransformerLens/SAELens names (`blocks.6.hook_mlp_out`),
    dictionary_learning submodule names (`mlp_out_layer_6`) and HF module paths as sparsify
    names its hookpoints (`layers.6`, `layers.6.mlp`, `model.layers.6.self_attn`; module
    outputs).
    """
    name = str(name).strip()
    if name in HOOKS:
        return None, name
    m = _TL_RE.match(name)
    if m and m.group(2) in _TL_NAMES:
        return int(m.group(1)), _TL_NAMES[m.group(2)]
    m = _DL_RE.match(name)
    if m:
        return int(m.group(2)), m.group(1)
    return module_hook(name)


def module_hook(path: str, *, side: str = "output") -> tuple[int, str] | None:
    """(layer, hook) of an HF module path: the module's output, or its input for side='input'.

    Sandwich-norm blocks (Gemma-2) apply a norm after attention and MLP; their `self_attn` and
    `mlp` module outputs are before it, while attn_out / mlp_out are after it, so such names are
    only exact on blocks without post-norms.
    """
    path = str(path).strip().strip("/")
    for prefix in _HF_PREFIXES:
        if path.startswith(prefix) and _HF_RE.match(path[len(prefix) :]):
            path = path[len(prefix) :]
            break
    m = _HF_RE.match(path)
    if not m:
        return None
    table = _HF_OUTPUT if side == "output" else _HF_INPUT
    hook = table.get(m.group(2) or "")
    return (int(m.group(1)), hook) if hook else None


def _parse_or_refuse(name: Any, where: str) -> tuple[int | None, str]:
    parsed = parse_hook_name(str(name))
    if parsed is None:
        raise ConfigError(
            f"{where} = {name!r}: not a hook point saeflow can cache "
            f"(one of {', '.join(HOOKS)}, or blocks.L.<TransformerLens name>)"
        )
    return parsed


# ----------------------------------------------------------------------------- SAE files

Fetch = Callable[[str], "Path | None"]


class Recorded(NamedTuple):
    """What an SAE's own files say about where it was trained; None where they are silent."""

    layer: int | None
    hook: str | None
    source: str

    def describe(self) -> str:
        layer = "?" if self.layer is None else self.layer
        return f"layer {layer} {self.hook or '?'} ({self.source})"


# saeflow.sae.formats.FILE_SUFFIXES, not imported from there: that module loads torch, and the
# Snakefile reads hooks before any job.
FILE_SUFFIXES = (".npz", ".safetensors", ".pt", ".pth", ".json", ".yaml", ".yml")


def _folder_and_file(spec: Mapping[str, Any]) -> tuple[str, str | None]:
    path = str(spec.get("path") or "").rstrip("/")
    if Path(path).suffix.lower() in FILE_SUFFIXES:
        parent = str(Path(path).parent)
        return ("" if parent == "." else parent), Path(path).name
    return path, None


def local_fetch(spec: Mapping[str, Any]) -> Fetch:
    """Files of an SAE spec already on this machine (local folder or HF cache); never network."""
    folder, _ = _folder_and_file(spec)

    def fetch(name: str) -> Path | None:
        if spec.get("repo"):
            try:
                from huggingface_hub import try_to_load_from_cache
            except ImportError:
                return None
            rel = f"{folder}/{name}" if folder else name
            found = try_to_load_from_cache(spec["repo"], rel, revision=spec.get("revision"))
            return Path(found) if isinstance(found, str) else None
        path = Path(folder) / name
        return path if path.is_file() else None

    return fetch


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    return data if isinstance(data, dict) else {}


def recorded_hook(spec: Mapping[str, Any], fetch: Fetch | None = None) -> Recorded | None:
    """The hook point an SAE's files record, or None when they record none (or are not here).

    SAELens: `cfg.json` `metadata.hook_name` (6.x) or `hook_name` / `hook_layer` (older);
    dictionary_learning: `config.json` `trainer.submodule_name` and `trainer.layer`; GemmaScope:
    the repository suffix (-res, -mlp, -att) and `layer_L/` in the path; sparsify: the
    hookpoint folder name (`layers.6.mlp`; a transcoder reads its module's input); temporal:
    `conf.yaml` `llm.layer`.
    """
    fetch = fetch or local_fetch(spec)
    fmt = spec.get("format")
    folder, _ = _folder_and_file(spec)
    if fmt == "saelens":
        path = fetch("cfg.json")
        if path is None:
            return None
        cfg = _json(path)
        meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
        name = meta.get("hook_name") or cfg.get("hook_name")
        layer = meta.get("hook_layer", cfg.get("hook_layer"))
        head = meta.get("hook_head_index", cfg.get("hook_head_index"))
        if head is not None:
            raise ConfigError(
                f"{path}: hook_head_index = {head!r}: SAEs on one attention head are not supported"
            )
        hook = None
        if name:
            key = "metadata.hook_name" if meta.get("hook_name") else "hook_name"
            parsed_layer, hook = _parse_or_refuse(name, f"{path} {key}")
            layer = parsed_layer if parsed_layer is not None else layer
        if layer is None and hook is None:
            return None
        return Recorded(_int_or_none(layer), hook, f"{path.name} hook_name {name!r}")
    if fmt == "dictionary_learning":
        path = fetch("config.json")
        if path is None:
            return None
        cfg = _json(path)
        trainer = cfg.get("trainer") if isinstance(cfg.get("trainer"), dict) else cfg
        name, layer, hook = trainer.get("submodule_name"), trainer.get("layer"), None
        if name:
            parsed_layer, hook = _parse_or_refuse(name, f"{path} trainer.submodule_name")
            layer = parsed_layer if parsed_layer is not None else layer
        if layer is None and hook is None:
            return None
        return Recorded(_int_or_none(layer), hook, f"{path.name} submodule_name {name!r}")
    if fmt == "gemmascope":
        repo = str(spec.get("repo") or "")
        m = _GEMMASCOPE_RE.search(repo) or _GEMMASCOPE_RE.search(folder.split("/")[0])
        hook = _GEMMASCOPE_HOOKS[m.group(1)] if m else None
        lm = _LAYER_DIR_RE.search(folder)
        layer = int(lm.group(1)) if lm else None
        if layer is None and hook is None:
            return None
        return Recorded(layer, hook, f"GemmaScope {repo or 'path'} {folder!r}")
    if fmt == "sparsify":
        name = str(spec.get("hookpoint") or Path(folder).name)
        cfg_path = fetch("cfg.json")
        transcode = bool(_json(cfg_path).get("transcode")) if cfg_path is not None else False
        parsed = module_hook(name, side="input" if transcode else "output")
        if parsed is None:
            return None
        return Recorded(parsed[0], parsed[1], f"sparsify hookpoint {name!r}")
    if fmt == "temporal":
        path = fetch("conf.yaml")
        if path is None:
            return None
        import yaml

        try:
            conf = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError:
            return None
        llm = conf.get("llm") if isinstance(conf, dict) else None
        layer = llm.get("layer") if isinstance(llm, dict) else None
        hook = llm.get("hook") if isinstance(llm, dict) else None
        if hook is not None:
            hook = _parse_or_refuse(hook, f"{path} llm.hook")[1]
        if _int_or_none(layer) is None and hook is None:
            return None
        return Recorded(_int_or_none(layer), hook, f"{path.name} llm.layer")
    return None


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def check_recorded(recorded: Recorded | None, hp: HookPoint, what: str) -> None:
    """One line naming both when an SAE's recorded hook point is not `hp`."""
    if recorded is None:
        return
    if (recorded.layer is not None and recorded.layer != hp.layer) or (
        recorded.hook is not None and recorded.hook != hp.hook
    ):
        raise ConfigError(
            f"{what} would be given {hp} ({hp.tl_name}) activations, but its files record "
            f"{recorded.describe()}; set saes.<name>.hook / .layer to match the SAE, or use "
            "another SAE"
        )


def check_sae_hook(sae: Any, acts_manifest: Mapping[str, Any], where: str) -> None:
    """At job start: the SAE's recorded hook point against the activations it is given."""
    recorded = getattr(sae, "recorded_hook", None)
    if recorded is None or acts_manifest.get("layer") is None:
        return
    check_recorded(recorded, hookpoint_from(acts_manifest), where)


# ----------------------------------------------------------------------------- config

_CACHE_KEY = "_hookpoints"


def configured_hook(spec: Mapping[str, Any], key: str) -> tuple[int | None, str | None]:
    """(layer, hook) that `saes.<name>` sets explicitly; a TL-style hook name may carry a layer."""
    layer, hook = spec.get("layer"), spec.get("hook")
    if hook is not None:
        parsed_layer, hook = _parse_or_refuse(hook, f"{key}.hook")
        if parsed_layer is not None:
            if layer is not None and int(layer) != parsed_layer:
                raise ConfigError(
                    f"{key}.hook = {spec['hook']!r} names layer {parsed_layer} but "
                    f"{key}.layer = {layer}"
                )
            layer = parsed_layer
    return (int(layer) if layer is not None else None), hook


def resolve_sae_hookpoint(config: Mapping[str, Any], name: str) -> HookPoint:
    """The SAE's hook point: its files, else `saes.<name>.hook/layer`, else the model's layer.

    SAEs trained in the graph (`train:`) are outputs, so only the config decides for them. A
    configured value that its files contradict is a ConfigError naming both.
    """
    from saeflow.config import sae_spec

    spec = config["saes"][name]
    key = f"saes.{name}"
    layer, hook = configured_hook(spec, key)
    recorded = None
    if "train" not in spec and spec.get("source") != "organism":
        try:
            recorded = recorded_hook(sae_spec(dict(config), name))
        except DataError as err:
            raise ConfigError(f"{key}: {err}") from None
    model_layer = int(config["models"][spec["model"]]["layer"])
    if recorded is not None:
        given = HookPoint(
            next(x for x in (layer, recorded.layer, model_layer) if x is not None),
            hook or recorded.hook or DEFAULT_HOOK,
        )
        for field, mine, theirs in (
            ("layer", layer, recorded.layer),
            ("hook", hook, recorded.hook),
        ):
            if mine is not None and theirs is not None and mine != theirs:
                field = field if spec.get(field) is not None else "hook"  # layer from a TL name
                raise ConfigError(
                    f"{key}.{field} = {spec[field]!r}: the SAE would be given {given} "
                    f"({given.tl_name}) activations, but its files record {recorded.describe()}"
                )
        return given
    return HookPoint(model_layer if layer is None else layer, hook or DEFAULT_HOOK)


def _pairs(config: Mapping[str, Any]) -> set[tuple[str, str]]:
    """(model, sae) pairs whose codes the graph may compute: each SAE on its own model, plus
    every model an analysis names together with an SAE it names (diffing applies one SAE to
    both models; match_features pairs sides)."""
    pairs = {(spec["model"], name) for name, spec in config.get("saes", {}).items()}
    for a in config.get("analyses", []):
        models = [a.get("model"), *(a.get("models") or [])]
        saes = [a.get("sae")]
        for side in ("a", "b"):
            if isinstance(a.get(side), dict):
                pairs.add((a[side].get("model"), a[side].get("sae")))
        pairs |= {(m, s) for m in models for s in saes if m and s}
    return {(m, s) for m, s in pairs if m in config["models"] and s in config.get("saes", {})}


def prepare_hooks(config: dict[str, Any]) -> None:
    """Resolve every SAE's hook point and every model's cached hook points, before any job.

    Stores them under config["_hookpoints"] for the rules; raises ConfigError (one line) on an
    unknown hook name, a layer outside the model, or an SAE whose files disagree with the config.
    """
    from saeflow.config import model_n_layers

    saes = {name: resolve_sae_hookpoint(config, name) for name in config.get("saes", {})}
    models: dict[str, list[HookPoint]] = {}
    for name, spec in config["models"].items():
        layers = sorted({int(spec["layer"]), *(int(x) for x in spec.get("layers") or [])})
        hooks = spec.get("hooks", [DEFAULT_HOOK])
        for h in hooks:
            if h not in HOOKS:
                raise ConfigError(f"models.{name}.hooks: {h!r} is not one of {', '.join(HOOKS)}")
        models[name] = [HookPoint(layer, h) for layer in layers for h in hooks]
    for model, sae in sorted(_pairs(config)):
        models[model].append(saes[sae])
    for analysis in config.get("analyses", []):
        if analysis["type"] != "rep_similarity":
            continue
        for src in analysis["sources"]:
            if src.get("layer") is not None and not src.get("sae"):
                models[src["model"]].append(HookPoint(int(src["layer"]), DEFAULT_HOOK))
    for name, hps in models.items():
        models[name] = sort_hookpoints(hps)
        n_layers = model_n_layers(dict(config), name)
        if n_layers is None:
            continue
        for hp in models[name]:
            if hp.layer >= n_layers:
                users = sorted(s for m, s in _pairs(config) if m == name and saes[s] == hp)
                key = f"saes.{users[0]}" if users else f"models.{name}.layers"
                raise ConfigError(
                    f"{key}: layer {hp.layer} is outside models.{name} "
                    f"({n_layers} layers, 0..{n_layers - 1})"
                )
    config[_CACHE_KEY] = {
        "saes": {k: v.as_dict() for k, v in saes.items()},
        "models": {k: [hp.as_dict() for hp in v] for k, v in models.items()},
    }


def sae_hookpoint(config: Mapping[str, Any], name: str) -> HookPoint:
    """The hook point of `saes.<name>` (after `prepare_hooks`; resolved on the fly otherwise)."""
    cached = config.get(_CACHE_KEY, {}).get("saes", {}).get(name)
    return hookpoint_from(cached) if cached else resolve_sae_hookpoint(config, name)


def model_hookpoints(config: Mapping[str, Any], model: str) -> list[HookPoint]:
    """Every hook point the cache job of `model` captures, in forward order."""
    cached = config.get(_CACHE_KEY, {}).get("models", {}).get(model)
    if cached is None:
        raise ConfigError(f"models.{model}: hook points not resolved (call prepare_hooks)")
    return [hookpoint_from(x) for x in cached]


def model_hookpoint(
    config: Mapping[str, Any], model: str, layer: int | None = None, hook: str | None = None
) -> HookPoint:
    """A hook point of `model` (default: its `layer` at resid_post) that its cache job captures."""
    spec = config["models"][model]
    hp = HookPoint(int(spec["layer"]) if layer is None else int(layer), hook or DEFAULT_HOOK)
    if hp not in model_hookpoints(config, model):
        have = ", ".join(str(x) for x in model_hookpoints(config, model))
        raise ConfigError(
            f"models.{model}: {hp} is not cached (cached: {have}); add the layer to "
            f"models.{model}.layers or the hook to models.{model}.hooks"
        )
    return hp


def acts_dir(root: str, model: str, dataset: str, hp: HookPoint) -> str:
    """Activation folder of one hook point: {root}/activations/{model}/{dataset}/layer_L/hook."""
    return f"{root}/activations/{model}/{dataset}/{hp.folder}"


def publish_hookpoint(
    set_manifest: str | os.PathLike, layer: int, hook: str, out: str | os.PathLike
) -> dict[str, Any]:
    """Write one hook point's manifest.json from the set manifest that `cache_hookpoints` wrote.

    The rule graph declares only the set manifest as the cache job's output; this gives every
    hook point folder a declared output of its own, with the bytes the cache job wrote there.
    """
    from saeflow import io as sio

    set_manifest = Path(set_manifest)
    data = sio.read_json(set_manifest)
    for entry in data.get("hookpoints", []):
        if int(entry["layer"]) == int(layer) and entry["hook"] == hook:
            folder = Path(out).parent
            if folder.resolve() != (set_manifest.parent / entry["folder"]).resolve():
                raise DataError(f"{out}: not the folder of layer {layer} {hook} in {set_manifest}")
            for shard in entry["manifest"]["shards"]:
                if not (folder / shard["file"]).exists():
                    raise DataError(f"{folder / shard['file']}: missing; rerun cache_activations")
            sio.write_manifest(folder, entry["manifest"])
            return entry["manifest"]
    have = ", ".join(f"layer {e['layer']} {e['hook']}" for e in data.get("hookpoints", []))
    raise DataError(
        f"{set_manifest}: layer {layer} {hook} was not cached (it holds {have or 'nothing'})"
    )
