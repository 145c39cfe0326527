"""The whole workflow on the tiny config: exact reruns, determinism, crash safety, GPU placement.

The tiny config runs once per session (`tiny_run` in conftest.py); every test that changes a file
works on a clone of that run. "Exact reruns" means: after a change, `snakemake -n` plans exactly
the jobs whose inputs, params or code changed, and nothing else.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import (
    CORES,
    PARALLEL,
    Job,
    TinyRun,
    clone_run,
    dry_run,
    files_under,
    job_names,
    parse_dry_run,
    run_snakemake,
    start_snakemake,
    tree_snapshot,
    wait_for,
)

pytestmark = pytest.mark.workflow

REPORT_INDEX = "report_index"
ORGANISM_RULES = {"make_corpus", "train_tokenizer", "train_base_lm", "finetune_chat"}
UPSTREAM_RULES = ORGANISM_RULES | {"fetch_dataset", "tokenize", "cache_activations"}


def _config(run: TinyRun) -> dict[str, Any]:
    return yaml.safe_load(run.configfile.read_text())


def _variant(run: TinyRun, name: str, mutate: Callable[[dict[str, Any]], None]) -> str:
    """The run's config changed by `mutate`, written beside it (results/ is not touched)."""
    cfg = _config(run)
    mutate(cfg)
    (run.workdir / name).write_text(yaml.safe_dump(cfg, sort_keys=False))
    return name


def _analysis(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    return next(a for a in cfg["analyses"] if a["name"] == name)


def _first(cfg: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(a for a in cfg["analyses"] if a["type"] == kind)


def _wildcards(job: Job) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in job.wildcards.split(", ") if "=" in kv)


def _plan(run: TinyRun, configfile: str, *args: str) -> list[Job]:
    return dry_run(run.workdir, "--configfile", configfile, *args)


def _describe(jobs: list[Job]) -> str:
    return "\n".join(f"{j}: {j.reason}" for j in jobs) or "(no job)"


# ----------------------------------------------------------------------------- the full run


def test_full_run_builds_every_target(tiny_run):
    results = tiny_run.results
    cfg = _config(tiny_run)
    assert (results / "reports" / "index.html").is_file()
    assert (results / "reports" / "plotly.min.js").is_file()
    kinds = {"umap", "diffing", "similarity", "mfa"}
    compare = {"rep_similarity": "repsim", "feature_families": "families", "sae_steer": "steer"}
    for a in cfg["analyses"]:
        kind = a["type"] if a["type"] in kinds else compare.get(a["type"], "geometry")
        assert (results / "reports" / f"{kind}-{a['name']}.html").is_file(), a["name"]
        if a["type"] == "match_features":
            assert (results / "reports" / f"pairs-{a['name']}.html").is_file(), a["name"]
    assert (results / "reports" / "metrics-saes.html").is_file()
    for sae, spec in cfg["saes"].items():
        for ds in spec.get("eval_datasets", []):
            metrics = json.loads(
                (results / "metrics" / spec["model"] / ds / f"{sae}.json").read_text()
            )
            assert metrics["n_tokens"] > 0, (sae, ds)
    # No temporary sibling survives a successful run.
    leftovers = [p for p in results.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]
    assert not leftovers, leftovers


def test_snakemake_report_bundles_every_page(tiny_run, tmp_path):
    """`snakemake --report report.zip` holds the whole offline site, index first."""
    import zipfile

    report = tmp_path / "report.zip"
    run_snakemake(
        tiny_run.workdir, "--configfile", tiny_run.configfile.name, "--report", str(report)
    )
    with zipfile.ZipFile(report) as z:
        names = z.namelist()
        html = z.read("report/report.html").decode()
    reports = tiny_run.results / "reports"
    pages = {
        p.relative_to(reports).as_posix()
        for p in reports.rglob("*")
        if p.is_file() and not p.name.startswith(".")  # not snakemake's .snakemake_timestamp
    }
    raw = [n for n in names if "/data/raw/" in n]
    missing = sorted(p for p in pages if not any(n.endswith("/" + p) for n in raw))
    assert not missing, missing
    assert "index.html" in html


def test_second_run_executes_no_job(tiny_run):
    proc = run_snakemake(
        tiny_run.workdir, "--configfile", tiny_run.configfile.name, "--cores", CORES
    )
    log = proc.stdout + proc.stderr
    assert [j for j in parse_dry_run(log) if j.rule != "all"] == [], log[-4000:]
    assert "Nothing to be done" in log


def test_nothing_changed_plans_no_job(tiny_run):
    jobs = _plan(tiny_run, tiny_run.configfile.name)
    assert jobs == [], _describe(jobs)


def test_bad_config_on_a_finished_run_changes_nothing(tiny_run):
    """A real (not dry) run with a bad config stops before any job; results/ stays as it was."""
    bad = _variant(tiny_run, "bad_layer.yaml", lambda c: c["models"]["chat"].update(layer=5))
    before = tree_snapshot(tiny_run.results)
    proc = run_snakemake(
        tiny_run.workdir, "--configfile", bad, "--cores", CORES, "--forceall", check=False
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-3000:]
    errors = [line for line in text.splitlines() if line.startswith("saeflow: config error: ")]
    assert errors == ["saeflow: config error: models.chat.layer = 5: the model has 2 layers (0..1)"]
    assert "Traceback" not in text
    assert tree_snapshot(tiny_run.results) == before


# ----------------------------------------------------------------------------- exact reruns


def test_umap_parameter_change_reruns_only_that_umap(tiny_run):
    name = _first(_config(tiny_run), "umap")["name"]
    variant = _variant(
        tiny_run, "umap_min_dist.yaml", lambda c: _analysis(c, name).update(min_dist=0.25)
    )
    jobs = _plan(tiny_run, variant)
    assert job_names(jobs) == {
        f"umap[analysis={name}]",
        f"report_umap[analysis={name}]",
        REPORT_INDEX,
    }, _describe(jobs)


def test_sae_training_change_reruns_encoding_and_after_but_not_caching(tiny_run):
    variant = _variant(
        tiny_run, "topk_steps.yaml", lambda c: c["saes"]["topk"]["train"].update(steps=21)
    )
    jobs = _plan(tiny_run, variant)
    rules = {j.rule for j in jobs}
    names = job_names(jobs)
    assert "train_sae[sae=topk]" in names, _describe(jobs)
    assert not rules & UPSTREAM_RULES, _describe(jobs)
    # Only this SAE: the other SAEs, and analyses that do not use it, stay as they are.
    assert not {"train_temporal_sae", "umap", "similarity", "mfa_init", "fit_mfa"} & rules
    assert {_wildcards(j)["sae"] for j in jobs if "sae" in _wildcards(j)} == {"topk"}
    # Every code of this SAE is re-encoded, with its metrics and the analyses that read them.
    encoded = {
        (w["model"], w["dataset"]) for w in (_wildcards(j) for j in jobs if j.rule == "encode_sae")
    }
    on_disk = {
        (p.parents[2].name, p.parents[1].name)
        for p in (tiny_run.results / "codes").glob("*/*/topk/manifest.json")
    }
    assert encoded == on_disk, _describe(jobs)
    assert {"sae_metrics", "diff_stats", "report_diffing", "report_metrics", REPORT_INDEX} <= rules


def test_report_script_edit_reruns_only_report_jobs(tiny_run, tmp_path):
    run = clone_run(tiny_run, tmp_path / "wf")
    name = _first(_config(run), "umap")["name"]
    script = run.workdir / "scripts" / "report_umap.py"
    script.write_text(script.read_text() + "\n# edited by the rerun test\n")
    jobs = _plan(run, run.configfile.name)
    assert job_names(jobs) == {f"report_umap[analysis={name}]", REPORT_INDEX}, _describe(jobs)


def test_touched_dataset_file_with_same_content_reruns_nothing(tiny_run):
    data = tiny_run.workdir / "gsm8k_tiny.jsonl"
    stat = data.stat()
    try:
        os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**11))
        jobs = _plan(tiny_run, tiny_run.configfile.name)
        assert jobs == [], _describe(jobs)
    finally:
        os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_changed_dataset_file_reruns_that_dataset(tiny_run):
    """The control for the test above: the same file with other content does rerun."""
    data = tiny_run.workdir / "gsm8k_tiny.jsonl"
    original = data.read_bytes()
    stat = data.stat()
    rows = original.decode().splitlines()
    first = json.loads(rows[0])
    first["question"] = "How many ducks are there? " + first["question"]
    try:
        data.write_text("\n".join([json.dumps(first), *rows[1:]]) + "\n")
        jobs = _plan(tiny_run, tiny_run.configfile.name)
    finally:
        data.write_bytes(original)
        os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert "fetch_dataset[dataset=gsm8k]" in job_names(jobs), _describe(jobs)
    for job in jobs:
        w = _wildcards(job)
        assert w.get("dataset", "gsm8k") == "gsm8k", job
        assert job.rule not in ORGANISM_RULES, job


def test_new_analysis_runs_only_its_own_jobs(tiny_run):
    def add(cfg: dict[str, Any]) -> None:
        umap = dict(_first(cfg, "umap"), name="umap_2d", n_components=2)
        cfg["analyses"].append(umap)

    jobs = _plan(tiny_run, _variant(tiny_run, "new_umap.yaml", add))
    assert job_names(jobs) == {
        "umap[analysis=umap_2d]",
        "report_umap[analysis=umap_2d]",
        REPORT_INDEX,
    }, _describe(jobs)


def test_new_dataset_and_analysis_run_only_their_own_jobs(tiny_run):
    def add(cfg: dict[str, Any]) -> None:
        cfg["datasets"]["more_dialogues"] = {
            "source": "organism",
            "corpus": "dialogues_train",
            "chat": True,
            "num_sequences": 4,
            "context_length": 32,
        }
        sim = dict(_first(cfg, "similarity"), name="sim_more", dataset="more_dialogues")
        cfg["analyses"].append(sim)

    jobs = _plan(tiny_run, _variant(tiny_run, "new_dataset.yaml", add))
    assert {"fetch_dataset", "tokenize", "cache_activations", "encode_sae", "similarity"} <= {
        j.rule for j in jobs
    }, _describe(jobs)
    for job in jobs:
        w = _wildcards(job)
        mine = w.get("dataset") == "more_dialogues" or w.get("analysis") == "sim_more"
        assert mine or job.rule == REPORT_INDEX, _describe(jobs)


# ----------------------------------------------------------------------------- determinism


DETERMINISTIC = {
    "diff_stats": ["diffing/{name}/features.parquet", "diffing/{name}/summary.json"],
    "umap": ["umap/{name}/embedding.parquet", "umap/{name}/results.json"],
    "rep_similarity": ["compare/{name}/measures.parquet", "compare/{name}/summary.json"],
    "feature_families": ["compare/{name}/families.parquet"],
    "similarity": ["similarity/{name}/manifest.json"],  # last: its parts are compared below
}
KIND_OF_RULE = {
    "diff_stats": "diffing",
    "umap": "umap",
    "rep_similarity": "rep_similarity",
    "feature_families": "feature_families",
    "similarity": "similarity",
}


def test_analyses_rerun_to_the_same_bytes(tiny_run, tmp_path):
    run = clone_run(tiny_run, tmp_path / "wf")
    cfg = _config(run)
    targets = []
    for rule, files in DETERMINISTIC.items():
        name = _first(cfg, KIND_OF_RULE[rule])["name"]
        targets += [f.format(name=name) for f in files]
    run_snakemake(
        run.workdir,
        *(f"results/{t}" for t in targets),
        "--configfile",
        run.configfile.name,
        *PARALLEL,
        "--forcerun",
        *DETERMINISTIC,
    )
    for target in targets:
        new, old = run.results / target, tiny_run.results / target
        assert new.stat().st_mtime_ns != old.stat().st_mtime_ns, f"{target} was not rewritten"
        assert new.read_bytes() == old.read_bytes(), target
    sim = tiny_run.results / targets[-1]
    for part in sorted(sim.parent.glob("*.parquet")):
        assert (run.results / part.relative_to(tiny_run.results)).read_bytes() == part.read_bytes()


# ----------------------------------------------------------------------------- crash safety


def _progress_shards(directory: Path) -> int:
    try:
        return len(json.loads((directory / ".progress.json").read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return 0


def _kill_group(proc: subprocess.Popen) -> str:
    """SIGKILL snakemake and all its jobs (a crash: no cleanup runs); the output it printed."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    return out or ""


def _sharded_case(run: TinyRun, rule: str) -> tuple[str, str, str]:
    """(results-relative output dir, log path, target) of the job the kill test interrupts."""
    cfg = _config(run)
    name = _first(cfg, "umap")
    model, dataset, sae = name["model"], name["dataset"], name["sae"]
    layer = cfg["models"][model]["layer"]
    if rule == "cache_activations":
        rel = f"activations/{model}/{dataset}/layer_{layer}/resid_post"
        target = f"results/activations/{model}/{dataset}/manifest.json"  # the set manifest
        return rel, f"logs/cache_activations/{model}/{dataset}.log", target
    rel = f"codes/{model}/{dataset}/{sae}"
    return rel, f"logs/encode_sae/{model}/{dataset}/{sae}.log", f"results/{rel}/manifest.json"


def _unlock(run: TinyRun) -> None:
    run_snakemake(run.workdir, "--unlock", "--configfile", run.configfile.name, "--cores", "1")


# What the log of a resumed job says: (shards skipped, shards in all).
RESUMED = {
    "cache_activations": lambda m: (int(m[0]), int(m[1])),
    "encode_sae": lambda m: (int(m[1]) - int(m[0]), int(m[1])),
}
RESUME_LOG = {
    "cache_activations": re.compile(r"skipped (\d+) of (\d+) shards"),
    "encode_sae": re.compile(r"encoding (\d+) of (\d+) shards"),
}
# The module whose shard loop sleeps SAEFLOW_TEST_SHARD_DELAY seconds after each finished shard.
SHARD_LOOP = {"cache_activations": "saeflow.activations", "encode_sae": "saeflow.sae.encode"}


def _has_delay_hook(module: str) -> bool:
    import importlib
    import inspect

    source = inspect.getsource(importlib.import_module(module))
    return "SAEFLOW_TEST_SHARD_DELAY" in source or "TEST_DELAY_ENV" in source


@pytest.mark.parametrize("rule", ["cache_activations", "encode_sae"])
def test_killed_sharded_job_resumes_to_the_same_bytes(tiny_run, tmp_path, rule):
    """SIGKILL snakemake and the job after its first shard; the rerun keeps that shard, computes
    the rest, and every shard and the manifest are the bytes of the uninterrupted run."""
    if not _has_delay_hook(SHARD_LOOP[rule]):
        pytest.skip(f"{SHARD_LOOP[rule]} has no SAEFLOW_TEST_SHARD_DELAY hook: the kill would race")
    run = clone_run(tiny_run, tmp_path / "wf")
    rel, log, target = _sharded_case(run, rule)
    out, ref_dir = run.results / rel, tiny_run.results / rel
    reference = files_under(ref_dir, "part-*") | files_under(ref_dir, "manifest.json")
    n_shards = len(json.loads((ref_dir / "manifest.json").read_text())["shards"])
    assert n_shards >= 2, f"{rel}: tiny.yaml must give at least two shards"
    shutil.rmtree(out)
    (run.workdir / target).unlink(missing_ok=True)
    args = (target, "--configfile", run.configfile.name, "--cores", "1")

    proc = start_snakemake(run.workdir, *args, env={"SAEFLOW_TEST_SHARD_DELAY": "120"})
    try:
        wait_for(lambda: _progress_shards(out) >= 1, 300, f"a finished shard in {rel}", proc)
    finally:
        _kill_group(proc)
    assert not (out / "manifest.json").exists(), "a killed job left a manifest"
    assert 1 <= _progress_shards(out) < n_shards

    _unlock(run)
    jobs = dry_run(run.workdir, target, "--configfile", run.configfile.name)
    assert [j.rule for j in jobs] == [rule], _describe(jobs)
    run_snakemake(run.workdir, *args, "--rerun-incomplete")

    assert files_under(out, "part-*") | files_under(out, "manifest.json") == reference
    found = RESUME_LOG[rule].findall((run.workdir / log).read_text())
    assert found, f"{log}: no line says how many shards were left"
    skipped, total = RESUMED[rule](found[-1])
    assert total == n_shards and skipped >= 1, f"the rerun did not resume: {found}"


@pytest.mark.parametrize(
    ("rule", "sae"), [("train_sae", "topk"), ("train_temporal_sae", "temporal")]
)
def test_killed_training_leaves_nothing_and_reruns_to_the_same_bytes(tiny_run, tmp_path, rule, sae):
    """Kill during training (made long by a variant with many steps): no SAE folder appears, and
    the rerun with the original config writes the same bytes as the uninterrupted run."""
    run = clone_run(tiny_run, tmp_path / "wf")
    out = run.results / "organism" / "saes" / sae
    reference = files_under(tiny_run.results / "organism" / "saes" / sae)
    shutil.rmtree(out)
    slow = _variant(run, "slow.yaml", lambda c: c["saes"][sae]["train"].update(steps=10**7))
    target = f"results/organism/saes/{sae}"
    log = run.workdir / "logs" / rule / f"{sae}.log"
    log.unlink()  # the cloned log of the finished run would satisfy the wait below at once

    proc = start_snakemake(run.workdir, target, "--configfile", slow, "--cores", "1")
    try:
        wait_for(lambda: log.exists() and " SAE" in log.read_text(), 300, "training", proc)
    finally:
        _kill_group(proc)
    assert not out.exists(), "a killed training job left an SAE folder"

    _unlock(run)
    run_snakemake(
        run.workdir,
        target,
        "--configfile",
        run.configfile.name,
        "--cores",
        "1",
        "--rerun-incomplete",
    )
    assert files_under(out) == reference


# ----------------------------------------------------------------------------- GPU placement


GPU_SNAKEFILE = """
rule all:
    input:
        expand("out/{name}.json", name=["a", "b"]),


rule gpu_job:
    output:
        "out/{name}.json",
    threads: 1
    resources:
        gpu=1,
    script:
        "gpu_job.py"
"""

GPU_SCRIPT = """
import json
import os
import time
from pathlib import Path

from saeflow.devices import gpu_slot

snakemake = globals()["snakemake"]
barrier = Path("started")
barrier.mkdir(exist_ok=True)
with gpu_slot() as slot:
    (barrier / snakemake.wildcards.name).write_text(str(os.getpid()))
    deadline = time.monotonic() + 120
    while len(list(barrier.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    Path(snakemake.output[0]).write_text(json.dumps({
        "slot": slot,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "both_running": len(list(barrier.iterdir())) == 2,
    }))
"""


def test_two_concurrent_gpu_jobs_get_distinct_devices(tmp_path):
    """`--resources gpu=2`: two GPU jobs run side by side, each pinned to its own device."""
    (tmp_path / "Snakefile").write_text(GPU_SNAKEFILE)
    (tmp_path / "gpu_job.py").write_text(GPU_SCRIPT)
    env = {
        "SAEFLOW_GPUS": "0,1",
        "SAEFLOW_GPU_LOCK_DIR": str(tmp_path / "locks"),
        "PYTHONPATH": os.pathsep.join(
            filter(
                None,
                [str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH")],
            )
        ),
    }
    run_snakemake(
        tmp_path, "--cores", "2", "--resources", "gpu=2", "--workflow-profile", "none", env=env
    )
    got = [json.loads((tmp_path / "out" / f"{n}.json").read_text()) for n in ("a", "b")]
    assert all(g["both_running"] for g in got), got
    assert sorted(g["slot"] for g in got) == ["0", "1"], got
    assert all(g["cuda_visible_devices"] == g["slot"] for g in got), got
