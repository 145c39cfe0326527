"""Snakemake entry point: train the organism's byte-level BPE tokenizer."""

from pathlib import Path

from saeflow.organism.tokenizer import train_tokenizer
from saeflow.utils import log_to

log_to(snakemake.log[0])
train_tokenizer(
    corpus_dir=Path(snakemake.input.corpus[0]).parent,
    cfg=dict(snakemake.params.cfg or {}),
    out_dir=snakemake.output[0],
)
