"""Snakemake entry point: top-activating examples, feature index and dashboards of one SAE."""

from saeflow.devices import gpu_slot
from saeflow.geometry.top_examples import run_top_examples
from saeflow.utils import log_to

log_to(snakemake.log[0])
runtime = dict(snakemake.params.runtime)
with gpu_slot(str(runtime.get("device", "auto"))):
    run_top_examples(
        snakemake.input.codes,
        snakemake.input.tokens,
        analysis=dict(snakemake.params.analysis),
        model=snakemake.params.model,
        sae_spec=snakemake.params.sae,
        runtime=runtime,
        out_examples=snakemake.output.examples,
        out_index=snakemake.output.index,
        out_page=snakemake.output.page,
        families=list(snakemake.params.families),
        threads=int(getattr(snakemake, "threads", 1) or 1),
    )
