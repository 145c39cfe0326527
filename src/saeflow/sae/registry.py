"""SAEs named as the field names them: a SAELens release + SAE id, resolved offline.

`saes.<name>: {release: gemma-scope-9b-pt-res-canonical, sae_id: layer_20/width_131k/canonical}`
is looked up in SAELens's registry (`pretrained_saes.yaml`, vendored beside the package with its
MIT licence, so config checks need no network). The entry gives the hub repository (`repo_id`),
the folder (`path`), the file layout (from the release's `conversion_func`) and the Neuronpedia
id; they replace hand-copied strings. A configured `neuronpedia`, `format`, `repo` or `path` that
disagrees with the registry is a config error (one source of truth; resolving twice is harmless).
Conversions saeflow has no loader for are refused with the release named.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import yaml

from saeflow.errors import ConfigError

REGISTRY_PATH = Path(__file__).resolve().parents[1] / "pretrained_saes.yaml"
# SAELens `conversion_func` -> saeflow format (the published file layout each one loads)
FORMAT_OF_CONVERSION: dict[str | None, str] = {
    None: "saelens",
    "gemma_2": "gemmascope",
    "dictionary_learning_1": "dictionary_learning",
    "temporal": "temporal",
}


@functools.cache
def load_registry(path: str | None = None) -> dict[str, Any]:
    """The parsed registry (release -> entry); C loader when available (~0.2 s for 600 kB)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    file = Path(path) if path else REGISTRY_PATH
    try:
        data = yaml.load(file.read_text(), Loader=loader)  # noqa: S506 - a safe loader
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"SAELens registry {file}: unreadable ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"SAELens registry {file}: top level must be a mapping")
    return data


def resolve(release: str, sae_id: str, *, where: str = "saes", path: str | None = None) -> dict:
    """{release, sae_id, repo, path, format, neuronpedia, model} of one registry SAE."""
    reg = load_registry(path)
    if release not in reg:
        close = sorted(r for r in reg if r.split("-")[:3] == release.split("-")[:3])[:5]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise ConfigError(f"{where}.release = {release!r}: not in SAELens's registry{hint}")
    entry = reg[release]
    conversion = entry.get("conversion_func")
    if conversion not in FORMAT_OF_CONVERSION:
        raise ConfigError(
            f"{where}.release = {release!r}: SAELens loads it with conversion "
            f"{conversion!r}, which saeflow has no loader for; give format, repo and path instead"
        )
    found = [s for s in entry.get("saes", []) if s.get("id") == sae_id]
    if not found:
        ids = [s.get("id") for s in entry.get("saes", [])]
        close = [i for i in ids if str(i).split("/")[0] == sae_id.split("/")[0]][:6]
        hint = f"; ids like it: {', '.join(close)}" if close else f"; {len(ids)} ids"
        raise ConfigError(f"{where}.sae_id = {sae_id!r}: release {release} has no such SAE{hint}")
    sae = found[0]
    return {
        "release": release,
        "sae_id": sae_id,
        "repo": entry["repo_id"],
        "path": sae.get("path", sae_id),
        "format": FORMAT_OF_CONVERSION[conversion],
        "neuronpedia": sae.get("neuronpedia"),
        "model": entry.get("model"),
    }


def apply_registry(name: str, spec: dict[str, Any]) -> None:
    """Fill repo/path/format/neuronpedia of a `release` + `sae_id` SAE spec in place (checked)."""
    where = f"saes.{name}"
    if spec.get("release") is None and spec.get("sae_id") is None:
        if not spec.get("format"):
            raise ConfigError(
                f"{where}: needs format (or release + sae_id from SAELens's registry)"
            )
        return
    if not spec.get("release") or not spec.get("sae_id"):
        missing = "sae_id" if spec.get("release") else "release"
        raise ConfigError(
            f"{where}: a SAELens-registry SAE needs both release and sae_id ({missing})"
        )
    found = resolve(str(spec["release"]), str(spec["sae_id"]), where=where)
    for key in ("repo", "path"):
        if spec.get(key) and spec[key] != found[key]:
            raise ConfigError(
                f"{where}.{key} = {spec[key]!r}: SAELens's registry gives {found[key]!r} for "
                f"{found['release']} / {found['sae_id']}; leave {key} out (the registry names it)"
            )
    if spec.get("format") and spec["format"] != found["format"]:
        raise ConfigError(
            f"{where}.format = {spec['format']!r}: SAELens's registry stores "
            f"{found['release']} / {found['sae_id']} as {found['format']}"
        )
    configured = spec.get("neuronpedia")
    if configured and found["neuronpedia"] and configured != found["neuronpedia"]:
        raise ConfigError(
            f"{where}.neuronpedia = {configured!r}: SAELens's registry gives "
            f"{found['neuronpedia']!r} for {found['release']} / {found['sae_id']} "
            f"(path {found['path']}): the links would open another SAE's features"
        )
    spec.update(repo=found["repo"], path=found["path"], format=found["format"])
    spec["neuronpedia"] = configured or found["neuronpedia"]
