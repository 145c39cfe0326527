"""Snakemake entry point: the Mapper graph of codes or activations, beside a random baseline."""

from saeflow.geometry.mapper import run_mapper
from saeflow.utils import log_to

log_to(snakemake.log[0])
run_mapper(
    snakemake.input.points,
    analysis=dict(snakemake.params.analysis),
    runtime=dict(snakemake.params.runtime),
    out_graph=snakemake.output.graph,
    out_baseline=snakemake.output.baseline,
    out_page=snakemake.output.page,
    tokens_path=getattr(snakemake.input, "tokens", None),
)
