"""GPTQ (Frantar et al., 2022): quantize a linear's columns one at a time, pushing each column's rounding
error onto the columns not yet quantized through the inverse Hessian of the layer's inputs, H = 2 X^T X.

Facts from the paper that shape this file: the error of column i is spread with row i of the upper Cholesky
factor of H^-1 (so H^-1 is never updated); updates are applied lazily in blocks of 128 columns (the rest of
the matrix is touched once per block); dampening adds a fraction of mean(diag H) to the diagonal; act-order
quantizes columns by decreasing diag(H). With act-order, the group grids are fitted up front on the
original weights in the original column order ("static groups"), so the codes land in the plain group
layout our kernels and GGUF read.
"""

from __future__ import annotations

import torch

from fleetlm.compress.grid import QuantizedWeight, check_bits, check_group, code_range, fit_grid

BLOCK = 128  # columns per lazy update


class Hessian:
    """Running H = 2/n sum x x^T of a linear's inputs, in float64 (sums over ~10^5 tokens)."""

    def __init__(self, in_features: int) -> None:
        self.h = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        n = x.shape[0]
        # running mean, so H's scale does not depend on how many tokens came in; each chunk's product in
        # float32 (2x faster than float64), the sum over chunks in float64
        self.h *= self.count / (self.count + n)
        self.count += n
        self.h += (2.0 / self.count) * (x.T @ x).double()


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) I)^-1, with more dampening if H is singular."""
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    base = float(h.diagonal().mean()) or 1.0
    for factor in (damp, damp * 10, damp * 100, 1.0):
        lower, info = torch.linalg.cholesky_ex(h + factor * base * eye)
        if int(info) == 0:
            inv = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return upper
    raise ValueError("the Hessian is not positive definite even after dampening")


@torch.no_grad()
def gptq(w: torch.Tensor, h: torch.Tensor, bits: int, group: int, *, sym: bool = False,
         act_order: bool = True, damp: float = 0.01, block: int = BLOCK) -> QuantizedWeight:
    """Quantize weight w [N, K] given its inputs' Hessian h [K, K]."""
    check_bits(bits)
    n, k = w.shape
    check_group(group, k)
    if h.shape != (k, k):
        raise ValueError(f"Hessian is {tuple(h.shape)}, expected ({k}, {k})")
    if block % group:
        raise ValueError(f"block {block} must be a multiple of group {group}")  # a group never spans blocks
    lo, hi = code_range(bits)
    W = w.detach().double().clone()
    H = h.double().clone()
    dead = H.diagonal() == 0  # inputs that were always 0: any weight works, pin them to 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    d_all = torch.zeros(n, k // group, dtype=torch.float64)
    m_all = torch.zeros_like(d_all)
    if act_order:
        d0, m0 = fit_grid(W, bits, group, sym)  # static groups: fitted before any column moves
        d_all, m_all = d0.double(), m0.double()
        perm = torch.argsort(H.diagonal(), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    else:
        perm = torch.arange(k)
    U = _inverse_cholesky(H, damp)

    Q = torch.zeros(n, k, dtype=torch.float64)
    threads = torch.get_num_threads()
    # thousands of small ops: on a busy machine, waking a second thread for each cost 3x the whole loop
    torch.set_num_threads(1)
    try:
        _columns(W, U, Q, perm, d_all, m_all, bits, group, sym, act_order, block, lo, hi)
    finally:
        torch.set_num_threads(threads)
    codes = torch.empty_like(Q)
    codes[:, perm] = Q  # back to the original column order
    return QuantizedWeight(codes.to(torch.int16), d_all.float(), m_all.float(), bits, group, sym)


def _columns(W: torch.Tensor, U: torch.Tensor, Q: torch.Tensor, perm: torch.Tensor, d_all: torch.Tensor,
             m_all: torch.Tensor, bits: int, group: int, sym: bool, act_order: bool, block: int, lo: int,
             hi: int) -> None:
    """The column loop: codes into Q, lazily grown grids into d_all/m_all (without act-order)."""
    k = W.shape[1]
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        W1, U1 = W[:, b0:b1].clone(), U[b0:b1, b0:b1]
        E1 = torch.zeros_like(W1)
        for i in range(b1 - b0):
            col = int(perm[b0 + i])
            g = col // group
            if not act_order and col % group == 0:
                # a group's grid from its columns as they are now, after the earlier columns' feedback
                d, m = fit_grid(W1[:, i : i + group], bits, group, sym)
                d_all[:, g], m_all[:, g] = d[:, 0].double(), m[:, 0].double()
            d, m = d_all[:, g], m_all[:, g]
            x = W1[:, i]
            inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
            q = torch.round((x - m) * inv).clamp(lo, hi)
            Q[:, b0 + i] = q
            err = (x - (q * d + m)) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            E1[:, i] = err
        W[:, b1:] -= E1 @ U[b0:b1, b1:]
