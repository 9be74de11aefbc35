"""The multi-row kernels (several activation rows per weight pass: speculative decoding's verify step) against
the PyTorch references and the single-row kernels, for T = 1..16 rows, odd shapes, every format."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fleetlm.engine import kernels

HAVE = kernels.available()
needs_kernels = pytest.mark.skipif(not HAVE, reason="our kernels did not build on this machine")
ISAS = [name for name, level in (("avx512", 2), ("avx2", 1))
        if HAVE and int(torch.ops.fleetlm_kernels.best_isa_level()) >= level]
ROWS = list(range(1, 17))
# K neither a multiple of 32 nor of the group, N not a multiple of the 16-row tile, and one K with many blocks
SHAPES = [(70, 33), (100, 200), (33, 1000)]
# Kernel and reference quantize activations identically and their integer dot products are exact: they differ
# only in the order of f32 sums (~1e-7 relative). The AVX2 bf16 path keeps activations in f32 where the
# reference (like vdpbf16ps) rounds them to bf16: up to 2^-9 per element, ~2e-3 on a dot product.
EXACT, BF16_ACTIVATIONS = 1e-5, 5e-3


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(params=ISAS)
def isa(request):
    with kernels.use_isa(request.param) as got:
        assert got == request.param
        yield got


@pytest.fixture(params=[True, False], ids=["rows", "single"])
def rows_setting(request):
    before = int(torch.ops.fleetlm_kernels.rows_kernels())
    with kernels.use_rows_kernels(request.param) as got:
        assert got is request.param
        yield got
    assert int(torch.ops.fleetlm_kernels.rows_kernels()) == before  # restored


def _packed(n: int, k: int, seed: int):
    torch.manual_seed(seed)
    w, b = torch.randn(n, k) * 0.1, torch.randn(n)
    return w, b, kernels.pack_int4(w, 32), kernels.pack_int8(w), kernels.pack_bf16(w)


@needs_kernels
@pytest.mark.parametrize("n,k", SHAPES)
def test_every_row_count_matches_the_reference(isa, rows_setting, n: int, k: int) -> None:
    ops = torch.ops.fleetlm_kernels
    _, b, (w4, s4), (w8, s8), wb = _packed(n, k, n * k)
    for t in ROWS:
        x = torch.randn(t, k) * 2
        got = ops.linear_int4(x, w4, s4, b, n, 32)
        assert rel(got, kernels.reference_linear_int4(x, w4, s4, b, n, 32)) < EXACT, ("int4", t)
        got = ops.linear_int8(x, w8, s8, b, n)
        assert rel(got, kernels.reference_linear_int8(x, w8, s8, b, n)) < EXACT, ("int8", t)
        got = ops.linear_bf16(x, wb, None, n)
        tol = EXACT if isa == "avx512" else BF16_ACTIVATIONS
        assert rel(got, kernels.reference_linear_bf16(x, wb, None, n)) < tol, ("bf16", t)


@needs_kernels
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_groups_wider_than_a_block(isa, group: int) -> None:
    ops = torch.ops.fleetlm_kernels
    torch.manual_seed(group)
    n, k = 48, 300
    w4, s4 = kernels.pack_int4(torch.randn(n, k), group)
    for t in (2, 5, 16):
        x = torch.randn(t, k)
        assert rel(ops.linear_int4(x, w4, s4, None, n, group),
                   kernels.reference_linear_int4(x, w4, s4, None, n, group)) < EXACT, (group, t)


@needs_kernels
def test_a_row_gets_the_same_numbers_alone_and_among_others(isa) -> None:
    """Each row's sums run in the same order whatever the pass it falls in: a verify step's rows equal the
    single-row steps' to the last bit (greedy speculative decoding then picks the same tokens)."""
    ops = torch.ops.fleetlm_kernels
    n, k = 80, 256
    _, b, (w4, s4), (w8, s8), wb = _packed(n, k, 7)
    x = torch.randn(16, k)
    for name, f in (("int4", lambda v: ops.linear_int4(v, w4, s4, b, n, 32)),
                    ("int8", lambda v: ops.linear_int8(v, w8, s8, b, n))):
        alone = torch.cat([f(x[i : i + 1]) for i in range(16)])
        for t in (2, 3, 7, 16):
            assert torch.equal(f(x[:t]), alone[:t]), (name, t)
    alone = torch.cat([ops.linear_bf16(x[i : i + 1], wb, b, n) for i in range(16)])
    for t in (2, 5, 16):
        assert torch.equal(ops.linear_bf16(x[:t], wb, b, n), alone[:t]), ("bf16", t)


@needs_kernels
def test_the_env_var_keeps_the_single_row_kernels() -> None:
    code = "import torch; from fleetlm.engine import kernels; kernels.available(); " \
           "print(int(torch.ops.fleetlm_kernels.rows_kernels()))"
    for value, want in (("0", "0"), ("1", "1")):
        env = {**os.environ, "FLEET_KERNELS_ROWS": value}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip().splitlines()[-1] == want
