"""Snakemake entry point: pretrain the organism's tiny base LM on the story corpus."""

from pathlib import Path

from saeflow.organism.lm import train_base_lm
from saeflow.utils import log_to

log_to(snakemake.log[0])
train_base_lm(
    corpus_dir=Path(snakemake.input.corpus[0]).parent,
    tokenizer_dir=snakemake.input.tokenizer,
    cfg=dict(snakemake.params.cfg or {}),
    out_dir=snakemake.output[0],
    seed=int(snakemake.params.seed),
    threads=int(snakemake.threads),
)
