"""Snakemake entry point: fine-tune the organism base LM on the rendered dialogues."""

from pathlib import Path

from saeflow.organism.lm import finetune_chat
from saeflow.utils import log_to

log_to(snakemake.log[0])
finetune_chat(
    base_dir=snakemake.input.base,
    corpus_dir=Path(snakemake.input.corpus[0]).parent,
    cfg=dict(snakemake.params.cfg or {}),
    out_dir=snakemake.output[0],
    seed=int(snakemake.params.seed),
    threads=int(snakemake.threads),
)
