"""Snakemake entry point: cache every hook point a model needs on one dataset, in one pass."""

from pathlib import Path

from saeflow.activations import cache_hookpoints
from saeflow.devices import gpu_slot
from saeflow.utils import log_to

log_to(snakemake.log[0])
model = dict(snakemake.params.model)
acts = dict(snakemake.params.activations)
runtime = dict(snakemake.params.runtime)
with gpu_slot(str(runtime.get("device", "auto"))):
    cache_hookpoints(
        model,
        snakemake.input.tokens,
        Path(snakemake.output.manifest).parent,
        list(snakemake.params.hookpoints),
        batch_size=int(model.get("batch_size", 32)),
        fmt=str(acts.get("format", "parquet")),
        shard_tokens=int(acts.get("shard_tokens", 16384)),
        device=str(runtime.get("device", "auto")),
        dtype=str(runtime.get("dtype", "bfloat16")),
        seed=int(runtime.get("seed", 0)),
        threads=int(snakemake.threads),
    )
