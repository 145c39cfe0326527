"""Snakemake entry point: one joint UMAP of the decoder directions of several SAEs."""

from pathlib import Path

from saeflow.embedding import enable_numba_cache
from saeflow.geometry.decoder_umap import run_decoder_umap
from saeflow.utils import log_to

log_to(snakemake.log[0])
warm = getattr(snakemake.input, "numba_warmup", None)
if warm:
    enable_numba_cache(Path(warm).parent)
run_decoder_umap(
    analysis=dict(snakemake.params.analysis),
    sae_specs=dict(snakemake.params.saes),
    model_specs=dict(snakemake.params.models),
    match_paths=list(getattr(snakemake.input, "matches", []) or []),
    index_paths=list(getattr(snakemake.input, "indexes", []) or []),
    out_embedding=snakemake.output.embedding,
    out_page=snakemake.output.page,
    threads=int(getattr(snakemake, "threads", 1) or 1),
)
