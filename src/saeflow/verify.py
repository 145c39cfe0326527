"""Checks that an artifact is what its manifest says before anything is computed from it.

Each loader calls one of these: a damaged or foreign file becomes one `saeflow` line that names
the file and says what to do, never a library traceback, never a silently reinterpreted buffer
and never advice to unpickle. JSON written by saeflow is strict (non-finite numbers become null).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from saeflow.errors import DataError

RERUN = "delete it and rerun the rule that wrote it"


def json_safe(obj: Any) -> Any:
    """`obj` as plain JSON data, NaN and infinities as None (JSON has no NaN)."""
    if isinstance(obj, Mapping):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return json_safe(obj.tolist())
    return obj


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """A sharded output's manifest.json, as a mapping; unreadable JSON is one line."""
    from saeflow import io as sio

    path = Path(directory)
    path = path if path.name == sio.MANIFEST else path / sio.MANIFEST
    try:
        manifest = sio.read_manifest(path.parent)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err}); the output is damaged: {RERUN}") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: expected a JSON object; the output is damaged: {RERUN}")
    return manifest


def _need_keys(path: Path, manifest: Mapping[str, Any], keys: Iterable[str]) -> None:
    missing = [k for k in keys if k not in manifest]
    if missing:
        raise DataError(f"{path}: manifest lacks {', '.join(missing)}; {RERUN}")


def activation_manifest(directory: Path, manifest: Mapping[str, Any]) -> None:
    """dtype vs itemsize, shard files present, shard token counts summing to n_tokens."""
    import torch

    path = directory / "manifest.json"
    _need_keys(path, manifest, ("format", "dtype", "d_model", "shards"))
    dtype = getattr(torch, str(manifest["dtype"]), None)
    if not isinstance(dtype, torch.dtype):
        raise DataError(f"{path}: unknown dtype {manifest['dtype']!r}; {RERUN}")
    size = torch.empty((), dtype=dtype).element_size()
    if "itemsize" in manifest and int(manifest["itemsize"]) != size:
        raise DataError(
            f"{path}: dtype {manifest['dtype']} has {size}-byte items but the manifest says "
            f"itemsize {manifest['itemsize']}; the manifest does not match its shards: {RERUN}"
        )
    shards = manifest["shards"]
    for shard in shards:
        file = directory / shard["file"]
        if not file.is_file():
            raise DataError(f"{file}: shard listed in {path} is missing; {RERUN}")
    counts = [s.get("n_tokens") for s in shards]
    if "n_tokens" in manifest and None not in counts and sum(counts) != int(manifest["n_tokens"]):
        raise DataError(
            f"{path}: its {len(shards)} shards hold {sum(counts)} tokens but n_tokens is "
            f"{manifest['n_tokens']} (a shard is missing from the list?); {RERUN}"
        )


def codes_manifest(directory: Path, manifest: Mapping[str, Any]) -> None:
    """One token count per shard, summing to n_tokens, and every shard file present."""
    path = directory / "manifest.json"
    _need_keys(path, manifest, ("parts", "shards", "d_sae"))
    shards = list(manifest["shards"])
    counts = manifest.get("shard_tokens")
    if counts is not None and len(counts) != len(shards):
        raise DataError(
            f"{path}: lists {len(shards)} shards but {len(counts)} shard token counts; {RERUN}"
        )
    if counts is not None and "n_tokens" in manifest and sum(counts) != int(manifest["n_tokens"]):
        raise DataError(
            f"{path}: shards hold {sum(counts)} tokens but n_tokens is {manifest['n_tokens']}; "
            f"{RERUN}"
        )
    for folder in manifest["parts"].values():
        for shard in shards:
            file = directory / folder / shard
            if not file.is_file():
                raise DataError(f"{file}: listed in {path} but missing; {RERUN}")


def shard_rows(path: Path, n_rows: int, record: Mapping[str, Any]) -> None:
    """A shard holds as many rows as its manifest record says."""
    want = record.get("n_tokens")
    if want is not None and int(want) != n_rows:
        raise DataError(
            f"{path}: holds {n_rows} rows but its manifest says {want}; the shard does not "
            f"belong to this manifest: {RERUN}"
        )


def activation_shard(
    path: Path, rows: tuple[Any, Any, Any], record: Mapping[str, Any], dtype: Any, d_model: int
) -> None:
    """Rows, dtype and width of one activation shard as its manifest says."""
    seq_N, pos_N, acts_ND = rows
    shard_rows(path, len(seq_N), record)
    if len(pos_N) != len(seq_N) or tuple(acts_ND.shape) != (len(seq_N), int(d_model)):
        raise DataError(
            f"{path}: activations of shape {tuple(acts_ND.shape)} for {len(seq_N)} rows of "
            f"d_model {d_model}; {RERUN}"
        )
    if acts_ND.dtype != dtype:
        raise DataError(f"{path}: holds {acts_ND.dtype}, the manifest says {dtype}; {RERUN}")


def read_parquet(path: str | os.PathLike, **kwargs: Any) -> Any:
    """pyarrow.parquet.read_table with a truncated or foreign file as one line."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path, **kwargs)
    except (pa.ArrowException, OSError) as err:
        size = Path(path).stat().st_size if Path(path).exists() else 0
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise DataError(
            f"{path}: not a readable Parquet file ({size} bytes; {first}); it is probably "
            f"truncated: {RERUN}"
        ) from None


def read_pt(path: str | os.PathLike) -> Any:
    """torch.load(weights_only=True); a pickled or damaged file is one line (never unpickled)."""
    import torch

    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise DataError(
            f"{path}: refused: it holds pickled Python objects, not only tensors, and saeflow "
            f"never unpickles; {RERUN} (or convert it to safetensors)"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, KeyError) as err:
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise DataError(f"{path}: not a readable torch file ({first}); {RERUN}") from None


def finite_weights(where: str, tensors: Mapping[str, Any]) -> None:
    """Every floating tensor finite: a NaN weight would give empty codes and NaN metrics."""
    import torch

    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise DataError(
                f"{where}: weight {name} has {bad} NaN/inf values; the SAE is broken "
                "(retrain it, or fetch it again)"
            )


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def safetensors_complete(path: Path) -> None:
    """The header of a .safetensors file parses and its tensors fit in the file (no truncation);
    reads only the header."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= size - 8:
                raise ValueError(f"header length {n}")
            header = json.loads(f.read(n))
        end = max(
            (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
            default=0,
        )
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as err:
        raise DataError(
            f"{path}: not a readable safetensors file ({size} bytes; {err}); it is probably "
            "truncated: delete it and download or save it again"
        ) from None
    if 8 + n + end > size:
        raise DataError(
            f"{path}: truncated ({size} bytes, its header needs {8 + n + end}); delete it and "
            "download or save it again"
        )


def model_folder(path: str | os.PathLike, trust_remote_code: bool) -> None:
    """A local model folder that transformers can load safely: config.json, safetensors weights
    (complete), and custom code only when the config opts in."""
    folder = Path(path)
    if not folder.is_dir():
        return
    cfg_path = folder / "config.json"
    if not cfg_path.is_file() and any(folder.glob("*.gguf")):
        return  # a GGUF model: config, weights and tokenizer are inside the GGUF file
    if not cfg_path.is_file():
        raise DataError(f"{folder}: no config.json, so this is not a Hugging Face model folder")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{cfg_path}: not valid JSON ({err})") from None
    if isinstance(cfg, dict) and cfg.get("auto_map") and not trust_remote_code and not _known(cfg):
        raise DataError(
            f"{folder}: this model needs its own Python code (config.json auto_map); if you "
            "trust it, set trust_remote_code: true in its models.<name> entry"
        )
    weights = sorted(folder.glob("*.safetensors"))
    if not weights and any(folder.glob("*.gguf")):
        return  # GGUF weights: checked by the GGUF reader
    if not weights:
        pickled = [p.name for p in (*folder.glob("*.bin"), *folder.glob("*.pt")) if p.is_file()]
        if pickled:
            raise DataError(
                f"{folder}: weights only as {pickled[0]} (a pickle, which saeflow never loads); "
                "use the model's safetensors files (most hub models publish them)"
            )
        raise DataError(f"{folder}: no *.safetensors weights")
    for file in weights:
        safetensors_complete(file)


def _known(cfg: Mapping[str, Any]) -> bool:
    """transformers has its own class for this model_type (then auto_map is not needed)."""
    from transformers import CONFIG_MAPPING

    return cfg.get("model_type") in CONFIG_MAPPING


def tokenizer_folder(path: str | os.PathLike) -> None:
    """A local folder has at least one tokenizer vocabulary file."""
    folder = Path(path)
    if folder.is_dir() and any(folder.glob("*.gguf")):
        return  # the tokenizer is read from the GGUF file
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise DataError(
            f"{folder}: no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); copy them "
            "from where the model came from"
        )


def model_error(path: str | os.PathLike, err: Exception) -> DataError:
    """One line for a model transformers cannot load (custom code, unknown type, missing files)."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    if "trust_remote_code" in str(err):
        return DataError(
            f"model {path}: needs its own Python code; if you trust it, set "
            "trust_remote_code: true in its models.<name> entry"
        )
    return DataError(f"model {path}: cannot be loaded ({first})")
