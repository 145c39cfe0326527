"""Snakemake entry point: the diffing report page (and its shards) of one diffing analysis."""

from saeflow.report.diffing_page import write_diffing_page
from saeflow.utils import log_to

log_to(snakemake.log[0])
write_diffing_page(
    snakemake.input.features,
    snakemake.input.summary,
    snakemake.output.page,
    analysis=snakemake.params.analysis,
    neuronpedia=snakemake.params.neuronpedia,
    models_info=snakemake.params.models,
)
