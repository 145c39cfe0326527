"""Snakemake entry point: steer the LM with SAE decoder directions and re-encode the result."""

import torch

from saeflow.compare.steer import run_sae_steer
from saeflow.devices import gpu_slot
from saeflow.utils import log_to

log_to(snakemake.log[0])
torch.set_num_threads(int(snakemake.threads))
runtime = dict(snakemake.params.runtime)
with gpu_slot(str(runtime.get("device", "auto"))):
    run_sae_steer(
        analysis=dict(snakemake.params.analysis),
        model=dict(snakemake.params.model),
        sae_spec=dict(snakemake.params.sae),
        runtime=runtime,
        out_path=snakemake.output.steer,
        info_path=snakemake.output.info,
        page_path=snakemake.output.page,
        codes_path=getattr(snakemake.input, "codes", None),
        tokens_path=getattr(snakemake.input, "tokens", None),
        hookpoint=dict(snakemake.params.hookpoint),
    )
