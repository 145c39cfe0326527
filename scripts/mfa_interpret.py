"""Snakemake entry point: top-likelihood contexts and subspace coordinates of an MFA."""

import torch

from saeflow.mfa.interpret import run_mfa_interpret
from saeflow.utils import log_to

log_to(snakemake.log[0])
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
