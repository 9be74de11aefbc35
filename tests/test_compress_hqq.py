"""HQQ-style refinement (fleetlm.compress.hqq): no calibration, never worse than RTN, better with outliers."""

from __future__ import annotations

import pytest
import torch

from fleetlm.compress.grid import rtn
from fleetlm.compress.hqq import hqq, shrink_lp


def _heavy_tailed(n: int = 64, k: int = 256, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = 0.02 * torch.randn(n, k, generator=gen)
    spikes = torch.rand(n, k, generator=gen) < 0.01  # a few outliers per group stretch the min/max grid
    return torch.where(spikes, 8 * w, w)


def test_shrink_keeps_large_and_zeroes_small():
    x = torch.tensor([-3.0, -0.01, 0.0, 0.01, 3.0])
    out = shrink_lp(x, beta=10.0, p=0.7)
    assert out[1] == 0 and out[2] == 0 and out[3] == 0
    assert 0 < out[4] < 3 and out[0] == -out[4]


@pytest.mark.parametrize("bits", [8, 4, 3])
@pytest.mark.parametrize("sym", [False, True])
def test_hqq_error_not_above_rtn(bits, sym):
    w = _heavy_tailed()
    ours, base = hqq(w, bits, 64, sym=sym), rtn(w, bits, 64, sym=sym)
    e_ours = (w - ours.dequantize()).abs().mean(-1)
    e_base = (w - base.dequantize()).abs().mean(-1)
    assert bool((e_ours <= e_base + 1e-9).all())  # row by row: each group keeps its best grid
    if bits < 8 and not sym:
        assert float(e_ours.mean()) < 0.97 * float(e_base.mean())  # and at low bits it is clearly better


def test_hqq_grid_stays_loadable():
    w = _heavy_tailed()
    qw = hqq(w, 4, 32)
    assert int(qw.q.min()) >= 0 and int(qw.q.max()) <= 15
    assert torch.equal(qw.m, qw.m.half().float()) and torch.equal(qw.d, qw.d.half().float())
    s8 = hqq(w, 8, 32)
    assert bool((s8.m == 0).all())  # 8-bit stays symmetric (Q8_0): only its scale moves
