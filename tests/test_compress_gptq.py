"""GPTQ and the shared grid (fleetlm.compress.gptq, .grid): error against RTN, act-order layout, errors."""

from __future__ import annotations

import pytest
import torch

from fleetlm.compress.gptq import Hessian, gptq
from fleetlm.compress.grid import CompressError, QuantizedWeight, fit_grid, output_error, rtn


def _correlated(t: int = 1024, k: int = 128, seed: int = 0) -> torch.Tensor:
    """Inputs with a few strong shared directions and uneven channel scales, as real activations have."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(t, 16, generator=gen) @ torch.randn(16, k, generator=gen)
    return (base + 0.1 * torch.randn(t, k, generator=gen)) * (0.2 + 3 * torch.rand(k, generator=gen))


def _weight(n: int = 64, k: int = 128, seed: int = 1) -> torch.Tensor:
    return 0.05 * torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


def test_hessian_is_the_running_mean_of_2xtx():
    x = _correlated()
    h = Hessian(x.shape[1])
    for part in x.split(300):
        h.add(part)
    ref = 2 * x.double().T @ x.double() / x.shape[0]
    torch.testing.assert_close(h.h, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("bits", [8, 4, 3])
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_output_error_below_rtn(bits, act_order):
    x, w = _correlated(), _weight()
    h = Hessian(w.shape[1])
    h.add(x)
    ours = gptq(w, h.h, bits, 32, act_order=act_order)
    base = rtn(w, bits, 32)
    # GPTQ minimises exactly this; on correlated inputs it is far below round-to-nearest
    assert output_error(x, w, ours.dequantize()) < 0.5 * output_error(x, w, base.dequantize())


def test_act_order_keeps_the_plain_group_layout():
    x, w = _correlated(), _weight()
    h = Hessian(w.shape[1])
    h.add(x)
    qw = gptq(w, h.h, 4, 32, act_order=True)
    # static groups: the grid of group g is the min/max grid of the original columns g*32 .. g*32+31
    d, m = fit_grid(w, 4, 32)
    assert torch.equal(qw.d, d) and torch.equal(qw.m, m)
    assert qw.q.shape == w.shape and int(qw.q.min()) >= 0 and int(qw.q.max()) <= 15
    # and the codes load into our int4 kernel as they are: its output is x @ dequantized.T
    from fleetlm.engine.quant import kernel_linear_from_codes

    lin = kernel_linear_from_codes(qw.q, qw.d, qw.m, 4, 32)
    xs = x[:8]
    ref = xs @ qw.dequantize().T
    out = lin(xs)
    assert (out - ref).abs().max() < 0.02 * ref.abs().max()  # int8 activations: a small error, no reordering


def test_grid_codes_and_sizes():
    w = _weight()
    for bits, lo, hi in ((8, -127, 127), (4, 0, 15), (3, 0, 7)):
        qw = rtn(w, bits, 64)
        assert int(qw.q.min()) >= lo and int(qw.q.max()) <= hi
        # d and m are what float16 holds, so the kernel and GGUF see the same grid
        assert torch.equal(qw.d, qw.d.half().float()) and torch.equal(qw.m, qw.m.half().float())
        assert (w - qw.dequantize()).abs().max() <= qw.d.max() * 0.51 + 1e-6
    sym = rtn(w, 4, 32, sym=True)
    torch.testing.assert_close(sym.m, -8 * sym.d)
    assert QuantizedWeight.nbytes(rtn(w, 4, 32)) == 64 * 128 // 2 + 64 * 4 * 4


def test_bad_settings_are_clear_errors():
    w = _weight()
    with pytest.raises(CompressError, match="bits"):
        rtn(w, 5, 32)
    with pytest.raises(CompressError, match="group size"):
        rtn(w, 4, 48)
    with pytest.raises(CompressError, match="multiple"):
        rtn(_weight(k=96), 4, 64)
    with pytest.raises(ValueError, match="Hessian"):
        gptq(w, torch.eye(64), 4, 32)


def test_rtn_is_the_engines_load_time_int4():
    from fleetlm.engine.kernels import pack_int4, unpack_int4

    w = _weight()
    qw = rtn(w, 4, 32)
    q, d, m = unpack_int4(*pack_int4(w, 32), w.shape[0], w.shape[1])
    assert torch.equal(q.to(torch.int16), qw.q) and torch.equal(d, qw.d) and torch.equal(m, qw.m)
