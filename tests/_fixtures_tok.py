"""Tiny real tokenizers built on the fly, so tests never need a model hub.

`make_chat_tokenizer` writes a word-level tokenizer with Gemma-style special tokens and chat
template; `make_plain_tokenizer` writes the same vocabulary without a chat template.
"""

from __future__ import annotations

from pathlib import Path

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]

GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

SENTENCES = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "hello how are you today",
    "i am fine thank you",
    "what is two plus two",
    "two plus two is four",
    "user model",
    "User: Model:",
]


def _build(path: str | Path, chat_template: str | None) -> Path:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    # Whitespace-free pre-tokenizer that keeps newlines and punctuation as their own tokens, so
    # every character of a rendered chat is covered by some token's offsets.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIALS, min_frequency=1)
    tok.train_from_iterator(SENTENCES + ["\n", "?", "!", ".", ":"], trainer=trainer)
    tok.add_tokens(["\n"])
    # Like Gemma and Llama: plain `tokenizer(text)` prepends <bos>.
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tok.token_to_id("<bos>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(path)
    return path


def make_chat_tokenizer(path: str | Path) -> Path:
    """Save a tiny fast tokenizer with a Gemma-style chat template under `path`; return `path`."""
    return _build(path, GEMMA_TEMPLATE)


def make_plain_tokenizer(path: str | Path) -> Path:
    """Same vocabulary as `make_chat_tokenizer` but no chat template (a base-model tokenizer)."""
    return _build(path, None)
