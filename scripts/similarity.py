"""Snakemake entry point: centred cosine similarity matrices of one similarity analysis."""

from saeflow.similarity import run_similarity
from saeflow.utils import log_to, seed_everything

log_to(snakemake.log[0])
seed_everything(int(snakemake.params.runtime.get("seed", 0)))
run_similarity(
    snakemake.params.analysis,
    snakemake.input.codes,
    snakemake.input.tokens,
    snakemake.output.manifest,
)
