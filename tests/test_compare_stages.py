"""SAE steering, pair labelling, redundant pairs and feature families on small built inputs."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from saeflow.compare.families import families_summary, families_table
from saeflow.compare.pairs import jaccard, label_pairs, one_sided, redundant_pairs
from saeflow.compare.steer import add_direction_fn, decoder_rows, steer_sae_features
from saeflow.models import splice_layer
from saeflow.sae.models import SAE

sys.path.insert(0, str(Path(__file__).parent))
from _fixtures_models import save_steer_llama  # noqa: E402

D, VOCAB, LAYER, F = 32, 64, 0, 16


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    model, tokenizer = save_steer_llama(path, d=D, vocab=VOCAB)
    return model, tokenizer


def tiny_sae(scale: float = 1.0) -> SAE:
    g = torch.Generator().manual_seed(2)
    W_dec = torch.randn(F, D, generator=g)
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
    return SAE(
        W_dec.T.clone(),
        torch.zeros(F),
        W_dec,
        torch.zeros(D),
        activation="relu",
        input_scale=scale,
        normalize="scalar" if scale != 1.0 else "none",
    )


def test_decoder_rows_undo_input_scaling():
    sae = tiny_sae(scale=4.0)
    d = decoder_rows(sae, [3])[3]
    # decoding one unit of feature 3 moves the activations by W_dec[3] / input_scale
    torch.testing.assert_close(d, sae.W_dec[3] / 4.0)


def test_steer_alpha_zero_is_no_op_and_steered_feature_moves(tiny_llama):
    model, tok = tiny_llama
    sae = tiny_sae()
    dirs = decoder_rows(sae, [1, 5])
    df, runs = steer_sae_features(
        model,
        tok,
        sae,
        dirs,
        LAYER,
        prompts=["a b c"],
        features=[1, 5],
        alphas=[0.0, 6.0],
        top_logits=3,
        max_new_tokens=2,
        top_moved=3,
        chat=False,
    )
    zero = [r for r in runs if r["alpha"] == 0.0]
    assert max(r["max_abs_logit_delta"] for r in zero) < 1e-5
    assert all(r["continuation"] == r["base_continuation"] for r in zero)
    assert max(r["max_abs_logit_delta"] for r in runs if r["alpha"] == 6.0) > 1e-3
    feats = df[(df["kind"] == "feature") & (df["alpha"] == 6.0) & (df["direction"] == "+")]
    for f in (1, 5):
        top = feats[(feats["feature"] == f) & (feats["rank"] == 0)]
        assert int(top["id"].iloc[0]) == f  # the steered feature is the one that moves most
        assert top["delta"].iloc[0] > 1.0
    logits = df[df["kind"] == "logit"]
    assert set(logits["direction"]) == {"+", "-"}
    assert (logits[logits["direction"] == "+"]["delta"] >= 0).all()


def test_add_direction_really_splices(tiny_llama):
    model, _ = tiny_llama
    ids = torch.tensor([[5, 6, 7]])
    rec = []
    d = torch.ones(D)
    with splice_layer(model, LAYER, add_direction_fn(d, 2.0, rec)):
        model(input_ids=ids)
    clean = []
    with splice_layer(model, LAYER, add_direction_fn(d, 0.0, clean)):
        model(input_ids=ids)
    torch.testing.assert_close(rec[0] - clean[0], torch.full_like(rec[0], 2.0))


def _codes():
    rng = np.random.default_rng(0)
    n = 400
    A = np.zeros((n, 4), np.float32)
    B = np.zeros((n, 6), np.float32)
    parent = rng.random(n) < 0.3
    half = rng.random(n) < 0.5
    A[parent, 0] = rng.random(parent.sum()) + 0.5
    B[parent & half, 0] = A[parent & half, 0]  # child 0: one half of parent 0's tokens
    B[parent & ~half, 1] = A[parent & ~half, 0]  # child 1: the other half
    other = rng.random(n) < 0.2
    A[other, 1] = 1.0
    B[other, 2] = 1.0  # a 1:1 match
    A[:, 2] = rng.random(n) * (rng.random(n) < 0.1)
    B[:, 3] = A[:, 2] * 1.0  # duplicate inside B below
    B[:, 4] = B[:, 3] * 2.0
    return sp.csr_matrix(A), sp.csr_matrix(B)


def test_families_split_general_to_specific():
    from saeflow.geometry.matching import match_features, matches_table

    A, B = _codes()
    table = matches_table(match_features(A, B, top_k=3), sae_a="small", sae_b="big")
    fam = families_table(table, A, B, parent_sae="small", threshold=0.3, min_children=2)
    f0 = fam[fam["parent"] == 0]
    assert set(f0["child"]) == {0, 1}
    assert (f0["split_ratio"] == 2).all()
    # the children split the parent's tokens: densities sum to the parent's, no co-firing
    assert f0["density_ratio"].sum() == pytest.approx(1.0)
    assert f0["coverage"].iloc[0] == pytest.approx(1.0)
    assert f0["children_jaccard"].iloc[0] == 0.0
    assert (f0["p_parent_given_child"] == 1.0).all()
    assert (f0["child_parents"] >= 1).all()
    assert 1 not in set(fam["parent"])  # a 1:1 match is no family
    s = families_summary(fam, 4)
    assert s["split_ratio_counts"]["2"] >= 1


def test_pair_labels_and_self_match_without_diagonal():
    from saeflow.geometry.matching import match_features, matches_table

    A, B = _codes()
    tokens = [f"t{i % 7}" for i in range(A.shape[0])]
    table = matches_table(match_features(A, B, top_k=3), sae_a="small", sae_b="big")
    pairs = label_pairs(table, A, B, tokens, n_pairs=10, top_n=5)
    one = pairs[(pairs["feature_a"] == 1) & (pairs["feature_b"] == 2)].iloc[0]
    assert one["corr"] == pytest.approx(1.0)
    assert one["n_a_only"] == 0 and one["n_b_only"] == 0
    red = redundant_pairs(B, None, threshold=0.9, sae="big")
    assert list(zip(red["feature"], red["other"], strict=True)) == [(3, 4)]
    assert red["corr"].iloc[0] == pytest.approx(1.0)
    assert not ((red["feature"] == red["other"]).any())


def test_one_sided_and_jaccard():
    a = np.array([1.0, 0, 2, 0, 1])
    b = np.array([0.0, 1, 1, 0, 0])
    out = one_sided(a, b, ["x", "y", "z", "w", "x"])
    assert (out["n_both"], out["n_a_only"], out["n_b_only"]) == (1, 2, 1)
    assert out["a_only_tokens"] == ["x (2)"]
    assert jaccard({"a", "b"}, {"b", "c"}) == pytest.approx(1 / 3)
    assert jaccard(set(), set()) == 0.0


def test_family_links_file_lists_shown_parents_and_their_children(tmp_path):
    from saeflow.compare.pages import shown_parents, write_family_links
    from saeflow.geometry.matching import match_features, matches_table

    A, B = _codes()
    table = matches_table(match_features(A, B, top_k=3), sae_a="small", sae_b="big")
    fam = families_table(table, A, B, parent_sae="small", threshold=0.3, min_children=2)
    summary = {"name": "fams", "parent_sae": "small", "child_sae": "big"}
    out = write_family_links(tmp_path / "families-fams.links.js", fam, summary, max_families=5)
    text = out.read_text()
    assert text.startswith("saeflowFamilyLinks(") and text.rstrip().endswith(");")
    payload = __import__("json").loads(text[len("saeflowFamilyLinks(") : text.rindex(")")])
    assert payload["page"] == "families-fams.html"
    assert payload["parents"] == shown_parents(fam, 5) and 0 in payload["parents"]
    want: dict[str, list[int]] = {}
    for child, parent in sorted(zip(fam["child"], fam["parent"], strict=True)):
        want.setdefault(str(child), []).append(int(parent))
    assert payload["children"] == want and want["0"] == [0] and want["1"] == [0]
    assert shown_parents(fam, 0) == []
