"""Config checks of the compare analyses, called from `saeflow.config.check_semantics`."""

from __future__ import annotations

from typing import Any

from saeflow.errors import ConfigError


def check_compare_analysis(config: dict[str, Any], analysis: dict[str, Any], key: str) -> None:
    """Names the analyses refer to exist and fit: one ConfigError naming the key otherwise."""
    from saeflow.config import _need, model_n_layers

    kind = analysis["type"]
    if kind == "rep_similarity":
        for j, src in enumerate(analysis.get("sources", [])):
            _need(config, "models", src.get("model"), f"{key}.sources[{j}].model")
            layer = src.get("layer")
            n_layers = model_n_layers(config, src["model"]) if layer is not None else None
            if n_layers is not None and not 0 <= layer < n_layers:
                raise ConfigError(
                    f"{key}.sources[{j}].layer = {layer}: the model has {n_layers} layers "
                    f"(0..{n_layers - 1})"
                )
            if src.get("sae") is not None:
                _need(config, "saes", src["sae"], f"{key}.sources[{j}].sae")
    elif kind == "feature_families":
        ref = analysis.get("match")
        found = [a for a in config.get("analyses", []) if a["name"] == ref]
        if not found or found[0]["type"] != "match_features":
            raise ConfigError(f"{key}.match = {ref!r}: no match_features analysis of that name")
    elif kind == "sae_steer":
        sae = config["saes"][analysis["sae"]]
        if sae["format"] == "temporal":
            raise ConfigError(
                f"{key}.sae = {analysis['sae']!r}: sae_steer re-encodes single tokens, which a "
                "temporal SAE does not do"
            )
        if analysis.get("features") is None and not analysis.get("dataset"):
            raise ConfigError(
                f"{key}.features = null: choosing features by frequency needs a `dataset` "
                "(or list `features`)"
            )
