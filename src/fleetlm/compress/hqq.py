"""HQQ-style quantization (Badri & Shaji, 2023): no calibration data; each group's offset (or, on symmetric
grids, its scale) is refined by half-quadratic splitting to minimise the l_p error |W - Q(W)|_p with p < 1.

The split: an auxiliary error E absorbs the outliers, E = shrink_p(W - Q(W)) (the proximal step of the l_p
norm, a generalised soft threshold), then the offset is the least-squares one for W - E, in closed form;
beta (the threshold's inverse) grows by kappa each step. Facts from the paper (p = 0.7, beta = 10,
kappa = 1.01, 20 steps) carry over. Unlike the reference, residuals are measured in grid steps
(W / d), so the threshold does not depend on the weights' magnitude. Each group keeps the best grid seen
by mean |error| after float16 rounding, starting from min/max round-to-nearest: never worse than RTN.
"""

from __future__ import annotations

import torch

from fleetlm.compress.grid import QuantizedWeight, check_bits, check_group, code_range, fit_grid

P_NORM, BETA, KAPPA, ITERS = 0.7, 10.0, 1.01, 20


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """argmin_e |e|^p + beta/2 (e - x)^2, approximately: sign(x) max(|x| - |x|^(p-1) / beta, 0)."""
    a = x.abs()
    return torch.sign(x) * torch.relu(a - a.clamp(min=1e-12).pow(p - 1) / beta)


def _codes(w: torch.Tensor, d: torch.Tensor, m: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    return torch.round((w - m[..., None]) * inv[..., None]).clamp(lo, hi)


def _error(w: torch.Tensor, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return (w - (q * d[..., None] + m[..., None])).abs().mean(-1)


@torch.no_grad()
def hqq(w: torch.Tensor, bits: int, group: int, *, sym: bool = False, iters: int = ITERS,
        p: float = P_NORM, beta: float = BETA, kappa: float = KAPPA) -> QuantizedWeight:
    """Quantize weight w [N, K]: min/max grid, then `iters` half-quadratic refinements per group."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # elementwise passes over ~1M values: a second thread cost 5x on a busy machine
    try:
        return _hqq(w, bits, group, sym, iters, p, beta, kappa)
    finally:
        torch.set_num_threads(threads)


def _hqq(w: torch.Tensor, bits: int, group: int, sym: bool, iters: int, p: float, beta: float,
         kappa: float) -> QuantizedWeight:
    check_bits(bits)
    n, k = w.shape
    check_group(group, k)
    lo, hi = code_range(bits)
    W = w.detach().float().view(n, k // group, group)
    d, m = fit_grid(w, bits, group, sym)
    refine_scale = bits == 8 or sym  # a symmetric grid has no free offset: refine its scale instead
    best_d, best_m, best_err = d.clone(), m.clone(), None
    step = torch.where(d != 0, d, torch.ones_like(d))[..., None]  # residuals in grid steps
    d_cur, m_cur = d.clone(), m.clone()
    for i in range(iters + 1):
        q = _codes(W, d_cur, m_cur, lo, hi)
        err = _error(W, q, d_cur, m_cur)
        if best_err is None:
            best_err = err  # step 0: round-to-nearest on the min/max grid
        else:
            better = err < best_err
            if i > 2 and not bool(better.any()):
                break  # no group improved: later steps only shrink less
            best_d = torch.where(better, d_cur, best_d)
            best_m = torch.where(better, m_cur, best_m)
            best_err = torch.minimum(err, best_err)
        if i == iters:
            break
        residual = (W - (q * d_cur[..., None] + m_cur[..., None])) / step
        target = W - shrink_lp(residual, beta, p) * step  # the part of W the grid should fit
        if refine_scale:
            # least squares d for target ~ q d (+ m with m tied to d on symmetric 4/3-bit grids)
            shift = q + (m_cur / torch.where(d_cur != 0, d_cur, torch.ones_like(d_cur)))[..., None]
            denom = (shift * shift).sum(-1)
            d_new = torch.where(denom > 0, (shift * target).sum(-1) / denom.clamp(min=1e-20), d_cur)
            ratio = torch.where(d_cur != 0, m_cur / d_cur, torch.zeros_like(d_cur))
            d_cur = d_new.to(torch.float16).float()
            m_cur = (ratio * d_cur).to(torch.float16).float()
        else:
            m_cur = (target - q * d_cur[..., None]).mean(-1).to(torch.float16).float()  # least-squares offset
        beta *= kappa
    q = _codes(W, best_d, best_m, lo, hi).view(n, k)
    return QuantizedWeight(q.to(torch.int16), best_d, best_m, bits, group, sym)
