"""EleutherAI sparsify SAEs and transcoders: files written by the library itself, and layouts
written here, both compared with an independent computation of the codes and outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from saeflow.errors import ConfigError, DataError
from saeflow.sae import load_sae
from saeflow.sae.sparsify import SparsifySAE, hook_of

FIXTURES = Path(__file__).parent / "data" / "sparsify"
LIBRARY_CASES = {
    "topk": ("layers.1", "blocks.1.hook_resid_post"),
    "groupmax": ("layers.2", "blocks.2.hook_resid_post"),
    "transcoder": ("layers.1.mlp", "blocks.1.ln2.hook_normalized"),
}


@pytest.mark.parametrize("case", sorted(LIBRARY_CASES))
def test_files_written_by_eai_sparsify(case: str) -> None:
    """`make_fixtures.py` ran eai-sparsify 1.3.3: its encode and forward are the reference."""
    hookpoint, hook_name = LIBRARY_CASES[case]
    expected = load_file(str(FIXTURES / case / "expected.safetensors"))
    sae = load_sae({"format": "sparsify", "path": str(FIXTURES / case / hookpoint)})
    assert isinstance(sae, SparsifySAE)
    x = expected["x"]
    codes = sae.encode(x)
    torch.testing.assert_close(codes, expected["codes"], rtol=1e-5, atol=1e-5)
    dense = torch.from_numpy(sae.encode_sparse(x).to_dense(sae.d_sae).numpy())
    torch.testing.assert_close(dense, expected["codes"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae(x).recon, expected["sae_out"], rtol=1e-5, atol=1e-5)
    assert sae.metadata["hookpoint"] == hookpoint
    assert sae.metadata["hook_name"] == hook_name
    assert sae.metadata["transcoder"] is (case == "transcoder")
    if case == "transcoder":
        assert sae.metadata["hook_name_out"] == "blocks.1.hook_mlp_out"
        assert sae.describe()["skip_connection"] is True


def _write(folder: Path, cfg: dict, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "sae.safetensors"))
    return folder


def _random_coder(d: int, f: int, *, skip: bool, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {
        "encoder.weight": torch.randn(f, d, generator=g),
        "encoder.bias": torch.randn(f, generator=g) * 0.1,
        "W_dec": torch.randn(f, d, generator=g),
        "b_dec": torch.randn(d, generator=g),
    }
    if skip:
        out["W_skip"] = torch.randn(d, d, generator=g) * 0.1
    return out


def _reference(
    t: dict[str, np.ndarray], x: np.ndarray, k: int, *, activation: str, transcode: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Codes and output in float64 numpy, written from the library's description."""
    xin = x if transcode else x - t["b_dec"]
    pre = np.maximum(xin @ t["encoder.weight"].T + t["encoder.bias"], 0)
    codes = np.zeros_like(pre)
    rows = np.arange(len(x))[:, None]
    if activation == "topk":
        idx = np.argsort(-pre, axis=1, kind="stable")[:, :k]
    else:
        size = pre.shape[1] // k
        idx = pre.reshape(len(x), k, size).argmax(-1) + np.arange(k) * size
    codes[rows, idx] = pre[rows, idx]
    y = codes @ t["W_dec"] + t["b_dec"]
    if "W_skip" in t:
        y = y + x @ t["W_skip"].T
    return codes, y


@pytest.mark.parametrize(
    ("activation", "transcode", "skip"),
    [
        ("topk", False, False),
        ("groupmax", False, False),
        ("topk", True, True),
        ("topk", False, True),
    ],
)
def test_layout_written_here(tmp_path: Path, activation: str, transcode: bool, skip: bool) -> None:
    d, f, k = 24, 96, 6
    tensors = _random_coder(d, f, skip=skip, seed=len(activation) + 2 * transcode + skip)
    cfg = {
        "activation": activation,
        "expansion_factor": 4,
        "normalize_decoder": True,
        "num_latents": 0,
        "k": k,
        "multi_topk": False,
        "skip_connection": skip,
        "transcode": transcode,
        "d_in": d,
    }
    folder = _write(tmp_path / "run" / "layers.3", cfg, tensors)
    x = torch.randn(40, d, generator=torch.Generator().manual_seed(9)) * 2
    codes_ref, y_ref = _reference(
        {n: v.double().numpy() for n, v in tensors.items()},
        x.double().numpy(),
        k,
        activation=activation,
        transcode=transcode,
    )
    sae = load_sae({"format": "sparsify", "path": str(folder)})
    np.testing.assert_allclose(sae.encode(x).numpy(), codes_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        sae.encode_sparse(x).to_dense(f).numpy(), codes_ref, rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(sae(x).recon.numpy(), y_ref, rtol=1e-4, atol=1e-3)
    assert sae.d_in == d and sae.d_sae == f and sae.metadata["layer"] == 3


def test_bf16_weights_and_the_hub_layout_of_a_run(tmp_path: Path) -> None:
    tensors = {k: v.bfloat16() for k, v in _random_coder(8, 32, skip=False, seed=0).items()}
    cfg = {"activation": "topk", "k": 2, "num_latents": 32, "d_in": 8}
    _write(tmp_path / "run" / "layers.0", cfg, tensors)
    _write(tmp_path / "run" / "layers.5", cfg, tensors)
    sae = load_sae({"format": "sparsify", "path": str(tmp_path / "run" / "layers.5")})
    assert (
        sae.W_enc.dtype == torch.float32 and sae.metadata["hook_name"] == "blocks.5.hook_resid_post"
    )
    with pytest.raises(
        ConfigError, match=r"one folder per hookpoint: set path to one of .*layers\.0"
    ):
        load_sae({"format": "sparsify", "path": str(tmp_path / "run")})


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"activation": "batchtopk"}, r"cfg.json: activation='batchtopk' is not supported"),
        ({"n_targets": 3}, r"cfg.json: n_targets=3 is not supported"),
        ({"embed_skip": True}, r"cfg.json: embed_skip=True is not supported"),
        ({"encoder_rank": 8}, r"cfg.json: encoder_rank=8 is not supported"),
        ({"jumprelu_init_threshold": 0.1}, r"cfg.json: unknown key jumprelu_init_threshold"),
        ({"num_latents": 50}, r"sae.safetensors: encoder has 32 latents but cfg.json says 50"),
    ],
)
def test_unsupported_variants_are_refused(tmp_path: Path, change: dict, match: str) -> None:
    cfg = {"activation": "topk", "k": 2, "num_latents": 32, "d_in": 8, **change}
    folder = _write(tmp_path / "layers.0", cfg, _random_coder(8, 32, skip=False, seed=1))
    with pytest.raises((ConfigError, DataError), match=match) as err:
        load_sae({"format": "sparsify", "path": str(folder)})
    assert len(str(err.value).splitlines()) == 1 and str(folder) in str(err.value)


def test_unexpected_tensor_is_refused(tmp_path: Path) -> None:
    src = FIXTURES / "transcoder" / "layers.1.mlp"
    folder = tmp_path / "layers.1.mlp"
    shutil.copytree(src, folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "skip_connection": False}))
    with pytest.raises(ConfigError, match=r"sae.safetensors: tensor 'W_skip' is not supported"):
        load_sae({"format": "sparsify", "path": str(folder)})


def test_hookpoint_names() -> None:
    assert hook_of("layers.7", transcode=False)["hook_name"] == "blocks.7.hook_resid_post"
    assert hook_of("h.2.mlp", transcode=False)["hook_name"] == "blocks.2.hook_mlp_out"
    assert hook_of("layers.0.self_attn", transcode=False)["hook_name"] == "blocks.0.hook_attn_out"
    tc = hook_of("layers.4.mlp", transcode=True)
    assert tc["hook_name"] == "blocks.4.ln2.hook_normalized"
    assert tc["hook_name_out"] == "blocks.4.hook_mlp_out" and tc["layer"] == 4
    assert hook_of("embed_tokens", transcode=False) == {
        "hookpoint": "embed_tokens",
        "hook_name": "embed_tokens",
        "layer": None,
    }


def test_transcoder_metrics_are_refused(tmp_path: Path) -> None:
    """Reconstruction metrics compare x_hat with the SAE's input; a transcoder predicts another
    activation, so sae_metrics refuses it in one line instead of reporting a wrong number."""
    from saeflow import io as sio
    from saeflow.sae.metrics import sae_metrics

    d = 8
    acts = tmp_path / "acts"
    acts.mkdir()
    sio.write_manifest(acts, {"d_model": d, "n_tokens": 0, "shards": []})
    codes = tmp_path / "codes"
    codes.mkdir()
    sio.write_manifest(codes, {"n_tokens": 0})
    cfg = {"activation": "topk", "k": 2, "num_latents": 16, "d_in": d, "transcode": True}
    folder = _write(tmp_path / "layers.0.mlp", cfg, _random_coder(d, 16, skip=False, seed=2))
    spec = {"format": "sparsify", "path": str(folder), "name": "tc"}
    with pytest.raises(ConfigError, match=r"saes.tc: a transcoder predicts blocks.0.hook_mlp_out"):
        sae_metrics(acts, codes, spec, {"layer": 0}, tmp_path / "t.parquet", tmp_path / "m.json")
    assert not (tmp_path / "m.json").exists()
