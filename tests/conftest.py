"""Shared pieces of the workflow tests: a workflow copy, snakemake runs and the tiny run.

Every workflow test works on a COPY of the workflow (Snakefile, rules, scripts, src, ...) in a
temporary directory that is also the working directory, so results/ never land in the repo, a
test may edit a script of its copy, and helpers editing the repo at the same time do not change
what a test sees. The tiny config (tests/configs/tiny.yaml) runs once per session
(`tiny_run`); tests that change files clone that finished run (`clone_run`) and work on the clone.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The workflow under test; another checkout (e.g. one with a candidate fix) can stand in for it.
WORKFLOW = Path(os.environ.get("SAEFLOW_TEST_WORKFLOW") or REPO)
CONFIGS = REPO / "tests" / "configs"
TINY = CONFIGS / "tiny.yaml"
TINY_DATA = CONFIGS / "gsm8k_tiny.jsonl"
WORKFLOW_ITEMS = (
    "Snakefile",
    "config.yaml",
    "rules",
    "scripts",
    "schemas",
    "envs",
    "profiles",
    "src",
    "configs",
)
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".snakemake", "results")
_JOB = re.compile(r"^(?:local)?rule (\S+):$")
CORES = "2"
# Full test runs are CPU-only, where the `gpu` resource (1 in profiles/default) would only run
# the "GPU" rules one at a time. Their jobs are mostly interpreter and torch start-up, so three at
# once on 2 cores cut the tiny run from ~3.9 to ~2.8 min. Rule threads stay at most 2 either way,
# so the bytes written are the same.
PARALLEL = ("--cores", "3", "--resources", "gpu=3")
TINY_TIMEOUT = 1200


@dataclass(frozen=True)
class Job:
    """One job of a dry run: its rule and its wildcards as printed (`a=1, b=x`)."""

    rule: str
    wildcards: str = ""
    output: str = ""
    reason: str = ""

    def __str__(self) -> str:
        return f"{self.rule}[{self.wildcards}]" if self.wildcards else self.rule


def copy_workflow(dest: Path) -> Path:
    """Copy the workflow files (of WORKFLOW, the repo by default) into `dest`; returns `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW_ITEMS:
        src = WORKFLOW / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=_IGNORE, dirs_exist_ok=True)
        elif src.exists():
            shutil.copy2(src, dest / name)
    return dest


def install_tiny_config(workdir: Path, name: str = "tiny.yaml") -> Path:
    """tiny.yaml and the data file it names, side by side in `workdir`."""
    shutil.copy2(TINY_DATA, workdir / TINY_DATA.name)
    target = workdir / name
    shutil.copy2(TINY, target)
    return target


def workflow_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a snakemake subprocess: offline, this venv first on PATH."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        PYTHONDONTWRITEBYTECODE="1",
    )
    env.pop("SAEFLOW_TEST_SHARD_DELAY", None)
    if extra:
        env.update(extra)
    return env


def snakemake_cmd(workdir: Path, *args: str, snakefile: Path | None = None) -> list[str]:
    """`python -m snakemake` on the workflow copy in `workdir` (its default profile applies)."""
    snakefile = snakefile or workdir / "Snakefile"
    return [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(snakefile),
        "--directory",
        str(workdir),
        *args,
    ]


def run_snakemake(
    workdir: Path,
    *args: str,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    timeout: float = 900,
    snakefile: Path | None = None,
) -> subprocess.CompletedProcess:
    """Run snakemake to the end; on failure (with `check`) fail the test with the log's tail."""
    proc = subprocess.run(
        snakemake_cmd(workdir, *args, snakefile=snakefile),
        cwd=workdir,
        env=workflow_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        pytest.fail(
            f"snakemake {' '.join(args)} failed ({proc.returncode}):\n"
            f"{(proc.stdout + proc.stderr)[-8000:]}",
            pytrace=False,
        )
    return proc


def parse_dry_run(text: str) -> list[Job]:
    """The jobs that a `snakemake -n` log lists (one `rule X:` / `localrule X:` block each)."""
    jobs: list[Job] = []
    current: dict[str, str] | None = None
    for line in text.splitlines():
        m = _JOB.match(line.strip()) if not line.startswith("    ") else None
        if m:
            if current is not None:
                jobs.append(Job(**current))
            current = {"rule": m.group(1)}
            continue
        if current is not None and line.startswith("    "):
            key, _, value = line.strip().partition(": ")
            if key in ("wildcards", "output", "reason"):
                current[key] = value
        elif current is not None and line.strip() and not line.startswith("["):
            jobs.append(Job(**current))
            current = None
    if current is not None:
        jobs.append(Job(**current))
    return jobs


def parse_job_stats(text: str) -> dict[str, int]:
    """The first `Job stats:` table of a snakemake log as {rule: count} (without `total`)."""
    lines = iter(text.splitlines())
    for line in lines:
        if line.strip() == "Job stats:":
            break
    else:
        return {}
    counts: dict[str, int] = {}
    for line in lines:
        parts = line.split()
        if not parts or parts[0] == "total":
            break
        if len(parts) == 2 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
    return counts


def dry_run(workdir: Path, *args: str, env: Mapping[str, str] | None = None) -> list[Job]:
    """Jobs that snakemake would run now (rule `all` left out).

    The job blocks are cross-checked against snakemake's own `Job stats` table, so a change in
    the log format fails loudly instead of reading as "no job".
    """
    proc = run_snakemake(workdir, "-n", "--cores", CORES, *args, env=env)
    text = proc.stdout + proc.stderr
    jobs = parse_dry_run(text)
    counts: dict[str, int] = {}
    for job in jobs:
        counts[job.rule] = counts.get(job.rule, 0) + 1
    assert counts == parse_job_stats(text), f"cannot parse this dry run:\n{text[-4000:]}"
    if not jobs:
        assert "Nothing to be done" in text, text[-4000:]
    return [j for j in jobs if j.rule != "all"]


def job_names(jobs: Iterable[Job]) -> set[str]:
    return {str(j) for j in jobs}


def tree_snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """relative path -> (size, mtime_ns) of every file and directory under `root`."""
    if not root.exists():
        return {}
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (0 if p.is_dir() else st.st_size, st.st_mtime_ns)
    return out


def done_shards(folder: Path) -> int:
    """Shards an activation cache job has finished in `folder` (its progress file), 0 before."""
    import json

    from saeflow.io import PROGRESS

    try:
        return len(json.loads((folder / PROGRESS).read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return 0


def files_under(root: Path, pattern: str = "*") -> dict[str, bytes]:
    """relative path -> bytes of every file under `root` matching `pattern`."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob(pattern)) if p.is_file()
    }


@dataclass
class TinyRun:
    """A finished run of the tiny config in `workdir` (do not modify it: clone it)."""

    workdir: Path
    configfile: Path
    seconds: float
    log: str

    @property
    def results(self) -> Path:
        return self.workdir / "results"


def clone_run(run: TinyRun, dest: Path) -> TinyRun:
    """A copy of a finished run (workflow, config, results/ and .snakemake/ metadata, mtimes)."""
    shutil.copytree(run.workdir, dest, symlinks=True, ignore=shutil.ignore_patterns("locks"))
    return TinyRun(dest, dest / run.configfile.name, 0.0, "")


def wait_for(
    predicate: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen | None = None
) -> None:
    """Poll `predicate` until true; fail after `timeout` s or when `proc` ends first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            pytest.fail(f"snakemake ended ({proc.returncode}) before {what}:\n{out[-6000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def start_snakemake(
    workdir: Path, *args: str, env: Mapping[str, str] | None = None
) -> subprocess.Popen:
    """snakemake in its own process group (so a test can SIGKILL it with all its jobs)."""
    return subprocess.Popen(
        snakemake_cmd(workdir, *args),
        cwd=workdir,
        env=workflow_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


_tiny_failure: list[str] = []


@dataclass
class _BackgroundRun:
    """A tiny run going in the background; `root` (if set) is removed when the session ends."""

    workdir: Path
    configfile: Path
    log_path: Path
    proc: subprocess.Popen
    start: float
    root: Path | None = None


_tiny_background: list[_BackgroundRun] = []


def _start_tiny_run(workdir: Path | None = None, unlock: bool = False) -> _BackgroundRun:
    """Copy the workflow and tiny config into `workdir` and start snakemake there.

    Without `workdir`, the run goes into a new temporary folder, removed when the session ends.
    `unlock` first clears a lock an interrupted earlier session left in a kept `workdir`.
    """
    root = None
    if workdir is None:
        root = Path(tempfile.mkdtemp(prefix="saeflow-tiny-"))
        workdir = root / "wf"
    copy_workflow(workdir)
    configfile = install_tiny_config(workdir)
    if unlock:
        run_snakemake(workdir, "--configfile", configfile.name, "--unlock", check=False)
    log_dir = root or workdir / ".snakemake"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / "tiny_run.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            snakemake_cmd(workdir, "--configfile", configfile.name, *PARALLEL),
            cwd=workdir,
            env=workflow_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    run = _BackgroundRun(workdir, configfile, log_path, proc, time.monotonic(), root)
    _tiny_background.append(run)
    return run


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the tiny run now if a collected test needs it (not with SAEFLOW_TEST_TINY_RUN).

    The run is mostly interpreter and torch start-up in small jobs and the unit tests mostly use
    one core, so running both at once saves wall time on 2 cores; `tiny_run` waits for it.
    """
    if session.config.option.collectonly or os.environ.get("SAEFLOW_TEST_TINY_RUN"):
        return
    if not any("tiny_run" in getattr(item, "fixturenames", ()) for item in session.items):
        return
    _start_tiny_run()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Stop a tiny run that is still going (interrupted session); remove the temporary one."""
    for run in _tiny_background:
        if run.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(run.proc.pid, signal.SIGKILL)
            run.proc.wait()
        if run.root is not None:
            shutil.rmtree(run.root, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_run() -> TinyRun:
    """The tiny config run once per session, start to end, three jobs at a time (PARALLEL).

    Started in the background after collection (see pytest_collection_finish); this waits for
    it. `SAEFLOW_TEST_TINY_RUN=<dir>` keeps the run in <dir> across sessions instead: the
    workflow and config are copied over it and snakemake brings it up to date (for debugging).
    """
    if _tiny_failure:
        pytest.fail(_tiny_failure[0], pytrace=False)
    if not _tiny_background:
        keep = os.environ.get("SAEFLOW_TEST_TINY_RUN")
        _start_tiny_run(Path(keep) if keep else None, unlock=bool(keep))
    run = _tiny_background[0]
    try:
        returncode = run.proc.wait(timeout=TINY_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(run.proc.pid, signal.SIGKILL)
        returncode = run.proc.wait()
    log = run.log_path.read_text()
    if returncode != 0:
        _tiny_failure.append(f"the tiny run failed ({returncode}):\n{log[-8000:]}")
        pytest.fail(_tiny_failure[0], pytrace=False)
    return TinyRun(run.workdir, run.configfile, time.monotonic() - run.start, log)


def pytest_configure(config: pytest.Config) -> None:
    # Registered here too so these files also run without the pyproject markers.
    for marker in ("workflow: runs snakemake on a tiny config", "slurm: needs a SLURM cluster"):
        config.addinivalue_line("markers", marker)
