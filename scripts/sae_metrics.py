"""Snakemake entry point: variance explained, L0, dead features and CE loss recovered of an SAE."""

from saeflow.devices import gpu_slot
from saeflow.sae.metrics import sae_metrics
from saeflow.utils import log_to

log_to(snakemake.log[0])
runtime = dict(snakemake.params.runtime)
with gpu_slot(str(runtime.get("device", "auto"))):
    sae_metrics(
        snakemake.input.acts,
        snakemake.input.codes,
        dict(snakemake.params.sae),
        dict(snakemake.params.model),
        snakemake.input.tokens,
        snakemake.output[0],
        runtime=runtime,
        metrics_cfg=dict(snakemake.params.metrics),
        threads=int(snakemake.threads),
    )
