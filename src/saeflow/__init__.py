"""saeflow: from language-model activations to SAE interpretability results.

The public API is imported lazily so that light stages (reports, statistics) do not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "load_activations": "saeflow.activations",
    "iter_activation_shards": "saeflow.activations",
    "load_tokens": "saeflow.tokenize",
    "load_sae": "saeflow.sae",
    "load_codes": "saeflow.codes",
    "load_config": "saeflow.config",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'saeflow' has no attribute {name!r}")
