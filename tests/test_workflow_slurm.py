"""The tiny config through `--workflow-profile profiles/slurm` on the local single-node cluster
(.ci/slurm.sh): every job completes, exactly the GPU rules ask SLURM for a GPU, and every file the
SLURM run writes is byte-identical to the local run's.

By default the run starts from the local run's organism (corpus, tokenizer, models) and runs one
branch of the graph on SLURM (data -> tokens -> activations -> temporal SAE -> codes -> similarity
-> its report): the test cluster has one GPU, so GPU jobs run one after the other, and the plugin
notices a finished job only 10-20 s late. `SAEFLOW_SLURM_FULL=1` runs the whole tiny graph from
scratch instead (about 10 minutes on 2 busy cores; byte-identical to the local run).

Skipped when `sinfo` does not answer, except under `SAEFLOW_SLURM=1` (CI), where a missing
cluster is a failure.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml
from conftest import (
    CORES,
    WORKFLOW,
    TinyRun,
    clone_run,
    copy_workflow,
    install_tiny_config,
    workflow_env,
)
from test_slurm import rule_of, run_snakemake_slurm, slurm_available

_RULE = re.compile(r"^\s*(?:rule|checkpoint) (\w+):")
_GPU_RESOURCE = re.compile(r"^\s*gpu\s*=\s*[1-9]")


@pytest.fixture(scope="module")
def need_slurm() -> None:
    if slurm_available():
        return
    if os.environ.get("SAEFLOW_SLURM") == "1":
        pytest.fail("SAEFLOW_SLURM=1 but `sinfo` does not answer: run `.ci/slurm.sh start`")
    pytest.skip("no SLURM cluster (start one with `sudo .ci/slurm.sh start`)")


def gpu_rules(workdir: Path) -> set[str]:
    """Rules whose `resources:` declare a GPU (what a local run hands a GPU slot to)."""
    found: set[str] = set()
    for path in sorted((workdir / "rules").glob("*.smk")):
        rule = None
        for line in path.read_text().splitlines():
            m = _RULE.match(line)
            if m:
                rule = m.group(1)
            elif rule and _GPU_RESOURCE.match(line):
                found.add(rule)
    return found


def profile_gpu_rules(workdir: Path) -> set[str]:
    """Rules that profiles/slurm gives a GPU through `set-resources`."""
    profile = yaml.safe_load((workdir / "profiles" / "slurm" / "config.yaml").read_text())
    return {
        rule
        for rule, res in (profile.get("set-resources") or {}).items()
        if int((res or {}).get("gpu", 0) or 0) > 0
    }


ORGANISM_KEPT = ("organism/corpus", "organism/tokenizer", "organism/models")


def keep_only(workdir: Path, kept: tuple[str, ...]) -> Path:
    """Delete every output under results/ except the `kept` folders (and their metadata)."""
    results = workdir / "results"
    for path in sorted(results.rglob("*"), reverse=True):
        rel = path.relative_to(results).as_posix()
        if any(rel == k or rel.startswith(k + "/") or k.startswith(rel + "/") for k in kept):
            continue
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        else:
            path.unlink()
    return workdir


def results_files(root: Path) -> dict[str, bytes]:
    """Every file under results/ except caches (numba's compiled kernels)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".cache" not in p.relative_to(root).parts
    }


def test_gpu_requests_of_the_slurm_profile_match_the_rules():
    """profiles/slurm asks for a GPU for exactly the rules that declare one (and use gpu_slot).

    A static check of the files (no cluster needed)."""
    declared, profiled = gpu_rules(WORKFLOW), profile_gpu_rules(WORKFLOW)
    assert profiled - declared == set(), "GPU requested for CPU-only rules"
    assert declared - profiled == set(), "GPU rules without the profile's GPU settings"


@pytest.mark.slurm
@pytest.mark.workflow
def test_tiny_config_on_slurm_matches_local_run(
    need_slurm, tiny_run: TinyRun, tmp_path, monkeypatch
):
    full = os.environ.get("SAEFLOW_SLURM_FULL") == "1"
    if full:
        workdir = copy_workflow(tmp_path / "wf")
        configfile = install_tiny_config(workdir)
    else:
        workdir = keep_only(clone_run(tiny_run, tmp_path / "wf").workdir, ORGANISM_KEPT)
        configfile = workdir / tiny_run.configfile.name
    for key, value in workflow_env().items():
        monkeypatch.setenv(key, value)
    cfg = yaml.safe_load(configfile.read_text())
    sim = next(a for a in cfg["analyses"] if a["type"] == "similarity")["name"]
    targets = [] if full else [f"results/reports/similarity-{sim}.html"]

    records = run_snakemake_slurm(
        workdir,
        configfile,
        ["--local-cores", CORES, *targets],
        snakefile=workdir / "Snakefile",
        workflow_profile=workdir / "profiles" / "slurm",
        jobs=4,
    )

    assert records, "no job was submitted to SLURM"
    bad = [r for r in records if r.get("JobState") != "COMPLETED" or r.get("ExitCode") != "0:0"]
    assert not bad, bad
    submitted = {rule_of(r) for r in records}
    assert {"fetch_dataset", "tokenize", "cache_activations", "encode_sae"} <= submitted, submitted
    # The cheap report rules stay on the submit host.
    assert not {r for r in submitted if r.startswith("report_")}, submitted
    want_gpu = gpu_rules(workdir)
    assert {"cache_activations", "encode_sae"} <= want_gpu
    for record in records:
        tres = record.get("TresPerJob", "") + record.get("TresPerNode", "")
        rule = rule_of(record)
        assert ("gpu" in tres) == (rule in want_gpu), (
            f"rule {rule}: SLURM request {tres or 'without TRES'} but the rule declares "
            f"{'a' if rule in want_gpu else 'no'} GPU"
        )

    local, slurm = results_files(tiny_run.results), results_files(workdir / "results")
    assert len(slurm) > 20 and f"reports/similarity-{sim}.html" in slurm
    missing = sorted(set(slurm) - set(local))
    assert not missing, f"files only the SLURM run wrote: {missing}"
    differ = sorted(p for p, data in slurm.items() if local[p] != data)
    assert not differ, f"files that differ between the SLURM and the local run: {differ}"
