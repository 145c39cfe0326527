"""Seeding and log plumbing shared by the scripts."""

from __future__ import annotations

import logging
import os
import random
import sys

import numpy as np


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch so the same config gives the same bytes.

    torch is seeded only when something has imported it already: importing it here would cost
    the torch-free jobs (fetch, diffing, similarity, UMAP) ~3 s each. A module that draws from
    torch imports it at the top, so it is loaded before any entry point calls this.
    """
    random.seed(seed)
    np.random.seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    torch = sys.modules.get("torch")
    if torch is None:
        return
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def log_to(path: str | None) -> logging.Logger:
    """Send stdout, stderr (tqdm bars included) and `logging` to the rule's log file."""
    if path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        stream = open(path, "a", buffering=1)  # noqa: SIM115 - lives for the whole process
        sys.stdout = stream
        sys.stderr = stream
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
        force=True,
    )
    return logging.getLogger("saeflow")
