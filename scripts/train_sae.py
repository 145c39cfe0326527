"""Snakemake entry point: train the organism's TopK SAE, saved in the SAELens layout."""

from saeflow.sae.train import train_sae
from saeflow.utils import log_to

log_to(snakemake.log[0])
acts = snakemake.input.acts
train_sae(
    [acts] if isinstance(acts, str) else list(acts),
    snakemake.output[0],
    dict(snakemake.params.train),
    seed=int(snakemake.params.seed),
)
