"""Snakemake entry point: reports/index.html (and the bundled site for `snakemake --report`)."""

from saeflow.report.index import write_index
from saeflow.utils import log_to

log_to(snakemake.log[0])
write_index(
    list(snakemake.input.pages),
    snakemake.params.config,
    snakemake.output.index,
    site_dir=getattr(snakemake.output, "site", None),
)
