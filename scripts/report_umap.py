"""Snakemake entry point: the UMAP report page of one umap analysis."""

from saeflow.report.umap_page import write_umap_page
from saeflow.utils import log_to

log_to(snakemake.log[0])
write_umap_page(
    snakemake.input.embedding,
    snakemake.input.results,
    snakemake.output[0],
    analysis=snakemake.params.analysis,
)
