"""Snakemake entry point: compile umap-learn's numba kernels into the cache beside the output."""

import logging
from pathlib import Path

from saeflow.embedding import warmup
from saeflow.io import write_json
from saeflow.utils import log_to

log_to(snakemake.log[0])
out = Path(snakemake.output[0])
info = warmup(out.parent)
logging.getLogger("saeflow.embedding").info("umap warm-up: %s", info)
write_json(out, {"kernels": info["kernels"]})
