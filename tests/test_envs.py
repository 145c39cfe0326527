"""The per-rule conda envs pin exactly what pyproject.toml pins (and what the tests ran with)."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
ENVS = sorted((REPO / "envs").glob("*.yaml"))
PYTHON_311 = re.compile(r"^python\s*=?=\s*3\.11(\.\*|\.\d+)?$")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _exact(req: Requirement, where: str) -> Version:
    """The version of an `==` pin; anything looser is a reproducibility bug."""
    specs = list(req.specifier)
    assert len(specs) == 1 and specs[0].operator == "==", f"{where}: {req} is not an exact == pin"
    return Version(specs[0].version)


def pyproject_pins() -> dict[str, Version]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lines = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        lines += extra
    pins: dict[str, Version] = {}
    for line in lines:
        req = Requirement(line)
        pins[_norm(req.name)] = _exact(req, "pyproject.toml")
    return pins


def env_pins(path: Path) -> dict[str, Version]:
    spec = yaml.safe_load(path.read_text())
    pip_lists = [d["pip"] for d in spec["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_lists) == 1, f"{path.name}: expected one pip section"
    pins: dict[str, Version] = {}
    for line in pip_lists[0]:
        req = Requirement(line)
        name = _norm(req.name)
        assert name not in pins, f"{path.name}: {req.name} listed twice"
        pins[name] = _exact(req, path.name)
    return pins


def test_three_envs_exist():
    assert [p.name for p in ENVS] == ["analysis.yaml", "report.yaml", "torch.yaml"]


@pytest.mark.parametrize("path", ENVS, ids=lambda p: p.name)
def test_env_parses_and_names_python_311(path):
    spec = yaml.safe_load(path.read_text())
    assert spec["channels"][0] == "conda-forge", path.name
    conda_deps = [d for d in spec["dependencies"] if isinstance(d, str)]
    assert any(PYTHON_311.match(d.replace(" ", "")) for d in conda_deps), conda_deps
    assert "pip" in conda_deps, f"{path.name}: the pip section needs pip from conda"


@pytest.mark.parametrize("path", ENVS, ids=lambda p: p.name)
def test_env_pins_equal_pyproject(path):
    project = pyproject_pins()
    for name, version in env_pins(path).items():
        assert name in project, f"{path.name}: {name} is not a pinned dependency in pyproject.toml"
        assert version == project[name], (
            f"{path.name}: {name}=={version}, pyproject {project[name]}"
        )


def test_torch_env_pins_torch():
    assert env_pins(REPO / "envs" / "torch.yaml")["torch"] == Version("2.13.0")


def test_pyproject_pins_match_installed():
    """The pins are the versions the test suite runs with (local labels like +cpu ignored)."""
    mismatched = []
    for name, pinned in pyproject_pins().items():
        try:
            installed = Version(importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            continue  # e.g. an extra that this environment did not install
        if Version(installed.public) != pinned:
            mismatched.append(f"{name}: pinned {pinned}, installed {installed}")
    assert not mismatched, mismatched
