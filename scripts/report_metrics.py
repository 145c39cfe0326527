"""Snakemake entry point: the SAE metrics report page (table and bars)."""

from saeflow.report.metrics_page import write_metrics_page
from saeflow.utils import log_to

log_to(snakemake.log[0])
write_metrics_page(
    list(snakemake.input.metrics),
    snakemake.output[0],
    labels=getattr(snakemake.params, "labels", None),
    title=getattr(snakemake.params, "title", None) or "SAE metrics",
)
