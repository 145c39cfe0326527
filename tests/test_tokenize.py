"""tokenize_dataset with tiny real tokenizers: exact roles, truncation, plain fallback."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _fixtures_tok import make_chat_tokenizer, make_plain_tokenizer

from saeflow.data import CHAT_SCHEMA, TEXT_SCHEMA
from saeflow.errors import ConfigError
from saeflow.tokenize import (
    TOKENS_SCHEMA,
    chat_spans,
    encode_chats,
    encode_segments,
    load_tokenizer,
    load_tokens,
    roles_from_offsets,
    special_ids,
    tokenize_dataset,
)

DIALOGUE = [
    {"role": "user", "content": "hello how are you"},
    {"role": "assistant", "content": "i am fine"},
]


@pytest.fixture(scope="module")
def chat_tok(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(make_chat_tokenizer(tmp_path_factory.mktemp("chat_tok")))


@pytest.fixture(scope="module")
def plain_tok(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(make_plain_tokenizer(tmp_path_factory.mktemp("plain_tok")))


def _chat_data(path: Path, chats: list[list[dict]]) -> Path:
    table = pa.Table.from_pydict(
        {"seq_id": pa.array(range(len(chats)), pa.int32()), "messages": chats}, schema=CHAT_SCHEMA
    )
    pq.write_table(table, path)
    return path


def _text_data(path: Path, texts: list[str]) -> Path:
    table = pa.Table.from_pydict(
        {"seq_id": pa.array(range(len(texts)), pa.int32()), "text": texts}, schema=TEXT_SCHEMA
    )
    pq.write_table(table, path)
    return path


def _run(tmp_path: Path, data: Path, tok: str, spec: dict, **kw) -> pa.Table:
    out = tmp_path / "tokens" / "m" / "d.parquet"
    tokenize_dataset(data, tok, spec, out, **kw)
    table = pq.read_table(out)
    assert table.schema == TOKENS_SCHEMA
    return table


def test_chat_roles_exact(tmp_path: Path, chat_tok: str) -> None:
    data = _chat_data(tmp_path / "d.parquet", [DIALOGUE])
    row = _run(tmp_path, data, chat_tok, {"chat": True}).to_pylist()[0]
    pairs = list(zip(row["tokens"], row["roles"], strict=True))
    assert pairs == [
        ("<bos>", 0),
        ("<start_of_turn>", 0),
        ("user", 1),
        ("\n", 1),
        ("hello", 1),
        ("how", 1),
        ("are", 1),
        ("you", 1),
        ("<end_of_turn>", 0),
        ("\n", 1),
        ("<start_of_turn>", 0),
        ("model", 2),
        ("\n", 2),
        ("i", 2),
        ("am", 2),
        ("fine", 2),
        ("<end_of_turn>", 0),
        ("\n", 2),
    ]
    assert row["n_tokens"] == len(row["token_ids"]) == 18
    tok = load_tokenizer(chat_tok)
    assert row["token_ids"] == tok.apply_chat_template(DIALOGUE, tokenize=True)["input_ids"]


def test_generation_prompt_and_truncation(tmp_path: Path, chat_tok: str) -> None:
    data = _chat_data(tmp_path / "d.parquet", [DIALOGUE[:1], DIALOGUE])
    table = _run(tmp_path, data, chat_tok, {"add_generation_prompt": True, "context_length": 13})
    first, second = table.to_pylist()
    assert first["tokens"][-3:] == ["<start_of_turn>", "model", "\n"]
    assert first["roles"][-3:] == [0, 2, 2]
    assert first["n_tokens"] == 13
    assert second["n_tokens"] == 13
    assert second["roles"] == [0, 0, 1, 1, 1, 1, 1, 1, 0, 1, 0, 2, 2]


def test_no_template_fallback(tmp_path: Path, plain_tok: str, chat_tok: str) -> None:
    data = _chat_data(tmp_path / "d.parquet", [DIALOGUE])
    row = _run(tmp_path, data, plain_tok, {"chat": True}).to_pylist()[0]
    # "User: hello how are you\nModel: i am fine\n" with the tokenizer's default <bos>.
    assert row["tokens"] == [
        "<bos>", "User", ":", "hello", "how", "are", "you", "\n",
        "Model", ":", "i", "am", "fine", "\n",
    ]  # fmt: skip
    assert row["roles"] == [0] + [1] * 7 + [2] * 6
    # chat_template=False forces the same rendering on a tokenizer that has a template.
    forced = _run(tmp_path, data, chat_tok, {}, chat_template=False).to_pylist()[0]
    assert forced["roles"] == row["roles"]
    with pytest.raises(ConfigError, match="has no chat template"):
        _run(tmp_path, data, plain_tok, {}, chat_template=True)


def test_text_bos_roles_and_truncation(tmp_path: Path, plain_tok: str) -> None:
    data = _text_data(tmp_path / "d.parquet", ["the cat sat on the mat", "", "a dog"])
    table = _run(tmp_path, data, plain_tok, {"context_length": 4})
    rows = table.to_pylist()
    assert [r["seq_id"] for r in rows] == [0, 1, 2]  # "" still gets <bos>
    assert rows[0]["tokens"] == ["<bos>", "the", "cat", "sat"]
    assert rows[1]["tokens"] == ["<bos>"]
    assert all(set(r["roles"]) == {0} for r in rows)
    df = load_tokens(tmp_path / "tokens" / "m" / "d.parquet")
    assert list(df.columns) == ["seq_id", "token_ids", "roles", "n_tokens", "tokens"]
    assert df["n_tokens"].tolist() == [4, 1, 3]


def test_deterministic_bytes(tmp_path: Path, chat_tok: str) -> None:
    data = _chat_data(tmp_path / "d.parquet", [DIALOGUE, DIALOGUE[:1]])
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    tokenize_dataset(data, chat_tok, {}, a)
    tokenize_dataset(data, chat_tok, {}, b)
    assert a.read_bytes() == b.read_bytes()


def test_segments_match_offsets(chat_tok: str) -> None:
    """The path for tokenizers without offsets gives the same ids and roles."""
    tok = load_tokenizer(chat_tok)
    for use_template in (True, False):
        text, spans = chat_spans(tok, DIALOGUE, True, use_template=use_template)
        enc = tok(text, add_special_tokens=not use_template, return_offsets_mapping=True)
        ids, roles = encode_segments(tok, text, spans, not use_template)
        assert ids == enc["input_ids"]
        assert roles == roles_from_offsets(ids, enc["offset_mapping"], spans, special_ids(tok))


def test_content_fallback_when_prefixes_differ(chat_tok: str) -> None:
    """A template that rewrites earlier turns: roles fall back to the message contents only."""
    tok = load_tokenizer(chat_tok)
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}"
        "{% if loop.last %}<start_of_turn>last {% endif %}{{ m['content'] }}<end_of_turn>\n"
        "{% endfor %}"
    )
    text, spans = chat_spans(tok, DIALOGUE, False, use_template=True)
    assert [(text[s:e], r) for s, e, r in spans] == [("hello how are you", 1), ("i am fine", 2)]


def test_default_system_prompt_is_other(chat_tok: str) -> None:
    """A template that injects a system prompt (Qwen-style): that preamble is role 0, not user."""
    tok = load_tokenizer(chat_tok)
    tok.chat_template = (
        "{{ bos_token }}<start_of_turn>model\nthe cat sat<end_of_turn>\n"
        "{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
        "{% endfor %}"
    )
    [(ids, roles)] = encode_chats(tok, [DIALOGUE], False, use_template=True)
    pieces = tok.convert_ids_to_tokens(ids)
    first_user = pieces.index("user")
    assert set(roles[:first_user]) == {0}
    assert roles[first_user : first_user + 6] == [1] * 6
    assert roles[-2:] == [0, 2]
