"""Snakemake entry point: k-means (or random-point) centroids that initialise an MFA."""

import torch

from saeflow.mfa.init import run_mfa_init
from saeflow.utils import log_to

log_to(snakemake.log[0])
torch.set_num_threads(int(snakemake.threads))
run_mfa_init(
    snakemake.input.acts,
    centroids_path=snakemake.output.centroids,
    info_path=snakemake.output.info,
    settings=dict(snakemake.params.analysis),
    seed=int(snakemake.params.runtime.get("seed", 0)),
)
