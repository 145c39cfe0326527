"""Temporal SAE (Lubana, Rager et al., "Priors in Time", arXiv:2511.01836).

Numerically the module of the published code (`canrager/temporalSAEs`, mirrored in SAELens'
`TemporalSAE` and its `temporal` loader): parameter names, initialisation, the causal
`scaled_dot_product_attention` and the order of operations are the same, so a published
`latest_ckpt.safetensors` loads with `load_state_dict` unchanged. On top of the reference forward
we apply the published `scaling_factor` (SAELens `constant_scalar_rescale`): the input is multiplied
by it before `b` is subtracted and the reconstruction divided by it afterwards.

Encoding needs whole sequences in order: position t attends to the codes of positions < t.

As published: `b` is a [d] vector (files with [1, d] load too), `inf_k` overrides `kval_topk` at
inference (the reference forward's `inf_k`), and `forward(x, return_graph=True)` /
`attention_maps(x)` give the attention maps [B, n_attn_layers, n_heads, L, L] (the reference's
`attn_graphs`: softmax(q k^T / sqrt(head_dim)) under the causal mask).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812 - the reference code's spelling
from torch import nn

from saeflow.errors import ConfigError
from saeflow.sae.models import BaseSAE, SAEOutput

DIFF_TYPES = ("topk", "relu", "nullify")


class ManualAttention(nn.Module):
    """Causal attention from target codes (queries) to shifted context codes (keys, values)."""

    def __init__(self, dimin: int, n_heads: int = 4, bottleneck_factor: int = 64) -> None:
        super().__init__()
        if dimin % (bottleneck_factor * n_heads) != 0:
            raise ConfigError(
                f"temporal SAE: width {dimin} is not divisible by n_heads*bottleneck_factor="
                f"{n_heads * bottleneck_factor}"
            )
        self.n_heads = n_heads
        self.n_embds = dimin // bottleneck_factor
        self.dimin = dimin
        self.k_ctx = nn.Linear(dimin, self.n_embds, bias=True)
        self.q_target = nn.Linear(dimin, self.n_embds, bias=True)
        self.v_ctx = nn.Linear(dimin, dimin, bias=True)
        self.c_proj = nn.Linear(dimin, dimin, bias=True)
        with torch.no_grad():
            for layer, fan in (
                (self.k_ctx, self.n_embds // n_heads),
                (self.q_target, self.n_embds // n_heads),
                (self.v_ctx, dimin // n_heads),
                (self.c_proj, dimin),
            ):
                w = layer.weight
                w.copy_(w / (1e-6 + torch.linalg.norm(w, dim=1, keepdim=True)) / math.sqrt(fan))

    def forward(
        self, x_ctx: torch.Tensor, x_target: torch.Tensor, get_attn_map: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(output [B, T, dimin], attention map [B, H, T, T] or None)."""
        B, T, _ = x_ctx.size()
        hd = self.n_embds // self.n_heads
        k = self.k_ctx(x_ctx).view(B, T, self.n_heads, hd).transpose(1, 2)
        v = self.v_ctx(x_ctx).view(B, T, self.n_heads, self.dimin // self.n_heads).transpose(1, 2)
        q = self.q_target(x_target).view(B, T, self.n_heads, hd).transpose(1, 2)
        attn_map = None
        if get_attn_map:
            causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(hd)
            attn_map = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True)
        return self.c_proj(out.transpose(1, 2).contiguous().view(B, T, self.dimin)), attn_map


class TemporalSAE(BaseSAE):
    """Predictable codes from attention over the context, novel codes from the residual."""

    is_temporal = True

    def __init__(
        self,
        dimin: int,
        width: int,
        *,
        n_heads: int = 8,
        sae_diff_type: str = "topk",
        kval_topk: int | None = None,
        tied_weights: bool = True,
        n_attn_layers: int = 1,
        bottleneck_factor: int = 64,
        scaling_factor: float = 1.0,
        inf_k: int | None = None,
        source: str = "",
    ) -> None:
        super().__init__()
        if sae_diff_type not in DIFF_TYPES:
            raise ConfigError(
                f"{source}: sae_diff_type={sae_diff_type!r} is not one of {', '.join(DIFF_TYPES)}"
            )
        if sae_diff_type == "topk" and (kval_topk is None or int(kval_topk) < 1):
            raise ConfigError(f"{source}: sae_diff_type=topk needs kval_topk >= 1, got {kval_topk}")
        self.source = source
        self.d_in = self.dimin = int(dimin)
        self.d_sae = self.width = int(width)
        self.n_heads = int(n_heads)
        self.sae_diff_type = sae_diff_type
        self.kval_topk = int(kval_topk) if sae_diff_type == "topk" else None
        if inf_k is not None and (sae_diff_type != "topk" or int(inf_k) < 1):
            raise ConfigError(
                f"{source}: inf_k = {inf_k!r} needs sae_diff_type=topk and an integer >= 1"
            )
        self.inf_k = None if inf_k is None else int(inf_k)
        self.tied_weights = bool(tied_weights)
        self.n_attn_layers = int(n_attn_layers)
        self.bottleneck_factor = int(bottleneck_factor)
        self.scaling_factor = float(scaling_factor)
        self.eps = 1e-6
        self.lam = 1 / (4 * self.dimin)
        self.attn_layers = nn.ModuleList(
            [
                ManualAttention(self.width, self.n_heads, self.bottleneck_factor)
                for _ in range(self.n_attn_layers)
            ]
        )
        self.D = nn.Parameter(torch.randn((self.width, self.dimin)))
        self.b = nn.Parameter(torch.zeros(self.dimin))
        if not self.tied_weights:
            self.E = nn.Parameter(torch.randn((self.dimin, self.width)))

    def config(self) -> dict:
        """The `sae` section of the published conf.yaml (plus `llm.dimin`)."""
        return {
            "llm": {"dimin": self.dimin},
            "sae": {
                "exp_factor": self.width / self.dimin,
                "n_heads": self.n_heads,
                "sae_diff_type": self.sae_diff_type,
                "kval_topk": self.kval_topk,
                "tied_weights": self.tied_weights,
                "n_attn_layers": self.n_attn_layers,
                "bottleneck_factor": self.bottleneck_factor,
                "scaling_factor": self.scaling_factor,
            },
            "data": {"dtype": "float32"},
        }

    def describe(self) -> dict:
        return {
            "kind": "temporal",
            **self.config()["sae"],
            "inf_k": self.inf_k,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
        }

    def decoder_directions(self) -> torch.Tensor:
        return self.D / self.scaling_factor

    def encoder(self) -> torch.Tensor:
        return self.D.T if self.tied_weights else self.E

    def encode(self, x_BLD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(novel_BLF, pred_BLF) for whole sequences [B, L, D] (or one sequence [L, D])."""
        novel, pred, _, _ = self._run(x_BLD, with_recon=False)
        return novel, pred

    def forward(self, x_BLD: torch.Tensor, return_graph: bool = False) -> SAEOutput:
        """Codes and reconstruction; `return_graph` also fills `attn_graphs`."""
        novel, pred, recon, graphs = self._run(x_BLD, with_recon=True, return_graph=return_graph)
        return SAEOutput(novel=novel, pred=pred, recon=recon, attn_graphs=graphs)

    def attention_maps(self, x_BLD: torch.Tensor) -> torch.Tensor:
        """[B, n_attn_layers, n_heads, L, L] attention of each position over its context."""
        return self._run(x_BLD, with_recon=False, return_graph=True)[3]

    def split_recon(self, novel: torch.Tensor, pred: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(pred_recon, novel_recon) in input units, without `b` (the reference's split)."""
        return pred @ self.D / self.scaling_factor, novel @ self.D / self.scaling_factor

    def _run(
        self, x_BLD: torch.Tensor, *, with_recon: bool, return_graph: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        squeeze = x_BLD.dim() == 2
        if squeeze:
            x_BLD = x_BLD.unsqueeze(0)
        x = x_BLD.to(self.D.dtype) * self.scaling_factor - self.b
        B, L, _ = x.shape
        E = self.encoder()
        z_pred = torch.zeros((B, L, self.width), device=x.device, dtype=x.dtype)
        graphs = []
        for attn in self.attn_layers:
            z_input = F.relu(torch.matmul(x * self.lam, E))
            z_ctx = torch.cat((torch.zeros_like(z_input[:, :1, :]), z_input[:, :-1, :]), dim=1)
            z_pred_, graph = attn(z_ctx, z_input, get_attn_map=return_graph)
            z_pred_ = F.relu(z_pred_)
            if return_graph:
                graphs.append(graph)
            Dz_pred_ = torch.matmul(z_pred_, self.D)
            Dz_norm_ = Dz_pred_.norm(dim=-1, keepdim=True) + self.eps
            proj_scale = (Dz_pred_ * x).sum(dim=-1, keepdim=True) / Dz_norm_.pow(2)
            z_pred = z_pred + z_pred_ * proj_scale
            x = x - proj_scale * Dz_pred_
        if self.sae_diff_type == "nullify":
            z_novel = torch.zeros_like(z_pred)
        else:
            z_novel = F.relu(torch.matmul(x * self.lam, E))
            k = self.inf_k if self.inf_k is not None else self.kval_topk
            if self.sae_diff_type == "topk" and k < self.width:
                _, idx = torch.topk(z_novel, k, dim=-1)
                z_novel = z_novel * torch.zeros_like(z_novel).scatter_(-1, idx, 1)
        recon = None
        if with_recon:
            recon = (torch.matmul(z_novel + z_pred, self.D) + self.b) / self.scaling_factor
        attn_graphs = torch.stack(graphs, dim=1) if return_graph else None
        if squeeze:
            z_novel, z_pred = z_novel[0], z_pred[0]
            recon = recon[0] if recon is not None else None
            attn_graphs = attn_graphs[0] if attn_graphs is not None else None
        return z_novel, z_pred, recon, attn_graphs
