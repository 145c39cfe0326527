"""A real GGUF file, written with the `gguf` package from a tiny Llama, loaded through saeflow.

The file follows llama.cpp's layout as transformers' GGUF loader reads it
(`integrations/ggml.py`, `modeling_gguf_pytorch_utils.py`): `llama.*` hyper-parameters, a
byte-level BPE vocabulary (`tokenizer.ggml.model = gpt2`) with merges and a ChatML template, and
F32 tensors under llama.cpp names with q/k rows permuted as `convert_hf_to_gguf.py` does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from saeflow import config as sfc
from saeflow.models import capture_layer, load_lm, split_gguf
from saeflow.tokenize import load_tokenizer

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXTS = ["what is two plus two", "two plus two is four", "the cat sat on the mat", "user assistant"]
D, N_LAYERS, HEADS, KV_HEADS, FFN = 32, 3, 4, 2, 64


def _bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TEXTS * 4, trainer=trainer)
    return tok


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (the inverse of transformers' `_reverse_permute_weights`)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_gguf(folder: Path) -> tuple[Path, torch.nn.Module, object]:
    """A tiny random Llama saved as `folder/tiny.gguf`; returns (path, model, BPE tokenizer)."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _bpe()
    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    import json

    merges = [" ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    cfg = LlamaConfig(
        vocab_size=len(tokens),
        hidden_size=D,
        intermediate_size=FFN,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=vocab["<|im_start|>"],
        eos_token_id=vocab["<|im_end|>"],
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_block_count(N_LAYERS)
    w.add_context_length(64)
    w.add_embedding_length(D)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(D // HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab["<|im_start|>"])
    w.add_eos_token_id(vocab["<|im_end|>"])
    w.add_pad_token_id(vocab["<|endoftext|>"])
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(N_LAYERS):
        p = f"model.layers.{i}."
        names = {
            "attn_norm": "input_layernorm",
            "ffn_norm": "post_attention_layernorm",
            "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj",
            "ffn_gate": "mlp.gate_proj",
            "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj",
        }
        for g, h in names.items():
            w.add_tensor(f"blk.{i}.{g}.weight", sd[p + h + ".weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], HEADS))
        w.add_tensor(
            f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], KV_HEADS)
        )
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, model, tok


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory):
    return write_gguf(tmp_path_factory.mktemp("gguf") / "model")


def test_split_gguf() -> None:
    assert split_gguf("results/wheels/x/m.gguf") == ("results/wheels/x", "m.gguf")
    assert split_gguf("org/repo", "m.Q4.gguf") == ("org/repo", "m.Q4.gguf")
    assert split_gguf("some/folder") == ("some/folder", None)


def test_gguf_model_matches_the_model_it_was_written_from(tiny_gguf) -> None:
    path, ref, _ = tiny_gguf
    ids = torch.randint(
        0, ref.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1)
    )
    mask = torch.ones_like(ids)
    lm = load_lm(path, device="cpu", dtype="float32", with_head=True)
    with torch.no_grad():
        torch.testing.assert_close(
            lm(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-4, atol=1e-4
        )
        hidden = ref(input_ids=ids, output_hidden_states=True).hidden_states
    cut = load_lm(
        str(path.parent), gguf_file=path.name, device="cpu", dtype="float32", upto_layer=1
    )
    torch.testing.assert_close(capture_layer(cut, 1, ids, mask), hidden[2], rtol=1e-4, atol=1e-4)


def test_gguf_tokenizer_and_chat_template(tiny_gguf) -> None:
    path, _, tok = tiny_gguf
    hf_tok = load_tokenizer(str(path))
    text = "what is two plus two"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text).ids
    chat = hf_tok.apply_chat_template(
        [{"role": "user", "content": "two plus two"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|im_start|>user\ntwo plus two<|im_end|>\n<|im_start|>assistant\n"


def test_config_gguf_file_and_layer_check(tiny_gguf, tmp_path: Path) -> None:
    from saeflow.errors import ConfigError

    path, _, _ = tiny_gguf

    def cfg(layer: int) -> dict:
        return {
            "models": {"m": {"hf_name": str(path.parent), "gguf_file": path.name, "layer": layer}},
            "datasets": {"d": {"source": "hf", "hf_name": "x"}},
        }

    good = cfg(2)
    sfc.prepare(good, tmp_path)
    spec = sfc.model_spec(good, "m")
    assert spec["path"] == f"{path.parent}/{path.name}" and spec["gguf_file"] == path.name
    with pytest.raises(ConfigError, match=r"models.m.layer = 3: the model has 3 layers"):
        sfc.prepare(cfg(3), tmp_path)


def test_accelerator_loads_go_straight_to_the_device(tmp_path: Path, monkeypatch) -> None:
    """Off CPU, load_lm hands `device_map` to from_pretrained (accelerate places each weight as it
    is read) instead of building on the host and moving; `meta` stands in for a GPU here."""
    from _fixtures_models import make_tiny_model

    import saeflow.models as sm

    assert sm.device_map_kwargs(torch.device("cpu")) == {}
    assert sm.device_map_kwargs(torch.device("cuda:1")) == {"device_map": {"": "cuda:1"}}
    path = make_tiny_model("llama", tmp_path / "m")
    moved: list = []
    monkeypatch.setattr(sm, "resolve_device", lambda _d: torch.device("meta"))
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: moved.append(a) or self)
    lm = sm.load_lm(path, device="cuda", dtype="float32", upto_layer=1)
    assert {p.device.type for p in lm.parameters()} == {"meta"} and not moved
