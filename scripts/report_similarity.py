"""Snakemake entry point: the similarity report page of one similarity analysis."""

from saeflow.report.similarity_page import write_similarity_page
from saeflow.utils import log_to

log_to(snakemake.log[0])
write_similarity_page(
    snakemake.input.similarity,
    snakemake.input.tokens,
    snakemake.output[0],
    analysis=snakemake.params.analysis,
)
