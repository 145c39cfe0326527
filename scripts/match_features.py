"""Snakemake entry point: match the features of two SAEs by activation correlation."""

from saeflow.devices import gpu_slot
from saeflow.geometry.matching import run_match_features
from saeflow.utils import log_to

log_to(snakemake.log[0])
runtime = dict(snakemake.params.runtime)
with gpu_slot(str(runtime.get("device", "auto"))):
    run_match_features(
        snakemake.input.codes_a,
        snakemake.input.codes_b,
        analysis=dict(snakemake.params.analysis),
        sae_a_spec=snakemake.params.sae_a,
        sae_b_spec=snakemake.params.sae_b,
        runtime=runtime,
        out_matches=snakemake.output.matches,
        out_summary=snakemake.output.summary,
        out_page=snakemake.output.page,
        tokens_a_path=getattr(snakemake.input, "tokens_a", None),
        tokens_b_path=getattr(snakemake.input, "tokens_b", None),
        threads=int(getattr(snakemake, "threads", 1) or 1),
    )
