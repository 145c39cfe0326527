"""Snakemake entry point: fit the MFA (NLL + Adam), write model, NLL table and posteriors."""

import os

# Before torch loads OpenMP: spinning threads collapse on a shared, oversubscribed CPU
# (50 MFA epochs: 347 s with the default policy vs 27 s passive, 2 threads, load 8 on 2 cores).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from saeflow.devices import gpu_slot
from saeflow.mfa.fit import run_fit_mfa
from saeflow.utils import log_to

snakemake = globals()["snakemake"]
log_to(snakemake.log[0] if snakemake.log else None)
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
