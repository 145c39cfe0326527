"""Snakemake entry point: top-likelihood contexts and subspace coordinates of an MFA."""

import os

# Before torch loads OpenMP: spinning threads collapse on a shared, oversubscribed CPU
# (50 MFA epochs: 347 s with the default policy vs 27 s passive, 2 threads, load 8 on 2 cores).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from saeflow.mfa.interpret import run_mfa_interpret
from saeflow.utils import log_to

snakemake = globals()["snakemake"]
log_to(snakemake.log[0] if snakemake.log else None)
torch.set_num_threads(int(snakemake.threads))
run_mfa_interpret(
    snakemake.input.model,
    snakemake.input.acts,
    snakemake.input.tokens,
    contexts_path=snakemake.output.contexts,
    subspace_path=snakemake.output.subspace,
    summary_path=snakemake.output.summary,
    settings=dict(snakemake.params.analysis),
    seed=int(snakemake.params.runtime.get("seed", 0)),
    device="cpu",
)
