"""A catalogue of bad configs and bad artifacts: each is one `saeflow` line that names the key or
file (and, for a typo, the nearest valid name), raised before any job where it can be known then;
and nothing computed earlier is lost.

Most cases are unit-level (`saeflow.config.load_config`, the loaders), so they are fast. The
workflow cases at the end run snakemake on a clone of the finished tiny run and compare every byte
under results/ before and after, and check that reordering, JSON and keys at their defaults plan
no job while one changed UMAP value plans exactly that UMAP, its page and the index.
"""

from __future__ import annotations

import copy
import json
import math
import pickle
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY, clone_run, dry_run, files_under, job_names, run_snakemake
from test_config_errors import _set, tiny_config, write_config

from saeflow import config as sfc
from saeflow.config import load_config
from saeflow.errors import ConfigError, DataError, SaeflowError

Mutation = Callable[[dict[str, Any]], None]


def _analysis(cfg: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(a for a in cfg["analyses"] if a["type"] == kind)


def _in(kind: str, key: str, value: Any) -> Mutation:
    def apply(cfg: dict[str, Any]) -> None:
        _analysis(cfg, kind)[key] = value

    return apply


def _add_dataset(name: str, spec: dict[str, Any], content: str | None = None) -> Mutation:
    """A `file` dataset beside the config (content written by the test through `spec['path']`)."""

    def apply(cfg: dict[str, Any]) -> None:
        cfg["datasets"][name] = spec
        cfg.setdefault("_files", {})[spec["path"]] = content

    return apply


def _similarity_on(dataset: str, ids: list[int]) -> Mutation:
    def apply(cfg: dict[str, Any]) -> None:
        sim = _analysis(cfg, "similarity")
        sim["dataset"], sim["sequences"] = dataset, ids
        if dataset == "gsm8k":
            sim["codes"], sim["sae"], sim["model"] = "total", "topk", "base"

    return apply


def _local_sae(cfg: dict[str, Any]) -> None:
    cfg["saes"]["mine"] = {"format": "saelens", "source": "local", "model": "base", "path": "nope"}


def _drop(path: str) -> Mutation:
    def apply(cfg: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = cfg
        for part in parents:
            node = node[part]
        del node[last]

    return apply


def _both(*mutations: Mutation) -> Mutation:
    def apply(cfg: dict[str, Any]) -> None:
        for m in mutations:
            m(cfg)

    return apply


CHAT_BAD_ROLE = json.dumps({"messages": [{"content": "hi"}]})
CHAT_NOT_LIST = json.dumps({"messages": "hello"})
CHAT_NOT_OBJECT = json.dumps({"messages": ["hello"]})

# (mutation, words the one line must contain)
CONFIG_CASES = [
    # unknown keys, with the nearest valid name
    (_set("organism.base_lm.num_layer", 2), ["organism.base_lm.num_layer", "num_layers"]),
    (_set("organism.corpus.n_storys", 9), ["organism.corpus.n_storys", "n_stories"]),
    (_set("organism.tokenizer.vocab", 9), ["organism.tokenizer.vocab", "vocab_size"]),
    (_set("organism.chat.stepz", 3), ["organism.chat.stepz", "steps"]),
    (_set("organism.chatt", {}), ["organism.chatt", "chat"]),
    (_set("saes.topk.train.stepz", 3), ["saes.topk.train.stepz", "steps"]),
    (_set("saes.temporal.train.exp_facter", 2), ["saes.temporal.train.exp_facter", "exp_factor"]),
    (_set("saes.topk.train.n_heads", 2), ["saes.topk.train.n_heads", "unknown key"]),
    (_set("saes.topk.train.widht", 8), ["saes.topk.train.widht", "width"]),
    (_in("umap", "n_neigbors", 3), ["analyses[1].n_neigbors", "umap analysis", "n_neighbors"]),
    (_in("umap", "report", {"colour": "role"}), ["analyses[1].report.colour", "color"]),
    (_in("similarity", "centre", False), ["analyses[2].centre", "center"]),
    (_in("mfa", "epoch", 3), ["analyses[3].epoch", "epochs"]),
    (_in("mfa", "steer", {"prompt": ["x"]}), ["analyses[3].steer.prompt", "prompts"]),
    (_in("top_examples", "n_example", 3), ["analyses[4].n_example", "n_examples"]),
    (_in("match_features", "topk", 3), ["analyses[5].topk", "top_k"]),
    (_in("match_features", "a", {"modle": "base", "sae": "topk"}), ["analyses[5].a.modle"]),
    (_in("decoder_umap", "n_neighbours", 3), ["analyses[6].n_neighbours", "n_neighbors"]),
    (_in("mapper", "n_interval", 3), ["analyses[7].n_interval", "n_intervals"]),
    (_in("diffing", "metric", ["target_max"]), ["analyses[0].metric", "metrics"]),
    (_in("umap", "type", "umapp"), ["analyses[1].type", "umap"]),
    (_set("runtime.sead", 1), ["runtime.sead", "seed"]),
    (_set("encode.batch_token", 8), ["encode.batch_token", "batch_tokens"]),
    (_set("metrics.ce_batch", 8), ["metrics.ce_batch", "ce_batch_size"]),
    (_set("activations.shard_tokenz", 8), ["activations.shard_tokenz", "shard_tokens"]),
    (_set("models.base.batchsize", 8), ["models.base.batchsize", "batch_size"]),
    (_set("datasets.gsm8k.feilds", {}), ["datasets.gsm8k.feilds", "fields"]),
    (_set("datasets.gsm8k.fields", {"txt": "question"}), ["datasets.gsm8k.fields.txt", "text"]),
    (_set("saes.topk.eval_dataset", []), ["saes.topk.eval_dataset", "eval_datasets"]),
    (_set("analysis", []), ["analysis", "analyses"]),
    # wrong values and types
    (_set("models.base.layer", 1.0), ["models.base.layer", "integer", "write 1"]),
    (_set("datasets.dialogues.num_sequences", 24.0), ["num_sequences", "integer"]),
    (_set("organism.base_lm.steps", 6.5), ["organism.base_lm.steps", "integer"]),
    (_set("saes.topk.train.k", 4.0), ["saes.topk.train.k", "integer"]),
    (_in("umap", "n_components", 4), ["analyses[1].n_components"]),
    (_in("mfa", "psi", "shard"), ["analyses[3].psi", "shared"]),
    (_set("saes.topk.format", "saelen"), ["saes.topk.format", "saelens"]),
    (_set("umap_warmup", "yes"), ["umap_warmup"]),
    (_set("models.base.revision", 1234567), ["models.base.revision", "quote it"]),
    (_in("mfa", "steer", {"alphas": ["a"]}), ["analyses[3].steer.alphas[0]"]),
    (_in("similarity", "sequences", [-1]), ["analyses[2].sequences[0]"]),
    (_set("organism.chat.loss_on", "models"), ["organism.chat.loss_on", "model"]),
    (_drop("saes.topk.train.datasets"), ["saes.topk.train", "datasets"]),
    # cheap content checks at -n time
    (_in("similarity", "sequences", [0, 9999]), ["analyses[2].sequences", "9999", "24 sequences"]),
    (_similarity_on("gsm8k", [6]), ["analyses[2].sequences", "sequence 6", "6 sequences"]),
    (
        _both(_drop("datasets.dialogues.num_sequences"), _in("similarity", "sequences", [30])),
        ["analyses[2].sequences", "sequence 30", "24 sequences"],
    ),
    (_local_sae, ["saes.mine.path", "'nope'", "no such file"]),
    (
        _add_dataset("blank", {"source": "file", "path": "blank.txt"}, "\n   \n\n"),
        ["datasets.blank.path", "no records"],
    ),
    (
        _add_dataset("chat1", {"source": "file", "path": "c1.jsonl"}, CHAT_BAD_ROLE + "\n"),
        ["datasets.chat1", "record 0", "no role"],
    ),
    (
        _add_dataset("chat2", {"source": "file", "path": "c2.jsonl"}, CHAT_NOT_LIST + "\n"),
        ["datasets.chat2", "record 0", "list of {role, content}"],
    ),
    (
        _add_dataset("chat3", {"source": "file", "path": "c3.jsonl"}, CHAT_NOT_OBJECT + "\n"),
        ["datasets.chat3", "message 0 is not an object"],
    ),
    (
        _add_dataset(
            "nulls",
            {"source": "file", "path": "n.jsonl"},
            '{"text": "fine"}\n{"text": null}\n',
        ),
        ["datasets.nulls", "record 1", "'text'", "missing or null"],
    ),
    (
        _add_dataset(
            "holes",
            {"source": "file", "path": "h.jsonl"},
            '{"text": "fine"}\n' * 3 + '{"other": "x"}\n',
        ),
        ["datasets.holes", "record 3", "missing or null"],
    ),
    (
        _add_dataset(
            "noq",
            {"source": "file", "path": "q.jsonl", "fields": {"instruction": "q"}},
            '{"q": "a"}\n{"q": null}\n',
        ),
        ["datasets.noq", "record 1", "'q'"],
    ),
    (_both(_set("models.base.source", "hub"), _drop("models.base.organism")), ["source", "hf"]),
]


def _case_id(case: tuple[Mutation, list[str]]) -> str:
    return re.sub(r"[^A-Za-z0-9_.\[\]-]+", "-", case[1][0])[:48]


def _write(tmp_path: Path, cfg: dict[str, Any]) -> Path:
    files = cfg.pop("_files", {})
    path = write_config(tmp_path, cfg)
    for name, content in files.items():
        (tmp_path / name).write_text(content)
    return path


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    assert "Traceback" not in message
    return message


@pytest.mark.parametrize(("mutate", "words"), CONFIG_CASES, ids=[_case_id(c) for c in CONFIG_CASES])
def test_bad_config_is_one_line(tmp_path, mutate, words):
    cfg = tiny_config()
    mutate(cfg)
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, cfg))
    message = _one_line(err)
    for word in words:
        assert word in message, message


# ----------------------------------------------------------------------------- config files

TINY_TEXT = TINY.read_text()
TINY_LINES = TINY_TEXT.splitlines()
RUNTIME_LINE = "runtime: {device: auto, dtype: bfloat16, seed: 0}"
TOKENIZER_LINE = "  tokenizer: {vocab_size: 320}"
N_RUNTIME = TINY_LINES.index(RUNTIME_LINE) + 1
N_TOKENIZER = TINY_LINES.index(TOKENIZER_LINE) + 1
FILE_CASES = [
    (
        TINY_TEXT + "\nruntime: {seed: 1}\n",
        ["'runtime'", "given twice", f"line {N_RUNTIME} and line {len(TINY_LINES) + 2}"],
        "top",
    ),
    (
        TINY_TEXT.replace(TOKENIZER_LINE, TOKENIZER_LINE + "\n  tokenizer: {vocab_size: 64}"),
        ["'tokenizer'", "given twice", f"line {N_TOKENIZER} and line {N_TOKENIZER + 1}"],
        "nested",
    ),
    (
        TINY_TEXT.replace(RUNTIME_LINE, "runtime: {device: auto, seed: 0, seed: 1}"),
        ["'seed'", "given twice"],
        "flow",
    ),
    ("__use_yte__: true\n" + TINY_TEXT, ["__use_yte__", "data only"], "yte"),
    ("", ["is empty"], "empty"),
    ("# only a comment\n", ["is empty"], "comment-only"),
    ("- a\n- b\n", ["top level must be a mapping"], "list"),
    ("models:\n  base: {layer: 1\ndatasets:\n", ["line", "not valid YAML"], "syntax"),
]


@pytest.mark.parametrize(("text", "words", "kind"), FILE_CASES, ids=[c[2] for c in FILE_CASES])
def test_bad_config_file_is_one_line(tmp_path, text, words, kind):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = _one_line(err)
    assert str(path) in message, message
    for word in words:
        assert word in message, message


def test_bad_json_config_files(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"models": {}, "models": {}}')
    with pytest.raises(ConfigError, match="'models' is given twice"):
        load_config(path)
    path.write_text('{"models": {\n  "a": 1,\n}')
    with pytest.raises(ConfigError, match=r"line 3 column 1 is not valid JSON"):
        load_config(path)


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    cfg_text = TINY_TEXT.replace("steps: 6,", "steps: 6, lr: 1e-3,", 1)
    path = tmp_path / "config.yaml"
    path.write_text(cfg_text)
    shutil.copy2(TINY.parent / "gsm8k_tiny.jsonl", tmp_path)
    assert load_config(path)["organism"]["base_lm"]["lr"] == 1e-3


# ----------------------------------------------------------------------------- canonical config


def _reorder(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _reorder(value[k]) for k in reversed(list(value))}
    if isinstance(value, list):
        return [_reorder(v) for v in value]
    return value


def _slices(cfg: dict[str, Any]) -> str:
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    return repr(sfc.canonical(cfg))


def test_reordered_json_and_defaults_give_the_same_canonical_config(tmp_path):
    raw = tiny_config()
    base = _slices(load_config(write_config(tmp_path / "a", raw)))
    assert _slices(load_config(write_config(tmp_path / "b", _reorder(raw)))) == base
    json_dir = tmp_path / "c"
    write_config(json_dir, raw)
    (json_dir / "config.json").write_text(json.dumps(_reorder(raw), indent=1))
    assert _slices(load_config(json_dir / "config.json")) == base
    with_defaults = copy.deepcopy(raw)
    with_defaults["organism"]["base_lm"]["lr"] = 3e-3
    with_defaults["organism"]["chat"]["loss_on"] = "all"
    _analysis(with_defaults, "umap")["hover_window"] = 50
    _analysis(with_defaults, "mfa")["steer"]["chat"] = False
    with_defaults["saes"]["topk"]["train"]["holdout_every"] = 10
    assert _slices(load_config(write_config(tmp_path / "d", with_defaults))) == base
    whole = copy.deepcopy(raw)
    _analysis(whole, "umap")["min_dist"] = 1  # a whole number for a `number` key
    _analysis(raw, "umap")["min_dist"] = 1.0
    assert _slices(load_config(write_config(tmp_path / "e", whole))) == _slices(
        load_config(write_config(tmp_path / "f", raw))
    )


def test_canonical_plain_types():
    from collections import OrderedDict

    value = OrderedDict(b=(1, 2), a={"y": np.float32(0.5), "x": np.int64(3)}, c={2, 1})
    out = sfc.canonical(value)
    assert repr(out) == "{'a': {'x': 3, 'y': 0.5}, 'b': [1, 2], 'c': [1, 2]}"
    assert type(out["a"]["x"]) is int and type(out["a"]["y"]) is float


def test_schema_defaults_match_the_code_defaults():
    """Defaults live in the schema; the modules' own tables must agree with it."""
    from saeflow.embedding import UMAP_DEFAULTS
    from saeflow.geometry import decoder_umap, mapper, matching, top_examples
    from saeflow.mfa import MFA_DEFAULTS
    from saeflow.organism import corpus, lm, tokenizer
    from saeflow.sae.train import TEMPORAL_DEFAULTS, TOPK_DEFAULTS

    defs = sfc.load_schema()["$defs"]

    def defaults(block: str) -> dict[str, Any]:
        return {k: v.get("default") for k, v in defs[block]["properties"].items()}

    def agree(block: str, table: dict[str, Any]) -> None:
        schema = defaults(block)
        for key, value in table.items():
            assert key in schema, f"{block}: {key} missing from the schema"
            if key == "steer":
                continue
            assert schema[key] == value, f"{block}.{key}: schema {schema[key]!r} != {value!r}"

    agree("organism_corpus", corpus.DEFAULTS)
    agree("organism_tokenizer", tokenizer.DEFAULTS)
    agree("organism_base_lm", lm.BASE_DEFAULTS)
    agree("organism_chat", lm.CHAT_DEFAULTS)
    agree("train_topk", TOPK_DEFAULTS)
    agree("train_temporal", TEMPORAL_DEFAULTS)
    agree("analysis_umap", UMAP_DEFAULTS)
    agree("analysis_mfa", MFA_DEFAULTS)
    steer = {
        k: v.get("default")
        for k, v in defs["analysis_mfa"]["properties"]["steer"]["properties"].items()
    }
    assert steer == MFA_DEFAULTS["steer"]
    agree("analysis_top_examples", top_examples.DEFAULTS)
    agree("analysis_match_features", matching.DEFAULTS)
    agree("analysis_decoder_umap", decoder_umap.DEFAULTS)
    agree("analysis_mapper", mapper.DEFAULTS)


def test_every_analysis_type_is_one_closed_block():
    schema = sfc.load_schema()
    kinds = sfc.analysis_types(schema)
    assert {"diffing", "umap", "similarity", "mfa", "mapper"} <= set(kinds)
    for kind in kinds:
        block = schema["$defs"][f"analysis_{kind}"]
        assert block["additionalProperties"] is False
        assert block["properties"]["type"] == {"const": kind}


def test_public_config_is_plain_for_yaml():
    from collections import OrderedDict

    cfg = OrderedDict(models=OrderedDict(a=OrderedDict(layer=1)), _config_dir=".")
    assert yaml.safe_load(yaml.safe_dump(sfc.public_config(cfg))) == {"models": {"a": {"layer": 1}}}


# ----------------------------------------------------------------------------- artifacts


def _acts(tmp_path: Path) -> Path:
    from test_encode import write_acts

    return write_acts(tmp_path / "acts", [[4, 3], [5], [2, 2]], 8)


def _edit_manifest(manifest: Path, change: Callable[[dict[str, Any]], None]) -> None:
    data = json.loads(manifest.read_text())
    change(data)
    manifest.write_text(json.dumps(data))


def _load_acts(manifest: Path) -> None:
    from saeflow.activations import load_activations

    load_activations(manifest)


def _expect(call: Callable[[], Any], *words: str) -> str:
    with pytest.raises(SaeflowError) as err:
        call()
    message = _one_line(err)
    for word in words:
        assert word in message, message
    assert "weights_only=False" not in message
    return message


def test_activation_manifest_dtype_disagrees_with_itemsize(tmp_path):
    manifest = _acts(tmp_path)
    _edit_manifest(manifest, lambda m: m.update(dtype="bfloat16"))
    _expect(lambda: _load_acts(manifest), "manifest.json", "itemsize 4")


def test_activation_manifest_drops_a_shard(tmp_path):
    manifest = _acts(tmp_path)
    _edit_manifest(manifest, lambda m: m["shards"].pop(1))
    _expect(lambda: _load_acts(manifest), "manifest.json", "n_tokens")


def test_activation_shard_missing(tmp_path):
    manifest = _acts(tmp_path)
    (manifest.parent / "part-00001.parquet").unlink()
    _expect(lambda: _load_acts(manifest), "part-00001.parquet", "missing")


def test_activation_shard_swapped(tmp_path):
    manifest = _acts(tmp_path)
    shutil.copy2(manifest.parent / "part-00000.parquet", manifest.parent / "part-00001.parquet")
    _expect(lambda: _load_acts(manifest), "part-00001.parquet", "rows")


def test_activation_manifest_not_json(tmp_path):
    manifest = _acts(tmp_path)
    manifest.write_text("{not json")
    _expect(lambda: _load_acts(manifest), "manifest.json", "not valid JSON", "rerun")


def test_activation_manifest_not_an_object(tmp_path):
    manifest = _acts(tmp_path)
    manifest.write_text("[1, 2]")
    _expect(lambda: _load_acts(manifest), "manifest.json", "JSON object")


def test_truncated_parquet_shard(tmp_path):
    manifest = _acts(tmp_path)
    shard = manifest.parent / "part-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:100])
    _expect(lambda: _load_acts(manifest), "part-00000.parquet", "Parquet", "truncated")


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_pt_activation_shard(tmp_path):
    manifest = _acts(tmp_path)
    _edit_manifest(
        manifest,
        lambda m: m.update(format="pt", shards=[{"file": "part-00000.pt", "n_tokens": 7}]),
    )
    _edit_manifest(manifest, lambda m: m.update(n_tokens=7))
    with open(manifest.parent / "part-00000.pt", "wb") as f:
        pickle.dump({"act": _Evil()}, f)
    _expect(lambda: _load_acts(manifest), "part-00000.pt", "pickled", "never unpickles")


def _codes(tmp_path: Path) -> Path:
    from test_encode import write_acts
    from test_sae_formats import write_saelens

    from saeflow.sae import encode as enc

    acts = write_acts(tmp_path / "acts", [[4, 3], [5]], 16)
    write_saelens(tmp_path / "sae", "topk")
    spec = {"name": "sae", "format": "saelens", "path": str(tmp_path / "sae")}
    out = tmp_path / "codes" / "manifest.json"
    enc.encode_sae(acts, spec, out, runtime={"device": "cpu"}, encode_cfg={})
    return out


def test_codes_manifest_counts_disagree(tmp_path):
    from saeflow.codes import load_codes

    out = _codes(tmp_path)
    _edit_manifest(out, lambda m: m["shard_tokens"].pop())
    _expect(lambda: load_codes(out), "manifest.json", "shard token counts")
    _edit_manifest(out, lambda m: m.update(shard_tokens=[7, 6]))
    _expect(lambda: load_codes(out), "manifest.json", "n_tokens")


def test_codes_manifest_not_json_and_missing_shard(tmp_path):
    from saeflow.codes import load_codes

    out = _codes(tmp_path)
    (out.parent / "part-00001.parquet").unlink()
    _expect(lambda: load_codes(out), "part-00001.parquet", "missing")
    out.write_text("")
    _expect(lambda: load_codes(out), "manifest.json", "not valid JSON")


def test_sae_with_nan_weights(tmp_path):
    from safetensors.torch import load_file, save_file
    from test_sae_formats import write_saelens

    from saeflow.sae import load_sae

    write_saelens(tmp_path / "sae", "topk")
    weights = load_file(str(tmp_path / "sae" / "sae_weights.safetensors"))
    weights["W_enc"][0, 0] = math.nan
    save_file(weights, str(tmp_path / "sae" / "sae_weights.safetensors"))
    spec = {"name": "bad", "format": "saelens", "path": str(tmp_path / "sae")}
    _expect(lambda: load_sae(spec), "saes.bad", "W_enc", "NaN")


def test_metrics_json_is_strict(tmp_path):
    from saeflow import io as sio

    path = tmp_path / "m.json"
    sio.write_json(path, {"ve": math.nan, "ce": [np.float32("inf"), 1.0], "n": np.int64(2)})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"ce": [None, 1.0], "n": 2, "ve": None}


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    from _fixtures_models import make_tiny_model

    return make_tiny_model("llama", tmp_path_factory.mktemp("lm") / "lm", n_layers=2)


def _copy_lm(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def _load_lm(path: Path, **kw: Any) -> Any:
    from saeflow.models import load_lm

    return load_lm(path, device="cpu", dtype="float32", **kw)


def test_model_with_pickled_weights_only(tmp_path, tiny_lm):
    lm = _copy_lm(tiny_lm, tmp_path / "lm")
    state = {"w": torch.zeros(2)}
    torch.save(state, lm / "pytorch_model.bin")
    (lm / "model.safetensors").unlink()
    message = _expect(lambda: _load_lm(lm), "pytorch_model.bin", "pickle", "safetensors")
    assert "weights_only" not in message


def test_model_with_truncated_safetensors(tmp_path, tiny_lm):
    lm = _copy_lm(tiny_lm, tmp_path / "lm")
    blob = (lm / "model.safetensors").read_bytes()
    (lm / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    _expect(lambda: _load_lm(lm), "model.safetensors", "truncated")


def test_model_needing_custom_code(tmp_path, tiny_lm):
    lm = _copy_lm(tiny_lm, tmp_path / "lm")
    cfg = json.loads((lm / "config.json").read_text())
    cfg.update(model_type="my_own_lm", auto_map={"AutoConfig": "modeling_mine.MyConfig"})
    (lm / "config.json").write_text(json.dumps(cfg))
    _expect(lambda: _load_lm(lm), str(lm), "trust_remote_code", "models.<name>")


def test_model_folder_without_config(tmp_path, tiny_lm):
    lm = _copy_lm(tiny_lm, tmp_path / "lm")
    (lm / "config.json").unlink()
    _expect(lambda: _load_lm(lm), "config.json")


def test_tokenizer_folder_missing_files(tmp_path, tiny_lm):
    from saeflow.tokenize import load_tokenizer

    lm = _copy_lm(tiny_lm, tmp_path / "lm")
    for name in ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model"):
        (lm / name).unlink(missing_ok=True)
    _expect(lambda: load_tokenizer(str(lm)), str(lm), "tokenizer files")


def _with_local_model(folder: Path) -> Mutation:
    def apply(cfg: dict[str, Any]) -> None:
        cfg["models"]["real"] = {"hf_name": str(folder), "layer": 0}

    return apply


@pytest.mark.parametrize("damage", ["custom-code", "pickled", "truncated", "no-tokenizer"])
def test_local_model_folder_is_checked_before_any_job(tmp_path, tiny_lm, damage):
    lm = _copy_lm(tiny_lm, tmp_path / "lm")
    if damage == "custom-code":
        cfg = json.loads((lm / "config.json").read_text())
        cfg.update(model_type="my_own_lm", auto_map={"AutoConfig": "modeling_mine.MyConfig"})
        (lm / "config.json").write_text(json.dumps(cfg))
        words = ["models.real.hf_name", "trust_remote_code"]
    elif damage == "pickled":
        torch.save({"w": torch.zeros(2)}, lm / "pytorch_model.bin")
        (lm / "model.safetensors").unlink()
        words = ["models.real.hf_name", "pytorch_model.bin", "never loads"]
    elif damage == "truncated":
        blob = (lm / "model.safetensors").read_bytes()
        (lm / "model.safetensors").write_bytes(blob[:-100])
        words = ["models.real.hf_name", "model.safetensors", "truncated"]
    else:
        for name in ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model"):
            (lm / name).unlink(missing_ok=True)
        words = ["models.real.hf_name", "tokenizer files"]
    cfg = tiny_config()
    _with_local_model(lm)(cfg)
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path / "cfg", cfg))
    message = _one_line(err)
    for word in words:
        assert word in message, message


def test_diffing_prompt_cut_by_context_length(tmp_path):
    from _fixtures_models import write_tokens

    from saeflow.diffing import run_diffing

    tokens = {
        s: {m: write_tokens(tmp_path / f"{s}_{m}.parquet", [[1, 2, 3, 4]] * 2) for m in "ab"}
        for s in ("target", "control")
    }
    analysis = {
        "name": "d",
        "models": ["a", "b"],
        "target": "t",
        "control": "c",
        "sae": "s",
        "token_types": {"model": -1},
    }
    with pytest.raises(DataError) as err:
        run_diffing(
            analysis,
            tokens=tokens,
            codes={s: {m: tmp_path / "none" for m in "ab"} for s in tokens},
            features_out=tmp_path / "f.parquet",
            summary_out=tmp_path / "s.json",
            context_lengths={"target": 4, "control": None},
        )
    message = _one_line(err)
    assert "datasets.t.context_length = 4" in message and "before the model turn" in message


# ----------------------------------------------------------------------------- workflow level


@pytest.fixture(scope="module")
def finished(tiny_run, tmp_path_factory):
    """One clone of the finished tiny run shared by the read-only checks below."""
    return clone_run(tiny_run, tmp_path_factory.mktemp("bad") / "wf")


def _tiny_cfg(run) -> dict[str, Any]:
    return yaml.safe_load(run.configfile.read_text())


def _text_with(run, mutate: Mutation | None = None, *, text: str | None = None) -> str:
    if text is not None:
        return text
    cfg = _tiny_cfg(run)
    mutate(cfg)
    return yaml.safe_dump(cfg, sort_keys=False)


def _dup(run) -> str:
    return run.configfile.read_text() + "\nruntime: {seed: 1}\n"


WORKFLOW_CASES = [
    ("organism-typo", _set("organism.base_lm.num_layer", 3), "num_layers"),  # train_base_lm
    ("train-typo", _set("saes.topk.train.stepz", 3), "steps"),  # train_sae
    ("shards-typo", _set("activations.shard_tokenz", 64), "shard_tokens"),  # cache_activations
    ("umap-typo", _in("umap", "n_neigbors", 3), "n_neighbors"),  # umap (one file)
    ("layer-float", _set("models.chat.layer", 1.0), "write 1"),  # cache_activations
    ("similarity-ids", _in("similarity", "sequences", [0, 9999]), "9999"),  # similarity manifest
    ("duplicate-key", None, "given twice"),
]


@pytest.mark.workflow
@pytest.mark.parametrize(
    ("name", "mutate", "word"), WORKFLOW_CASES, ids=[c[0] for c in WORKFLOW_CASES]
)
def test_config_mistake_on_a_finished_run_changes_no_byte(finished, name, mutate, word):
    before = files_under(finished.results)
    bad = finished.workdir / f"bad-{name}.yaml"
    bad.write_text(_dup(finished) if mutate is None else _text_with(finished, mutate))
    proc = run_snakemake(
        finished.workdir, "--cores", "1", "--configfile", bad.name, check=False, timeout=300
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-3000:]
    lines = [line for line in text.splitlines() if line.startswith("saeflow: ")]
    assert len(lines) == 1 and word in lines[0], text[-3000:]
    assert "Traceback" not in text
    assert files_under(finished.results) == before


@pytest.mark.workflow
def test_reordered_json_and_default_keys_plan_nothing(finished):
    cfg = _tiny_cfg(finished)
    work = finished.workdir
    (work / "sorted.yaml").write_text(yaml.safe_dump(cfg, sort_keys=True))
    (work / "reversed.json").write_text(json.dumps(_reorder(cfg), indent=2))
    defaults = copy.deepcopy(cfg)
    defaults["organism"]["base_lm"]["lr"] = 3.0e-3
    defaults["saes"]["topk"]["train"]["holdout_every"] = 10
    _analysis(defaults, "umap")["hover_window"] = 50
    _analysis(defaults, "mapper")["baseline"] = "permute"
    (work / "defaults.yaml").write_text(yaml.safe_dump(defaults, sort_keys=False))
    for name in ("sorted.yaml", "reversed.json", "defaults.yaml"):
        assert dry_run(work, "--configfile", name) == [], name


@pytest.mark.workflow
def test_json_config_runs_report_index(tiny_run, tmp_path):
    run = clone_run(tiny_run, tmp_path / "wf")
    (run.workdir / "c.json").write_text(json.dumps(_tiny_cfg(run)))
    run_snakemake(
        run.workdir, "--cores", "1", "--configfile", "c.json", "--forcerun", "report_index"
    )
    assert "introspection" in (run.results / "reports" / "index.html").read_text()


@pytest.mark.workflow
def test_one_umap_value_plans_that_umap_its_page_and_the_index(finished):
    cfg = _tiny_cfg(finished)
    umap = _analysis(cfg, "umap")
    umap["n_neighbors"] += 1
    (finished.workdir / "umap.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    jobs = dry_run(finished.workdir, "--configfile", "umap.yaml")
    name = umap["name"]
    assert job_names(jobs) == {
        f"umap[analysis={name}]",
        f"report_umap[analysis={name}]",
        "report_index",
    }, jobs


def test_check_command_names_file_and_line(tmp_path, capsys):
    """`python -m saeflow.config FILE`: what Snakemake's own --configfile message cannot say."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  base: {layer: 1\n")
    assert sfc.main([str(bad)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("saeflow: config error: config file") and "line 3" in err, err
    (tmp_path / "empty.yaml").write_text("")
    assert sfc.main([str(tmp_path / "empty.yaml")]) == 1
    assert "is empty" in capsys.readouterr().err
    assert sfc.main([str(write_config(tmp_path / "ok", tiny_config()))]) == 0


def test_corpus_sizes_match_the_generated_corpus():
    from saeflow.organism.corpus import generate_corpus

    cfg = load_config(write_config(Path(tempfile.mkdtemp()), tiny_config()))["organism"]["corpus"]
    made = generate_corpus(cfg, seed=0)
    assert sfc.corpus_sizes(cfg) == {name: len(rows) for name, rows in made.items()}


def test_a_job_failing_on_bad_input_prints_one_line(tmp_path):
    """A script entry point (log_to) that raises a saeflow error: one line, exit status 1."""
    import subprocess
    import sys

    log = tmp_path / "job.log"
    code = (
        "from saeflow.utils import log_to\n"
        "from saeflow.errors import DataError\n"
        f"log_to({str(log)!r})\n"
        "raise DataError('results/x/manifest.json: not valid JSON; rerun')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    want = "saeflow: data error: results/x/manifest.json: not valid JSON; rerun"
    assert proc.returncode == 1
    assert proc.stderr.strip() == want, proc.stderr
    assert log.read_text().strip() == want
