"""Snakemake entry point: generate the organism corpora (stories, dialogues, target, control)."""

from pathlib import Path

from saeflow.organism.corpus import make_corpus
from saeflow.utils import log_to

log_to(snakemake.log[0])
make_corpus(
    cfg=dict(snakemake.params.cfg or {}),
    out_dir=Path(snakemake.output[0]).parent,
    seed=int(snakemake.params.seed),
)
