"""Inference SAEs: one per-token class for ReLU, TopK and JumpReLU encoders.

All published per-token formats (SAELens, GemmaScope, dictionary_learning) reduce to

    x' = norm_in(x) - b_dec * apply_b_dec_to_input
    pre = x' @ W_enc + b_enc
    codes = act(pre)            relu | TopK(k) then relu | relu(pre) * (pre > threshold)
    x_hat = norm_out(codes @ W_dec + b_dec)

so the loaders only translate names and layouts. The encoder bias is folded once
(`pre = norm_in(x) @ W_enc + (b_enc - b_dec @ W_enc)`) so encoding is a single GEMM plus the
activation, which is what makes the fused TopK kernel possible.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from saeflow.errors import ConfigError
from saeflow.sae.sparse import CSR, csr_from_dense, topk_encode

log = logging.getLogger(__name__)

ACTIVATIONS = ("relu", "topk", "jumprelu")
NORMALIZATIONS = ("none", "scalar", "constant_norm_rescale", "layer_norm")


@dataclass
class SAEOutput:
    """Novel codes (all codes for a per-token SAE), predictable codes (temporal only), x_hat."""

    novel: torch.Tensor
    pred: torch.Tensor | None
    recon: torch.Tensor
    attn_graphs: torch.Tensor | None = None


class BaseSAE(nn.Module):
    """What every SAE offers the pipeline: sizes, a forward pass and the decoder directions."""

    d_in: int
    d_sae: int
    is_temporal: bool = False
    source: str = ""

    def decoder_directions(self) -> torch.Tensor:
        """Decoder rows [d_sae, d_in] in input space (for decoder UMAPs and feature matching)."""
        raise NotImplementedError

    def describe(self) -> dict:
        raise NotImplementedError


class SAE(BaseSAE):
    """A per-token sparse autoencoder; encoding is independent for every token."""

    def __init__(
        self,
        W_enc_DF: torch.Tensor,
        b_enc_F: torch.Tensor,
        W_dec_FD: torch.Tensor,
        b_dec_D: torch.Tensor,
        *,
        activation: str,
        k: int | None = None,
        threshold_F: torch.Tensor | None = None,
        apply_b_dec_to_input: bool = True,
        normalize: str = "none",
        input_scale: float = 1.0,
        rescale_acts_by_decoder_norm: bool = False,
        source: str = "",
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ConfigError(f"{source}: activation {activation!r} is not one of {ACTIVATIONS}")
        if normalize not in NORMALIZATIONS:
            raise ConfigError(
                f"{source}: normalization {normalize!r} is not one of {NORMALIZATIONS}"
            )
        if activation == "topk" and (k is None or int(k) < 1):
            raise ConfigError(f"{source}: a topk SAE needs k >= 1, got k={k}")
        if activation == "jumprelu" and threshold_F is None:
            raise ConfigError(f"{source}: a jumprelu SAE needs a threshold")
        self.source = source
        self.activation = activation
        self.k = int(k) if k is not None else None
        self.apply_b_dec_to_input = bool(apply_b_dec_to_input)
        self.normalize = normalize
        self.input_scale = float(input_scale)
        self.rescale_acts_by_decoder_norm = bool(rescale_acts_by_decoder_norm)
        self.d_in, self.d_sae = int(W_enc_DF.shape[0]), int(W_enc_DF.shape[1])
        f32 = {"dtype": torch.float32}
        self.W_enc = nn.Parameter(W_enc_DF.to(**f32).contiguous(), requires_grad=False)
        self.b_enc = nn.Parameter(b_enc_F.to(**f32).reshape(-1).contiguous(), requires_grad=False)
        self.W_dec = nn.Parameter(W_dec_FD.to(**f32).contiguous(), requires_grad=False)
        self.b_dec = nn.Parameter(b_dec_D.to(**f32).reshape(-1).contiguous(), requires_grad=False)
        thr = threshold_F if threshold_F is not None else torch.zeros(self.d_sae)
        self.threshold = nn.Parameter(thr.to(**f32).reshape(-1).contiguous(), requires_grad=False)
        self._fold()

    def _fold(self) -> None:
        """Effective encoder/decoder with the input bias and decoder-norm rescaling folded in."""
        with torch.no_grad():
            W_enc, W_dec = self.W_enc.data, self.W_dec.data
            bias = self.b_enc.data.clone()
            if self.apply_b_dec_to_input:
                bias = bias - self.b_dec.data @ W_enc
            if self.rescale_acts_by_decoder_norm:
                norms = W_dec.norm(dim=-1)
                W_enc = W_enc * norms
                bias = bias * norms
                W_dec = W_dec / norms[:, None]
            self.register_buffer("_W_enc_eff", W_enc.contiguous(), persistent=False)
            self.register_buffer("_bias_eff", bias.contiguous(), persistent=False)
            self.register_buffer("_W_dec_eff", W_dec.contiguous(), persistent=False)

    def describe(self) -> dict:
        return {
            "kind": "per_token",
            "activation": self.activation,
            "k": self.k,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "normalize": self.normalize,
            "input_scale": self.input_scale,
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "rescale_acts_by_decoder_norm": self.rescale_acts_by_decoder_norm,
        }

    def decoder_directions(self) -> torch.Tensor:
        return self._W_dec_eff

    # -- normalisation -------------------------------------------------------------------------
    def _norm_in(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        if self.normalize == "scalar":
            return x_ND * self.input_scale, ()
        if self.normalize == "constant_norm_rescale":
            coeff = (self.d_in**0.5) / x_ND.norm(dim=-1, keepdim=True)
            return x_ND * coeff, (coeff,)
        if self.normalize == "layer_norm":
            mu = x_ND.mean(dim=-1, keepdim=True)
            xc = x_ND - mu
            std = xc.std(dim=-1, keepdim=True)
            return xc / (std + 1e-5), (mu, std)
        return x_ND, ()

    def _norm_out(self, x_ND: torch.Tensor, state: tuple) -> torch.Tensor:
        if self.normalize == "scalar":
            return x_ND / self.input_scale
        if self.normalize == "constant_norm_rescale":
            return x_ND / state[0]
        if self.normalize == "layer_norm":
            return x_ND * state[1] + state[0]
        return x_ND

    # -- encode / decode -----------------------------------------------------------------------
    def pre_acts(self, x_ND: torch.Tensor) -> torch.Tensor:
        x_in, _ = self._norm_in(x_ND.float())
        return torch.addmm(self._bias_eff, x_in.reshape(-1, self.d_in), self._W_enc_eff).reshape(
            *x_ND.shape[:-1], self.d_sae
        )

    def encode(self, x_ND: torch.Tensor) -> torch.Tensor:
        """Dense codes [..., d_sae]."""
        pre = self.pre_acts(x_ND)
        if self.activation == "relu":
            return pre.relu()
        if self.activation == "jumprelu":
            return pre.relu() * (pre > self.threshold)
        if self.k >= self.d_sae:
            return pre.relu()
        vals, idx = pre.topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, idx, vals.relu())

    def encode_sparse(self, x_ND: torch.Tensor) -> CSR:
        """Sparse codes of [N, d_in] activations (the fast path used by encode_sae)."""
        if self.activation == "topk":
            x_in, _ = self._norm_in(x_ND.float())
            return topk_encode(x_in, self._W_enc_eff, self._bias_eff, self.k)
        return csr_from_dense(self.encode(x_ND))

    def decode(self, codes_NF: torch.Tensor, x_ND: torch.Tensor | None = None) -> torch.Tensor:
        """x_hat; `x_ND` is needed to undo per-token normalisations."""
        out = codes_NF.float() @ self._W_dec_eff + self.b_dec
        if self.normalize in ("constant_norm_rescale", "layer_norm"):
            if x_ND is None:
                raise ValueError(f"{self.source}: decoding needs x for {self.normalize}")
            _, state = self._norm_in(x_ND.float())
            return self._norm_out(out, state)
        return self._norm_out(out, ())

    def forward(self, x_ND: torch.Tensor) -> SAEOutput:
        codes = self.encode(x_ND)
        return SAEOutput(novel=codes, pred=None, recon=self.decode(codes, x_ND))


def check_sae_matches(sae: BaseSAE, d_model: int, where: str) -> None:
    """Fail early, in one line, when an SAE was trained for a different residual width."""
    if int(sae.d_in) != int(d_model):
        raise ConfigError(
            f"{where}: SAE {sae.source or '?'} has d_in={sae.d_in} but the model's activations "
            f"have d_model={d_model}; the SAE belongs to another model or layer"
        )
