"""The SLURM executor path, end to end, on a real (single-node) cluster started by .ci/slurm.sh.

Skipped when `sinfo` does not answer, except under `SAEFLOW_SLURM=1` (CI), where a missing
cluster is a failure. Job records come from the jobcomp/filetxt log (`JobCompLoc`; there is no
slurmdbd, so `sacct` does not work) merged with `scontrol show job` (kept for MinJobAge).

`run_snakemake_slurm()` is the reusable piece: point it at the real Snakefile and a small config
to compare a SLURM run with a local one.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MINI = REPO / "tests" / "slurm_mini" / "Snakefile"
SLURM_PROFILE = REPO / "profiles" / "slurm"
_KV = re.compile(r"(\S+?)=(.*?)(?=\s+\S+?=|\s*$)")
_SUBMITTED = re.compile(r"submitted with SLURM jobid (\d+)")

pytestmark = pytest.mark.slurm


def _sh(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=60).stdout


def slurm_available() -> bool:
    """True when a controller answers `sinfo` with at least one partition."""
    if shutil.which("sinfo") is None:
        return False
    try:
        return bool(_sh("sinfo", "-h", "-o", "%P").strip())
    except (subprocess.SubprocessError, OSError):
        return False


@pytest.fixture(scope="module", autouse=True)
def _need_slurm() -> None:
    if slurm_available():
        return
    if os.environ.get("SAEFLOW_SLURM") == "1":
        pytest.fail("SAEFLOW_SLURM=1 but `sinfo` does not answer: run `.ci/slurm.sh start`")
    pytest.skip("no SLURM cluster (start one with `sudo .ci/slurm.sh start`)")


def default_partition() -> str:
    """The partition marked `*` by sinfo (else the first)."""
    names = _sh("sinfo", "-h", "-o", "%P").split()
    return next((n.rstrip("*") for n in names if n.endswith("*")), names[0])


def parse_record(line: str) -> dict[str, str]:
    """`Key=value Key2=value with spaces` (jobcomp / `scontrol -o`) -> dict."""
    return {k: v.strip() for k, v in _KV.findall(line.strip())}


def jobcomp_path() -> Path:
    for line in _sh("scontrol", "show", "config").splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "JobCompLoc":
            return Path(value.strip())
    raise AssertionError("scontrol show config has no JobCompLoc (JobCompType=jobcomp/filetxt)")


def job_records(
    job_ids: Sequence[str], name_prefix: str = "", wait_s: float = 60.0
) -> list[dict[str, str]]:
    """One dict per SLURM job: the jobcomp line merged over `scontrol show job -o`.

    `name_prefix` (the run's `--slurm-jobname-prefix`) guards against job ids that a
    restarted controller hands out again.

    Waits (up to `wait_s`) for every job to reach the jobcomp log, which slurmctld writes when
    the job ends. Keys of interest: JobState, ExitCode, Comment (`rule_<name>[_wildcards_..]`),
    TresPerJob (`gres:gpu:1` for a GPU request), CpusPerTres, NumCPUs, MinMemoryNode.
    """
    path = jobcomp_path()
    deadline = time.monotonic() + wait_s
    while True:
        done = {}
        if path.exists():
            for line in path.read_text().splitlines():
                rec = parse_record(line)
                if rec.get("JobId") in job_ids and rec.get("Name", "").startswith(name_prefix):
                    done[rec["JobId"]] = rec
        if len(done) == len(set(job_ids)) or time.monotonic() > deadline:
            break
        time.sleep(1)
    records = []
    for job_id in job_ids:
        try:
            live = parse_record(_sh("scontrol", "show", "job", "-o", job_id))
        except subprocess.CalledProcessError:
            live = {}  # purged after MinJobAge
        if not live.get("JobName", "").startswith(name_prefix):
            live = {}
        records.append({**live, **done.get(job_id, {"JobId": job_id})})
    return records


def run_snakemake_slurm(
    workdir: Path,
    configfile: Path | None = None,
    extra_args: Sequence[str] = (),
    *,
    snakefile: Path = MINI,
    workflow_profile: Path | str = "none",
    jobs: int = 2,
) -> list[dict[str, str]]:
    """Run snakemake with the SLURM executor in `workdir`; the record of every job it submitted.

    No account is passed: the plugin (2.8.0; its --slurm-no-account flag is a no-op) tries to
    guess one with sacct, fails, and submits without `-A`. Fails with the tail of the log when
    snakemake fails. `extra_args` go last, so they can
    override anything here (but `--default-resources` here replaces the profile's).
    """
    prefix = "saeflowtest" + uuid.uuid4().hex[:8]
    cmd = [
        sys.executable, "-m", "snakemake",
        "--snakefile", str(snakefile),
        "--directory", str(workdir),
        "--workflow-profile", str(workflow_profile),
        "--executor", "slurm",
        "--jobs", str(jobs),
        "--slurm-jobname-prefix", prefix,
        "--slurm-init-seconds-before-status-checks", "2",
        "--slurm-status-command", "squeue",
        "--slurm-keep-successful-logs",
        "--default-resources", f"slurm_partition={default_partition()}", "mem_mb=500",
        "runtime=30",
        "--latency-wait", "10",
    ]  # fmt: skip
    if configfile is not None:
        cmd += ["--configfile", str(configfile)]
    cmd += list(extra_args)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        slurm_logs = sorted((workdir / ".snakemake" / "slurm_logs").rglob("*.log"))
        tails = "\n".join(f"--- {p}\n{p.read_text()[-2000:]}" for p in slurm_logs)
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{log[-6000:]}\n{tails}")
    job_ids = _SUBMITTED.findall(log)
    return job_records(job_ids, name_prefix=prefix + "_")


def rule_of(record: dict[str, str]) -> str:
    """`Comment=rule_gpu_step` / `rule_cpu_part_wildcards_1` -> rule name."""
    comment = record.get("Comment", "")
    return comment.removeprefix("rule_").split("_wildcards_")[0]


def test_mini_workflow_runs_on_slurm(tmp_path):
    records = run_snakemake_slurm(tmp_path, workflow_profile=SLURM_PROFILE)

    assert len(records) == 3, records
    assert [r.get("JobState") for r in records] == ["COMPLETED"] * 3, records
    assert all(r.get("ExitCode") == "0:0" for r in records), records
    by_rule = sorted(rule_of(r) for r in records)
    assert by_rule == ["cpu_part", "cpu_part", "gpu_step"], records

    gpu = next(r for r in records if rule_of(r) == "gpu_step")
    assert "gpu" in gpu.get("TresPerJob", "") + gpu.get("TresPerNode", ""), gpu
    for cpu in (r for r in records if rule_of(r) == "cpu_part"):
        assert "gpu" not in cpu.get("TresPerJob", "") + cpu.get("TresPerNode", ""), cpu

    # The GPU job ran inside its SLURM allocation and gpu_slot() kept SLURM's device.
    out = (tmp_path / "out" / "gpu.txt").read_text()
    assert f"slurm_job={gpu['JobId']}" in out
    assert "slot=0" in out
    assert "(from CUDA_VISIBLE_DEVICES)" in out
    cpu_jobs = {r["JobId"] for r in records if rule_of(r) == "cpu_part"}
    assert {f"slurm_job={j}" for j in cpu_jobs} <= set(out.split())
