"""Hook points: names, what SAE files record, HF module resolution checked against independent
computations, splicing, config resolution and errors, and many hook points in one pass."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from _fixtures_models import make_tiny_model, tiny_config, write_tokens
from conftest import TINY_DATA, done_shards
from safetensors.torch import save_file

from saeflow.activations import (
    TEST_DELAY_ENV,
    cache_activations,
    cache_hookpoints,
    load_activations,
)
from saeflow.config import load_config
from saeflow.errors import ConfigError, DataError
from saeflow.hooks import (
    HOOKS,
    HookPoint,
    Recorded,
    acts_dir,
    model_hookpoints,
    parse_hook_name,
    publish_hookpoint,
    recorded_hook,
    sae_hookpoint,
)
from saeflow.io import read_manifest
from saeflow.models import capture_hooks, splice_hook

SRC = str(Path(__file__).resolve().parents[1] / "src")
LAYER = 1


# ----------------------------------------------------------------------------- names


def test_parse_hook_names():
    assert parse_hook_name("mlp_out") == (None, "mlp_out")
    assert parse_hook_name("blocks.6.hook_resid_pre") == (6, "resid_pre")
    assert parse_hook_name("blocks.0.attn.hook_z") == (0, "attn_z")
    assert parse_hook_name("blocks.3.ln2.hook_normalized") == (3, "mlp_in")
    assert parse_hook_name("blocks.3.hook_mlp_in") == (3, "resid_mid")
    assert parse_hook_name("resid_post_layer_19") == (19, "resid_post")
    assert parse_hook_name("layers.6") == (6, "resid_post")
    assert parse_hook_name("layers.6.mlp") == (6, "mlp_out")
    assert parse_hook_name("model.layers.2.self_attn") == (2, "attn_out")
    assert parse_hook_name("gpt_neox.layers.0.attention") == (0, "attn_out")
    assert parse_hook_name("h.4") == (4, "resid_post")
    assert parse_hook_name("hook_embed") is None
    assert parse_hook_name("blocks.2.attn.hook_pattern") is None
    hp = HookPoint(6, "mlp_out")
    assert hp.folder == "layer_6/mlp_out" and hp.tl_name == "blocks.6.hook_mlp_out"
    assert parse_hook_name(hp.tl_name) == (6, "mlp_out")
    assert acts_dir("results", "m", "d", hp) == "results/activations/m/d/layer_6/mlp_out"
    with pytest.raises(ConfigError, match="hook 'mlp'"):
        HookPoint(1, "mlp")


def _saelens(folder: Path, hook_name: str | None, d_in: int = 32, **top) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"hook_name": hook_name} if hook_name else {}
    cfg = {"architecture": "topk", "d_in": d_in, "d_sae": 8, "k": 2, "dtype": "float32",
           "apply_b_dec_to_input": True, "normalize_activations": "none",
           "metadata": meta, **top}  # fmt: skip
    (folder / "cfg.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)
    save_file(
        {
            "W_enc": torch.randn(d_in, 8, generator=g),
            "W_dec": torch.randn(8, d_in, generator=g),
            "b_enc": torch.zeros(8),
            "b_dec": torch.zeros(d_in),
        },
        str(folder / "sae_weights.safetensors"),
    )
    return folder


def test_recorded_hook_of_each_layout(tmp_path):
    six = _saelens(tmp_path / "six", "blocks.4.hook_mlp_out")
    assert recorded_hook({"format": "saelens", "path": str(six)})[:2] == (4, "mlp_out")
    old = tmp_path / "old"
    old.mkdir()
    (old / "cfg.json").write_text(
        json.dumps({"hook_name": "blocks.2.attn.hook_z", "hook_layer": 2})
    )
    assert recorded_hook({"format": "saelens", "path": str(old)})[:2] == (2, "attn_z")
    silent = _saelens(tmp_path / "silent", None)
    assert recorded_hook({"format": "saelens", "path": str(silent)}) is None
    embed = _saelens(tmp_path / "embed", "hook_embed")
    with pytest.raises(ConfigError, match="hook_embed"):
        recorded_hook({"format": "saelens", "path": str(embed)})

    head = _saelens(
        tmp_path / "head",
        "blocks.2.attn.hook_z",
        metadata={"hook_name": "blocks.2.attn.hook_z", "hook_head_index": 3},
    )
    with pytest.raises(ConfigError, match="hook_head_index = 3"):
        recorded_hook({"format": "saelens", "path": str(head)})

    dl = tmp_path / "resid_post_layer_3" / "trainer_0"
    dl.mkdir(parents=True)
    trainer = {"dict_class": "BatchTopKSAE", "layer": 3, "submodule_name": "resid_post_layer_3"}
    (dl / "config.json").write_text(json.dumps({"trainer": trainer}))
    got = recorded_hook({"format": "dictionary_learning", "path": str(dl / "ae.pt")})
    assert (got.layer, got.hook) == (3, "resid_post")

    for suffix, hook in (("res", "resid_post"), ("mlp", "mlp_out"), ("att", "attn_z")):
        spec = {"format": "gemmascope", "repo": f"google/gemma-scope-2b-pt-{suffix}",
                "path": "layer_12/width_16k/average_l0_82/params.npz"}  # fmt: skip
        assert recorded_hook(spec, lambda name: None)[:2] == (12, hook)
    local = {
        "format": "gemmascope",
        "path": "gemma-scope-9b-pt-res-canonical/layer_20/x/params.npz",
    }
    assert recorded_hook(local, lambda name: None)[:2] == (20, "resid_post")

    sp = tmp_path / "sae-pythia" / "layers.5.mlp"
    sp.mkdir(parents=True)
    (sp / "cfg.json").write_text(json.dumps({"k": 4, "d_in": 32}))
    assert recorded_hook({"format": "sparsify", "path": str(sp)})[:2] == (5, "mlp_out")
    (sp / "cfg.json").write_text(json.dumps({"k": 4, "d_in": 32, "transcode": True}))
    assert recorded_hook({"format": "sparsify", "path": str(sp)})[:2] == (5, "mlp_in")

    tm = tmp_path / "temporal"
    tm.mkdir()
    (tm / "conf.yaml").write_text(yaml.safe_dump({"llm": {"layer": 12, "dimin": 32}}))
    assert recorded_hook({"format": "temporal", "path": str(tm)})[:2] == (12, None)


# ----------------------------------------------------------------------------- HF modules


def _model(kind: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    if kind.startswith("neox"):
        config = GPTNeoXConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=64,
            use_parallel_residual=kind == "neox_parallel",
        )
    else:
        config = tiny_config(kind)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def _parts(model: torch.nn.Module, kind: str):
    """(block, pre-MLP norm, MLP hidden function, attention out-proj, sublayer post-norms)."""
    from saeflow.models import layer_modules

    block = layer_modules(model)[LAYER]
    if kind == "gpt2":
        mlp = block.mlp
        return block, block.ln_2, lambda x: mlp.act(mlp.c_fc(x)), block.attn.c_proj, None
    if kind.startswith("neox"):
        mlp = block.mlp
        hidden = lambda x: mlp.act(mlp.dense_h_to_4h(x))  # noqa: E731
        return block, block.post_attention_layernorm, hidden, block.attention.dense, None
    mlp = block.mlp
    hidden = lambda x: mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)  # noqa: E731
    if kind == "gemma2":
        posts = (block.post_attention_layernorm, block.post_feedforward_layernorm)
        return block, block.pre_feedforward_layernorm, hidden, block.self_attn.o_proj, posts
    return block, block.post_attention_layernorm, hidden, block.self_attn.o_proj, None


def _down(block, kind):
    if kind == "gpt2":
        return block.mlp.c_proj
    return block.mlp.dense_4h_to_h if kind.startswith("neox") else block.mlp.down_proj


@pytest.mark.parametrize("kind", ["gpt2", "llama", "gemma2", "neox_seq", "neox_parallel"])
def test_hooks_match_an_independent_forward(kind):
    """Each hook against output_hidden_states and a manual forward of the block's modules."""
    model = _model(kind)
    ids = torch.randint(4, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    hooks = [h for h in HOOKS if not (kind == "neox_parallel" and h == "resid_mid")]
    got = dict(
        zip(hooks, capture_hooks(model, [(LAYER, h) for h in hooks], ids, mask), strict=True)
    )
    from saeflow.models import model_inputs

    with torch.no_grad():
        hs = model(**model_inputs(model, ids, mask), output_hidden_states=True).hidden_states
        block, norm2, hidden, o_proj, posts = _parts(model, kind)
        x = hs[LAYER]
        torch.testing.assert_close(got["resid_pre"], x)
        torch.testing.assert_close(got["resid_post"], hs[LAYER + 1])
        # attn_z through the output projection (and Gemma-2's post-norm) is attn_out
        attn_from_z = o_proj(got["attn_z"])
        if posts is not None:
            attn_from_z = posts[0](attn_from_z)
        torch.testing.assert_close(attn_from_z, got["attn_out"])
        mid = x + got["attn_out"]
        mlp_src = x if kind == "neox_parallel" else mid
        if kind != "neox_parallel":
            torch.testing.assert_close(got["resid_mid"], mid)
        torch.testing.assert_close(got["mlp_in"], norm2(mlp_src))
        torch.testing.assert_close(got["mlp_post"], hidden(norm2(mlp_src)))
        mlp_out = _down(block, kind)(hidden(norm2(mlp_src)))
        if posts is not None:
            mlp_out = posts[1](mlp_out)
        torch.testing.assert_close(got["mlp_out"], mlp_out)
        # the three sum to the block output, which hidden_states gives independently
        torch.testing.assert_close(x + got["attn_out"] + got["mlp_out"], hs[LAYER + 1])
    if kind == "neox_parallel":
        with pytest.raises(ConfigError, match="parallel"):
            capture_hooks(model, [(LAYER, "resid_mid")], ids, mask)


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_splice_hook(kind):
    """Identity splices leave the logits alone; zeroing mlp_out or replacing resid_mid changes
    the block output exactly as a manual forward says."""
    model = _model(kind)
    ids = torch.randint(4, 64, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        clean = model(input_ids=ids).logits
        for hook in HOOKS:
            with splice_hook(model, LAYER, hook, lambda a: a.clone()):
                torch.testing.assert_close(model(input_ids=ids).logits, clean)
        mid, post = capture_hooks(model, [(LAYER, "resid_mid"), (LAYER, "resid_post")], ids, mask)
        with splice_hook(model, LAYER, "mlp_out", torch.zeros_like):
            (zeroed,) = capture_hooks(model, [(LAYER, "resid_post")], ids, mask)
        torch.testing.assert_close(zeroed, mid)
        shift = torch.randn(mid.shape[-1], generator=torch.Generator().manual_seed(3))
        with splice_hook(model, LAYER, "resid_mid", lambda a: a + shift):
            (moved,) = capture_hooks(model, [(LAYER, "resid_post")], ids, mask)
        block, norm2, hidden, _, posts = _parts(model, kind)
        new_mid = mid + shift
        mlp_out = block.mlp(norm2(new_mid))
        if posts is not None:
            mlp_out = posts[1](mlp_out)
        torch.testing.assert_close(moved, new_mid + mlp_out)
        assert not torch.allclose(moved, post)


# ----------------------------------------------------------------------------- config


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("m") / "llama", n_layers=3)


def _config(tmp_path: Path, llama: Path, sae: Path | None = None, **sae_keys) -> dict:
    shutil.copy2(TINY_DATA, tmp_path / TINY_DATA.name)
    cfg = {
        "models": {"base": {"hf_name": str(llama), "layer": 2}, "chat": {"hf_name": str(llama),
                   "layer": 2}},
        "datasets": {"qa": {"source": "file", "path": TINY_DATA.name, "chat": True,
                            "fields": {"instruction": "question"}}},
        "saes": {},
        "analyses": [],
    }  # fmt: skip
    if sae is not None:
        cfg["saes"]["s"] = {"format": "saelens", "path": str(sae), "model": "base", **sae_keys}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return load_config(path)


def test_sae_hook_from_files_config_or_default(tmp_path, llama):
    sae = _saelens(tmp_path / "sae", "blocks.1.hook_mlp_out")
    cfg = _config(tmp_path, llama, sae)
    assert sae_hookpoint(cfg, "s") == HookPoint(1, "mlp_out")
    assert model_hookpoints(cfg, "base") == [HookPoint(1, "mlp_out"), HookPoint(2, "resid_post")]
    assert model_hookpoints(cfg, "chat") == [HookPoint(2, "resid_post")]
    # the config may say the same thing, in either spelling
    assert sae_hookpoint(_config(tmp_path, llama, sae, hook="mlp_out"), "s").layer == 1
    assert sae_hookpoint(_config(tmp_path, llama, sae, hook="blocks.1.hook_mlp_out"), "s")
    # files that record nothing: the config, else the model's layer at resid_post
    silent = _saelens(tmp_path / "silent", None)
    assert sae_hookpoint(_config(tmp_path, llama, silent), "s") == HookPoint(2, "resid_post")
    cfg = _config(tmp_path, llama, silent, hook="resid_pre", layer=0)
    assert sae_hookpoint(cfg, "s") == HookPoint(0, "resid_pre")


def test_several_layers_and_hooks_per_model(tmp_path, llama):
    shutil.copy2(TINY_DATA, tmp_path / TINY_DATA.name)
    sae = _saelens(tmp_path / "sae", "blocks.0.attn.hook_z")
    cfg = {
        "models": {"base": {"hf_name": str(llama), "layer": 2, "layers": [0, 2],
                            "hooks": ["resid_pre", "resid_post"]},
                   "chat": {"hf_name": str(llama), "layer": 1, "hooks": []}},
        "datasets": {"qa": {"source": "file", "path": TINY_DATA.name}},
        "saes": {"s": {"format": "saelens", "path": str(sae), "model": "base"}},
        "analyses": [{"type": "diffing", "name": "d", "models": ["base", "chat"], "sae": "s",
                      "target": "qa", "control": "qa", "token_types": {"last": -1}}],
    }  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    cfg = load_config(tmp_path / "c.yaml")
    assert model_hookpoints(cfg, "base") == [
        HookPoint(0, "resid_pre"),
        HookPoint(0, "attn_z"),
        HookPoint(0, "resid_post"),
        HookPoint(2, "resid_pre"),
        HookPoint(2, "resid_post"),
    ]
    # diffing applies the SAE to both models, so chat caches its hook point too
    assert model_hookpoints(cfg, "chat") == [HookPoint(0, "attn_z")]


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"hook": "resid_post"}, "saes.s.hook = 'resid_post': the SAE would be given layer 1 "
         "resid_post (blocks.1.hook_resid_post) activations, but its files record layer 1 mlp_out"),
        ({"layer": 2}, "saes.s.layer = 2: the SAE would be given layer 2 mlp_out"),
        ({"hook": "blocks.0.hook_mlp_out"}, "saes.s.hook = 'blocks.0.hook_mlp_out': the SAE would "
         "be given layer 0 mlp_out (blocks.0.hook_mlp_out) activations, but its files record"),
        ({"hook": "hook_embed"}, "saes.s.hook = 'hook_embed': not a hook point"),
    ],
)  # fmt: skip
def test_recorded_hook_disagreeing_with_config_is_one_line(tmp_path, llama, keys, message):
    sae = _saelens(tmp_path / "sae", "blocks.1.hook_mlp_out")
    with pytest.raises(ConfigError) as err:
        _config(tmp_path, llama, sae, **keys)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert "record" not in message or "blocks.1.hook_mlp_out" in str(err.value)


def test_sae_layer_outside_the_model(tmp_path, llama):
    sae = _saelens(tmp_path / "sae", "blocks.7.hook_resid_post")
    with pytest.raises(ConfigError, match=r"saes\.s: layer 7 is outside models\.base \(3 layers"):
        _config(tmp_path, llama, sae)


# ----------------------------------------------------------------------------- caching


def _seqs(n: int = 14, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(4, 64, size=rng.integers(1, 12)).tolist() for _ in range(n)]


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    return write_tokens(tmp_path_factory.mktemp("tok") / "tokens.parquet", _seqs())


HPS = [HookPoint(2, "attn_z"), HookPoint(0, "resid_post"), HookPoint(1, "mlp_out"),
       HookPoint(1, "resid_pre"), HookPoint(0, "mlp_post")]  # fmt: skip
KW = {"batch_size": 3, "fmt": "parquet", "shard_tokens": 20, "device": "cpu", "threads": 1}


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def test_one_pass_equals_separate_passes(tmp_path, llama, tokens):
    """Every hook point of one pass has the bytes of its own single-hook run, and the rows equal
    an independent per-sequence forward."""
    root = tmp_path / "set"
    set_manifest = cache_hookpoints({"path": str(llama), "name": "m"}, tokens, root, HPS, **KW)
    order = [(e["layer"], e["hook"]) for e in set_manifest["hookpoints"]]
    assert order == [(0, "mlp_post"), (0, "resid_post"), (1, "resid_pre"), (1, "mlp_out"),
                     (2, "attn_z")]  # fmt: skip
    assert read_manifest(root)["hookpoints"] == set_manifest["hookpoints"]
    for hp in HPS:
        alone = tmp_path / hp.folder
        m = cache_activations({"path": str(llama), "name": "m"}, tokens, alone, layer=hp.layer,
                              hook=hp.hook, **KW)  # fmt: skip
        assert m["hook"] == hp.hook and m["hook_name"] == hp.tl_name
        assert _files(root / hp.folder) == _files(alone), hp
    from saeflow.models import load_lm

    model = load_lm(llama, device="cpu", dtype="float32")
    seq_N, pos_N, acts_ND = load_activations(root / "layer_1" / "mlp_out")
    for s, ids in enumerate(_seqs()):
        (ref,) = capture_hooks(
            model, [(1, "mlp_out")], torch.tensor([ids]), torch.ones(1, len(ids))
        )
        torch.testing.assert_close(acts_ND[seq_N == s], ref[0], rtol=1e-5, atol=1e-5)
    assert np.array_equal(pos_N[seq_N == 0], np.arange(len(_seqs()[0])))


def test_publish_hookpoint(tmp_path, llama, tokens):
    root = tmp_path / "set"
    cache_hookpoints({"path": str(llama)}, tokens, root, HPS[:2], **KW)
    want = (root / "layer_2" / "attn_z" / "manifest.json").read_bytes()
    (root / "layer_2" / "attn_z" / "manifest.json").unlink()
    publish_hookpoint(root / "manifest.json", 2, "attn_z", root / "layer_2/attn_z/manifest.json")
    assert (root / "layer_2" / "attn_z" / "manifest.json").read_bytes() == want
    with pytest.raises(DataError, match="layer 1 mlp_out was not cached"):
        publish_hookpoint(root / "manifest.json", 1, "mlp_out", root / "layer_1/mlp_out/m.json")


_CHILD = """
import sys
from saeflow.activations import cache_hookpoints
from saeflow.hooks import HookPoint
hps = [HookPoint(int(x.split(":")[0]), x.split(":")[1]) for x in sys.argv[4].split(",")]
cache_hookpoints({"path": sys.argv[1]}, sys.argv[2], sys.argv[3], hps, batch_size=3,
                 fmt="parquet", shard_tokens=20, device="cpu", threads=1)
"""


def test_multi_hook_kill_then_resume(tmp_path, llama, tokens, caplog):
    """One hook point cached earlier, more added, the job killed between shards: the resumed
    run skips what each hook point has, and every folder has the bytes of a clean run."""
    root = tmp_path / "killed"
    first = HPS[1]
    cache_hookpoints({"path": str(llama)}, tokens, root, [first], **KW)
    arg = ",".join(f"{hp.layer}:{hp.hook}" for hp in HPS)
    env = {**os.environ, "PYTHONPATH": SRC, TEST_DELAY_ENV: "1.0"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(llama), str(tokens), str(root), arg],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    watch = root / HPS[0].folder
    deadline = time.monotonic() + 300  # guards against a hang only; nothing is timed
    try:
        while done_shards(watch) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    n_done = {hp: done_shards(root / hp.folder) for hp in HPS}
    assert not (root / "manifest.json").exists(), "a killed job left the set manifest"
    with caplog.at_level(logging.INFO, logger="saeflow"):
        cache_hookpoints({"path": str(llama)}, tokens, root, HPS, **KW)
    n = len(read_manifest(root / first.folder)["shards"])
    assert n_done[first] == n and 2 <= n_done[HPS[0]] < n
    for hp in HPS:
        assert f"{hp}: skipped {n_done[hp]} of {n} shards" in caplog.text
    clean = tmp_path / "clean"
    cache_hookpoints({"path": str(llama)}, tokens, clean, HPS, **KW)
    for hp in HPS:
        assert _files(root / hp.folder) == _files(clean / hp.folder), hp
    assert _files(root) == _files(clean)


def test_job_start_check_names_both(tmp_path, llama, tokens):
    """An SAE whose files record another hook than the activations it is given: one line."""
    from saeflow.sae.encode import encode_sae

    acts = tmp_path / "acts"
    cache_activations({"path": str(llama)}, tokens, acts, layer=1, **KW)
    sae = _saelens(tmp_path / "sae", "blocks.1.hook_mlp_out")
    with pytest.raises(ConfigError) as err:
        encode_sae(acts, {"format": "saelens", "path": str(sae), "name": "s"},
                   tmp_path / "codes" / "manifest.json", runtime={"device": "cpu"})  # fmt: skip
    text = str(err.value)
    assert "blocks.1.hook_resid_post" in text and "blocks.1.hook_mlp_out" in text, text
    assert "\n" not in text
    assert isinstance(recorded_hook({"format": "saelens", "path": str(sae)}), Recorded)


def test_metrics_splice_the_sae_at_its_hook(tmp_path, llama, tokens):
    """CE loss of an mlp_out SAE replaces the MLP output: an identity SAE recovers the clean
    loss, and zero ablation equals an independent forward with that MLP's output zeroed."""
    import torch.nn.functional as F  # noqa: N812

    from saeflow.models import layer_modules, load_lm
    from saeflow.sae.encode import encode_sae
    from saeflow.sae.metrics import sae_metrics

    acts = tmp_path / "acts"
    cache_activations({"path": str(llama)}, tokens, acts, layer=1, hook="mlp_out", **KW)
    sae = tmp_path / "sae"
    sae.mkdir()
    eye = torch.eye(32)
    save_file({"W_enc": torch.cat([eye, -eye], 1), "W_dec": torch.cat([eye, -eye], 0),
               "b_enc": torch.zeros(64), "b_dec": torch.zeros(32)},
              str(sae / "sae_weights.safetensors"))  # fmt: skip
    cfg = {"architecture": "standard", "d_in": 32, "d_sae": 64, "apply_b_dec_to_input": True,
           "metadata": {"hook_name": "blocks.1.hook_mlp_out"}}  # fmt: skip
    (sae / "cfg.json").write_text(json.dumps(cfg))
    spec = {"format": "saelens", "path": str(sae), "name": "s"}
    codes = tmp_path / "codes" / "manifest.json"
    encode_sae(acts, spec, codes, runtime={"device": "cpu"})
    result = sae_metrics(acts, codes, spec, {"path": str(llama), "layer": 2}, tokens,
                         tmp_path / "m.json", runtime={"device": "cpu"},
                         metrics_cfg={"ce_batch_size": 4, "ce_max_sequences": 6})  # fmt: skip
    assert (result["layer"], result["hook"]) == (1, "mlp_out")
    assert result["ce_loss_recon"] == pytest.approx(result["ce_loss_clean"], rel=1e-5)

    model = load_lm(llama, device="cpu", dtype="float32", with_head=True)

    def zero_after_first(_m, _a, out):
        new = torch.zeros_like(out)
        new[:, 0] = out[:, 0]
        return new

    handle = layer_modules(model)[1].mlp.register_forward_hook(zero_after_first)
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for ids in [s for s in _seqs() if len(s) >= 2][:6]:
                x = torch.tensor([ids])
                logits = model(input_ids=x).logits
                total += float(F.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum"))
                count += len(ids) - 1
    finally:
        handle.remove()
    assert result["ce_loss_zero"] == pytest.approx(total / count, rel=1e-4)
