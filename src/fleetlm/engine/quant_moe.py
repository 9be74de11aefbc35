"""Engine quantization of mixture-of-experts models: which of an MoE layer's tensors stay in float.

quant.quantize swaps every nn.Linear for a quantized one. In an MoE layer (model/moe.py MoEFeedForward):
- the router (`mlp.gate`, [E, hidden]) stays float: rounding it can change which experts a token picks,
  and it is tiny (llama.cpp's converter keeps it float32 in every file type for the same reason);
- Qwen2-MoE's shared-expert gate (`mlp.shared_expert_gate`, [1, hidden]) stays float too: one output row,
  no kernel's shape, and a scale on the whole shared expert;
- the shared expert's gate/up/down are plain linears and are quantized like a dense MLP's;
- the stacked experts (`gate_exps`/`up_exps`/`down_exps` or the fused `gate_up_exps`, [E, ...]) are not
  nn.Linear and are kept in the model's float width: our kernels take one 2-D weight per call, and a decode
  step reads only k of the E experts, so they cost k/E of their size per token. expert_report says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from fleetlm.model.moe import MoEFeedForward

FLOAT_CHILDREN = ("gate", "shared_expert_gate")  # an MoE layer's linears that quantize must leave alone


def float_linears(model: nn.Module) -> list[str]:
    """Full module paths of the routers and shared-expert gates of every MoE layer (for quantize's skip)."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, MoEFeedForward):
            for child in FLOAT_CHILDREN:
                if isinstance(getattr(module, child, None), nn.Linear):
                    found.append(f"{name}.{child}" if name else child)
    return found


@dataclass
class ExpertReport:
    """What quantization left in float in an MoE model."""

    layers: int  # MoE layers
    float_linears: int  # routers and shared-expert gates
    expert_weights: int  # numbers in the stacked experts, kept float
    dtype: str  # their width

    def describe(self) -> str:
        if not self.layers:
            return "no MoE layers"
        return (f"{self.layers} MoE layers: routers and shared-expert gates ({self.float_linears}) and the "
                f"stacked experts ({self.expert_weights / 1e6:.1f}M weights) kept in {self.dtype}")


def expert_report(model: nn.Module) -> ExpertReport:
    layers = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
    stacked = [p for m in layers for name, p in m.named_parameters(recurse=False) if name.endswith("_exps")]
    dtype = str(stacked[0].dtype).removeprefix("torch.") if stacked else "-"
    return ExpertReport(len(layers), len(float_linears(model)), sum(p.numel() for p in stacked), dtype)
