"""Snakemake entry point: fit the MFA (NLL + Adam), write model, NLL table and posteriors."""

import torch

from saeflow.devices import gpu_slot
from saeflow.mfa.fit import run_fit_mfa
from saeflow.utils import log_to

log_to(snakemake.log[0])
torch.set_num_threads(int(snakemake.threads))
analysis = dict(snakemake.params.analysis)
runtime = dict(snakemake.params.runtime)
device = str(runtime.get("device", "auto"))
with gpu_slot(device):
    run_fit_mfa(
        snakemake.input.acts,
        snakemake.input.centroids,
        model_path=snakemake.output.model,
        config_path=snakemake.output.config,
        nll_path=snakemake.output.nll,
        posteriors_path=snakemake.output.posteriors,
        settings=analysis,
        seed=int(runtime.get("seed", 0)),
        device=device,
        meta={k: analysis.get(k) for k in ("name", "model", "dataset")},
    )
