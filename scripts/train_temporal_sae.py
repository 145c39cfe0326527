"""Snakemake entry point: train the organism's temporal SAE, saved in the published layout."""

from saeflow.sae.train import train_temporal_sae
from saeflow.utils import log_to

log_to(snakemake.log[0])
acts = snakemake.input.acts
train_temporal_sae(
    [acts] if isinstance(acts, str) else list(acts),
    snakemake.output[0],
    dict(snakemake.params.train),
    seed=int(snakemake.params.seed),
)
