"""The offline model organism: corpora, tokenizer, tiny base LM, chat fine-tune (tiny configs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from saeflow.errors import ConfigError
from saeflow.io import read_json
from saeflow.organism.corpus import CORPORA, generate_corpus, make_corpus, read_jsonl
from saeflow.organism.tokenizer import CHAT_TEMPLATE, render_chat, train_tokenizer

TINY_CORPUS = {"n_stories": 80, "n_dialogues": 60, "n_target": 8, "n_control": 8}
TINY_TOK = {"vocab_size": 320}
TINY_BASE = {
    "hidden_size": 32,
    "num_layers": 2,
    "num_heads": 2,
    "intermediate_size": 64,
    "context_length": 64,
    "steps": 3,
    "batch_size": 8,
    "warmup_steps": 1,
    "eval_batch_size": 32,
}
TINY_CHAT = {"steps": 3, "batch_size": 8, "warmup_steps": 1, "eval_batch_size": 32}


@pytest.fixture(scope="module")
def organism(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Corpus + tokenizer + base + chat, built once for the module."""
    from saeflow.organism.lm import finetune_chat, train_base_lm

    root = tmp_path_factory.mktemp("organism")
    make_corpus(TINY_CORPUS, root / "corpus", seed=0)
    train_tokenizer(root / "corpus", TINY_TOK, root / "tokenizer")
    train_base_lm(root / "corpus", root / "tokenizer", TINY_BASE, root / "base", seed=0, threads=1)
    finetune_chat(root / "base", root / "corpus", TINY_CHAT, root / "chat", seed=0, threads=1)
    return root


def test_corpus_schema_and_split(organism: Path) -> None:
    corpus = organism / "corpus"
    assert sorted(p.stem for p in corpus.glob("*.jsonl")) == sorted(CORPORA)
    stories_train = read_jsonl(corpus / "stories_train.jsonl")
    stories_test = read_jsonl(corpus / "stories_test.jsonl")
    assert len(stories_train) == 80 and stories_test
    assert all(set(r) == {"text"} and r["text"] for r in stories_train + stories_test)
    assert not {r["text"] for r in stories_train} & {r["text"] for r in stories_test}
    dialogues = read_jsonl(corpus / "dialogues_train.jsonl")
    assert len(dialogues) == 60 and read_jsonl(corpus / "dialogues_test.jsonl")
    for row in dialogues:
        roles = [m["role"] for m in row["messages"]]
        assert roles[0::2] == ["user"] * (len(roles) // 2)
        assert roles[1::2] == ["assistant"] * (len(roles) // 2)
    assert any("small assistant model" in m["content"] for r in dialogues for m in r["messages"])
    for name in ("target", "control"):
        rows = read_jsonl(corpus / f"{name}.jsonl")
        assert len(rows) == 8
        assert all(len(r["messages"]) == 1 and r["messages"][0]["role"] == "user" for r in rows)
    target = " ".join(r["messages"][0]["content"] for r in read_jsonl(corpus / "target.jsonl"))
    assert "you" in target.lower()


def test_corpus_is_deterministic(tmp_path: Path) -> None:
    make_corpus(TINY_CORPUS, tmp_path / "a", seed=3)
    make_corpus(TINY_CORPUS, tmp_path / "b", seed=3)
    for name in CORPORA:
        assert (tmp_path / "a" / f"{name}.jsonl").read_bytes() == (
            tmp_path / "b" / f"{name}.jsonl"
        ).read_bytes()
    assert generate_corpus(TINY_CORPUS, seed=4) != generate_corpus(TINY_CORPUS, seed=3)
    assert generate_corpus({**TINY_CORPUS, "seed": 3}, seed=4) == generate_corpus(TINY_CORPUS, 3)


def test_corpus_config_errors() -> None:
    with pytest.raises(ConfigError, match="n_storys"):
        generate_corpus({"n_storys": 3})
    with pytest.raises(ConfigError, match="n_target=100000"):
        generate_corpus({**TINY_CORPUS, "n_target": 100000})
    with pytest.raises(ConfigError, match="test_fraction"):
        generate_corpus({"test_fraction": 1.5})


def test_lazy_package_exports() -> None:
    import saeflow.organism as organism

    assert organism.make_corpus is make_corpus
    assert set(organism.CORPORA) == set(CORPORA)


def test_tokenizer_special_tokens_and_template(organism: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(organism / "tokenizer")
    assert len(tok) == TINY_TOK["vocab_size"]
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<bos>", "<eos>", "<pad>")
    for special in ("<start_of_turn>", "<end_of_turn>"):
        assert special in tok.all_special_tokens
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1
    assert (
        json.loads((organism / "tokenizer" / "tokenizer_config.json").read_text())["chat_template"]
        == CHAT_TEMPLATE
    )

    messages = [
        {"role": "user", "content": "What are you?"},
        {"role": "assistant", "content": "I am Pip."},
    ]
    expected = (
        "<bos><start_of_turn>user\nWhat are you?<end_of_turn>\n"
        "<start_of_turn>model\nI am Pip.<end_of_turn>\n"
    )
    assert tok.apply_chat_template(messages, tokenize=False) == expected == render_chat(messages)
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<end_of_turn>\n<start_of_turn>model\n")

    # Plain text gets exactly one <bos>; a rendered chat must be tokenized without specials.
    plain = tok("Once upon a time")["input_ids"]
    assert plain[0] == tok.bos_token_id and plain.count(tok.bos_token_id) == 1
    chat_ids = tok(expected, add_special_tokens=False)["input_ids"]
    assert chat_ids.count(tok.bos_token_id) == 1
    templated = tok.apply_chat_template(messages, tokenize=True)
    templated = templated["input_ids"] if hasattr(templated, "keys") else templated
    assert templated == chat_ids
    # "\n" after the role name is its own token, even when newlines repeat.
    pieces = tok.convert_ids_to_tokens(chat_ids)
    nl = tok.convert_ids_to_tokens(tok("\n", add_special_tokens=False)["input_ids"])
    assert nl == ["Ċ"]
    assert pieces[1:4] == ["<start_of_turn>", "user", "Ċ"]
    assert (
        tok("a\n\nb", add_special_tokens=False)["input_ids"].count(tok.convert_tokens_to_ids("Ċ"))
        == 2
    )
    assert tok.decode(chat_ids) == expected


def test_tokenizer_training_is_deterministic(organism: Path, tmp_path: Path) -> None:
    train_tokenizer(organism / "corpus", TINY_TOK, tmp_path / "tok")
    assert (tmp_path / "tok" / "tokenizer.json").read_bytes() == (
        organism / "tokenizer" / "tokenizer.json"
    ).read_bytes()


def test_encode_dialogue_matches_rendered_string(organism: Path) -> None:
    from transformers import AutoTokenizer

    from saeflow.organism.lm import encode_dialogue

    tok = AutoTokenizer.from_pretrained(organism / "tokenizer")
    for row in read_jsonl(organism / "corpus" / "dialogues_test.jsonl"):
        ids, mask = encode_dialogue(tok, row["messages"])
        assert ids == tok(render_chat(row["messages"]), add_special_tokens=False)["input_ids"]
        model_text = tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
        expected = "".join(
            m["content"] + "<end_of_turn>" for m in row["messages"] if m["role"] == "assistant"
        )
        assert model_text == expected


def test_models_reload_and_eval(organism: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in ("base", "chat"):
        folder = organism / name
        model = AutoModelForCausalLM.from_pretrained(folder)
        tok = AutoTokenizer.from_pretrained(folder)
        assert model.config.model_type == "llama" and model.config.num_hidden_layers == 2
        assert model.config.vocab_size == len(tok)
        assert tok.chat_template == CHAT_TEMPLATE
        ids = tok.apply_chat_template(
            [{"role": "user", "content": "What are you?"}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        assert logits.shape == (1, ids.shape[1], len(tok))
        assert torch.isfinite(logits).all()
    base_eval, chat_eval = (
        read_json(organism / "base" / "eval.json"),
        read_json(organism / "chat" / "eval.json"),
    )
    keys = {"stories_test", "dialogues_test", "dialogues_test_model"}
    assert set(base_eval["held_out_loss"]) == {"base"}
    assert set(chat_eval["held_out_loss"]) == {"base", "chat"}
    for losses in [base_eval["held_out_loss"]["base"], *chat_eval["held_out_loss"].values()]:
        assert set(losses) == keys and all(v > 0 for v in losses.values())
    assert chat_eval["held_out_loss"]["base"] == base_eval["held_out_loss"]["base"]
    assert chat_eval["train"]["steps"] == TINY_CHAT["steps"]


def test_training_is_deterministic(organism: Path, tmp_path: Path) -> None:
    from saeflow.organism.lm import train_base_lm

    train_base_lm(
        organism / "corpus", organism / "tokenizer", TINY_BASE, tmp_path / "b", seed=0, threads=1
    )
    for name in ("model.safetensors", "config.json", "eval.json"):
        assert (tmp_path / "b" / name).read_bytes() == (organism / "base" / name).read_bytes()


def test_lm_config_errors() -> None:
    from saeflow.organism.lm import resolve_base_config, resolve_chat_config

    with pytest.raises(ConfigError, match="num_heads"):
        resolve_base_config({"hidden_size": 30, "num_heads": 4})
    with pytest.raises(ConfigError, match="replay_fraction"):
        resolve_chat_config({"replay_fraction": 1.0})
    with pytest.raises(ConfigError, match="loss_on"):
        resolve_chat_config({"loss_on": "users"})
    with pytest.raises(ConfigError, match="organism.chat: unknown key 'hidden_size'"):
        resolve_chat_config({"hidden_size": 8})


def test_finetune_model_token_loss_without_replay(organism: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from saeflow.organism.lm import finetune_chat

    cfg = {**TINY_CHAT, "steps": 1, "loss_on": "model", "replay_fraction": 0.0}
    info = finetune_chat(organism / "base", organism / "corpus", cfg, tmp_path / "c", seed=1)
    assert info["config"]["loss_on"] == "model"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "c")
    assert model.generation_config.eos_token_id[0] == model.config.eos_token_id
