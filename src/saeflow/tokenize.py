"""Tokenize a fetched dataset for one model: token ids, per-token roles and per-token strings.

Output (`results/tokens/{model}/{dataset}.parquet`): `seq_id` int32, `token_ids` list<int32>,
`roles` list<int8> (0 other, 1 user, 2 model), `n_tokens` int32, `tokens` list<string>.

Chat data (a `messages` column) is rendered with the tokenizer's chat template
(`apply_chat_template(..., tokenize=False)`). A token's role is the role of the message whose
rendered span holds the token's first character; special tokens (bos, turn markers, every added
token flagged special) get 0. A message's span is found by rendering the conversation prefix that
ends with it: everything the message adds to the prefix (turn header, content, closing marker)
belongs to it, except a preamble before the first turn (BOS, a default system prompt), which is
role 0. `add_generation_prompt` text (the opening of the model turn) is role 2. When a template
does not render prefixes as prefixes of the full chat (some templates rewrite earlier turns),
spans fall back to the message contents alone and the headers get 0.

Without a chat template (or with `chat_template: false` in the model spec) chats are rendered as
plain "User: ...\\nModel: ...\\n" lines (`saeflow.data.render_plain`, a trailing "Model:" for
`add_generation_prompt`), tokenized with the tokenizer's default special tokens (e.g. BOS), and
each whole line belongs to its message. Plain text gets the tokenizer's default special tokens
and role 0 everywhere.

`context_length` keeps the first N tokens. Sequences with no tokens at all are dropped (logged);
`seq_id` always stays the id from the data table, so the surviving ids may have gaps.
"""

from __future__ import annotations

import bisect
import logging
import os
import sys
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from saeflow import verify
from saeflow.data import render_plain
from saeflow.errors import ConfigError, DataError
from saeflow.io import atomic_path

log = logging.getLogger("saeflow.tokenize")

ROLE_OTHER, ROLE_USER, ROLE_MODEL = 0, 1, 2
ROLE_IDS = {"user": ROLE_USER, "assistant": ROLE_MODEL, "model": ROLE_MODEL}
TOKENS_SCHEMA = pa.schema(
    [
        ("seq_id", pa.int32()),
        ("token_ids", pa.list_(pa.int32())),
        ("roles", pa.list_(pa.int8())),
        ("n_tokens", pa.int32()),
        ("tokens", pa.list_(pa.string())),
    ]
)
BATCH = 512

Span = tuple[int, int, int]  # (start char, end char, role id)


def load_tokenizer(
    model_path: str, *, revision: str | None = None, trust_remote_code: bool = False
):
    """`AutoTokenizer.from_pretrained` with a one-line error naming the model."""
    from transformers import AutoTokenizer

    from saeflow.models import hf_load_kwargs

    folder, kwargs = hf_load_kwargs(
        model_path, revision=revision, trust_remote_code=trust_remote_code
    )
    if "gguf_file" not in kwargs:
        verify.tokenizer_folder(folder)
    try:
        return AutoTokenizer.from_pretrained(folder, **kwargs)
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"{model_path}: cannot load the tokenizer ({first})") from exc


def tokenize_dataset(
    data_path: str | os.PathLike,
    model_path: str,
    spec: dict[str, Any],
    out_path: str | os.PathLike,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    chat_template: bool | None = None,
) -> None:
    """Tokenize `data_path` (a fetch_dataset table) with the tokenizer of `model_path`.

    `spec` is the dataset config (`context_length`, `add_generation_prompt`). `chat_template`
    (the model spec's flag): True requires the tokenizer's template, False forces the plain
    rendering, None uses the template when the tokenizer has one.
    """
    context_length = spec.get("context_length")
    if context_length is not None and (
        isinstance(context_length, bool)
        or not isinstance(context_length, int)
        or context_length <= 0
    ):
        raise ConfigError(f"context_length: expected a positive integer, got {context_length!r}")
    add_generation_prompt = bool(spec.get("add_generation_prompt", False))

    table = pq.read_table(data_path)
    if "seq_id" not in table.column_names:
        raise DataError(f"{data_path}: no seq_id column (rerun fetch_dataset)")
    seq_ids = table.column("seq_id").to_numpy().astype(np.int32)
    is_chat = "messages" in table.column_names
    if "chat" in spec and bool(spec["chat"]) != is_chat:
        raise DataError(
            f"{data_path}: the dataset spec says chat: {spec['chat']} but the table has "
            f"{'messages' if is_chat else 'text'} (rerun fetch_dataset)"
        )
    tokenizer = load_tokenizer(model_path, revision=revision, trust_remote_code=trust_remote_code)

    if is_chat:
        chats = table.column("messages").to_pylist()
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if chat_template is True and not has_template:
            raise ConfigError(
                f"chat_template: true, but the tokenizer of {model_path} has no chat template"
            )
        use_template = chat_template is not False and has_template
        if not use_template:
            log.info(
                "%s: no chat template used, rendering chats as plain User:/Model: lines", model_path
            )
        encoded = encode_chats(tokenizer, chats, add_generation_prompt, use_template=use_template)
    elif "text" in table.column_names:
        texts = table.column("text").to_pylist()
        encoded = encode_texts(tokenizer, texts)
    else:
        raise DataError(f"{data_path}: neither a text nor a messages column (rerun fetch_dataset)")

    if context_length is not None:
        encoded = [(ids[:context_length], roles[:context_length]) for ids, roles in encoded]
    keep = [i for i, (ids, _) in enumerate(encoded) if ids]
    if len(keep) < len(encoded):
        log.warning("%s: dropped %d empty sequences", data_path, len(encoded) - len(keep))
    if not keep:
        raise DataError(f"{data_path}: every sequence is empty after tokenization")
    encoded = [encoded[i] for i in keep]
    pieces = token_strings(tokenizer, [ids for ids, _ in encoded])

    out = pa.Table.from_arrays(
        [
            pa.array(seq_ids[keep], type=pa.int32()),
            pa.array([ids for ids, _ in encoded], type=pa.list_(pa.int32())),
            pa.array([roles for _, roles in encoded], type=pa.list_(pa.int8())),
            pa.array([len(ids) for ids, _ in encoded], type=pa.int32()),
            pa.array(pieces, type=pa.list_(pa.string())),
        ],
        schema=TOKENS_SCHEMA,
    )
    with atomic_path(out_path) as tmp:
        pq.write_table(out, tmp, compression="zstd")
    log.info(
        "%s: wrote %d sequences, %d tokens to %s",
        data_path,
        len(keep),
        sum(map(len, pieces)),
        out_path,
    )


def load_tokens(path: str | os.PathLike) -> pd.DataFrame:
    """Read a tokens table (one row per sequence, list columns as numpy arrays)."""
    return pq.read_table(path).to_pandas()


def encode_texts(tokenizer, texts: list[str]) -> list[tuple[list[int], list[int]]]:
    """Plain text: the tokenizer's default special tokens, role 0 everywhere."""
    out = []
    for start in tqdm(range(0, len(texts), BATCH), desc="tokenize", file=sys.stderr, mininterval=5):
        for ids in tokenizer(texts[start : start + BATCH])["input_ids"]:
            out.append((list(ids), [ROLE_OTHER] * len(ids)))
    return out


def encode_chats(
    tokenizer, chats: list[list[dict[str, str]]], add_generation_prompt: bool, *, use_template: bool
) -> list[tuple[list[int], list[int]]]:
    """Render each chat, tokenize it, and give each token the role of the span it falls in."""
    rendered = [
        chat_spans(tokenizer, messages, add_generation_prompt, use_template=use_template)
        for messages in tqdm(chats, desc="render", file=sys.stderr, mininterval=5)
    ]
    # A chat template writes its own BOS; the plain rendering relies on the tokenizer adding it.
    add_special = not use_template
    special = special_ids(tokenizer)
    out = []
    for start in tqdm(
        range(0, len(rendered), BATCH), desc="tokenize", file=sys.stderr, mininterval=5
    ):
        batch = rendered[start : start + BATCH]
        if tokenizer.is_fast:
            enc = tokenizer(
                [text for text, _ in batch],
                add_special_tokens=add_special,
                return_offsets_mapping=True,
            )
            for (_, spans), ids, offsets in zip(
                batch, enc["input_ids"], enc["offset_mapping"], strict=True
            ):
                out.append((list(ids), roles_from_offsets(ids, offsets, spans, special)))
        else:
            out.extend(
                encode_segments(tokenizer, text, spans, add_special) for text, spans in batch
            )
    return out


def chat_spans(
    tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool, *, use_template: bool
) -> tuple[str, list[Span]]:
    """Render a chat and return it with the (start, end, role) character span of each message."""
    if not use_template:
        spans, pos = [], 0
        for message in messages:
            line = render_plain([message])
            spans.append((pos, pos + len(line), ROLE_IDS.get(message["role"], ROLE_OTHER)))
            pos += len(line)
        text = render_plain(messages, add_generation_prompt)
        if add_generation_prompt:
            spans.append((pos, len(text), ROLE_MODEL))
        return text, spans

    def render(msgs: list[dict[str, str]], gen: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    try:
        text = render(messages, add_generation_prompt)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"chat template failed on a conversation: {first}") from exc
    spans = _prefix_spans(render, text, messages, add_generation_prompt)
    if spans is None:
        spans = _content_spans(text, messages)
    return text, spans


def _turn_start(render, first: dict[str, str]) -> int:
    """Where the first message's own turn starts, past any preamble (BOS, a default system prompt).

    Renders the first message again under another role: the two renderings agree up to the role
    name, so their common prefix is the preamble. Templates that refuse every other role give 0.
    """
    if ROLE_IDS.get(first["role"], ROLE_OTHER) == ROLE_OTHER:
        return 0
    base = render([first], False)
    for alt in ("assistant", "user", "system"):
        if alt == first["role"]:
            continue
        try:
            other = render([{"role": alt, "content": first["content"]}], False)
        except Exception:
            continue
        return len(os.path.commonprefix([base, other]))
    return 0


def _prefix_spans(
    render, text: str, messages: list[dict[str, str]], gen: bool
) -> list[Span] | None:
    spans, prev = [], 0
    for i, message in enumerate(messages, 1):
        try:
            prefix = text if (i == len(messages) and not gen) else render(messages[:i], False)
        except Exception:
            return None
        if len(prefix) < prev or not text.startswith(prefix):
            return None
        start = prev if i > 1 else min(_turn_start(render, message), len(prefix))
        spans.append((start, len(prefix), ROLE_IDS.get(message["role"], ROLE_OTHER)))
        prev = len(prefix)
    if gen and prev < len(text):
        spans.append((prev, len(text), ROLE_MODEL))
    return spans


def _content_spans(text: str, messages: list[dict[str, str]]) -> list[Span]:
    """Fallback: find each message's (stripped) content in order; headers stay role 0."""
    spans, pos = [], 0
    for message in messages:
        content = message["content"].strip()
        start = text.find(content, pos) if content else -1
        if start < 0:
            continue
        spans.append((start, start + len(content), ROLE_IDS.get(message["role"], ROLE_OTHER)))
        pos = start + len(content)
    return spans


def special_ids(tokenizer) -> set[int]:
    """bos/eos/pad/... plus every added token flagged special (turn markers such as <|eot_id|>)."""
    ids = set(tokenizer.all_special_ids)
    ids.update(
        i for i, tok in tokenizer.added_tokens_decoder.items() if getattr(tok, "special", False)
    )
    return ids


def roles_from_offsets(
    ids: list[int], offsets: list[tuple[int, int]], spans: list[Span], special: set[int]
) -> list[int]:
    """Role of each token: the span holding its first character; special tokens are 0."""
    starts = [s for s, _, _ in spans]
    roles = []
    for tok, (start, _) in zip(ids, offsets, strict=True):
        role = ROLE_OTHER
        if tok not in special:
            k = bisect.bisect_right(starts, start) - 1
            if k >= 0 and start < spans[k][1]:
                role = spans[k][2]
        roles.append(role)
    return roles


def encode_segments(
    tokenizer, text: str, spans: list[Span], add_special_tokens: bool
) -> tuple[list[int], list[int]]:
    """Roles without offsets (tokenizers that are not fast): tokenize span by span.

    Cuts fall at message boundaries, which chat templates put next to special tokens, so this
    matches tokenizing the whole string on every template we know of.
    """
    cuts = sorted({0, len(text), *(s for s, _, _ in spans), *(e for _, e, _ in spans)})
    special = special_ids(tokenizer)
    ids, roles = [], []
    for start, end in zip(cuts[:-1], cuts[1:], strict=True):
        role = next((r for s, e, r in spans if s <= start and end <= e), ROLE_OTHER)
        seg = tokenizer(text[start:end], add_special_tokens=False)["input_ids"]
        ids.extend(seg)
        roles.extend(ROLE_OTHER if t in special else role for t in seg)
    if add_special_tokens:
        prefix, suffix = _default_specials(tokenizer)
        ids = prefix + ids + suffix
        roles = [ROLE_OTHER] * len(prefix) + roles + [ROLE_OTHER] * len(suffix)
    return ids, roles


def _default_specials(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer adds before and after a text by default (e.g. [bos], [])."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for k in range(len(full) - len(bare) + 1):
        if full[k : k + len(bare)] == bare:
            return list(full[:k]), list(full[k + len(bare) :])
    return [], []


def token_strings(tokenizer, sequences: list[list[int]]) -> list[list[str]]:
    """Decode every token on its own (for hovers), decoding each distinct id once."""
    vocab = sorted({t for ids in sequences for t in ids})
    decoded = tokenizer.batch_decode(
        [[t] for t in vocab], skip_special_tokens=False, clean_up_tokenization_spaces=False
    )
    table = dict(zip(vocab, decoded, strict=True))
    return [[table[t] for t in ids] for ids in sequences]
