"""Seed 001's SAE named as SAELens names it: release + sae_id resolved offline via the registry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO
from test_sae_formats import _weights

from saeflow.config import load_config, sae_spec
from saeflow.errors import ConfigError
from saeflow.sae import load_sae
from saeflow.sae.registry import REGISTRY_PATH, apply_registry, load_registry, resolve

RELEASE, SAE_ID = "gemma-scope-9b-pt-res-canonical", "layer_20/width_131k/canonical"


def test_registry_is_vendored_with_its_licence() -> None:
    assert REGISTRY_PATH.exists()
    assert "MIT License" in (REGISTRY_PATH.parent / "pretrained_saes.LICENSE").read_text()
    assert len(load_registry()) > 50


def test_seed_001_sae_resolves_to_the_canonical_l0_114() -> None:
    got = resolve(RELEASE, SAE_ID)
    assert got == {
        "release": RELEASE,
        "sae_id": SAE_ID,
        "repo": "google/gemma-scope-9b-pt-res",
        "path": "layer_20/width_131k/average_l0_114",
        "format": "gemmascope",
        "neuronpedia": "gemma-2-9b/20-gemmascope-res-131k",
        "model": "gemma-2-9b",
    }
    assert resolve("gpt2-small-res-jb", "blocks.4.hook_resid_pre")["format"] == "saelens"


def test_9b_config_uses_it_offline(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = load_config(REPO / "configs" / "gemma-2-9b-introspection.yaml")
    spec = sae_spec(cfg, "scope20")
    assert spec["path"] == "layer_20/width_131k/average_l0_114"
    assert spec["repo"] == "google/gemma-scope-9b-pt-res" and spec["format"] == "gemmascope"
    assert spec["neuronpedia"] == "gemma-2-9b/20-gemmascope-res-131k"
    again = dict(cfg["saes"]["scope20"])
    apply_registry("scope20", again)  # resolving twice is harmless
    assert again == cfg["saes"]["scope20"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"neuronpedia": "gemma-2-9b/20-gemmascope-res-16k"},
            r"saes\.s\.neuronpedia = 'gemma-2-9b/20-gemmascope-res-16k': SAELens's registry gives "
            r"'gemma-2-9b/20-gemmascope-res-131k'",
        ),
        ({"format": "saelens"}, r"saes\.s\.format = 'saelens': .* as gemmascope"),
        ({"path": "layer_20/width_131k/average_l0_62"}, r"saes\.s\.path = .*average_l0_114"),
        ({"sae_id": "layer_20/width_131k/nope"}, r"saes\.s\.sae_id = .* has no such SAE"),
        ({"release": "gemma-scope-9b-pt-rez"}, r"saes\.s\.release = .* not in SAELens's registry"),
        ({"sae_id": None}, r"saes\.s: a SAELens-registry SAE needs both release and sae_id"),
    ],
)
def test_registry_disagreement_is_a_config_error(extra: dict, message: str) -> None:
    spec = {"release": RELEASE, "sae_id": SAE_ID, "model": "base", **extra}
    spec = {k: v for k, v in spec.items() if v is not None}
    with pytest.raises(ConfigError, match=message) as err:
        apply_registry("s", spec)
    assert "\n" not in str(err.value)


def test_unsupported_conversion_is_refused() -> None:
    with pytest.raises(ConfigError, match="conversion 'llama_scope', which saeflow has no loader"):
        resolve("llama_scope_lxr_8x", "l0r_8x")


def test_config_error_through_load_config(tmp_path: Path) -> None:
    cfg = yaml.safe_load((REPO / "configs" / "gemma-2-9b-introspection.yaml").read_text())
    cfg["saes"]["scope20"]["neuronpedia"] = "gemma-2-9b/20-gemmascope-res-16k"
    for name in ("introspective.jsonl", "control.jsonl"):
        (tmp_path / "prompts").mkdir(exist_ok=True)
        (tmp_path / "prompts" / name).write_text((REPO / "configs" / "prompts" / name).read_text())
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="links would open another SAE's features"):
        load_config(tmp_path / "c.yaml")


def test_registry_sae_loads_from_the_hub_cache(tmp_path: Path, monkeypatch) -> None:
    """The resolved spec downloads `{path}/params.npz` from the registry's repo."""
    import huggingface_hub

    w = _weights(3)
    np.savez(tmp_path / "params.npz", **{k: v.numpy() for k, v in w.items()})
    asked = []

    def fake_download(repo_id: str, filename: str, revision=None) -> str:
        asked.append((repo_id, filename))
        return str(tmp_path / "params.npz")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    spec = {"release": RELEASE, "sae_id": SAE_ID, "model": "base"}
    apply_registry("s", spec)
    sae = load_sae(spec)
    assert asked == [
        ("google/gemma-scope-9b-pt-res", "layer_20/width_131k/average_l0_114/params.npz")
    ]
    assert sae.d_sae == w["W_enc"].shape[1]
