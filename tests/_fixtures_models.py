"""Tiny causal LMs with random weights, saved like hub checkpoints, for offline tests.

Tests never reach a model hub, so each one builds a real `save_pretrained` folder (config,
safetensors weights and a word-level tokenizer that `AutoTokenizer` loads) in its tmp dir.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

KINDS = ("gpt2", "llama", "gemma2")
SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")
CHAT_TEMPLATE = (
    "{% for m in messages %}<bos>{{ m['role'] }}: {{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<bos>assistant:{% endif %}"
)


def tiny_config(
    kind: str,
    *,
    vocab: int = 64,
    d_model: int = 32,
    n_layers: int = 3,
    n_heads: int = 4,
    n_ctx: int = 64,
):
    """A tiny HF config of `kind`; ids 0..3 are pad, unk, bos, eos as in the tokenizer."""
    from transformers import Gemma2Config, GPT2Config, LlamaConfig

    ids = {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}
    if kind == "gpt2":
        return GPT2Config(
            vocab_size=vocab,
            n_embd=d_model,
            n_layer=n_layers,
            n_head=n_heads,
            n_positions=n_ctx,
            **ids,
        )
    if kind == "llama":
        return LlamaConfig(
            vocab_size=vocab,
            hidden_size=d_model,
            intermediate_size=2 * d_model,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=max(1, n_heads // 2),
            max_position_embeddings=n_ctx,
            tie_word_embeddings=False,
            **ids,
        )
    if kind == "gemma2":
        return Gemma2Config(
            vocab_size=vocab,
            hidden_size=d_model,
            intermediate_size=2 * d_model,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=max(1, n_heads // 2),
            head_dim=d_model // n_heads,
            query_pre_attn_scalar=d_model // n_heads,
            max_position_embeddings=n_ctx,
            sliding_window=4,
            **ids,
        )
    raise ValueError(f"unknown tiny model kind {kind!r}; expected one of {KINDS}")


def make_tokenizer(path: str | os.PathLike, vocab: int = 64):
    """Save a word-level fast tokenizer: specials, then words `w4`, `w5`, ... up to `vocab`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {tok: i for i, tok in enumerate(SPECIALS)}
    words.update({f"w{i}": i for i in range(len(SPECIALS), vocab)})
    backend = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(path))
    return tok


def make_tiny_model(
    kind: str,
    path: str | os.PathLike,
    *,
    vocab: int = 64,
    d_model: int = 32,
    n_layers: int = 3,
    n_heads: int = 4,
    n_ctx: int = 64,
    seed: int = 0,
    tokenizer: bool = True,
) -> Path:
    """Build a random-weight `kind` causal LM, `save_pretrained` it (and a tokenizer) to `path`."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    config = tiny_config(
        kind, vocab=vocab, d_model=d_model, n_layers=n_layers, n_heads=n_heads, n_ctx=n_ctx
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(path))
    if tokenizer:
        make_tokenizer(path, vocab=vocab)
    return path


def write_tokens(path: str | os.PathLike, token_ids: list[list[int]]) -> Path:
    """Write a tokens parquet in the `tokenize` rule's layout (seq_id, token_ids, roles, ...)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "seq_id": pa.array(range(len(token_ids)), pa.int32()),
            "token_ids": pa.array(token_ids, pa.list_(pa.int32())),
            "roles": pa.array([[0] * len(t) for t in token_ids], pa.list_(pa.int8())),
            "n_tokens": pa.array([len(t) for t in token_ids], pa.int32()),
            "tokens": pa.array([[f"w{i}" for i in t] for t in token_ids], pa.list_(pa.string())),
        }
    )
    pq.write_table(table, path, compression="zstd")
    return path


def save_steer_llama(path: str | os.PathLike, d: int = 32, vocab: int = 64):
    """A seeded 2-block Llama (untied head) with a tokenizer, saved in `path`, for the steering
    tests; returns (model in eval mode, tokenizer)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=d,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(path))
    make_tokenizer(path, vocab=vocab)
    model = LlamaForCausalLM.from_pretrained(str(path)).eval()
    return model, AutoTokenizer.from_pretrained(str(path))
