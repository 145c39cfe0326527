"""Seed 004 (MFA tutorial): random-point init, fitted-order loadings and the NLL it reports."""

from __future__ import annotations

import numpy as np
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from saeflow.mfa import resolve_settings
from saeflow.mfa.fit import evaluate_nll, fit_mfa, init_model, standardisation, train_mfa
from saeflow.mfa.init import init_centroids, tensor_source

CPU = torch.device("cpu")
TUTORIAL = {"init": "random", "R": 2, "lr": 1e-3, "batch_size": 128, "val_fraction": 0.0}


def _data(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, 5, generator=g) * 4
    return torch.cat(
        [
            c + torch.randn(120, 5, generator=g) @ torch.randn(5, 5, generator=g) * 0.4
            for c in centres
        ]
    )


def tutorial_nll(mu_KD, W_KDR, psi_KD, log_pi_K, x_ND) -> float:
    """The tutorial's train NLL: mean over tokens of -log sum_k pi_k N(x | mu_k, W W^T + Psi)."""
    ll = np.stack(
        [
            multivariate_normal(mu_KD[k], W_KDR[k] @ W_KDR[k].T + np.diag(psi_KD[k])).logpdf(x_ND)
            for k in range(len(mu_KD))
        ],
        axis=1,
    )
    return float(-logsumexp(ll + log_pi_K[None], axis=1).mean())


def test_random_init_takes_data_points() -> None:
    """`init: random` as the tutorial trained it: K activations drawn without replacement."""
    x = _data()
    C, info = init_centroids(tensor_source(x), 6, method="random", pool_size=len(x), seed=3)
    assert info["method"] == "random" and info["pool"] == len(x)
    rows = {tuple(r) for r in x.numpy().round(6)}
    assert (
        all(tuple(c) in rows for c in C.numpy().round(6)) and len(set(map(tuple, C.numpy()))) == 6
    )


def test_fitted_nll_matches_the_dense_mixture_and_loadings_keep_fitted_order() -> None:
    x = _data()
    seq = np.repeat(np.arange(36), 10)
    C, _ = init_centroids(tensor_source(x), 3, method="random", pool_size=len(x), seed=1)
    settings = resolve_settings({**TUTORIAL, "K": 3, "epochs": 4, "patience": 0})
    assert settings["sort_loadings"] is False
    model, history, summary, _ = fit_mfa(x, seq, C, settings, seed=0, device=CPU)
    assert summary["split"] == "none" and summary["n_train"] == len(x)
    with torch.no_grad():
        want = tutorial_nll(
            model.mu.double().numpy(),
            model.W.double().numpy(),
            model.psi.double().numpy(),
            model.log_pi_K().double().numpy(),
            x.double().numpy(),
        )
    assert abs(evaluate_nll(model, x, 128, CPU) - want) < 1e-3 * abs(want)

    # the same fit by hand (init + Adam), never permuted: W is exactly what training produced
    center, scale = standardisation(x)
    by_hand = init_model(x, C, 2, psi="shared", center_D=center, scale=scale, seed=0)
    train_mfa(
        by_hand,
        x,
        x[:0],
        epochs=4,
        lr=1e-3,
        batch_size=128,
        clip=settings["clip"],
        patience=0,
        seed=0,
        device=CPU,
    )
    torch.testing.assert_close(model.W.detach(), by_hand.W.detach())
    sorted_model, *_ = fit_mfa(x, seq, C, {**settings, "sort_loadings": True}, seed=0, device=CPU)
    norms = sorted_model.W.detach().norm(dim=1)
    assert (norms[:, :-1] >= norms[:, 1:]).all()
    assert torch.allclose(norms.sort(dim=1).values, model.W.detach().norm(dim=1).sort(dim=1).values)
