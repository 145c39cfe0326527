"""Snakemake entry point: label match_features pairs (Jaccard, one-sided tokens, scatter) and
find redundant pairs inside each SAE."""

import torch
from threadpoolctl import threadpool_limits

from saeflow.compare.pairs import run_label_pairs
from saeflow.utils import log_to, seed_everything

log_to(snakemake.log[0])
torch.set_num_threads(int(snakemake.threads))
seed = int(snakemake.params.runtime.get("seed", 0))
seed_everything(seed)
with threadpool_limits(limits=int(snakemake.threads)):
    run_label_pairs(
        codes_a_path=snakemake.input.codes_a,
        codes_b_path=snakemake.input.codes_b,
        tokens_path=snakemake.input.tokens_a,
        matches_path=snakemake.input.matches,
        analysis=dict(snakemake.params.analysis),
        sae_a_spec=snakemake.params.sae_a,
        sae_b_spec=snakemake.params.sae_b,
        seed=seed,
        out_pairs=snakemake.output.pairs,
        out_redundant=snakemake.output.redundant,
        out_page=snakemake.output.page,
    )
