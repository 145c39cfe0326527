"""Snakemake entry point: the report page of one MFA analysis."""

from saeflow.report.mfa_page import run_report_mfa
from saeflow.utils import log_to

log_to(snakemake.log[0])
analysis = dict(snakemake.params.analysis)
run_report_mfa(
    snakemake.output.html,
    nll_path=snakemake.input.nll,
    contexts_path=snakemake.input.contexts,
    subspace_path=snakemake.input.subspace,
    summary_path=snakemake.input.summary,
    model_config_path=snakemake.input.config,
    steer_path=snakemake.input.get("steer"),
    steer_info_path=snakemake.input.get("steer_info"),
    settings=analysis,
    title=f"MFA: {analysis['name']} ({analysis.get('model')} on {analysis.get('dataset')})",
    seed=int(snakemake.params.runtime.get("seed", 0)),
)
