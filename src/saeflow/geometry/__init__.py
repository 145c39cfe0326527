"""Feature geometry: dashboards, cross-SAE matching, decoder UMAPs and Mapper graphs.

Submodules are imported on use so a light rule (a page) does not pay for torch or umap:
`top_examples`, `matching`, `decoder_umap`, `mapper`, `pages`, `weights`.
"""

from __future__ import annotations

import importlib
from typing import Any

_API = {
    "top_activations": "saeflow.geometry.top_examples",
    "compute_top_examples": "saeflow.geometry.top_examples",
    "search_features": "saeflow.geometry.top_examples",
    "run_top_examples": "saeflow.geometry.top_examples",
    "match_features": "saeflow.geometry.matching",
    "run_match_features": "saeflow.geometry.matching",
    "decoder_umap": "saeflow.geometry.decoder_umap",
    "run_decoder_umap": "saeflow.geometry.decoder_umap",
    "mapper_graph": "saeflow.geometry.mapper",
    "run_mapper": "saeflow.geometry.mapper",
    "read_unembedding": "saeflow.geometry.weights",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'saeflow.geometry' has no attribute {name!r}")
