"""Model loading, block lookup, capture and splice on tiny GPT-2 / Llama / Gemma-2 checkpoints."""

from __future__ import annotations

import pytest
import torch
from _fixtures_models import make_tiny_model
from torch import nn

from saeflow.errors import ConfigError
from saeflow.models import (
    capture_layer,
    layer_modules,
    load_lm,
    n_layers_of,
    resolve_device,
    resolve_dtype,
    splice_layer,
    weight_bytes,
)

KINDS = ("gpt2", "llama", "gemma2")


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    return {k: str(make_tiny_model(k, root / k, n_layers=3)) for k in KINDS}


def test_resolve_device_and_dtype():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_dtype("bfloat16", "cpu") == torch.float32
    assert resolve_dtype("bf16", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float16", "cuda") == torch.float16
    with pytest.raises(ConfigError, match="runtime.dtype"):
        resolve_dtype("int8", "cpu")
    with pytest.raises(ConfigError, match="runtime.device"):
        resolve_device("nonsense")


@pytest.mark.parametrize("kind", KINDS)
def test_truncated_load(tiny_models, kind):
    """upto_layer=L builds L+1 blocks and no LM head; with_head keeps all blocks and the head."""
    from transformers import AutoConfig

    path = tiny_models[kind]
    assert n_layers_of(AutoConfig.from_pretrained(path)) == 3
    small = load_lm(path, device="cpu", dtype="bfloat16", upto_layer=0)
    full = load_lm(path, device="cpu", with_head=True)
    assert len(layer_modules(small)) == 1
    assert len(layer_modules(full)) == 3
    assert not hasattr(small, "lm_head") and hasattr(full, "lm_head")
    assert next(small.parameters()).dtype == torch.float32  # CPU computes in fp32
    assert not small.training and not next(small.parameters()).requires_grad
    assert weight_bytes(small) < weight_bytes(full)
    with pytest.raises(ConfigError, match="layer"):
        load_lm(path, device="cpu", upto_layer=3)


def _padded(seqs: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    P = max(map(len, seqs))
    ids = torch.zeros(len(seqs), P, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        sl = slice(P - len(s), P) if side == "left" else slice(0, len(s))
        ids[i, sl] = torch.tensor(s)
        mask[i, sl] = 1
    return ids, mask


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_capture_matches_hidden_states(tiny_models, kind, side):
    """Block L's raw output, batched and padded, equals each sequence's hidden_states[L+1]."""
    path = tiny_models[kind]
    seqs = [[5, 9, 17, 33, 8, 40, 12, 7, 9], [11, 13], [20, 21, 22, 23, 24, 25]]
    ref_model = load_lm(path, device="cpu", with_head=True)
    model = load_lm(path, device="cpu", upto_layer=1)
    ids, mask = _padded(seqs, side)
    acts_BPD = capture_layer(model, 1, ids, mask)
    for i, s in enumerate(seqs):
        with torch.no_grad():
            out = ref_model(torch.tensor([s]), output_hidden_states=True)
        torch.testing.assert_close(
            acts_BPD[i][mask[i].bool()], out.hidden_states[2][0], atol=1e-5, rtol=0
        )


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_last_layer_is_raw_not_final_norm(tiny_models, kind):
    """HF hidden_states[-1] is post-final-norm; the last block's capture is the raw residual."""
    model = load_lm(tiny_models[kind], device="cpu", with_head=True)
    ids = torch.tensor([[5, 6, 7, 8]])
    acts = capture_layer(model, 2, ids, torch.ones_like(ids))
    norm = model.transformer.ln_f if kind == "gpt2" else model.model.norm
    with torch.no_grad():
        last = model(ids, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(norm(acts), last, atol=1e-5, rtol=0)
    assert not torch.allclose(acts, last, atol=1e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_splice_replaces_block_output(tiny_models, kind):
    """Splicing block 0's output of input B into a forward of input A makes block 1 see B."""
    model = load_lm(tiny_models[kind], device="cpu", with_head=True)
    ids_a = torch.tensor([[5, 6, 7, 8, 9, 10]])
    ids_b = torch.tensor([[30, 31, 32, 33, 34, 35]])
    mask = torch.ones_like(ids_a)
    acts_b0 = capture_layer(model, 0, ids_b, mask)
    acts_b1 = capture_layer(model, 1, ids_b, mask)
    with splice_layer(model, 0, lambda acts: acts_b0):
        spliced = capture_layer(model, 1, ids_a, mask)
    torch.testing.assert_close(spliced, acts_b1, atol=1e-6, rtol=0)
    with torch.no_grad():
        clean = model(ids_a).logits
        with splice_layer(model, 1, lambda acts: acts):
            same = model(ids_a).logits
        with splice_layer(model, 1, lambda acts: acts + 1.0):
            moved = model(ids_a).logits
    assert torch.equal(clean, same)
    assert not torch.allclose(clean, moved)
    # The hook is gone after the block.
    with torch.no_grad():
        assert torch.equal(model(ids_a).logits, clean)


class _TupleBlock(nn.Module):
    """A block in the older HF style, returning (hidden_states, extras)."""

    def __init__(self, d: int):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        return (x + self.lin(x), None)


class _TupleLM(nn.Module):
    def __init__(self, vocab: int = 16, d: int = 8, n: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([_TupleBlock(d) for _ in range(n)])

    def forward(self, input_ids, attention_mask=None):
        x = self.embed(input_ids)
        for block in self.layers:
            x = block(x)[0]
        return x


def test_tuple_blocks_capture_and_splice():
    torch.manual_seed(0)
    model = _TupleLM().eval()
    ids = torch.tensor([[1, 2, 3]])
    mask = torch.ones_like(ids)
    assert len(layer_modules(model)) == 3
    with torch.no_grad():
        x = model.embed(ids)
        x0 = model.layers[0](x)[0]
        x1 = model.layers[1](x0)[0]
    torch.testing.assert_close(capture_layer(model, 1, ids, mask), x1)
    with splice_layer(model, 0, torch.zeros_like):
        got = capture_layer(model, 1, ids, mask)
    with torch.no_grad():
        torch.testing.assert_close(got, model.layers[1](torch.zeros_like(x0))[0])
    with pytest.raises(ConfigError, match="layer"):
        capture_layer(model, 5, ids, mask)
