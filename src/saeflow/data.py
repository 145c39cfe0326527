"""Fetch a configured dataset into one canonical Parquet table (`results/data/{dataset}.parquet`).

Every source (Hugging Face hub, a local file, an organism corpus) ends in the same two shapes, so
later stages never care where text came from:

- non-chat: `seq_id` int32, `text` string;
- chat: `seq_id` int32, `messages` list<struct<role: string, content: string>>, roles normalised
  to `user` / `assistant` / `system` (aliases `human`, `model`, `gpt`, `bot` are accepted).

Field mapping (`fields:` in the dataset spec) picks the columns that hold the text:
`{text: col}`, `{messages: col}` or `{instruction: col, input: col, output: col}` (input and
output optional; instruction + input become the user turn, joined by a blank line, and output the
assistant turn). Without `fields`, the first match among `messages`, `conversations`, `text`,
`instruction`(+`input`, `output`), `question`+`answer`, `prompt`(+`completion`|`response`) is used.

A non-chat dataset built from chat records renders them as plain "User: ...\\nModel: ...\\n"
lines; a chat dataset built from text records turns each text into a single user message.

Plain `.txt` files hold one record per non-empty line; `txt_records: paragraph` switches to one
record per blank-line-separated paragraph (lines joined by newlines).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from saeflow.errors import ConfigError, DataError
from saeflow.io import atomic_path

log = logging.getLogger("saeflow.data")

MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])
TEXT_SCHEMA = pa.schema([("seq_id", pa.int32()), ("text", pa.string())])
CHAT_SCHEMA = pa.schema([("seq_id", pa.int32()), ("messages", pa.list_(MESSAGE_TYPE))])

FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".tsv": "tsv",
    ".txt": "txt",
}
FIELD_KEYS = ("text", "messages", "instruction", "input", "output")
ROLE_ALIASES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "model": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "system": "system",
}
PLAIN_LABELS = {"user": "User", "assistant": "Model", "system": "System"}
HEADER_ROWS = 20

Record = dict[str, Any]


def fetch_dataset(
    name: str,
    spec: dict[str, Any],
    out_path: str | os.PathLike,
    *,
    config_dir: str | os.PathLike | None = None,
    organism_corpus_dir: str | os.PathLike | None = None,
    seed: int = 0,
) -> None:
    """Read the dataset `name` described by `spec` and write the canonical table to `out_path`."""
    source = spec.get("source", "hf")
    n_max = _num_sequences(name, spec)
    if source == "hf":
        columns, rows = _read_hf(name, spec, n_max, spec.get("seed", seed))
        where = f"hf:{spec['hf_name']}"
    elif source == "file":
        path = resolve_path(name, spec, config_dir)
        if not path.is_file():
            raise DataError(f"datasets.{name}.path: no such file {path}")
        columns, rows = _read_file(name, spec, path)
        where = str(path)
    elif source == "organism":
        if "corpus" not in spec:
            raise ConfigError(f"datasets.{name}.corpus: required for source: organism")
        if organism_corpus_dir is None:
            raise ConfigError(f"datasets.{name}: source organism needs the organism corpus dir")
        path = Path(organism_corpus_dir) / f"{spec['corpus']}.jsonl"
        if not path.is_file():
            raise DataError(f"datasets.{name}.corpus: no such organism corpus {path}")
        columns, rows = _read_jsonl(path)
        where = str(path)
    else:
        raise ConfigError(f"datasets.{name}.source: unknown source {source!r} (hf, file, organism)")

    if source != "hf":
        rows = _subset(rows, n_max, bool(spec.get("shuffle", False)), spec.get("seed", seed))
    mapping = resolve_fields(name, spec.get("fields"), columns, where, DataError)
    records = [_to_record(name, row, mapping, where, i) for i, row in enumerate(rows)]
    if not records:
        raise DataError(f"datasets.{name}: {where} holds no records")
    table = _to_table(records, chat=bool(spec.get("chat", False)))
    with atomic_path(out_path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    log.info("datasets.%s: wrote %d records from %s to %s", name, len(records), where, out_path)


def check_file_source(
    name: str, spec: dict[str, Any], config_dir: str | os.PathLike | None
) -> int | None:
    """Fail fast, before any job runs, on a missing file or a field that names no column.

    Reads the header, and the whole file when it is small (CHECK_BYTES), so it is cheap to run on
    every config. Returns the number of sequences when it is known.
    """
    path = resolve_path(name, spec, config_dir)
    if not path.is_file():
        raise ConfigError(f"datasets.{name}.path: no such file {path}")
    fmt = _format(name, spec, path)
    _num_sequences(name, spec)
    try:
        columns = _header_columns(name, fmt, path, spec)
    except DataError as exc:
        raise ConfigError(f"datasets.{name}.path: {exc}") from exc
    mapping = resolve_fields(name, spec.get("fields"), columns, str(path), ConfigError)
    return _check_records(name, spec, path, mapping)


CHECK_BYTES = 16 << 20  # files up to this size are read in full before any job


def _check_records(
    name: str, spec: dict[str, Any], path: Path, mapping: dict[str, str]
) -> int | None:
    """Every record of a small file converted as the job will (a blank file, a null text or a
    malformed chat message fails now, not in a job); returns the number of sequences kept, or
    None for a file too big to read here."""
    if path.stat().st_size > CHECK_BYTES:
        return None
    try:
        _, rows = _read_file(name, spec, path)
        for i, row in enumerate(rows):
            _to_record(name, row, mapping, str(path), i)
    except DataError as exc:
        raise ConfigError(str(exc)) from exc
    except (pa.ArrowException, OSError, csv.Error, UnicodeDecodeError) as exc:
        raise ConfigError(f"datasets.{name}.path: cannot read {path} ({exc})") from exc
    if not rows:
        raise ConfigError(f"datasets.{name}.path: {path} holds no records (is it blank?)")
    n_max = _num_sequences(name, spec)
    return len(rows) if n_max is None else min(n_max, len(rows))


def resolve_path(name: str, spec: dict[str, Any], config_dir: str | os.PathLike | None) -> Path:
    """A `file` path is absolute or relative to the directory of the config file."""
    if not spec.get("path"):
        raise ConfigError(f"datasets.{name}.path: required for source: file")
    path = Path(os.path.expanduser(str(spec["path"])))
    if not path.is_absolute():
        path = Path(config_dir or ".") / path
    return path


def resolve_fields(
    name: str,
    fields: dict[str, str] | None,
    columns: list[str],
    where: str,
    error: type[Exception] = DataError,
) -> dict[str, str]:
    """Return the field -> column mapping, checked against the available `columns`."""
    if fields is None:
        mapping = _default_fields(columns)
        if mapping is None:
            raise error(
                f"datasets.{name}.fields: cannot tell which columns of {where} hold the text "
                f"(columns: {', '.join(columns) or 'none'}); set fields: {{text: <column>}}"
            )
        return mapping
    if not isinstance(fields, dict) or not fields:
        raise ConfigError(f"datasets.{name}.fields: expected a mapping such as {{text: <column>}}")
    for key, col in fields.items():
        if key not in FIELD_KEYS:
            raise ConfigError(
                f"datasets.{name}.fields.{key}: unknown field (one of {', '.join(FIELD_KEYS)})"
            )
        if not isinstance(col, str):
            raise ConfigError(f"datasets.{name}.fields.{key}: expected a column name, got {col!r}")
    kinds = [k for k in ("text", "messages", "instruction") if k in fields]
    if len(kinds) != 1:
        raise ConfigError(
            f"datasets.{name}.fields: set exactly one of text, messages or instruction "
            f"(got {', '.join(fields)})"
        )
    if kinds[0] != "instruction" and len(fields) > 1:
        raise ConfigError(
            f"datasets.{name}.fields: input/output only go with instruction "
            f"(got {', '.join(fields)})"
        )
    for key, col in fields.items():
        if col not in columns:
            raise error(
                f"datasets.{name}.fields.{key}: column {col!r} not in {where} "
                f"(columns: {', '.join(columns) or 'none'})"
            )
    return dict(fields)


def render_plain(messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """Template-free chat rendering: one "User: ..." / "Model: ..." line per message.

    Used for non-chat datasets built from chat records and by tokenize for tokenizers without a
    chat template, so both agree on the text.
    """
    return "".join(_plain_line(m) for m in messages) + ("Model:" if add_generation_prompt else "")


def _plain_line(message: dict[str, str]) -> str:
    label = PLAIN_LABELS.get(message["role"], str(message["role"]).capitalize())
    return f"{label}: {message['content']}\n"


def _num_sequences(name: str, spec: dict[str, Any]) -> int | None:
    n = spec.get("num_sequences")
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ConfigError(f"datasets.{name}.num_sequences: expected a positive integer, got {n!r}")
    return n


def _indices(n_total: int, n_max: int | None, shuffle: bool, seed: int) -> np.ndarray:
    """The first `n_max` rows, or `n_max` rows of a seeded permutation when shuffling."""
    order = np.random.default_rng(seed).permutation(n_total) if shuffle else np.arange(n_total)
    return order if n_max is None else order[:n_max]


def _subset(rows: list[Record], n_max: int | None, shuffle: bool, seed: int) -> list[Record]:
    if n_max is not None and n_max > len(rows):
        log.warning("num_sequences=%d but only %d records exist: taking all", n_max, len(rows))
    if n_max is None and not shuffle:
        return rows
    return [rows[i] for i in _indices(len(rows), n_max, shuffle, seed)]


def _offline() -> bool:
    truthy = {"1", "on", "yes", "true"}
    return any(
        os.environ.get(k, "").strip().lower() in truthy
        for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _read_hf(
    name: str, spec: dict[str, Any], n_max: int | None, seed: int
) -> tuple[list[str], list[Record]]:
    import datasets

    if not spec.get("hf_name"):
        raise ConfigError(f"datasets.{name}.hf_name: required for source: hf")
    hf_name, split = spec["hf_name"], spec.get("split", "train")
    try:
        ds = datasets.load_dataset(
            hf_name, spec.get("subset"), split=split, revision=spec.get("revision")
        )
    except Exception as exc:
        if _offline():
            raise DataError(
                f"datasets.{name}: {hf_name!r} (split {split!r}) is not in the local Hugging Face "
                "cache and offline mode is on (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE); fetch it once "
                "online or use source: file"
            ) from exc
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(
            f"datasets.{name}: cannot load {hf_name!r} split {split!r}: {first}"
        ) from exc
    if n_max is not None and n_max > len(ds):
        log.warning("num_sequences=%d but %s has %d rows: taking all", n_max, hf_name, len(ds))
    if n_max is not None or spec.get("shuffle", False):
        idx = _indices(len(ds), n_max, bool(spec.get("shuffle", False)), seed)
        ds = ds.select(idx.tolist())
    return list(ds.column_names), ds.to_list()


def _format(name: str, spec: dict[str, Any], path: Path) -> str:
    fmt = spec.get("format") or FORMATS.get(path.suffix.lower())
    if fmt not in set(FORMATS.values()):
        raise ConfigError(
            f"datasets.{name}.path: cannot tell the format of {path} "
            f"(use one of {', '.join(sorted(FORMATS))} or set format:)"
        )
    return fmt


def _read_file(name: str, spec: dict[str, Any], path: Path) -> tuple[list[str], list[Record]]:
    fmt = _format(name, spec, path)
    if fmt == "jsonl":
        return _read_jsonl(path)
    if fmt == "json":
        rows = _json_rows(path)
        return _columns_of(rows), rows
    if fmt == "parquet":
        table = pq.read_table(path)
        return list(table.column_names), table.to_pylist()
    if fmt in ("csv", "tsv"):
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter="\t" if fmt == "tsv" else ",")
            rows = list(reader)
            return list(reader.fieldnames or []), rows
    return ["text"], [{"text": t} for t in _txt_records(name, path, spec)]


def _header_columns(name: str, fmt: str, path: Path, spec: dict[str, Any]) -> list[str]:
    if fmt == "jsonl":
        rows = [row for _, row in zip(range(HEADER_ROWS), _iter_jsonl(path), strict=False)]
        return _columns_of(rows)
    if fmt == "json":
        return _columns_of(_json_rows(path)[:HEADER_ROWS])
    if fmt == "parquet":
        try:
            return list(pq.read_schema(path).names)
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"{path}: not a readable Parquet file ({exc})") from exc
    if fmt in ("csv", "tsv"):
        with open(path, newline="", encoding="utf-8-sig") as f:
            return next(csv.reader(f, delimiter="\t" if fmt == "tsv" else ","), [])
    _txt_mode(name, spec)
    return ["text"]


def _columns_of(rows: list[Record]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)


def _iter_jsonl(path: Path) -> Iterator[Record]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object per line")
            yield row


def _read_jsonl(path: Path) -> tuple[list[str], list[Record]]:
    rows = list(_iter_jsonl(path))
    return _columns_of(rows[:HEADER_ROWS]), rows


def _json_rows(path: Path) -> list[Record]:
    """A JSON file is a list of objects, or an object holding one such list (`{"data": [...]}`)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from exc
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) == 1:
            data = lists[0]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: expected a list of objects (or one key holding such a list)")
    return data


def _txt_mode(name: str, spec: dict[str, Any]) -> str:
    mode = spec.get("txt_records", "line")
    if mode not in ("line", "paragraph"):
        raise ConfigError(f"datasets.{name}.txt_records: expected line or paragraph, got {mode!r}")
    return mode


def _txt_records(name: str, path: Path, spec: dict[str, Any]) -> list[str]:
    mode = _txt_mode(name, spec)
    text = path.read_text(encoding="utf-8")
    if mode == "line":
        return [line for line in text.splitlines() if line.strip()]
    paragraphs, current = [], []
    for line in [*text.splitlines(), ""]:
        if line.strip():
            current.append(line)
        elif current:
            paragraphs.append("\n".join(current))
            current = []
    return paragraphs


def _default_fields(columns: list[str]) -> dict[str, str] | None:
    cols = set(columns)
    for col in ("messages", "conversations"):
        if col in cols:
            return {"messages": col}
    if "text" in cols:
        return {"text": "text"}
    if "instruction" in cols:
        return {"instruction": "instruction"} | {k: k for k in ("input", "output") if k in cols}
    if {"question", "answer"} <= cols:
        return {"instruction": "question", "output": "answer"}
    if "prompt" in cols:
        out = next((c for c in ("completion", "response") if c in cols), None)
        return {"instruction": "prompt"} | ({"output": out} if out else {})
    return None


def _as_str(value: Any, what: Callable[[], str]) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float, bool)):
        return str(value)
    raise DataError(f"{what()}: expected a string, got {type(value).__name__}")


def _to_record(name: str, row: Record, mapping: dict[str, str], where: str, i: int) -> Record:
    def what(key: str) -> Callable[[], str]:
        return lambda: f"datasets.{name}: {where} record {i} field {mapping[key]!r}"

    for key in ("text", "instruction"):
        if key in mapping and row.get(mapping[key]) is None:
            raise DataError(
                f"{what(key)()} is missing or null: fix or drop that record "
                f"(or point datasets.{name}.fields.{key} at another column)"
            )
    if "text" in mapping:
        return {"text": _as_str(row.get(mapping["text"]), what("text"))}
    if "messages" in mapping:
        return {"messages": _messages(row.get(mapping["messages"]), what("messages"))}
    user = _as_str(row.get(mapping["instruction"]), what("instruction"))
    if "input" in mapping:
        extra = _as_str(row.get(mapping["input"]), what("input"))
        user = f"{user}\n\n{extra}" if extra else user
    messages = [{"role": "user", "content": user}]
    if "output" in mapping:
        output = _as_str(row.get(mapping["output"]), what("output"))
        if output:
            messages.append({"role": "assistant", "content": output})
    return {"messages": messages}


def _messages(value: Any, what: Callable[[], str]) -> list[dict[str, str]]:
    """Normalise a list of {role, content} (or ShareGPT {from, value}) dicts."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, list) or not value:
        raise DataError(f"{what()}: expected a non-empty list of {{role, content}} messages")
    out = []
    for j, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise DataError(f"{what()}: message {j} is not an object")
        role = msg.get("role", msg.get("from"))
        content = msg.get("content", msg.get("value"))
        if role is None:
            raise DataError(f"{what()}: message {j} has no role")
        role = ROLE_ALIASES.get(str(role).lower(), str(role))
        out.append({"role": role, "content": _as_str(content, what)})
    return out


def _to_table(records: list[Record], *, chat: bool) -> pa.Table:
    seq_id = pa.array(np.arange(len(records), dtype=np.int32))
    if chat:
        messages = [
            r["messages"] if "messages" in r else [{"role": "user", "content": r["text"]}]
            for r in records
        ]
        return pa.Table.from_arrays(
            [seq_id, pa.array(messages, type=CHAT_SCHEMA.field("messages").type)],
            schema=CHAT_SCHEMA,
        )
    texts = [r["text"] if "text" in r else render_plain(r["messages"]) for r in records]
    return pa.Table.from_arrays([seq_id, pa.array(texts, type=pa.string())], schema=TEXT_SCHEMA)
