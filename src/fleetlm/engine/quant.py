"""Quantized int8 and int4 linears for CPU decoding: on our own kernels (engine/kernels) where they build,
else on PyTorch's packed-weight kernels.

Decoding one token reads every weight once, so its speed is set by bytes read: int8 halves bf16's bytes,
int4 quarters them. Activations stay in a float dtype (bf16 by default); only weights are quantized.
- Int8Linear: symmetric, one scale per output channel, `aten._weight_int8pack_mm` (x @ (q * scale).T).
- Int4Linear: asymmetric, group-wise along the input dimension, `aten._weight_int4pack_mm_for_cpu`
  on weights packed once at load time by `aten._convert_weight_to_int4pack_for_cpu`.
- DynamicInt8Linear: fbgemm's int8 GEMM with activations quantized per call.
- KernelInt4Linear / KernelInt8Linear: our kernels, int8 activations per block of 32 and VNNI dot products
  (llama.cpp's Q4 x Q8 / Q8 x Q8 scheme), weights in tiles laid out for streaming reads.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from fleetlm.engine.packed import KernelLinear
from fleetlm.errors import FleetError

__all__ = ["SCHEMES", "DynamicInt8Linear", "Int4Linear", "Int8Linear", "KernelInt4Linear", "KernelInt8Linear",
           "QuantizationError", "dynamic_int8_available", "quantize", "quantized_bytes"]

SCHEMES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)


class QuantizationError(FleetError):
    """An unknown scheme or group size, or a model with nothing that can be quantized."""


def quantize_int8_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: w ~= q * scale[:, None], q in [-127, 127]."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4_weight(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-wise asymmetric 4-bit: q in [0, 15]; returns (q int32 [N, K], scales_and_zeros [K/g, N, 2]).

    The kernel dequantizes as (q - 8) * scale + zero, so zero = min + 8 * scale maps q=0 to the group min.
    """
    w = weight.detach().float()
    n, k = w.shape
    groups = w.reshape(n, k // group_size, group_size)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((hi - lo) / 15.0).clamp(min=1e-12)
    q = torch.round((groups - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).reshape(n, k)
    zero = lo + 8.0 * scale
    scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()  # [K/g, N, 2]
    return q, scales_and_zeros


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T + bias with int8 weights read by `_weight_int8pack_mm`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features, dtype=dtype))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype | None = None) -> Int8Linear:
        dtype = dtype or linear.weight.dtype
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, dtype)
        q, scale = quantize_int8_weight(linear.weight)
        m.weight.copy_(q)
        m.scales.copy_(scale.to(dtype))
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach().to(dtype))
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        # The kernel wants a 2-D activation of the scales' dtype; callers may hand 3-D [B, T, K].
        x2 = x.reshape(-1, self.in_features).to(self.scales.dtype)
        y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


@functools.cache  # read /proc/cpuinfo once, not once per quantized layer
def cpu_has_vnni() -> bool:
    """AVX512-VNNI or AVX-VNNI: int8 dot products without the int16 overflow that forces 7-bit activations."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def dynamic_int8_available() -> bool:
    """fbgemm (PyTorch's x86 quantized engine) is built in: int8 GEMMs with per-call activation scales."""
    return any(e in torch.backends.quantized.supported_engines for e in ("x86", "fbgemm"))


# Packed fbgemm weights by key, for the compiled decode step: torch.compile cannot trace the op's opaque
# packed-params argument (it fell back to eager around every linear: 53 ms a step vs 39 ms eager), but it
# calls a custom op that takes a plain int key as one extern kernel and fuses everything around it.
# Keyed by id(handle) and dropped with the handle: torch.compile deep-copies modules while it traces, so a
# module cannot own its key outright (a copy's finalizer would drop the original's weights).
_PACKED_INT8: weakref.WeakValueDictionary[int, _PackedHandle] = weakref.WeakValueDictionary()


class _PackedHandle:
    __slots__ = ("__weakref__", "packed")

    def __init__(self, packed: object) -> None:
        self.packed = packed


def _dynamic_int8_linear_cpu(x: torch.Tensor, key: int, out_features: int,
                             reduce_range: bool) -> torch.Tensor:
    return torch.ops.quantized.linear_dynamic(x, _PACKED_INT8[key].packed, reduce_range)


def _dynamic_int8_linear_fake(x: torch.Tensor, key: int, out_features: int,
                              reduce_range: bool) -> torch.Tensor:
    return x.new_empty(x.shape[0], out_features)


# A bare operator library rather than torch.library.custom_op: its Python wrapper cost ~35 us a call
# (6 ms a step over 169 linears); a plain CPU kernel registration skips it.
_LIB = torch.library.Library("fleetlm", "DEF")
_LIB.define("dynamic_int8_linear(Tensor x, int key, int out_features, bool reduce_range) -> Tensor")
_LIB.impl("dynamic_int8_linear", _dynamic_int8_linear_cpu, "CPU")
torch.library.register_fake("fleetlm::dynamic_int8_linear", _dynamic_int8_linear_fake, lib=_LIB)


class DynamicInt8Linear(nn.Module):
    """Per-channel int8 weights; each call quantizes x to int8 (one scale per call, as llama.cpp's Q8_0 matmul
    quantizes its activations) and runs fbgemm's int8 GEMM (`quantized::linear_dynamic`), f32 out.

    2-3x faster than `_weight_int8pack_mm` at batch 1 here, for a little more error (activations in 8 bits).
    The rows of one call share the activation scale, so a row's result can depend on its batch neighbours.
    """

    def __init__(self, linear: nn.Linear, reduce_range: bool | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # 7-bit activations unless the CPU has VNNI: without it fbgemm sums pairs of u8*s8 products in int16
        # (vpmaddubsw), which saturates on 8-bit activations (15% error on a random 128x96 layer on AVX2).
        self.reduce_range = not cpu_has_vnni() if reduce_range is None else reduce_range
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1).clamp(min=1e-12) / 127.0).double()
        with warnings.catch_warnings():  # quantized tensors are marked for a future removal; torch is pinned
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch.quantize_per_channel(w, scale, torch.zeros_like(scale, dtype=torch.long), 0,
                                                 torch.qint8)
            bias = linear.bias.detach().float() if linear.bias is not None else None
            # Opaque packed params: kept as an attribute, not a buffer (no storage for state_dict).
            self.packed = torch.ops.quantized.linear_prepack(qweight, bias)
        self.numel, self.nbytes = w.numel(), w.numel() + 4 * self.out_features
        self._handle = _PackedHandle(self.packed)
        self.key = id(self._handle)
        _PACKED_INT8[self.key] = self._handle

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).float()
        if torch.compiler.is_compiling():
            y = torch.ops.fleetlm.dynamic_int8_linear(x2, self.key, self.out_features, self.reduce_range)
        else:  # eager: the op directly (going through the registered operator costs ~4 us a call)
            y = torch.ops.quantized.linear_dynamic(x2, self.packed, self.reduce_range)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Int4Linear(nn.Module):
    """y = x @ dequant(q).T + bias with 4-bit group-wise weights packed for `_weight_int4pack_mm_for_cpu`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int = 64,
                 dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        if in_features % group_size:
            raise QuantizationError(f"in_features {in_features} is not a multiple of group size {group_size}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        # Packed layout: [N, K/2] uint8 (two 4-bit values a byte), made by the CPU packing op.
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales_and_zeros",
                             torch.zeros(in_features // group_size, out_features, 2, dtype=dtype))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 64,
                    dtype: torch.dtype | None = None) -> Int4Linear:
        dtype = dtype or linear.weight.dtype
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size, dtype)
        q, sz = quantize_int4_weight(linear.weight, group_size)
        m.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        m.scales_and_zeros = sz.to(dtype)
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach().to(dtype))
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(self.scales_and_zeros.dtype)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight, self.group_size,
                                                       self.scales_and_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


class KernelInt4Linear(KernelLinear):
    """4-bit weights (asymmetric, one float16 scale and offset per group of input columns) on our own kernel
    `fleetlm_kernels::linear_int4` (engine/kernels): activations quantized to int8 per block of 32 at each
    call, VNNI dot products, f32 sums; output in x's dtype. The packed tensors are plain buffers (state_dict
    works). Without the extension, forward runs the kernel's pure-PyTorch reference (same numbers, slow)."""

    def __init__(self, linear: nn.Linear, group_size: int = 64) -> None:
        super().__init__(linear)
        from fleetlm.engine import kernels

        self.group_size = group_size
        weight, scales = kernels.pack_int4(linear.weight, group_size)
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)

    def _kernel(self, x2: torch.Tensor) -> torch.Tensor:
        return torch.ops.fleetlm_kernels.linear_int4.default(x2, self.weight, self.scales, self.bias,
                                                             self.out_features, self.group_size)

    def _reference(self, x2: torch.Tensor) -> torch.Tensor:
        from fleetlm.engine.kernels import reference_linear_int4

        return reference_linear_int4(x2, self.weight, self.scales, self.bias, self.out_features,
                                     self.group_size)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"


class KernelInt8Linear(KernelLinear):
    """int8 weights with one float16 scale per block of 32 input columns (GGUF's Q8_0) on our own kernel
    `fleetlm_kernels::linear_int8`: int8 activations per block of 32, VNNI dot products, output in x's dtype.
    Each row's activations have their own scales, so a batched row never depends on its neighbours."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear)
        from fleetlm.engine import kernels

        weight, scales = kernels.pack_int8(linear.weight)
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)

    def _kernel(self, x2: torch.Tensor) -> torch.Tensor:
        return torch.ops.fleetlm_kernels.linear_int8.default(x2, self.weight, self.scales, self.bias,
                                                             self.out_features)

    def _reference(self, x2: torch.Tensor) -> torch.Tensor:
        from fleetlm.engine.kernels import reference_linear_int8

        return reference_linear_int8(x2, self.weight, self.scales, self.bias, self.out_features)


def _linears(model: nn.Module, skip: Iterable[str]) -> list[tuple[nn.Module, str, nn.Linear]]:
    skip = set(skip)
    found = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and child_name not in skip and full not in skip:
                found.append((module, child_name, child))
    return found


INT8_KERNELS = ("weight_only", "dynamic", "ours")
KERNEL_INT4_GROUP = 32  # 5 bits a weight with its float16 scale and offset (Q4_1's layout), 4.5 at 64
HEAD = "lm_head"  # the vocabulary projection: int8 even in an int4 model on our kernels (as llama.cpp keeps
# it at Q6_K/Q8_0 in its 4-bit files): its logits pick every token


@torch.no_grad()
def quantize(model: nn.Module, scheme: str, group_size: int | None = None, *, skip: Iterable[str] = (),
             dtype: torch.dtype | None = None, int8_kernel: str = "weight_only",
             kernels: bool = False) -> nn.Module:
    """Replace the model's nn.Linear layers in place with quantized ones; embeddings stay float.

    skip: child names (e.g. "lm_head") or full module paths to leave in float. dtype: the activation
    dtype of the quantized layers (default: each layer's current weight dtype). int8_kernel: "weight_only"
    (Int8Linear, activations in `dtype`), "dynamic" (DynamicInt8Linear: int8 activations, f32 in and out) or
    "ours" (KernelInt8Linear). kernels: our own kernels for every layer (KernelInt4Linear / KernelInt8Linear,
    lm_head in int8 in an int4 model), whatever int8_kernel says. group_size (int4): default 64 on PyTorch's
    kernel, 32 on ours: GGUF's 4-bit files (Q4_1, Q4_K) are asymmetric in groups of 32, which ours then
    reproduce (on SmolLM2's Q4_1 weights, group 64 changed the greedy answer and group 32 kept f32's).
    """
    if group_size is None:
        group_size = KERNEL_INT4_GROUP if kernels else 64
    if int8_kernel not in INT8_KERNELS:
        raise QuantizationError(f"int8_kernel must be one of {', '.join(INT8_KERNELS)}, got {int8_kernel!r}")
    if scheme not in SCHEMES:
        raise QuantizationError(f"unknown quantization scheme {scheme!r}: choose one of {', '.join(SCHEMES)}")
    if scheme == "int4" and group_size not in GROUP_SIZES:
        raise QuantizationError(f"int4 group size must be one of {GROUP_SIZES}, got {group_size}")
    from fleetlm.engine.quant_moe import float_linears  # MoE routers stay float (engine/quant_moe.py)

    targets = _linears(model, [*skip, *float_linears(model)])
    if not targets:
        raise QuantizationError("the model has no nn.Linear layers to quantize")
    for parent, child_name, linear in targets:
        if kernels or (scheme == "int8" and int8_kernel == "ours"):
            new: nn.Module = (KernelInt4Linear(linear, group_size) if scheme == "int4" and child_name != HEAD
                              else KernelInt8Linear(linear))
        elif scheme == "int8" and int8_kernel == "dynamic":
            new = DynamicInt8Linear(linear)
        elif scheme == "int8":
            new = Int8Linear.from_linear(linear, dtype)
        elif linear.in_features % group_size or linear.out_features % 16:
            # The int4 CPU packing needs groups along K and N divisible by 16: such a layer keeps int8
            # rather than failing the whole model.
            new = Int8Linear.from_linear(linear, dtype)
        else:
            new = Int4Linear.from_linear(linear, group_size, dtype)
        setattr(parent, child_name, new)
    return model


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers: what one decode step reads (KV cache aside)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t is None or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    from fleetlm.engine.packed import packed_bytes  # weights in opaque packed tensors (no storage to count)

    return total + packed_bytes(model)


@torch.no_grad()
def kernel_linear_from_codes(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor, bits: int, group: int,
                             bias: torch.Tensor | None = None) -> KernelLinear:
    """One of our kernels' linears from codes chosen elsewhere (fleetlm.compress: GPTQ, AWQ, HQQ), without
    rounding again: w = q * d + m per group of `group` input columns (d, m [N, K / group]).

    bits 8: symmetric codes in [-127, 127] (m = 0) on the int8 kernel, d repeated per block of 32; bits 4 and
    3: codes in [0, 15] (3-bit codes use half the range) on the int4 kernel at the same group size."""
    from fleetlm.engine import kernels

    n, k = q.shape
    weight = (q.float().view(n, k // group, group) * d[..., None] + m[..., None]).view(n, k)
    linear = nn.Linear(k, n, bias=bias is not None)
    linear.weight.data = weight
    if bias is not None:
        linear.bias.data = bias.detach().float()
    if bits == 8:
        if bool((m != 0).any()):
            raise QuantizationError("8-bit codes must be symmetric (m = 0) for the int8 kernel")
        out: KernelLinear = KernelInt8Linear(linear)
        packed = kernels.pack_int8_codes(q, d.repeat_interleave(group // kernels.QBLOCK, dim=1))
    else:
        out = KernelInt4Linear(linear, group)
        packed = kernels.pack_int4_codes(q, d, m, group)
    out.weight, out.scales = packed
    return out
