"""Snakemake entry point: give one hook point folder its manifest, from the set manifest."""

from saeflow.hooks import publish_hookpoint
from saeflow.utils import log_to

log_to(snakemake.log[0])
publish_hookpoint(
    snakemake.input.set,
    int(snakemake.wildcards.layer),
    str(snakemake.wildcards.hook),
    snakemake.output.manifest,
)
