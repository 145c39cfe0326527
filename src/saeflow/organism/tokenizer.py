"""Byte-level BPE tokenizer for the organism, saved as a Gemma-style HF tokenizer.

Conventions (the same as Gemma's, so downstream code treats organism and hub models alike):
- `tokenizer(text)` (add_special_tokens=True, the default) prepends exactly one `<bos>` and no
  `<eos>`. The chat template already starts with `<bos>`, so a rendered chat string must be
  tokenized with `add_special_tokens=False` (or via `apply_chat_template(..., tokenize=True)`,
  which does that), otherwise it gets two.
- "\\n" is always a token of its own (a pre-tokenizer isolates it before byte-level BPE), so
  anchors such as "the newline after the user turn" are single positions.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from saeflow.errors import ConfigError, DataError
from saeflow.io import atomic_dir
from saeflow.organism.corpus import read_jsonl

BOS, EOS, PAD, SOT, EOT = "<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"
SPECIAL_TOKENS = [PAD, BOS, EOS, SOT, EOT]

DEFAULTS: dict[str, Any] = {"vocab_size": 1024, "min_frequency": 2}

# Gemma's template, minus its strict user/model alternation check; `assistant` and `model` both
# render as `model`, and a system message raises as in Gemma.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}"
    "{% endif %}"
    "{% if message['role'] in ['assistant', 'model'] %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def render_chat(messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """Python twin of CHAT_TEMPLATE (used to build the tokenizer's training text)."""
    out = [BOS]
    for m in messages:
        if m["role"] == "system":
            raise DataError("system role not supported by the organism chat template")
        role = "model" if m["role"] in ("assistant", "model") else m["role"]
        out.append(f"{SOT}{role}\n{m['content'].strip()}{EOT}\n")
    if add_generation_prompt:
        out.append(f"{SOT}model\n")
    return "".join(out)


def resolve_config(cfg: dict[str, Any] | None) -> dict[str, Any]:
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"organism.tokenizer: unknown key {unknown[0]!r}")
    out = {**DEFAULTS, **cfg}
    if not isinstance(out["vocab_size"], int) or not 300 <= out["vocab_size"] <= 65536:
        raise ConfigError(
            f"organism.tokenizer.vocab_size={out['vocab_size']!r}: must be an integer in "
            "[300, 65536] (256 bytes + specials + merges)"
        )
    if not isinstance(out["min_frequency"], int) or out["min_frequency"] < 1:
        raise ConfigError(
            f"organism.tokenizer.min_frequency={out['min_frequency']!r}: must be >= 1"
        )
    return out


def _training_text(corpus_dir: Path) -> Iterator[str]:
    for name in ("stories_train", "dialogues_train"):
        path = corpus_dir / f"{name}.jsonl"
        if not path.exists():
            raise DataError(f"{path}: corpus file missing (run make_corpus)")
        for row in read_jsonl(path):
            yield row["text"] if "text" in row else render_chat(row["messages"])


def build_tokenizer(texts: Iterator[str] | list[str], cfg: dict[str, Any] | None = None) -> Any:
    """Train byte-level BPE on `texts` and wrap it as a `PreTrainedTokenizerFast`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    c = resolve_config(cfg)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex("\n"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=c["vocab_size"],
        min_frequency=c["min_frequency"],
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[SOT, EOT],
        padding_side="right",
        model_max_length=1_000_000,
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def train_tokenizer(
    corpus_dir: str | Path, cfg: dict[str, Any] | None, out_dir: str | Path
) -> None:
    """Train on stories_train + rendered dialogues_train; save with `save_pretrained`."""
    hf = build_tokenizer(_training_text(Path(corpus_dir)), cfg)
    with atomic_dir(out_dir) as tmp:
        hf.save_pretrained(tmp, save_jinja_files=False)
