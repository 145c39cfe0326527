"""fetch_dataset / check_file_source on small real files in every supported format."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from saeflow import data
from saeflow.data import check_file_source, fetch_dataset, render_plain
from saeflow.errors import ConfigError, DataError

ROWS = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Say hi.", "input": "", "output": "hi"},
    {"instruction": "Name a colour.", "input": None, "output": "blue"},
]


@pytest.fixture
def gsm8k(tmp_path: Path) -> Path:
    """A few rows of the real GSM8K test split (MIT): the shared data folder beside the checkout,
    else the 24-row copy committed under tests/configs, so a bare clone never skips this."""
    src = Path(__file__).parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"
    if not src.is_file():
        src = Path(__file__).parent / "configs" / "gsm8k_tiny.jsonl"
    with open(src, encoding="utf-8") as f:
        lines = [next(f) for _ in range(5)]
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("".join(lines), encoding="utf-8")
    return path


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _fetch(tmp_path: Path, spec: dict, name: str = "ds", **kw) -> pa.Table:
    out = tmp_path / "results" / "data" / f"{name}.parquet"
    fetch_dataset(name, spec, out, config_dir=tmp_path, **kw)
    return pq.read_table(out)


def test_gsm8k_question_answer_to_chat(tmp_path: Path, gsm8k: Path) -> None:
    spec = {
        "source": "file",
        "path": gsm8k.name,
        "chat": True,
        "num_sequences": 3,
        "fields": {"instruction": "question", "output": "answer"},
    }
    check_file_source("gsm", spec, tmp_path)
    table = _fetch(tmp_path, spec)
    assert table.schema == data.CHAT_SCHEMA
    assert table.column("seq_id").to_pylist() == [0, 1, 2]
    first = json.loads(gsm8k.read_text().splitlines()[0])
    msgs = table.column("messages").to_pylist()[0]
    assert msgs == [
        {"role": "user", "content": first["question"]},
        {"role": "assistant", "content": first["answer"]},
    ]


def test_gsm8k_defaults_and_text_mapping(tmp_path: Path, gsm8k: Path) -> None:
    chat = _fetch(tmp_path, {"source": "file", "path": str(gsm8k), "chat": True})
    assert chat.num_rows == 5
    text = _fetch(
        tmp_path, {"source": "file", "path": str(gsm8k), "fields": {"text": "question"}}, "t"
    )
    assert text.schema == data.TEXT_SCHEMA
    assert (
        text.column("text").to_pylist()[0]
        == json.loads(gsm8k.read_text().splitlines()[0])["question"]
    )


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "csv"])
def test_instruction_formats(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"rows.{fmt}"
    if fmt == "jsonl":
        _write_jsonl(path, ROWS)
    elif fmt == "json":
        path.write_text(json.dumps({"data": ROWS}))
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    else:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(ROWS[0]))
            writer.writeheader()
            writer.writerows({k: v or "" for k, v in r.items()} for r in ROWS)
    spec = {"source": "file", "path": path.name, "chat": True}
    check_file_source("ds", spec, tmp_path)
    msgs = _fetch(tmp_path, spec).column("messages").to_pylist()
    assert msgs[0] == [
        {"role": "user", "content": "Add the numbers.\n\n2 and 3"},
        {"role": "assistant", "content": "5"},
    ]
    assert msgs[1][0] == {"role": "user", "content": "Say hi."}
    assert msgs[2][0] == {"role": "user", "content": "Name a colour."}


def test_instruction_without_chat_joins_paragraphs(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "r.jsonl", ROWS)
    table = _fetch(tmp_path, {"source": "file", "path": "r.jsonl", "chat": False})
    assert table.column("text").to_pylist()[0] == "User: Add the numbers.\n\n2 and 3\nModel: 5\n"


def test_txt_lines_and_paragraphs(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("first line\n\nsecond\nthird\n\n\n")
    lines = _fetch(tmp_path, {"source": "file", "path": "p.txt"})
    assert lines.column("text").to_pylist() == ["first line", "second", "third"]
    paras = _fetch(tmp_path, {"source": "file", "path": "p.txt", "txt_records": "paragraph"})
    assert paras.column("text").to_pylist() == ["first line", "second\nthird"]
    chat = _fetch(tmp_path, {"source": "file", "path": "p.txt", "chat": True})
    assert chat.column("messages").to_pylist()[0] == [{"role": "user", "content": "first line"}]


def test_messages_roles_normalised(tmp_path: Path) -> None:
    rows = [
        {"conv": [{"role": "user", "content": "hi"}, {"role": "model", "content": "yo"}]},
        {"conv": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
    ]
    _write_jsonl(tmp_path / "m.jsonl", rows)
    spec = {"source": "file", "path": "m.jsonl", "chat": True, "fields": {"messages": "conv"}}
    msgs = _fetch(tmp_path, spec).column("messages").to_pylist()
    assert [m["role"] for m in msgs[0]] == ["user", "assistant"]
    assert msgs[1] == [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]


def test_num_sequences_shuffle_deterministic(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "n.jsonl", [{"text": f"row {i}"} for i in range(20)])
    spec = {"source": "file", "path": "n.jsonl", "num_sequences": 5}
    assert _fetch(tmp_path, spec).column("text").to_pylist() == [f"row {i}" for i in range(5)]
    shuffled = {**spec, "shuffle": True}
    a = tmp_path / "a.parquet"
    b = tmp_path / "b.parquet"
    fetch_dataset("n", shuffled, a, config_dir=tmp_path, seed=3)
    fetch_dataset("n", shuffled, b, config_dir=tmp_path, seed=3)
    assert a.read_bytes() == b.read_bytes()
    texts = pq.read_table(a).column("text").to_pylist()
    assert len(texts) == 5 and texts != [f"row {i}" for i in range(5)]
    assert pq.read_table(a).column("seq_id").to_pylist() == list(range(5))


def test_organism_corpus(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    _write_jsonl(corpus / "stories_test.jsonl", [{"text": "once upon a time"}, {"text": "the end"}])
    dialogues = [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    ]
    _write_jsonl(corpus / "dialogues_test.jsonl", dialogues)
    spec = {"source": "organism", "corpus": "stories_test", "num_sequences": 1}
    table = _fetch(tmp_path, spec, organism_corpus_dir=corpus)
    assert table.column("text").to_pylist() == ["once upon a time"]
    spec = {"source": "organism", "corpus": "dialogues_test", "chat": True}
    table = _fetch(tmp_path, spec, organism_corpus_dir=corpus)
    assert table.column("messages").to_pylist() == [dialogues[0]["messages"]]


def test_hf_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls = []

    def fake_load(name, subset, split, revision):
        calls.append((name, subset, split, revision))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    spec = {"source": "hf", "hf_name": "org/alpaca", "split": "train", "num_sequences": 2}
    table = _fetch(tmp_path, {**spec, "chat": True, "revision": "abc"})
    assert calls == [("org/alpaca", None, "train", "abc")]
    assert table.num_rows == 2
    assert table.column("messages").to_pylist()[1] == [
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "hi"},
    ]


def test_hf_offline_not_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def fake_load(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'org/x' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"datasets\.alp: 'org/x' .*offline") as err:
        _fetch(tmp_path, {"source": "hf", "hf_name": "org/x", "split": "train"}, "alp")
    assert "\n" not in str(err.value)


def test_missing_file(tmp_path: Path) -> None:
    spec = {"source": "file", "path": "nope.jsonl"}
    with pytest.raises(DataError, match=r"datasets\.ds\.path: .*nope\.jsonl"):
        _fetch(tmp_path, spec)
    with pytest.raises(ConfigError, match=r"datasets\.ds\.path: .*nope\.jsonl"):
        check_file_source("ds", spec, tmp_path)


def test_missing_field(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "q.jsonl", [{"question": "a", "answer": "b"}])
    spec = {"source": "file", "path": "q.jsonl", "fields": {"text": "body"}}
    with pytest.raises(DataError, match=r"fields\.text: column 'body' not in .*q\.jsonl.*question"):
        _fetch(tmp_path, spec)
    with pytest.raises(ConfigError, match=r"datasets\.ds\.fields\.text: .*question, answer"):
        check_file_source("ds", spec, tmp_path)


def test_config_errors(tmp_path: Path) -> None:
    (tmp_path / "h.csv").write_text("body,label\nx,1\n")
    base = {"source": "file", "path": "h.csv"}
    with pytest.raises(ConfigError, match=r"datasets\.ds\.fields: cannot tell .*body, label"):
        check_file_source("ds", base, tmp_path)
    with pytest.raises(ConfigError, match=r"datasets\.ds\.fields\.txt: unknown field"):
        check_file_source("ds", {**base, "fields": {"txt": "body"}}, tmp_path)
    with pytest.raises(ConfigError, match=r"datasets\.ds\.fields: set exactly one"):
        check_file_source("ds", {**base, "fields": {"text": "body", "messages": "m"}}, tmp_path)
    with pytest.raises(ConfigError, match=r"datasets\.ds\.num_sequences"):
        check_file_source("ds", {**base, "num_sequences": 0, "fields": {"text": "body"}}, tmp_path)
    (tmp_path / "x.xml").write_text("<a/>")
    with pytest.raises(ConfigError, match=r"datasets\.ds\.path: cannot tell the format"):
        check_file_source("ds", {"source": "file", "path": "x.xml"}, tmp_path)
    check_file_source("ds", {**base, "fields": {"text": "body"}}, tmp_path)


def test_bad_rows(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{not json}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON"):
        _fetch(tmp_path, {"source": "file", "path": "bad.jsonl"})
    _write_jsonl(tmp_path / "m.jsonl", [{"messages": "not a list"}])
    with pytest.raises(DataError, match=r"record 0 field 'messages'"):
        _fetch(tmp_path, {"source": "file", "path": "m.jsonl", "chat": True})


def test_render_plain() -> None:
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert render_plain(msgs) == "User: hi\nModel: yo\n"
    assert render_plain(msgs[:1], add_generation_prompt=True) == "User: hi\nModel:"
