"""Snakemake entry point: steer the LM with an MFA component, report last-position logit changes."""

import torch

from saeflow.devices import gpu_slot
from saeflow.mfa.steer import run_mfa_steer
from saeflow.utils import log_to

log_to(snakemake.log[0])
torch.set_num_threads(int(snakemake.threads))
model = dict(snakemake.params.model)
runtime = dict(snakemake.params.runtime)
device = str(runtime.get("device", "auto"))
with gpu_slot(device):
    run_mfa_steer(
        snakemake.input.model,
        lm_path=model["path"],
        layer=int(model["layer"]),
        revision=model.get("revision"),
        trust_remote_code=bool(model.get("trust_remote_code", False)),
        out_path=snakemake.output.steer,
        info_path=snakemake.output.info,
        settings=dict(snakemake.params.analysis),
        device=device,
        dtype=str(runtime.get("dtype", "bfloat16")),
        seed=int(runtime.get("seed", 0)),
    )
