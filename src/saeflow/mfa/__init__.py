"""Mixture of Factor Analyzers on cached activations ("From Directions to Regions", 2026).

Stages: `init` (k-means centroids), `fit` (NLL training, posteriors), `interpret` (top contexts,
subspace coordinates), `steer` (centroid / two-stage interventions), `page` (report).
Settings come from one `analyses` entry of type `mfa`; `resolve_settings` fills the defaults
below and checks types, naming the offending key.
"""

from __future__ import annotations

import copy
from typing import Any

from saeflow.errors import ConfigError

MFA_DEFAULTS: dict[str, Any] = {
    "K": 32,
    "R": 8,
    "psi": "shared",
    "init": "kmeans",
    "sort_loadings": False,
    "pool_size": 50_000,
    "proj_dim": 32,
    "restarts": 5,
    "lloyd_iters": 10,
    "epochs": 50,
    "lr": 1e-2,
    "batch_size": 256,
    "val_fraction": 0.1,
    "patience": 10,
    "clip": 1.0,
    "top_resp": 4,
    "top_n": 10,
    "top_pool": 50,
    "context_tokens": 12,
    "page_components": 8,
    "scatter_points": 2000,
    "scatter_labels": 150,
    "steer": {
        "prompts": ["Once upon a time", "The weather today is"],
        "component": None,
        "alphas": [0.0, 0.25, 0.5, 1.0],
        "z": None,
        "z_scale": 2.0,
        "top_logits": 10,
        "chat": False,
    },
}

_INTS = (
    "K",
    "R",
    "pool_size",
    "restarts",
    "lloyd_iters",
    "epochs",
    "batch_size",
    "top_resp",
    "top_n",
    "top_pool",
    "context_tokens",
    "page_components",
    "scatter_points",
    "scatter_labels",
)
_POSITIVE = (
    "K",
    "R",
    "pool_size",
    "restarts",
    "epochs",
    "batch_size",
    "top_resp",
    "top_n",
    "top_pool",
)
_CHOICES = {"psi": ("shared", "per_component"), "init": ("kmeans", "random")}


def resolve_settings(analysis: dict[str, Any]) -> dict[str, Any]:
    """Defaults filled in and types checked; unrelated keys (type, name, model...) pass through."""
    where = f"analyses[{analysis.get('name', '?')}]"
    out = copy.deepcopy(MFA_DEFAULTS)
    steer = {**out["steer"], **(analysis.get("steer") or {})}
    out.update({k: v for k, v in analysis.items() if k != "steer"})
    out["steer"] = steer
    for key in _INTS:
        if not isinstance(out[key], int) or isinstance(out[key], bool):
            raise ConfigError(f"{where}.{key} = {out[key]!r}: must be an integer")
        if out[key] < 0 or (key in _POSITIVE and out[key] == 0):
            raise ConfigError(f"{where}.{key} = {out[key]!r}: must be positive")
    if not isinstance(out["sort_loadings"], bool):
        raise ConfigError(f"{where}.sort_loadings = {out['sort_loadings']!r}: true or false")
    for key, choices in _CHOICES.items():
        if out[key] not in choices:
            raise ConfigError(f"{where}.{key} = {out[key]!r}: must be one of {', '.join(choices)}")
    if out["proj_dim"] is not None and (
        not isinstance(out["proj_dim"], int) or out["proj_dim"] < 0
    ):
        raise ConfigError(
            f"{where}.proj_dim = {out['proj_dim']!r}: an integer >= 0 (0 = no projection)"
        )
    if not isinstance(out["lr"], int | float) or out["lr"] <= 0:
        raise ConfigError(f"{where}.lr = {out['lr']!r}: must be a positive number")
    if not isinstance(out["val_fraction"], int | float) or not 0 <= out["val_fraction"] < 1:
        raise ConfigError(f"{where}.val_fraction = {out['val_fraction']!r}: must be in [0, 1)")
    if out["clip"] is not None and (not isinstance(out["clip"], int | float) or out["clip"] < 0):
        raise ConfigError(f"{where}.clip = {out['clip']!r}: a number >= 0 (0 or null = off)")
    if out["patience"] is not None and not isinstance(out["patience"], int):
        raise ConfigError(f"{where}.patience = {out['patience']!r}: an integer (0 or null = off)")
    _check_steer(where, steer, out["R"])
    return out


def _check_steer(where: str, steer: dict[str, Any], R: int) -> None:
    prompts = steer["prompts"]
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ConfigError(f"{where}.steer.prompts = {prompts!r}: a non-empty list of strings")
    comp = steer["component"]
    comps = comp if isinstance(comp, list) else [comp]
    if not all(c is None or (isinstance(c, int) and c >= 0) for c in comps) or not comps:
        raise ConfigError(f"{where}.steer.component = {comp!r}: null, an index or a list of them")
    alphas = steer["alphas"]
    if not isinstance(alphas, list) or not all(isinstance(a, int | float) for a in alphas):
        raise ConfigError(f"{where}.steer.alphas = {alphas!r}: a list of numbers")
    z = steer["z"]
    if z is not None and (
        not isinstance(z, list) or len(z) != R or not all(isinstance(v, int | float) for v in z)
    ):
        raise ConfigError(f"{where}.steer.z = {z!r}: null or a list of R = {R} numbers")
    if not isinstance(steer["top_logits"], int) or steer["top_logits"] <= 0:
        raise ConfigError(f"{where}.steer.top_logits = {steer['top_logits']!r}: a positive integer")
