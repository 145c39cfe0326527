"""saeflow: from language-model activations to SAE interpretability results.

The config is checked (schema + semantics) before any job runs; every problem is reported as one
line that names the key and the value, and nothing under results/ is touched.
"""

import os
import sys
from pathlib import Path

from snakemake.utils import min_version

min_version("9.0")

SRC = str(Path(workflow.basedir) / "src")
sys.path.insert(0, SRC)
os.environ.update(
    PYTHONPATH=os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p)
)
# OpenMP threads that spin collapse on a shared, oversubscribed CPU (MFA fit: 347 s vs 27 s).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from saeflow import config as sfc
from saeflow.errors import ConfigError

CONFIGFILE = (
    str(workflow.overwrite_configfiles[-1])
    if workflow.overwrite_configfiles
    else str(Path(workflow.basedir) / "config.yaml")
)

try:
    if not workflow.overwrite_configfiles:
        sfc.read_yaml(CONFIGFILE)
except ConfigError as err:
    sys.exit(f"saeflow: config error: {err}")


if not workflow.overwrite_configfiles:

    configfile: "config.yaml"


try:
    sfc.prepare(config, Path(CONFIGFILE).resolve().parent)
except ConfigError as err:
    sys.exit(f"saeflow: config error: {err}")


include: "rules/common.smk"
include: "rules/organism.smk"
include: "rules/data.smk"
include: "rules/activations.smk"
include: "rules/sae.smk"
include: "rules/analysis.smk"
include: "rules/geometry.smk"
include: "rules/compare.smk"
include: "rules/report.smk"


rule all:
    default_target: True
    input:
        all_targets(),
