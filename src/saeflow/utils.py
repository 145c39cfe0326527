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


def _one_line_errors(kind: type, err: BaseException, tb: object) -> None:
    """A saeflow error ends the job as its one line (in the log and on the terminal); any other
    exception keeps its traceback."""
    from saeflow.errors import ConfigError, DataError, SaeflowError

    if not isinstance(err, SaeflowError):
        sys.__excepthook__(kind, err, tb)
        return
    what = {ConfigError: "config error", DataError: "data error"}.get(type(err), "error")
    line = f"saeflow: {what}: {err}"
    for stream in dict.fromkeys((sys.stderr, sys.__stderr__)):
        if stream is not None:
            print(line, file=stream, flush=True)


def log_to(path: str | None) -> logging.Logger:
    """Send stdout, stderr (tqdm bars included) and `logging` to the rule's log file; a saeflow
    error ends the job as one line, not a traceback."""
    sys.excepthook = _one_line_errors
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
