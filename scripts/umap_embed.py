"""Snakemake entry point: UMAP of one umap analysis (embedding.parquet + results.json)."""

from pathlib import Path

from saeflow.embedding import run_umap
from saeflow.utils import log_to, seed_everything

log_to(snakemake.log[0])
seed_everything(int(snakemake.params.runtime.get("seed", 0)))
warm = snakemake.input.get("numba_warmup")
run_umap(
    snakemake.params.analysis,
    snakemake.input.codes,
    snakemake.input.tokens,
    snakemake.output.embedding,
    snakemake.output.results,
    numba_cache_dir=Path(warm).parent if warm else None,
)
