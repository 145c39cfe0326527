"""Snakemake entry point: steer the LM with an MFA component, report last-position logit changes."""

import os

# Before torch loads OpenMP: spinning threads collapse on a shared, oversubscribed CPU
# (50 MFA epochs: 347 s with the default policy vs 27 s passive, 2 threads, load 8 on 2 cores).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from saeflow.devices import gpu_slot
from saeflow.mfa.steer import run_mfa_steer
from saeflow.utils import log_to

snakemake = globals()["snakemake"]
log_to(snakemake.log[0] if snakemake.log else None)
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
