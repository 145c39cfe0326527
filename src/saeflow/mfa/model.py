"""Mixture of Factor Analyzers: p(x) = sum_k pi_k N(mu_k, W_k W_k^T + Psi).

The log-likelihood goes through Woodbury and a Cholesky factor of the R x R matrix
M_k = I + W_k^T Psi^-1 W_k, so no D x D matrix is ever formed: the cost of a batch is O(B K D R)
instead of O(K D^3 + B K D^2).

The trainable parameters live in a *standardised* frame x' = (x - center) / scale (a fixed
shift and one scalar), so that Adam's step size means the same thing for any model's activation
scale and so that the quadratic forms are computed near the origin (float32 cancellation stays
small for residual streams with large norms). Everything the module exposes (`mu`, `W`, `psi`,
log-likelihoods) is in the original activation space.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from saeflow.errors import DataError

PSI_MODES = ("shared", "per_component")
# Floor on Psi in the standardised frame, where the mean per-dimension variance is 1.
PSI_FLOOR = 1e-5


class MFA(nn.Module):
    """A mixture of K factor analyzers of rank R in D dimensions (see the module docstring)."""

    def __init__(
        self,
        K: int,
        D: int,
        R: int,
        *,
        psi: str = "shared",
        center_D: torch.Tensor | None = None,
        scale: float = 1.0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if psi not in PSI_MODES:
            raise ValueError(f"psi must be one of {PSI_MODES}, got {psi!r}")
        if not 1 <= R <= D:
            raise ValueError(f"R must be in [1, D={D}], got {R}")
        self.K, self.D, self.R, self.psi_mode = int(K), int(D), int(R), psi
        self.mu_std_KD = nn.Parameter(torch.zeros(K, D, dtype=dtype))
        self.W_std_KDR = nn.Parameter(torch.zeros(K, D, R, dtype=dtype))
        psi_shape = (D,) if psi == "shared" else (K, D)
        self.log_psi_std = nn.Parameter(torch.zeros(psi_shape, dtype=dtype))
        self.pi_logits_K = nn.Parameter(torch.zeros(K, dtype=dtype))
        center = torch.zeros(D, dtype=dtype) if center_D is None else center_D.to(dtype)
        self.register_buffer("center_D", center.clone())
        self.register_buffer("scale", torch.tensor(float(scale), dtype=dtype))

    # ---- parameters in the standardised frame -------------------------------------------------
    def psi_std_KD(self) -> torch.Tensor:
        psi = self.log_psi_std.exp() + PSI_FLOOR
        return psi.expand(self.K, self.D) if psi.ndim == 1 else psi

    def log_pi_K(self) -> torch.Tensor:
        return torch.log_softmax(self.pi_logits_K, dim=0)

    # ---- parameters in the original activation space ------------------------------------------
    @property
    def mu(self) -> torch.Tensor:
        """Component means (K, D)."""
        return self.center_D + self.scale * self.mu_std_KD

    @property
    def W(self) -> torch.Tensor:
        """Loadings (K, D, R)."""
        return self.scale * self.W_std_KDR

    @property
    def psi(self) -> torch.Tensor:
        """Diagonal noise variances (K, D), expanded when shared."""
        return self.scale**2 * self.psi_std_KD()

    # ---- likelihood ----------------------------------------------------------------------------
    def _standardise(self, x_BD: torch.Tensor) -> torch.Tensor:
        if x_BD.ndim != 2 or x_BD.shape[1] != self.D:
            raise DataError(
                f"MFA expects activations of shape (B, {self.D}), got {tuple(x_BD.shape)}"
            )
        dtype = self.mu_std_KD.dtype
        return (x_BD.to(dtype) - self.center_D) / self.scale

    def _core(self, x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-component log N(x | mu_k, C_k) (B, K), v = W^T Psi^-1 (x - mu) (B, K, R), chol(M)."""
        x = self._standardise(x_BD)
        K, D, R = self.K, self.D, self.R
        psi_inv_KD = 1.0 / self.psi_std_KD()
        W = self.W_std_KDR
        mu = self.mu_std_KD
        PinvW_KDR = psi_inv_KD[:, :, None] * W
        M_KRR = torch.eye(R, dtype=W.dtype, device=W.device) + W.transpose(1, 2) @ PinvW_KDR
        L_KRR = torch.linalg.cholesky(M_KRR)
        # Mahalanobis term under the diagonal part: x'Px - 2 x'P mu + mu'P mu, all as matmuls.
        xPx_BK = (x * x) @ psi_inv_KD.T
        xPmu_BK = x @ (psi_inv_KD * mu).T
        muPmu_K = (mu * mu * psi_inv_KD).sum(-1)
        diag_BK = xPx_BK - 2.0 * xPmu_BK + muPmu_K
        # v = W^T Psi^-1 (x - mu): one (B, D) @ (D, K R) matmul.
        v_BKR = (x @ PinvW_KDR.permute(1, 0, 2).reshape(D, K * R)).view(-1, K, R)
        v_BKR = v_BKR - torch.einsum("kd,kdr->kr", mu, PinvW_KDR)
        # v^T M^-1 v = |L^-1 v|^2.
        y_KRB = torch.linalg.solve_triangular(L_KRR, v_BKR.permute(1, 2, 0), upper=False)
        woodbury_BK = (y_KRB * y_KRB).sum(1).T
        logdet_K = self.log_psi_std_sum_K() + 2.0 * torch.log(
            torch.diagonal(L_KRR, dim1=-2, dim2=-1)
        ).sum(-1)
        quad_BK = diag_BK - woodbury_BK
        ll_std_BK = -0.5 * (D * math.log(2.0 * math.pi) + logdet_K + quad_BK)
        ll_BK = ll_std_BK - D * torch.log(self.scale)
        return ll_BK, v_BKR, L_KRR

    def log_psi_std_sum_K(self) -> torch.Tensor:
        return torch.log(self.psi_std_KD()).sum(-1)

    def log_prob_components(self, x_BD: torch.Tensor) -> torch.Tensor:
        """log N(x | mu_k, W_k W_k^T + Psi_k) for every component (B, K)."""
        return self._core(x_BD)[0]

    def log_prob(self, x_BD: torch.Tensor) -> torch.Tensor:
        """log p(x) under the mixture (B,)."""
        return torch.logsumexp(self.log_prob_components(x_BD) + self.log_pi_K(), dim=1)

    def nll(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood per token (nats)."""
        return -self.log_prob(x_BD).mean()

    def posterior(self, x_BD: torch.Tensor) -> dict[str, torch.Tensor]:
        """Responsibilities p(k|x) (B, K), E[z|x,k] (B, K, R), log p(x|k) (B, K), log p(x) (B,).

        z is the same in the standardised and the original frame, so it needs no conversion.
        """
        ll_BK, v_BKR, L_KRR = self._core(x_BD)
        joint_BK = ll_BK + self.log_pi_K()
        log_px_B = torch.logsumexp(joint_BK, dim=1)
        Ez_KRB = torch.cholesky_solve(v_BKR.permute(1, 2, 0), L_KRR, upper=False)
        return {
            "resp_BK": (joint_BK - log_px_B[:, None]).exp(),
            "Ez_BKR": Ez_KRB.permute(2, 0, 1),
            "ll_BK": ll_BK,
            "log_px_B": log_px_B,
        }

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        return self.nll(x_BD)

    @torch.no_grad()
    def sort_loadings(self) -> MFA:
        """Order each W_k's columns by decreasing norm, so axis 0 is the strongest direction.

        Columns of W_k are only defined up to a rotation; a permutation leaves the likelihood
        unchanged and gives "the first pair of loading axes" a stable meaning.
        """
        order_KR = self.W_std_KDR.norm(dim=1).argsort(dim=1, descending=True)
        idx = order_KR[:, None, :].expand(-1, self.D, -1)
        self.W_std_KDR.copy_(self.W_std_KDR.gather(2, idx))
        return self

    # ---- construction from original-space parameters ------------------------------------------
    @torch.no_grad()
    def set_params(
        self,
        mu_KD: torch.Tensor,
        W_KDR: torch.Tensor,
        psi: torch.Tensor,
        log_pi_K: torch.Tensor | None = None,
    ) -> MFA:
        """Set the mixture from original-space parameters (psi of shape (D,) or (K, D))."""
        s = self.scale
        self.mu_std_KD.copy_((mu_KD.to(s.dtype) - self.center_D) / s)
        self.W_std_KDR.copy_(W_KDR.to(s.dtype) / s)
        psi_std = (psi.to(s.dtype) / s**2 - PSI_FLOOR).clamp_min(PSI_FLOOR * 1e-3)
        if psi_std.shape != self.log_psi_std.shape:
            raise DataError(
                f"psi has shape {tuple(psi.shape)}, expected {tuple(self.log_psi_std.shape)} "
                f"for psi={self.psi_mode}"
            )
        self.log_psi_std.copy_(psi_std.log())
        if log_pi_K is not None:
            self.pi_logits_K.copy_(log_pi_K.to(s.dtype))
        return self


def dense_log_prob_components(
    x_BD: torch.Tensor, mu_KD: torch.Tensor, W_KDR: torch.Tensor, psi_KD: torch.Tensor
) -> torch.Tensor:
    """Reference log N(x | mu_k, W_k W_k^T + diag psi_k) with the dense D x D covariance.

    Used by the tests and by bench/mfa.py as the baseline that Woodbury avoids.
    """
    D = x_BD.shape[1]
    C_KDD = W_KDR @ W_KDR.transpose(1, 2) + torch.diag_embed(psi_KD)
    L_KDD = torch.linalg.cholesky(C_KDD)
    diff_KDB = (x_BD[None, :, :] - mu_KD[:, None, :]).transpose(1, 2)
    y_KDB = torch.linalg.solve_triangular(L_KDD, diff_KDB, upper=False)
    quad_BK = (y_KDB * y_KDB).sum(1).T
    logdet_K = 2.0 * torch.log(torch.diagonal(L_KDD, dim1=-2, dim2=-1)).sum(-1)
    return -0.5 * (D * math.log(2.0 * math.pi) + logdet_K + quad_BK)


# ---- persistence ---------------------------------------------------------------------------------
TENSOR_NAMES = ("mu_KD", "W_KDR", "psi", "log_pi_K", "center_D", "scale")


def mfa_tensors(model: MFA) -> dict[str, torch.Tensor]:
    """Original-space parameters as plain CPU float32 tensors (what the safetensors file holds)."""
    with torch.no_grad():
        psi = model.scale**2 * (model.log_psi_std.exp() + PSI_FLOOR)
        out = {
            "mu_KD": model.mu,
            "W_KDR": model.W,
            "psi": psi,
            "log_pi_K": model.log_pi_K(),
            "center_D": model.center_D,
            "scale": model.scale.reshape(1),
        }
        return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in out.items()}


def save_mfa(model: MFA, path: str | Path, *, config: dict[str, Any] | None = None) -> dict:
    """Write the model as safetensors (atomically); return the JSON config that describes it."""
    from safetensors.torch import save_file

    from saeflow.io import atomic_path

    meta = {"K": model.K, "D": model.D, "R": model.R, "psi": model.psi_mode}
    with atomic_path(path) as tmp:
        # One metadata key: safetensors stores metadata in a hash map, so several keys would be
        # written in a random order and break byte-for-byte reproducibility.
        save_file(mfa_tensors(model), str(tmp), metadata={"mfa": json.dumps(meta, sort_keys=True)})
    return {**meta, **(config or {})}


def load_mfa(path: str | Path, *, device: str | torch.device = "cpu") -> MFA:
    """Load a model written by `save_mfa` (safetensors only; no pickle)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: MFA model file does not exist (rerun fit_mfa)")
    with safe_open(str(path), framework="pt") as f:
        missing = [n for n in TENSOR_NAMES if n not in f.keys()]  # noqa: SIM118
        if missing:
            raise DataError(f"{path}: not an MFA file, missing tensors {missing}")
        t = {n: f.get_tensor(n) for n in TENSOR_NAMES}
    K, D, R = t["W_KDR"].shape
    psi_mode = "shared" if t["psi"].ndim == 1 else "per_component"
    model = MFA(K, D, R, psi=psi_mode, center_D=t["center_D"], scale=float(t["scale"][0]))
    model.set_params(t["mu_KD"], t["W_KDR"], t["psi"], t["log_pi_K"])
    return model.to(device)
