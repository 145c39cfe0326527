"""Snakemake entry point: encode one dataset's cached activations with one SAE into code shards."""

from saeflow.devices import gpu_slot
from saeflow.sae.encode import encode_sae
from saeflow.utils import log_to

log_to(snakemake.log[0])
runtime = dict(snakemake.params.runtime)
with gpu_slot(str(runtime.get("device", "auto"))):
    encode_sae(
        snakemake.input.acts,
        dict(snakemake.params.sae),
        snakemake.output.manifest,
        runtime=runtime,
        encode_cfg=dict(snakemake.params.encode),
        threads=int(snakemake.threads),
    )
