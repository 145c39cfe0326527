"""Snakemake entry point: k-means (or random-point) centroids that initialise an MFA."""

import os

# Before torch loads OpenMP: spinning threads collapse on a shared, oversubscribed CPU
# (50 MFA epochs: 347 s with the default policy vs 27 s passive, 2 threads, load 8 on 2 cores).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from saeflow.mfa.init import run_mfa_init
from saeflow.utils import log_to

snakemake = globals()["snakemake"]
log_to(snakemake.log[0] if snakemake.log else None)
torch.set_num_threads(int(snakemake.threads))
run_mfa_init(
    snakemake.input.acts,
    centroids_path=snakemake.output.centroids,
    info_path=snakemake.output.info,
    settings=dict(snakemake.params.analysis),
    seed=int(snakemake.params.runtime.get("seed", 0)),
)
