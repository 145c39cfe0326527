"""Each published SAE layout, written here by hand, loads and encodes like its equations say."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from saeflow.errors import ConfigError, DataError
from saeflow.sae import check_sae_matches, load_sae

D_IN, D_SAE, K = 16, 64, 5


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(D_IN, D_SAE, generator=g) * 0.3,
        "W_dec": torch.randn(D_SAE, D_IN, generator=g) * 0.3,
        "b_enc": torch.randn(D_SAE, generator=g) * 0.1,
        "b_dec": torch.randn(D_IN, generator=g) * 0.5,
        "threshold": torch.rand(D_SAE, generator=g) * 0.5,
    }


def _x(n: int = 40, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed)) * 2


def _topk_ref(pre: torch.Tensor, k: int) -> torch.Tensor:
    vals, idx = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter_(-1, idx, vals.relu())


def write_saelens(folder: Path, arch: str, *, apply_b_dec: bool = True, **extra) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    w = _weights()
    cfg = {
        "architecture": arch,
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": apply_b_dec,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"hook_name": "blocks.2.hook_resid_post", "sae_lens_version": "6.18.0"},
        **extra,
    }
    if arch == "topk":
        cfg.setdefault("k", K)
    tensors = {k: v for k, v in w.items() if arch == "jumprelu" or k != "threshold"}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    return w


@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_saelens_architectures(tmp_path: Path, arch: str, apply_b_dec: bool) -> None:
    w = write_saelens(tmp_path / "sae", arch, apply_b_dec=apply_b_dec)
    sae = load_sae({"format": "saelens", "path": str(tmp_path / "sae")})
    x = _x()
    sae_in = x - w["b_dec"] if apply_b_dec else x
    pre = sae_in @ w["W_enc"] + w["b_enc"]
    want = {
        "standard": pre.relu(),
        "topk": _topk_ref(pre, K),
        "jumprelu": pre.relu() * (pre > w["threshold"]),
    }[arch]
    out = sae(x)
    torch.testing.assert_close(out.novel, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.recon, want @ w["W_dec"] + w["b_dec"], atol=1e-5, rtol=1e-5)
    assert out.pred is None and sae.d_in == D_IN and sae.d_sae == D_SAE and not sae.is_temporal


def test_saelens_pre6_topk_and_norm_rescale(tmp_path: Path) -> None:
    w = write_saelens(
        tmp_path / "sae",
        "standard",
        activation_fn_str="topk",
        activation_fn_kwargs={"k": 3},
        normalize_activations="constant_norm_rescale",
    )
    sae = load_sae({"format": "saelens", "path": str(tmp_path / "sae")})
    x = _x()
    coeff = D_IN**0.5 / x.norm(dim=-1, keepdim=True)
    want = _topk_ref((x * coeff - w["b_dec"]) @ w["W_enc"] + w["b_enc"], 3)
    out = sae(x)
    torch.testing.assert_close(out.novel, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        out.recon, (want @ w["W_dec"] + w["b_dec"]) / coeff, atol=1e-5, rtol=1e-5
    )


def test_saelens_expected_average_needs_factor(tmp_path: Path) -> None:
    w = write_saelens(
        tmp_path / "sae", "standard", normalize_activations="expected_average_only_in"
    )
    sae = load_sae({"format": "saelens", "path": str(tmp_path / "sae"), "norm_scaling_factor": 2.5})
    x = _x()
    want = ((x * 2.5 - w["b_dec"]) @ w["W_enc"] + w["b_enc"]).relu()
    torch.testing.assert_close(sae.encode(x), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        sae(x).recon, (want @ w["W_dec"] + w["b_dec"]) / 2.5, atol=1e-5, rtol=1e-5
    )


def test_gemmascope(tmp_path: Path) -> None:
    w = _weights(3)
    folder = tmp_path / "layer_2" / "width_64" / "average_l0_5"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **{k: v.numpy() for k, v in w.items()})
    for path in (folder, folder / "params.npz"):
        sae = load_sae({"format": "gemmascope", "path": str(path)})
        x = _x()
        pre = x @ w["W_enc"] + w["b_enc"]
        want = pre.relu() * (pre > w["threshold"])
        torch.testing.assert_close(sae.encode(x), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            sae(x).recon, want @ w["W_dec"] + w["b_dec"], atol=1e-5, rtol=1e-5
        )


def write_dictionary_learning(folder: Path, dict_class: str) -> dict[str, torch.Tensor]:
    folder.mkdir(parents=True, exist_ok=True)
    w = _weights(5)
    if dict_class == "AutoEncoder":
        state = {
            "bias": w["b_dec"],
            "encoder.weight": w["W_enc"].T.contiguous(),
            "encoder.bias": w["b_enc"],
            "decoder.weight": w["W_dec"].T.contiguous(),
        }
    elif dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        state = {
            "k": torch.tensor(K, dtype=torch.int),
            "threshold": torch.tensor(0.2),
            "encoder.weight": w["W_enc"].T.contiguous(),
            "encoder.bias": w["b_enc"],
            "decoder.weight": w["W_dec"].T.contiguous(),
            "b_dec": w["b_dec"],
        }
    else:
        state = {k: w[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}
    torch.save(state, folder / "ae.pt")
    trainer = {"dict_class": dict_class, "activation_dim": D_IN, "dict_size": D_SAE, "k": K}
    (folder / "config.json").write_text(json.dumps({"trainer": trainer, "buffer": {}}))
    return w


@pytest.mark.parametrize(
    "dict_class", ["AutoEncoder", "AutoEncoderTopK", "BatchTopKSAE", "JumpReluAutoEncoder"]
)
def test_dictionary_learning(tmp_path: Path, dict_class: str) -> None:
    w = write_dictionary_learning(tmp_path / "trainer_0", dict_class)
    sae = load_sae({"format": "dictionary_learning", "path": str(tmp_path / "trainer_0")})
    x = _x()
    if dict_class == "JumpReluAutoEncoder":
        pre = x @ w["W_enc"] + w["b_enc"]
        want = (pre * (pre > w["threshold"])).relu()
    else:
        post = ((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]).relu()
        want = {
            "AutoEncoder": post,
            "AutoEncoderTopK": _topk_ref(post, K),
            "BatchTopKSAE": post * (post > 0.2),
        }[dict_class]
    out = sae(x)
    recon = want @ w["W_dec"] + w["b_dec"]
    if dict_class == "AutoEncoder":
        # dictionary_learning's from_pretrained normalises decoder columns: codes scale by norms.
        norms = w["W_dec"].norm(dim=1)
        want = want * norms
    torch.testing.assert_close(out.novel, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.recon, recon, atol=1e-5, rtol=1e-5)


def test_hub_download_passes_repo_path_revision(tmp_path: Path, monkeypatch) -> None:
    write_saelens(tmp_path / "blocks.2", "topk")
    calls = []

    def fake_download(repo_id: str, filename: str, revision: str | None = None, **kw) -> str:
        calls.append((repo_id, filename, revision))
        return str(tmp_path / filename)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    sae = load_sae({"format": "saelens", "repo": "org/saes", "path": "blocks.2", "revision": "v1"})
    assert sae.k == K
    assert calls == [
        ("org/saes", "blocks.2/cfg.json", "v1"),
        ("org/saes", "blocks.2/sae_weights.safetensors", "v1"),
    ]


def test_truncated_safetensors_is_one_clear_error(tmp_path: Path) -> None:
    write_saelens(tmp_path / "sae", "standard")
    weights = tmp_path / "sae" / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"sae_weights\.safetensors: not a readable safetensors"):
        load_sae({"format": "saelens", "path": str(tmp_path / "sae")})


def test_missing_key_names_file_and_key(tmp_path: Path) -> None:
    folder = tmp_path / "sae"
    write_saelens(folder, "jumprelu")
    w = _weights()
    del w["threshold"]
    save_file(w, str(folder / "sae_weights.safetensors"))
    with pytest.raises(DataError, match=r"sae_weights\.safetensors: missing tensor 'threshold'"):
        load_sae({"format": "saelens", "path": str(folder)})


def test_wrong_shape_names_numbers(tmp_path: Path) -> None:
    folder = tmp_path / "sae"
    write_saelens(folder, "standard")
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["d_in"] = 32
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(DataError, match=r"'W_enc' has shape \(16, 64\), expected \(32, 64\)"):
        load_sae({"format": "saelens", "path": str(folder)})


def test_d_in_mismatch_with_model(tmp_path: Path) -> None:
    write_saelens(tmp_path / "sae", "standard")
    sae = load_sae({"format": "saelens", "path": str(tmp_path / "sae")})
    check_sae_matches(sae, D_IN, "saes.x")
    with pytest.raises(ConfigError, match=r"saes\.x: SAE .* has d_in=16 but .* d_model=128"):
        check_sae_matches(sae, 128, "saes.x")


class NotATensor:
    """A pickled object that weights_only loading must refuse."""

    def __init__(self) -> None:
        self.payload = [1, 2, 3]


def test_pickled_object_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "trainer_0"
    write_dictionary_learning(folder, "AutoEncoder")
    torch.save({"encoder.weight": torch.zeros(2, 2), "evil": NotATensor()}, folder / "ae.pt")
    with pytest.raises(DataError, match=r"ae\.pt: refused to load: it holds pickled Python"):
        load_sae({"format": "dictionary_learning", "path": str(folder)})


def test_missing_folder_and_bad_format(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_sae({"format": "saelens", "path": str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match="format='nope'"):
        load_sae({"format": "nope", "path": str(tmp_path)})
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"has no cfg\.json"):
        load_sae({"format": "saelens", "path": str(tmp_path / "empty")})
