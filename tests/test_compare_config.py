"""Config errors of the compare analyses: one ConfigError naming the key, before any job."""

from __future__ import annotations

import shutil

import pytest
import yaml
from conftest import TINY, TINY_DATA

from saeflow.config import load_config
from saeflow.errors import ConfigError


def _load(tmp_path, mutate):
    cfg = yaml.safe_load(TINY.read_text())
    mutate(cfg)
    shutil.copy2(TINY_DATA, tmp_path / TINY_DATA.name)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return load_config(path, check_files=False)


def _of(cfg, kind):
    return next(a for a in cfg["analyses"] if a["type"] == kind)


def test_tiny_compare_analyses_get_schema_defaults(tmp_path):
    cfg = _load(tmp_path, lambda c: None)
    rep = _of(cfg, "rep_similarity")
    assert rep["skip_pos0"] is True and rep["svcca_variance"] == 0.99
    assert rep["sources"][0]["layer"] is None
    assert rep["keywords"]["min_frac"] == 0.5
    assert _of(cfg, "match_features")["labels"]["n_pairs"] == 50
    assert _of(cfg, "feature_families")["min_children"] == 2
    assert _of(cfg, "sae_steer")["chat"] is False


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (
            lambda c: _of(c, "rep_similarity")["sources"][1].update(model="nope"),
            r"sources\[1\]\.model = 'nope'",
        ),
        (
            lambda c: _of(c, "rep_similarity")["sources"][2].update(sae="nope"),
            r"sources\[2\]\.sae = 'nope'",
        ),
        (
            lambda c: _of(c, "feature_families").update(match="topk_examples"),
            r"match = 'topk_examples': no match_features",
        ),
        (lambda c: _of(c, "sae_steer").update(sae="temporal"), "temporal SAE"),
        (lambda c: _of(c, "sae_steer").pop("dataset"), r"features = null"),
        (lambda c: _of(c, "rep_similarity").update(pca_dim=0), "pca_dim"),
        (
            lambda c: _of(c, "rep_similarity")["sources"][0].update(layer=2),
            r"sources\[0\]\.layer = 2: the model has 2 layers",
        ),
        (lambda c: _of(c, "sae_steer").update(alphas=[]), "alphas"),
    ],
)
def test_bad_compare_config_names_the_key(tmp_path, mutate, match):
    with pytest.raises(ConfigError, match=match):
        _load(tmp_path, mutate)
