"""Quantization grids shared by every method (RTN, GPTQ, AWQ, HQQ): w ~= q * d + m per group of input columns.

The methods differ only in how they choose (q, d, m); the layout is the one our kernels and GGUF store:
- 8 bits: symmetric, q in [-127, 127], m = 0 (GGUF's Q8_0 and our int8 kernel, blocks of 32).
- 4 and 3 bits: asymmetric, q in [0, 2^b - 1], d = (max - min) / (2^b - 1), m = min (GGUF's Q4_1 and our
  int4 kernel); or symmetric (`sym`: GGUF's Q4_0, m = -2^(b-1) d, d = the signed largest value / -2^(b-1)).
  3-bit codes travel in 4-bit containers (neither our kernels nor GGUF have a plain 3-bit block).
d and m are rounded to float16 before any code is picked: that is what the kernel and the file hold, so the
codes a method optimises against are the ones that load.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fleetlm.errors import FleetError

BITS = (8, 4, 3)
GROUP_SIZES = (32, 64, 128)  # multiples of 32: one group spans whole Q8_0 / Q4_x blocks and kernel blocks


class CompressError(FleetError):
    """Bad compression settings (bits, group size, shapes) or an unusable calibration set."""


def code_range(bits: int, sym: bool = False) -> tuple[int, int]:
    """The smallest and largest code at `bits`."""
    check_bits(bits)
    if bits == 8:
        return -127, 127
    return 0, 2**bits - 1


def check_bits(bits: int) -> None:
    if bits not in BITS:
        raise CompressError(f"bits must be one of {', '.join(map(str, BITS))}, got {bits}")


def check_group(group: int, in_features: int) -> None:
    if group not in GROUP_SIZES:
        raise CompressError(f"group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group}")
    if in_features % group:
        raise CompressError(f"input width {in_features} is not a multiple of group size {group}")


@dataclass
class QuantizedWeight:
    """One linear's weight as codes q [N, K] (int16) with per-group d, m [N, K / group] (float16-exact)."""

    q: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor
    bits: int
    group: int
    sym: bool = False

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [N, K] the codes stand for."""
        n, k = self.q.shape
        g = self.q.float().view(n, k // self.group, self.group)
        return (g * self.d[..., None] + self.m[..., None]).view(n, k)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)  # type: ignore[return-value]

    def nbytes(self) -> int:
        """Bytes packed: codes at `bits` (3-bit in 4-bit containers), a float16 d (and m) per group."""
        n, k = self.q.shape
        code_bits = 8 if self.bits == 8 else 4
        per_group = 2 if self.bits == 8 or self.sym else 4
        return n * k * code_bits // 8 + self.d.numel() * per_group


def _f16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).float()


def fit_grid(w: torch.Tensor, bits: int, group: int, sym: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max grid (d, m) [N, K / group] for weight w [N, K], float16-rounded."""
    n, k = w.shape
    g = w.float().view(n, k // group, group)
    if bits == 8:
        return _f16(g.abs().amax(-1) / 127.0), torch.zeros(n, k // group)
    if sym:
        half = 2 ** (bits - 1)
        # the value of largest magnitude maps to code 0 (as llama.cpp's Q4_0: d = max / -8)
        idx = g.abs().argmax(-1, keepdim=True)
        d = _f16(g.gather(-1, idx).squeeze(-1) / -half)
        return d, -half * d
    lo, hi = g.amin(-1), g.amax(-1)
    return _f16((hi - lo) / (2**bits - 1)), _f16(lo)


def quantize_codes(w: torch.Tensor, d: torch.Tensor, m: torch.Tensor, bits: int) -> torch.Tensor:
    """Nearest codes for w [N, C] under the grid d, m [N, C] (already expanded to w's columns)."""
    lo, hi = code_range(bits)
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    return torch.round((w - m) * inv).clamp(lo, hi)


def expand(t: torch.Tensor, group: int) -> torch.Tensor:
    """Per-group values [N, K / group] repeated to every column [N, K]."""
    return t.repeat_interleave(group, dim=1)


def rtn(w: torch.Tensor, bits: int, group: int, sym: bool = False) -> QuantizedWeight:
    """Round-to-nearest on the min/max grid: the baseline every other method must beat."""
    check_bits(bits)
    check_group(group, w.shape[1])
    d, m = fit_grid(w, bits, group, sym)
    q = quantize_codes(w.float(), expand(d, group), expand(m, group), bits)
    return QuantizedWeight(q.to(torch.int16), d, m, bits, group, sym)


def output_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """Squared error of the layer's outputs on inputs x [T, K]: what GPTQ minimises."""
    return float(((x.float() @ (w.float() - w_hat.float()).T) ** 2).sum())
