"""bf16 linears with weights packed once at load: for oneDNN (PackedLinear) or for our own kernel
(KernelBf16Linear, engine/kernels), for inference.

`F.linear` on a plain [N, K] bf16 weight reorders it inside oneDNN at every call; a weight reordered once
into oneDNN's blocked layout (`mkldnn._reorder_linear_weight`) skips that and reads memory in the order the
kernel wants (bench/decode.py measures the difference). The packed tensor is opaque: it cannot be saved or
trained, so packing happens at load time on a model used only for generation.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["KernelBf16Linear", "PackedLinear", "bf16_packing_available", "opaque_linears", "pack_linears",
           "packed_bytes"]


def bf16_packing_available() -> bool:
    """oneDNN is built in and the CPU has native bf16 (AVX512-BF16 / AMX): elsewhere bf16 is emulated and the
    blocked layout buys nothing."""
    mkldnn = getattr(torch.ops, "mkldnn", None)
    return (torch.backends.mkldnn.is_available() and mkldnn is not None
            and hasattr(mkldnn, "_linear_pointwise") and bool(mkldnn._is_mkldnn_bf16_supported()))


class PackedLinear(nn.Module):
    """y = x @ W.T + b with W held in oneDNN's blocked layout (bf16)."""

    def __init__(self, linear: nn.Linear, batch_hint: int = 1) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().to(torch.bfloat16).contiguous()
        self.numel, self.nbytes = weight.numel(), weight.numel() * weight.element_size()
        # A plain attribute, not a buffer: an opaque tensor has no storage for state_dict or .to().
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint)
        bias = linear.bias.detach().to(torch.bfloat16) if linear.bias is not None else None
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.bfloat16)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        bias = self.bias is not None
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={bias}"


class KernelLinear(nn.Module):
    """What our kernels' linears share: the shapes, an f32 bias buffer, and the choice between the compiled
    op (`_kernel`) and its pure-PyTorch reference (`_reference`) when the extension could not be built."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        from fleetlm.engine import kernels

        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("bias", linear.bias.detach().float() if linear.bias is not None else None)
        self.use_kernel = kernels.available()

    def _kernel(self, x2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _reference(self, x2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        y = self._kernel(x2) if self.use_kernel else self._reference(x2)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        bias = self.bias is not None
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={bias}"


class KernelBf16Linear(KernelLinear):
    """y = x @ W.T + b with bf16 W in tiles of 16 rows for our kernel `fleetlm_kernels::linear_bf16`
    (vdpbf16ps on AVX512-BF16, shift-and-FMA on AVX2); output in x's dtype. A plain buffer, unlike
    PackedLinear's opaque tensor, so torch.compile traces it and state_dict holds it. Without the extension,
    forward runs the pure-PyTorch reference."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear)
        from fleetlm.engine import kernels

        self.register_buffer("weight", kernels.pack_bf16(linear.weight))

    def _kernel(self, x2: torch.Tensor) -> torch.Tensor:
        return torch.ops.fleetlm_kernels.linear_bf16.default(x2, self.weight, self.bias, self.out_features)

    def _reference(self, x2: torch.Tensor) -> torch.Tensor:
        from fleetlm.engine.kernels import reference_linear_bf16

        return reference_linear_bf16(x2, self.weight, self.bias, self.out_features)


@torch.no_grad()
def pack_linears(model: nn.Module, kernels: bool = False) -> int:
    """Replace every bf16 nn.Linear of `model` by a PackedLinear (oneDNN), or by a KernelBf16Linear (our
    kernel) when `kernels`, in place; returns how many were packed."""
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child.weight.dtype == torch.bfloat16:
                setattr(module, name, KernelBf16Linear(child) if kernels else PackedLinear(child))
                count += 1
    return count


def opaque_linears(model: nn.Module) -> list[nn.Module]:
    """The linears whose weights live in opaque packed tensors (not among parameters or buffers)."""
    from fleetlm.engine.quant import DynamicInt8Linear

    return [m for m in model.modules() if isinstance(m, (PackedLinear, DynamicInt8Linear))]


def packed_bytes(model: nn.Module) -> int:
    """Bytes of weights held packed (not among the model's parameters or buffers)."""
    return sum(m.nbytes for m in opaque_linears(model))
