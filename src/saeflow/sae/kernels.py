"""Numba kernels (imported on first use: the import and the JIT cost about a second)."""

import numpy as np
from numba import njit, prange

ROWS_PER_TASK = 64


@njit(fastmath=True, inline="always")
def _group_max(row, lo, hi):
    m = -np.inf
    for t in range(lo, hi):
        m = max(m, row[t])
    return m


@njit(inline="always")
def _kth_largest(a, n, k):
    """k-th largest of a[:n] (1 <= k <= n), by in-place quickselect (a is scratch)."""
    lo, hi = 0, n - 1
    want = k - 1
    while lo < hi:
        pivot = a[(lo + hi) // 2]
        i, j = lo, hi
        while i <= j:
            while a[i] > pivot:
                i += 1
            while a[j] < pivot:
                j -= 1
            if i <= j:
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
        if want <= j:
            hi = j
        elif want >= i:
            lo = i
        else:
            break
    return a[want]


@njit(parallel=True, cache=True)
def topk_rows(P, k, out_v, out_i):
    """Per row of P: the k largest, ReLU'd, ids ascending, into out_v/out_i.

    Exact: with group maxima g_1..g_G, thr = the k-th largest g_j is a lower bound of the k-th
    largest element (the top-k groups hold k distinct elements >= thr), and every element >= thr
    lies in a group whose maximum is >= thr. So only those groups are scanned, their elements
    >= thr are collected in index order, and a quickselect over these few candidates finds the
    k-th largest value. Ties at that value keep the lowest feature ids.
    """
    n, f = P.shape
    gs = max(1, min(32, f // (2 * k)))
    ng = (f + gs - 1) // gs
    n_tasks = (n + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in prange(n_tasks):
        gmax = np.empty(ng, dtype=np.float32)
        scratch = np.empty(max(ng, f), dtype=np.float32)
        cand_v = np.empty(f, dtype=np.float32)
        cand_i = np.empty(f, dtype=np.int32)
        for r in range(task * ROWS_PER_TASK, min(n, (task + 1) * ROWS_PER_TASK)):
            row = P[r]
            for j in range(ng):
                gmax[j] = _group_max(row, j * gs, min(f, j * gs + gs))
            thr = -np.inf
            if ng >= k:
                scratch[:ng] = gmax
                thr = _kth_largest(scratch, ng, k)
            c = 0
            for j in range(ng):
                if gmax[j] >= thr:
                    for t in range(j * gs, min(f, j * gs + gs)):
                        v = row[t]
                        cand_v[c] = v
                        cand_i[c] = t
                        c += v >= thr
            kth = -np.inf
            if c > k:
                scratch[:c] = cand_v[:c]
                kth = _kth_largest(scratch, c, k)
            ties = k
            for q in range(c):
                ties -= cand_v[q] > kth
            m = 0
            for q in range(c):
                v = cand_v[q]
                take = v > kth
                if not take and v == kth and ties > 0:
                    take = True
                    ties -= 1
                if take:
                    out_v[r, m] = v if v > 0.0 else 0.0
                    out_i[r, m] = cand_i[q]
                    m += 1
            for q in range(m, k):
                out_v[r, q] = 0.0
                out_i[r, q] = -1
