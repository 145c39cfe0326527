"""Seed 000 (UMAP viewer of temporal codes): position sampling and the user/model colouring.

The viewer re-derives, from results.json's config, which positions were embedded and colours each
point black (user) or red (model) from `is_user`, a scan of the token ids for Gemma's turn
markers. Both are re-implemented here and compared with what saeflow stores per point.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch as th
from _fixtures_tok import make_chat_tokenizer
from test_tokenize import _chat_data
from transformers import AutoTokenizer

from saeflow.embedding import sample_positions
from saeflow.tokenize import tokenize_dataset

DIALOGUES = [
    [
        {"role": "user", "content": "hello how are you"},
        {"role": "assistant", "content": "i am fine"},
        {"role": "user", "content": "are you fine"},
        {"role": "assistant", "content": "i am"},
    ],
    [{"role": "user", "content": "how"}, {"role": "assistant", "content": "hello"}],
]


def seed_is_user(tokens_BP: th.Tensor, start: int, user: int, model: int) -> th.Tensor:
    """Seed 000's `is_user`: user from `<start_of_turn> user` up to the next turn marker."""
    B, P = tokens_BP.shape
    out = th.zeros(B, P, dtype=th.bool)
    for b in range(B):
        current = False
        for p in range(P):
            if p < P - 1 and tokens_BP[b, p] == start:
                if tokens_BP[b, p + 1] == user:
                    current = True
                elif tokens_BP[b, p + 1] == model:
                    current = False
            out[b, p] = current
    return out


def test_embedded_positions_follow_the_experiment_formula() -> None:
    """results.json `pos_indices` come from `th.linspace(min_p, max_p, num_p, dtype=th.int)`."""
    for min_p, max_p, num_p in ((0, 40, 30), (0, 49, 20), (3, 17, 5), (0, 9, 10)):
        want = th.linspace(min_p, max_p, num_p, dtype=th.int).tolist()
        assert sample_positions(min_p, max_p, num_p, False).tolist() == want
    # The viewer's colour positions, linspace(0, (max_p - min_p) - 1, num_p) on the [min_p:max_p]
    # slice, are another grid: for the 2-2B config half of them name a neighbouring token.
    # saeflow colours each point by its own token (README: differences from the notebooks).
    viewer = th.linspace(0, 40 - 1, 30, dtype=th.long).numpy()
    assert (viewer != sample_positions(0, 40, 30, False)).sum() == 15


def test_role_colours_match_is_user(tmp_path: Path) -> None:
    tok_dir = make_chat_tokenizer(tmp_path / "tok")
    out = tmp_path / "tokens.parquet"
    tokenize_dataset(
        _chat_data(tmp_path / "d.parquet", DIALOGUES), str(tok_dir), {"chat": True}, out
    )
    table = pq.read_table(out).to_pylist()
    tok = AutoTokenizer.from_pretrained(tok_dir)
    start = tok.convert_tokens_to_ids("<start_of_turn>")
    user, model = tok.convert_tokens_to_ids("user"), tok.convert_tokens_to_ids("model")
    for row in table:
        ids = th.tensor([row["token_ids"]])
        is_user = seed_is_user(ids, start, user, model)[0].numpy()
        roles = np.asarray(row["roles"])
        colour_seed = np.where(is_user, "black", "red")  # 0.0 -> #000000, 1.0 -> #AA1010
        colour_saeflow = np.select([roles == 1, roles == 2], ["black", "red"], "grey")
        content = roles != 0
        assert content.sum() > 0 and (roles == 1).any() and (roles == 2).any()
        np.testing.assert_array_equal(colour_saeflow[content], colour_seed[content])
        # role 0 = BOS and turn markers: grey here; the seed paints them by the turn they open
        other = set(np.asarray(row["tokens"])[~content].tolist())
        assert other <= {"<bos>", "<start_of_turn>", "<end_of_turn>"}
