"""The offline model organism: generated corpora, a BPE tokenizer, a tiny base LM and its chat
fine-tune, saved in HF format so the rest of the graph loads them like hub models.

Entry points are imported lazily, so `saeflow.organism.corpus` does not pull in torch.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "make_corpus": "saeflow.organism.corpus",
    "CORPORA": "saeflow.organism.corpus",
    "train_tokenizer": "saeflow.organism.tokenizer",
    "CHAT_TEMPLATE": "saeflow.organism.tokenizer",
    "train_base_lm": "saeflow.organism.lm",
    "finetune_chat": "saeflow.organism.lm",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'saeflow.organism' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
