"""Sparse code extraction: fused TopK on CPU, and dense-to-CSR conversions.

Why a kernel: for a TopK SAE the selection can cost as much as the encoder GEMM. `torch.topk` over
the full pre-activations copies every row into (value, index) pairs and heap-sorts them. The numba
kernel takes maxima of groups of 32 pre-activations (SIMD), uses the k-th largest group maximum as
a lower bound of the k-th largest value, scans only the ~k groups that reach it, and quickselects
among those few candidates. The result is the `torch.topk` set (ties keep the lowest ids), with ids
ascending. The GEMM runs in chunks of ROW_CHUNK rows into one reused buffer, so the pre-activations
never exist for a whole shard.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

ROW_CHUNK = 2048


@dataclass
class CSR:
    """Rows of sparse codes: row i owns ids/vals[indptr[i]:indptr[i+1]], ids ascending."""

    indptr: np.ndarray  # int64 [N+1]
    ids: np.ndarray  # int32 [nnz]
    vals: np.ndarray  # float32 [nnz]

    @property
    def n_rows(self) -> int:
        return len(self.indptr) - 1

    @staticmethod
    def concat(parts: list[CSR]) -> CSR:
        if not parts:
            return CSR(np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32))
        offsets = np.cumsum([0] + [int(p.indptr[-1]) for p in parts[:-1]])
        indptr = np.concatenate(
            [np.zeros(1, np.int64)]
            + [p.indptr[1:] + off for p, off in zip(parts, offsets, strict=True)]
        )
        return CSR(
            indptr.astype(np.int64),
            np.concatenate([p.ids for p in parts]).astype(np.int32),
            np.concatenate([p.vals for p in parts]).astype(np.float32),
        )

    def to_dense(self, width: int) -> torch.Tensor:
        out = torch.zeros(self.n_rows, width)
        rows = np.repeat(np.arange(self.n_rows), np.diff(self.indptr))
        out[torch.from_numpy(rows), torch.from_numpy(self.ids.astype(np.int64))] = torch.from_numpy(
            self.vals
        )
        return out


def csr_from_dense(codes_NF: torch.Tensor) -> CSR:
    """Keep the non-zero entries of dense codes (ids ascending within a row)."""
    codes_NF = codes_NF.detach().float()
    mask = codes_NF != 0
    counts = mask.sum(-1).cpu().numpy()
    return CSR(
        np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        mask.nonzero()[:, 1].cpu().numpy().astype(np.int32),
        codes_NF[mask].cpu().numpy().astype(np.float32),
    )


def csr_from_slots(vals_NK: torch.Tensor | np.ndarray, idx_NK: torch.Tensor | np.ndarray) -> CSR:
    """CSR from k slots per row; slots with value 0 (or index < 0) are dropped."""
    vals = np.asarray(vals_NK.cpu() if isinstance(vals_NK, torch.Tensor) else vals_NK)
    idx = np.asarray(idx_NK.cpu() if isinstance(idx_NK, torch.Tensor) else idx_NK)
    order = np.argsort(idx, axis=1, kind="stable")
    idx = np.take_along_axis(idx, order, axis=1)
    vals = np.take_along_axis(vals, order, axis=1)
    keep = (vals != 0) & (idx >= 0)
    indptr = np.concatenate([[0], np.cumsum(keep.sum(axis=1))]).astype(np.int64)
    return CSR(indptr, idx[keep].astype(np.int32), vals[keep].astype(np.float32))


def topk_by_magnitude(codes_NF: torch.Tensor, k: int | None, threshold: float = 0.0) -> CSR:
    """Keep the `k` entries of largest |value| per row (all if k is None), above `threshold`."""
    codes_NF = codes_NF.detach().float()
    if threshold > 0:
        codes_NF = codes_NF * (codes_NF.abs() > threshold)
    if k is None or k <= 0 or k >= codes_NF.shape[-1]:
        return csr_from_dense(codes_NF)
    _, idx = codes_NF.abs().topk(k, dim=-1, sorted=False)
    return csr_from_slots(codes_NF.gather(-1, idx), idx.to(torch.int32))


@functools.cache
def _kernel():
    """The TopK kernel, or None without numba."""
    try:
        from saeflow.sae.kernels import topk_rows
    except ImportError:  # pragma: no cover - numba is a declared dependency
        return None
    return topk_rows


def _match_threads() -> None:
    """Numba would start one thread per CPU; stay within torch's (= the rule's) thread budget."""
    import numba

    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


def _use_kernel(x_ND: torch.Tensor, k: int, width: int) -> bool:
    return x_ND.device.type == "cpu" and 0 < k < width and _kernel() is not None


def topk_encode(
    x_ND: torch.Tensor, W_DF: torch.Tensor, bias_F: torch.Tensor, k: int, *, kernel: bool = True
) -> CSR:
    """Sparse TopK(ReLU) codes of `x @ W + bias`: exactly the `torch.topk` selection."""
    width = W_DF.shape[1]
    if kernel and _use_kernel(x_ND, k, width):
        x_ND = x_ND.float().contiguous()
        W_DF = W_DF.float().contiguous()
        bias_F = bias_F.float().contiguous()
        out_v = np.empty((x_ND.shape[0], k), dtype=np.float32)
        out_i = np.empty((x_ND.shape[0], k), dtype=np.int32)
        kernel_fn = _kernel()
        _match_threads()
        buf = torch.empty(min(ROW_CHUNK, max(1, x_ND.shape[0])), width)
        for start in range(0, x_ND.shape[0], ROW_CHUNK):
            chunk = x_ND[start : start + ROW_CHUNK]
            pre = buf[: chunk.shape[0]]
            torch.addmm(bias_F, chunk, W_DF, out=pre)
            stop = start + len(chunk)
            kernel_fn(pre.numpy(), k, out_v[start:stop], out_i[start:stop])
        keep = out_v > 0
        indptr = np.concatenate([[0], np.cumsum(keep.sum(axis=1))]).astype(np.int64)
        return CSR(indptr, out_i[keep], out_v[keep])
    pre = torch.addmm(bias_F.float(), x_ND.float(), W_DF.float())
    if k >= width:
        return csr_from_dense(pre.relu())
    vals, idx = pre.topk(k, dim=-1, sorted=False)
    return csr_from_slots(vals.relu(), idx.to(torch.int32))
