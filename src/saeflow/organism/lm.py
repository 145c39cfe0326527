"""Train the organism's tiny Llama-style base LM and its chat fine-tune, on CPU, deterministically.

Both are saved with `save_pretrained` (model + tokenizer + `eval.json`) so the rest of the graph
loads them with `AutoModelForCausalLM.from_pretrained` exactly like hub models.

Choices:
- One document per row (stories start with `<bos>` and end with `<eos>`; dialogues are rendered
  with the chat template), truncated to `context_length` and right-padded to the longest row of
  the batch; no packing, so position 0 is always `<bos>`, as in the prompts analysed later.
- The chat fine-tune puts the loss on every token by default (`loss_on: all`), so the chat model
  also learns the user-turn format and the self-questions; `loss_on: model` restricts it to the
  model turns (content + `<end_of_turn>`).
- Held-out loss is the mean next-token cross-entropy over all non-pad tokens; for dialogues it is
  also reported over model-turn tokens only (`dialogues_test_model`).
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from saeflow.errors import ConfigError, DataError
from saeflow.io import atomic_dir, dumps_json
from saeflow.organism.corpus import read_jsonl
from saeflow.organism.tokenizer import EOT, SOT
from saeflow.utils import seed_everything

BASE_DEFAULTS: dict[str, Any] = {
    "hidden_size": 128,
    "num_layers": 4,
    "num_heads": 4,
    "intermediate_size": 512,
    "context_length": 128,
    "steps": 250,
    "batch_size": 32,
    "lr": 3.0e-3,
    "warmup_steps": 30,
    "weight_decay": 0.1,
    "eval_batch_size": 64,
}
CHAT_DEFAULTS: dict[str, Any] = {
    "steps": 150,
    "batch_size": 32,
    "lr": 1.0e-3,
    "warmup_steps": 20,
    "weight_decay": 0.1,
    "eval_batch_size": 64,
    "loss_on": "all",
    "replay_fraction": 0.2,
}
_POSITIVE_INTS = (
    "hidden_size",
    "num_layers",
    "num_heads",
    "intermediate_size",
    "context_length",
    "steps",
    "batch_size",
    "eval_batch_size",
)


def _resolve(cfg: dict[str, Any] | None, defaults: dict[str, Any], where: str) -> dict[str, Any]:
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(defaults))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}")
    out = {**defaults, **cfg}
    for key in _POSITIVE_INTS:
        if key in out and (not isinstance(out[key], int) or out[key] < 1):
            raise ConfigError(f"{where}.{key}={out[key]!r}: must be an integer >= 1")
    for key in ("lr", "weight_decay"):
        if not isinstance(out[key], (int, float)) or out[key] < 0:
            raise ConfigError(f"{where}.{key}={out[key]!r}: must be a number >= 0")
    if not isinstance(out["warmup_steps"], int) or out["warmup_steps"] < 0:
        raise ConfigError(f"{where}.warmup_steps={out['warmup_steps']!r}: must be an integer >= 0")
    if "num_heads" in out and out["hidden_size"] % out["num_heads"]:
        raise ConfigError(
            f"{where}.num_heads={out['num_heads']}: must divide hidden_size={out['hidden_size']}"
        )
    replay = out.get("replay_fraction", 0.0)
    if not isinstance(replay, (int, float)) or not 0.0 <= replay < 1.0:
        raise ConfigError(f"{where}.replay_fraction={out['replay_fraction']!r}: must be in [0, 1)")
    if out.get("loss_on", "all") not in ("all", "model"):
        raise ConfigError(f"{where}.loss_on={out['loss_on']!r}: must be 'all' or 'model'")
    return out


def resolve_base_config(cfg: dict[str, Any] | None) -> dict[str, Any]:
    return _resolve(cfg, BASE_DEFAULTS, "organism.base_lm")


def resolve_chat_config(cfg: dict[str, Any] | None) -> dict[str, Any]:
    return _resolve(cfg, CHAT_DEFAULTS, "organism.chat")


@contextlib.contextmanager
def deterministic_torch(threads: int) -> Iterator[None]:
    """Fixed thread count + deterministic kernels: the same config gives the same weights."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(max(1, int(threads)))
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_det)
        torch.set_num_threads(old_threads)


# --- data ---------------------------------------------------------------------------------------


def _load(corpus_dir: Path, name: str) -> list[dict]:
    path = corpus_dir / f"{name}.jsonl"
    if not path.exists():
        raise DataError(f"{path}: corpus file missing (run make_corpus)")
    rows = read_jsonl(path)
    if not rows:
        raise DataError(f"{path}: corpus file is empty")
    return rows


def encode_texts(tokenizer: Any, texts: list[str], ctx: int) -> list[list[int]]:
    """`<bos> text <eos>`, truncated to `ctx` tokens."""
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    return [(row + [tokenizer.eos_token_id])[:ctx] for row in ids]


def encode_dialogue(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids of the rendered chat and a 0/1 mask of model-turn tokens (content + end marker).

    Built piece by piece; this equals tokenizing the rendered string because every piece boundary
    is a special token or an isolated "\\n" (tests check it).
    """
    tok = tokenizer
    sot, eot = tok.convert_tokens_to_ids(SOT), tok.convert_tokens_to_ids(EOT)
    nl = tok("\n", add_special_tokens=False)["input_ids"]
    ids, mask = [tok.bos_token_id], [0]
    for m in messages:
        if m["role"] not in ("user", "assistant", "model"):
            raise DataError(f"dialogue role {m['role']!r}: organism chats are user/assistant only")
        is_model = m["role"] in ("assistant", "model")
        role = tok("model" if is_model else "user", add_special_tokens=False)["input_ids"]
        content = tok(m["content"].strip(), add_special_tokens=False)["input_ids"]
        head = [sot, *role, *nl]
        ids += head + content + [eot] + nl
        mask += [0] * len(head) + [int(is_model)] * (len(content) + 1) + [0] * len(nl)
    return ids, mask


def encode_dialogues(
    tokenizer: Any, rows: list[dict], ctx: int
) -> tuple[list[list[int]], list[list[int]]]:
    pairs = [encode_dialogue(tokenizer, r["messages"]) for r in rows]
    return [p[0][:ctx] for p in pairs], [p[1][:ctx] for p in pairs]


def _collate(
    seqs: list[list[int]], masks: list[list[int]] | None, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad to the longest row; labels are -100 on padding (and on masked-out tokens)."""
    length = max(len(s) for s in seqs)
    tokens_BP = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    attn_BP = torch.zeros((len(seqs), length), dtype=torch.long)
    labels_BP = torch.full((len(seqs), length), -100, dtype=torch.long)
    for i, s in enumerate(seqs):
        row = torch.tensor(s, dtype=torch.long)
        tokens_BP[i, : len(s)] = row
        attn_BP[i, : len(s)] = 1
        if masks is None:
            labels_BP[i, : len(s)] = row
        else:
            keep = torch.tensor(masks[i], dtype=torch.bool)
            labels_BP[i, : len(s)] = torch.where(keep, row, torch.full_like(row, -100))
    return tokens_BP, attn_BP, labels_BP


@torch.no_grad()
def held_out_loss(
    model: Any,
    seqs: list[list[int]],
    pad_id: int,
    batch_size: int,
    masks: list[list[int]] | None = None,
) -> tuple[float, float]:
    """Mean next-token cross-entropy over all target tokens, and over mask=1 targets only.

    Rows are sorted by length first, so little compute goes to padding.
    """
    model.eval()
    masks = masks if masks is not None else [[1] * len(s) for s in seqs]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    total, count, total_m, count_m = 0.0, 0, 0.0, 0
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        tokens_BP, attn_BP, labels_BP = _collate([seqs[i] for i in idx], None, pad_id)
        _, _, masked_BP = _collate([seqs[i] for i in idx], [masks[i] for i in idx], pad_id)
        logits_BPV = model(input_ids=tokens_BP, attention_mask=attn_BP).logits
        nll_BP = torch.nn.functional.cross_entropy(
            logits_BPV[:, :-1].transpose(1, 2).float(),
            labels_BP[:, 1:],
            ignore_index=-100,
            reduction="none",
        )
        keep_BP = masked_BP[:, 1:] != -100
        total += float(nll_BP.sum())
        count += int((labels_BP[:, 1:] != -100).sum())
        total_m += float(nll_BP[keep_BP].sum())
        count_m += int(keep_BP.sum())
    return total / max(count, 1), total_m / max(count_m, 1)


def evaluate(model: Any, tokenizer: Any, corpus_dir: Path, ctx: int, batch_size: int) -> dict:
    """Held-out losses on stories_test and dialogues_test (all tokens and model tokens)."""
    pad = tokenizer.pad_token_id
    stories = encode_texts(tokenizer, [r["text"] for r in _load(corpus_dir, "stories_test")], ctx)
    dialogues, masks = encode_dialogues(tokenizer, _load(corpus_dir, "dialogues_test"), ctx)
    story_loss, _ = held_out_loss(model, stories, pad, batch_size)
    dialogue_loss, model_loss = held_out_loss(model, dialogues, pad, batch_size, masks)
    return {
        "stories_test": round(story_loss, 6),
        "dialogues_test": round(dialogue_loss, 6),
        "dialogues_test_model": round(model_loss, 6),
    }


# --- training -----------------------------------------------------------------------------------


def _lr_at(step: int, c: dict[str, Any]) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < c["warmup_steps"]:
        return c["lr"] * (step + 1) / c["warmup_steps"]
    span = max(1, c["steps"] - c["warmup_steps"])
    frac = (step - c["warmup_steps"]) / span
    return c["lr"] * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac)))


def _batches(
    lengths: list[int], batch_size: int, gen: torch.Generator, pool_batches: int
) -> Iterator[list[int]]:
    """Endless seeded batches; with `pool_batches` > 1 rows of similar length share a batch.

    Each epoch is shuffled, cut into pools of `pool_batches` batches, each pool sorted by length
    and cut into batches, and the batches of the epoch shuffled again. Bucketing saves padding
    on the dialogues (lengths 30-160) but makes batches less diverse, which cost the stories
    (lengths 60-90, little padding anyway) about 0.1 nats, so the base LM does not bucket.
    """
    pool = pool_batches * batch_size
    while True:
        perm = torch.randperm(len(lengths), generator=gen).tolist()
        batches = []
        for start in range(0, len(perm), pool):
            chunk = sorted(perm[start : start + pool], key=lambda i: lengths[i])
            batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
        for b in torch.randperm(len(batches), generator=gen).tolist():
            yield batches[b]


def _train(
    model: Any,
    seqs: list[list[int]],
    masks: list[list[int]] | None,
    pad_id: int,
    c: dict[str, Any],
    seed: int,
    desc: str,
    pool_batches: int = 1,
) -> dict[str, Any]:
    """AdamW over seeded shuffled epochs; returns step/token counts and the last losses."""
    gen = torch.Generator().manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": c["weight_decay"]},
            {"params": no_decay, "weight_decay": 0},
        ],
        lr=c["lr"],
        betas=(0.9, 0.95),
        foreach=False,
    )
    model.train()
    batches = _batches([len(s) for s in seqs], c["batch_size"], gen, pool_batches)
    tokens_seen, recent = 0, []
    bar = tqdm(range(c["steps"]), desc=desc, file=sys.stderr, mininterval=2.0)
    for step in bar:
        idx = next(batches)
        batch_masks = [masks[i] for i in idx] if masks is not None else None
        tokens_BP, attn_BP, labels_BP = _collate([seqs[i] for i in idx], batch_masks, pad_id)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, c)
        loss = model(input_ids=tokens_BP, attention_mask=attn_BP, labels=labels_BP).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens_seen += int(attn_BP.sum())
        recent = (recent + [loss.item()])[-20:]
        bar.set_postfix(loss=f"{recent[-1]:.3f}")
    model.eval()
    return {
        "steps": c["steps"],
        "tokens_seen": tokens_seen,
        "final_train_loss": round(sum(recent) / max(len(recent), 1), 6),
    }


def _save(model: Any, tokenizer: Any, out_dir: str | Path, eval_info: dict) -> None:
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp, save_jinja_files=False)
        (tmp / "eval.json").write_text(dumps_json(eval_info))


def build_model(tokenizer: Any, c: dict[str, Any]) -> Any:
    """A freshly initialised tiny Llama whose special-token ids match the tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_layers"],
        num_attention_heads=c["num_heads"],
        num_key_value_heads=c["num_heads"],
        max_position_embeddings=c["context_length"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def train_base_lm(
    corpus_dir: str | Path,
    tokenizer_dir: str | Path,
    cfg: dict[str, Any] | None,
    out_dir: str | Path,
    seed: int = 0,
    threads: int = 1,
) -> dict[str, Any]:
    """Pretrain the base LM on stories_train (stories + plain fact paragraphs); return eval info."""
    from transformers import AutoTokenizer

    c = resolve_base_config(cfg)
    corpus_dir = Path(corpus_dir)
    with deterministic_torch(threads):
        seed_everything(seed)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        texts = [r["text"] for r in _load(corpus_dir, "stories_train")]
        seqs = encode_texts(tokenizer, texts, c["context_length"])
        model = build_model(tokenizer, c)
        train_info = _train(model, seqs, None, tokenizer.pad_token_id, c, seed, "base_lm")
        losses = evaluate(model, tokenizer, corpus_dir, c["context_length"], c["eval_batch_size"])
        print(f"held-out loss base: {losses}", file=sys.stderr)
        info = {
            "model": "base",
            "held_out_loss": {"base": losses},
            "train": {**train_info, "n_params": sum(p.numel() for p in model.parameters())},
            "config": c,
        }
        _save(model, tokenizer, out_dir, info)
    return info


def finetune_chat(
    base_dir: str | Path,
    corpus_dir: str | Path,
    cfg: dict[str, Any] | None,
    out_dir: str | Path,
    seed: int = 0,
    threads: int = 1,
) -> dict[str, Any]:
    """Fine-tune the base LM on rendered dialogues_train; eval.json holds base AND chat losses.

    A `replay_fraction` of the training rows are stories (loss on all their tokens), so the chat
    model keeps most of the base model's story skill, as a real chat model keeps its pretraining.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    c = resolve_chat_config(cfg)
    corpus_dir = Path(corpus_dir)
    with deterministic_torch(threads):
        seed_everything(seed)
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        ctx = int(model.config.max_position_embeddings)
        base_losses = evaluate(model, tokenizer, corpus_dir, ctx, c["eval_batch_size"])
        seqs, masks = encode_dialogues(tokenizer, _load(corpus_dir, "dialogues_train"), ctx)
        n_dialogues = len(seqs)
        n_replay = round(n_dialogues * c["replay_fraction"] / (1.0 - c["replay_fraction"]))
        replay: list[list[int]] = []
        if n_replay:
            stories = [r["text"] for r in _load(corpus_dir, "stories_train")[:n_replay]]
            replay = encode_texts(tokenizer, stories, ctx)
            seqs, masks = seqs + replay, masks + [[1] * len(r) for r in replay]
        train_masks = masks if c["loss_on"] == "model" else None
        train_info = _train(
            model, seqs, train_masks, tokenizer.pad_token_id, c, seed, "chat", pool_batches=4
        )
        chat_losses = evaluate(model, tokenizer, corpus_dir, ctx, c["eval_batch_size"])
        print(f"held-out loss base: {base_losses}", file=sys.stderr)
        print(f"held-out loss chat: {chat_losses}", file=sys.stderr)
        # Generation should stop at the end of a model turn, as Gemma-it does.
        model.generation_config.eos_token_id = [
            tokenizer.eos_token_id,
            tokenizer.convert_tokens_to_ids(EOT),
        ]
        info = {
            "model": "chat",
            "held_out_loss": {"base": base_losses, "chat": chat_losses},
            "train": {**train_info, "n_dialogues": n_dialogues, "n_replay_stories": len(replay)},
            "config": c,
        }
        _save(model, tokenizer, out_dir, info)
    return info
