"""Snakemake entry point: cache block-L resid_post activations of one model on one dataset."""

from pathlib import Path

from saeflow.activations import cache_activations
from saeflow.devices import gpu_slot
from saeflow.utils import log_to

log_to(snakemake.log[0])
model = dict(snakemake.params.model)
acts = dict(snakemake.params.activations)
runtime = dict(snakemake.params.runtime)
# The output directory names the layer, so the wildcard (when the rule has one) decides it.
layer = int(getattr(snakemake.wildcards, "layer", model["layer"]))
with gpu_slot(str(runtime.get("device", "auto"))):
    cache_activations(
        model,
        snakemake.input.tokens,
        Path(snakemake.output.manifest).parent,
        layer=layer,
        batch_size=int(model.get("batch_size", 32)),
        fmt=str(acts.get("format", "parquet")),
        shard_tokens=int(acts.get("shard_tokens", 16384)),
        device=str(runtime.get("device", "auto")),
        dtype=str(runtime.get("dtype", "bfloat16")),
        seed=int(runtime.get("seed", 0)),
        threads=int(snakemake.threads),
    )
