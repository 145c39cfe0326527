"""Snakemake entry point: tokenize one dataset for one model into results/tokens/{model}/."""

from saeflow.tokenize import tokenize_dataset
from saeflow.utils import log_to

log_to(snakemake.log[0])
model = dict(snakemake.params.model)
tokenize_dataset(
    snakemake.input.data,
    str(model["path"]),
    dict(snakemake.params.spec),
    snakemake.output[0],
    revision=model.get("revision"),
    trust_remote_code=bool(model.get("trust_remote_code", False)),
    chat_template=model.get("chat_template"),
)
