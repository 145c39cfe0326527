"""Snakemake entry point: fetch one configured dataset into results/data/{dataset}.parquet."""

from pathlib import Path

from saeflow.data import fetch_dataset
from saeflow.utils import log_to, seed_everything

log_to(snakemake.log[0])
seed_everything(int(snakemake.params.seed))
corpus = snakemake.input.get("corpus")
fetch_dataset(
    snakemake.params.name,
    dict(snakemake.params.spec),
    snakemake.output[0],
    config_dir=snakemake.params.config_dir,
    organism_corpus_dir=Path(corpus).parent if corpus else None,
    seed=int(snakemake.params.seed),
)
