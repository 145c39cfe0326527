"""A bad config fails before any job runs: one line naming the key and the value, a non-zero exit,
and nothing under results/ changes. Most cases call `saeflow.config.load_config` directly (fast);
a few run snakemake itself to prove the message reaches the user as one line.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import (
    REPO,
    TINY,
    TINY_DATA,
    copy_workflow,
    install_tiny_config,
    run_snakemake,
    tree_snapshot,
)

from saeflow.config import load_config
from saeflow.errors import ConfigError

BAD_YAML = "models:\n  base: {layer: 1\ndatasets:\n  x: [\n"
PREFIX = "saeflow: config error: "
N_LAYERS = 2  # organism.base_lm of tiny.yaml


def tiny_config() -> dict[str, Any]:
    return yaml.safe_load(TINY.read_text())


def write_config(directory: Path, cfg: dict[str, Any], name: str = "config.yaml") -> Path:
    """`cfg` as YAML in `directory`, with the tiny data file beside it (relative paths resolve)."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy2(TINY_DATA, directory / TINY_DATA.name)
    path = directory / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _analysis(cfg: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(a for a in cfg["analyses"] if a["type"] == kind)


def _index(cfg: dict[str, Any], kind: str) -> int:
    return next(i for i, a in enumerate(cfg["analyses"]) if a["type"] == kind)


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A mutation that sets the dotted key `path` (list items as [i]) to `value`."""

    def apply(cfg: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = cfg
        for part in parents:
            node = node[int(part[1:-1])] if part.startswith("[") else node[part]
        node[last] = value

    return apply


def _layer_at_n_layers(cfg: dict[str, Any]) -> None:
    cfg["models"]["base"]["layer"] = N_LAYERS


def _layer_beyond(cfg: dict[str, Any]) -> None:
    cfg["models"]["chat"]["layer"] = N_LAYERS + 5


def _unknown_model(cfg: dict[str, Any]) -> None:
    _analysis(cfg, "umap")["model"] = "gpt5"


def _unknown_model_in_list(cfg: dict[str, Any]) -> None:
    _analysis(cfg, "diffing")["models"] = ["base", "gpt5"]


def _unknown_sae(cfg: dict[str, Any]) -> None:
    _analysis(cfg, "similarity")["sae"] = "nosae"


def _unknown_dataset(cfg: dict[str, Any]) -> None:
    _analysis(cfg, "diffing")["target"] = "nodata"


def _unknown_train_dataset(cfg: dict[str, Any]) -> None:
    cfg["saes"]["topk"]["train"]["datasets"] = ["nodata"]


def _duplicate_analysis(cfg: dict[str, Any]) -> None:
    cfg["analyses"].append(copy.deepcopy(_analysis(cfg, "umap")))


def _pred_on_topk(cfg: dict[str, Any]) -> None:
    _analysis(cfg, "umap")["sae"] = "topk"


CASES = [
    pytest.param(
        _set("datasets.gsm8k.path", "missing.jsonl"),
        "datasets.gsm8k.path",
        "missing.jsonl",
        id="missing-dataset-file",
    ),
    pytest.param(
        _set("datasets.gsm8k.fields", {"instruction": "prompt", "output": "answer"}),
        "datasets.gsm8k.fields.instruction",
        "'prompt'",
        id="missing-text-field",
    ),
    pytest.param(_layer_at_n_layers, "models.base.layer", "= 2", id="layer-at-n_layers"),
    pytest.param(_layer_beyond, "models.chat.layer", "= 7", id="layer-beyond-n_layers"),
    pytest.param(_set("models.base.layer", -1), "models.base.layer", "-1", id="negative-layer"),
    pytest.param(_unknown_model, "analyses[1].model", "'gpt5'", id="unknown-model-in-analysis"),
    pytest.param(_unknown_model_in_list, "analyses[0].models", "'gpt5'", id="unknown-model-list"),
    pytest.param(_unknown_sae, "analyses[2].sae", "'nosae'", id="unknown-sae-in-analysis"),
    pytest.param(_unknown_dataset, "analyses[0].target", "'nodata'", id="unknown-dataset"),
    pytest.param(
        _unknown_train_dataset, "saes.topk.train.datasets", "'nodata'", id="unknown-train-dataset"
    ),
    pytest.param(
        _set("datasets.dialogues.num_sequences", -3),
        "datasets.dialogues.num_sequences",
        "-3",
        id="negative-num_sequences",
    ),
    pytest.param(
        _set("datasets.dialogues.context_length", "long"),
        "datasets.dialogues.context_length",
        '"long"',
        id="wrong-type",
    ),
    pytest.param(_set("runtime.device", "tpu"), "runtime.device", '"tpu"', id="bad-device"),
    pytest.param(
        _duplicate_analysis,
        f"analyses[{len(tiny_config()['analyses'])}].name",  # the appended copy
        "'pred_dialogues'",
        id="duplicate-name",
    ),
    pytest.param(_pred_on_topk, "analyses[1].codes", "'pred'", id="pred-codes-need-temporal"),
]


def test_tiny_config_is_valid(tmp_path):
    from saeflow.config import model_n_layers

    cfg = load_config(write_config(tmp_path, tiny_config()))
    assert model_n_layers(cfg, "base") == N_LAYERS
    assert {a["type"] for a in cfg["analyses"]} >= {"diffing", "umap", "similarity"}


def test_tiny_config_has_every_analysis_type_of_the_default_config():
    default = yaml.safe_load((REPO / "config.yaml").read_text())
    tiny = tiny_config()
    assert {a["type"] for a in default.get("analyses", [])} <= {a["type"] for a in tiny["analyses"]}
    assert {s["format"] for s in default["saes"].values()} <= {
        s["format"] for s in tiny["saes"].values()
    }
    assert any(d["source"] == "file" for d in tiny["datasets"].values())


@pytest.mark.parametrize(("mutate", "key", "value"), CASES)
def test_bad_config_is_one_line_naming_key_and_value(tmp_path, mutate, key, value):
    cfg = tiny_config()
    mutate(cfg)
    with pytest.raises(ConfigError) as err:
        load_config(write_config(tmp_path, cfg))
    message = str(err.value)
    assert "\n" not in message, message
    assert key in message, message
    assert value in message, message


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(BAD_YAML)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "\n" not in message
    assert str(path) in message and "line 3" in message and "not valid YAML" in message


def test_missing_config_file_names_it(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_real_model_configs_validate_offline(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = load_config(REPO / "configs" / name)
    assert cfg["models"] and cfg["datasets"]


# ----------------------------------------------------------------------------- through snakemake


def _results_tree(workdir: Path) -> Path:
    """A results/ tree with a few files, standing for the outputs of an earlier run."""
    results = workdir / "results"
    (results / "data").mkdir(parents=True)
    (results / "data" / "dialogues.parquet").write_bytes(b"earlier output")
    (results / "reports").mkdir()
    (results / "reports" / "index.html").write_text("<html></html>")
    return results


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(PREFIX)]


@pytest.mark.parametrize("dry", [True, False], ids=["dry-run", "run"])
def test_snakemake_stops_before_any_job(tmp_path, dry):
    """A layer out of range, through `snakemake [-n] --configfile`: one line, exit 1, no change."""
    workdir = tmp_path
    results = _results_tree(workdir)
    cfg = tiny_config()
    cfg["models"]["base"]["layer"] = 9
    write_config(workdir, cfg, "bad.yaml")
    before = tree_snapshot(results)

    args = ["--cores", "1", "--configfile", "bad.yaml"]
    proc = run_snakemake(
        workdir, *(["-n"] if dry else []), *args, check=False, snakefile=REPO / "Snakefile"
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text
    assert _error_lines(text) == [f"{PREFIX}models.base.layer = 9: the model has 2 layers (0..1)"]
    assert "Traceback" not in text
    assert tree_snapshot(results) == before
    assert not (workdir / "logs").exists()


def test_malformed_default_config_yaml(tmp_path):
    """The workflow's own config.yaml (no --configfile) is broken: one line naming file and line."""
    workdir = copy_workflow(tmp_path / "wf")
    (workdir / "config.yaml").write_text(BAD_YAML)
    results = _results_tree(workdir)
    before = tree_snapshot(results)

    proc = run_snakemake(workdir, "-n", "--cores", "1", check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text
    lines = _error_lines(text)
    assert len(lines) == 1, text
    assert "config.yaml" in lines[0] and "line 3" in lines[0] and "not valid YAML" in lines[0]
    assert "Traceback" not in text
    assert tree_snapshot(results) == before


def test_malformed_configfile(tmp_path):
    """A broken --configfile is parsed by snakemake itself, before the Snakefile: its own one-line
    WorkflowError (which does not name the file), a non-zero exit and no change."""
    workdir = tmp_path
    results = _results_tree(workdir)
    install_tiny_config(workdir)
    (workdir / "broken.yaml").write_text(BAD_YAML)
    before = tree_snapshot(results)

    proc = run_snakemake(
        workdir,
        "-n",
        "--cores",
        "1",
        "--configfile",
        "broken.yaml",
        check=False,
        snakefile=REPO / "Snakefile",
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text
    assert "not valid JSON or YAML" in text
    assert "Traceback" not in text
    assert tree_snapshot(results) == before


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_real_model_configs_dry_run_offline(tmp_path, name):
    """`snakemake -n` on each real-model config builds its whole DAG with no network."""
    proc = run_snakemake(
        tmp_path,
        "-n",
        "--cores",
        "1",
        "--configfile",
        str(REPO / "configs" / name),
        snakefile=REPO / "Snakefile",
    )
    text = proc.stdout + proc.stderr
    assert "cache_activations" in text and "report_index" in text, text[-3000:]
    assert not (tmp_path / "results").exists()
