"""Snakemake entry point: base-vs-chat feature statistics of one diffing analysis."""

from saeflow.diffing import SETS, run_diffing
from saeflow.utils import log_to, seed_everything

log_to(snakemake.log[0])
seed_everything(int(snakemake.params.runtime.get("seed", 0)))
analysis = snakemake.params.analysis
models = analysis["models"]
run_diffing(
    analysis,
    tokens={s: {m: snakemake.input[f"tokens_{s}_{m}"] for m in models} for s in SETS},
    codes={s: {m: snakemake.input[f"codes_{s}_{m}"] for m in models} for s in SETS},
    features_out=snakemake.output.features,
    summary_out=snakemake.output.summary,
    explanations=snakemake.input.get("explanations"),
    context_lengths=dict(snakemake.params.context_lengths),
)
