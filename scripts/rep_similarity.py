"""Snakemake entry point: compare representations of the same tokens (CCA, CKA, kNN, Procrustes)."""

import torch

from saeflow.compare.repsim import run_rep_similarity
from saeflow.utils import log_to, seed_everything

log_to(snakemake.log[0])
torch.set_num_threads(int(snakemake.threads))
seed = int(snakemake.params.runtime.get("seed", 0))
seed_everything(seed)
run_rep_similarity(
    [dict(s) for s in snakemake.params.sources],
    analysis=dict(snakemake.params.analysis),
    seed=seed,
    out_measures=snakemake.output.measures,
    out_summary=snakemake.output.summary,
    out_page=snakemake.output.page,
    threads=int(snakemake.threads),
)
