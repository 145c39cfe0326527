"""Snakemake entry point: the UMAP report page (and its token shards) of one umap analysis."""

from saeflow.report.umap_page import write_umap_page
from saeflow.utils import log_to

log_to(snakemake.log[0])
write_umap_page(
    snakemake.input.embedding,
    snakemake.input.results,
    snakemake.output.page,
    analysis=snakemake.params.analysis,
    tokens_path=snakemake.input.tokens,
)
