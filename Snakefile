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

CONFIGFILES = [str(f) for f in workflow.overwrite_configfiles] or [
    str(Path(workflow.basedir) / "config.yaml")
]
CONFIGFILE = CONFIGFILES[-1]

# Snakemake has parsed the config files already (keeping the last of a key given twice, running
# YTE templates); saeflow re-reads them as plain data with its own checks and uses that, with any
# --config values on top, so every job sees the same plain dicts whatever the file format.
try:
    _config = sfc.read_config_files(CONFIGFILES, workflow.config_settings.config)
except ConfigError as err:
    sys.exit(f"saeflow: config error: {err}")


if not workflow.overwrite_configfiles:

    configfile: "config.yaml"


config.clear()
config.update(_config)

# Dataset contents and SAE paths are checked once, by the main process (not again in each job).
try:
    sfc.prepare(
        config, Path(CONFIGFILE).resolve().parent, check_files=workflow.is_main_process
    )
except ConfigError as err:
    sys.exit(f"saeflow: config error: {err}")


include: "rules/common.smk"
include: "rules/organism.smk"
include: "rules/fetch.smk"
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
