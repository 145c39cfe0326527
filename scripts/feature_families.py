"""Snakemake entry point: feature families (splits) across two SAE widths from match_features."""

from threadpoolctl import threadpool_limits

from saeflow.compare.families import run_feature_families
from saeflow.utils import log_to

log_to(snakemake.log[0])
with threadpool_limits(limits=int(snakemake.threads)):
    run_feature_families(
        matches_path=snakemake.input.matches,
        codes_a_path=snakemake.input.codes_a,
        codes_b_path=snakemake.input.codes_b,
        tokens_path=snakemake.input.tokens,
        analysis=dict(snakemake.params.analysis),
        match=dict(snakemake.params.match),
        out_families=snakemake.output.families,
        out_summary=snakemake.output.summary,
        out_page=snakemake.output.page,
        out_links=snakemake.output.links,
    )
