"""The sparse mixture-of-experts feed-forward (Mixtral, Qwen2-MoE), its load-balancing loss, and the mapping
between its stacked expert tensors and Hugging Face's one-module-per-expert checkpoint names.

Facts that shape this file (from the Mixtral and Qwen2-MoE papers/configs and llama.cpp's GGUF layout; no
code copied):
- the router is a bias-free linear [E, hidden]; a softmax over all E experts, then the top k. Mixtral
  renormalises the k kept weights to sum to 1; Qwen2-MoE does so only with `norm_topk_prob`.
- Qwen2-MoE adds a shared expert (a plain SwiGLU MLP every token goes through), scaled by
  sigmoid(shared_expert_gate(x)), a linear [1, hidden].
- GGUF stores the experts stacked: ffn_gate_exps / ffn_up_exps [E, I, hidden], ffn_down_exps [E, hidden, I]
  (numpy order; each expert's slice is an nn.Linear weight). We keep that layout, so export is a copy.
- The Switch/Mixtral auxiliary loss is E * sum_e f_e * P_e (f_e: share of top-k choices that went to e,
  P_e: mean router probability of e), over all MoE layers' tokens together; it is k when perfectly balanced.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

# Checkpoint-name styles: (the per-layer module name, expert projection names gate/up/down).
HF_STYLE = {
    "mixtral": ("block_sparse_moe", {"gate": "w1", "up": "w3", "down": "w2"}),
    "qwen2_moe": ("mlp", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}),
}
_EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.(block_sparse_moe|mlp)\.experts\.(\d+)\.(\w+)\.weight$")
# transformers 5 keeps (and may save) the experts stacked: gate_up_proj [E, 2I, H] and down_proj [E, H, I].
_STACKED_RE = re.compile(r"^model\.layers\.(\d+)\.(block_sparse_moe|mlp)\.experts\.(gate_up_proj|down_proj)$")
_MODULE_RE = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.(.+)$")


class SwiGLU(nn.Module):
    """A plain gate/up/down SiLU MLP of a given width (Qwen2-MoE's shared expert)."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEFeedForward(nn.Module):
    """Top-k of E SwiGLU experts per token, experts stacked [E, ...] in GGUF's layout.

    Dispatch is grouped by expert: the tokens are sorted by the expert they chose, and each expert that got
    any runs one matmul over just its tokens (a decode step of one token touches k experts, not E).
    In training, the router's probabilities and choices stay on the module for `load_balancing_loss`.
    """

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int,
                 norm_topk_prob: bool = True, shared_intermediate: int = 0) -> None:
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must lie in 1..num_experts={num_experts}")
        self.num_experts, self.top_k, self.norm_topk_prob = num_experts, top_k, norm_topk_prob
        self.gate = nn.Linear(hidden, num_experts, bias=False)  # the router (HF's name)
        self.gate_exps = nn.Parameter(torch.empty(num_experts, intermediate, hidden))
        self.up_exps = nn.Parameter(torch.empty(num_experts, intermediate, hidden))
        self.down_exps = nn.Parameter(torch.empty(num_experts, hidden, intermediate))
        for p in (self.gate_exps, self.up_exps, self.down_exps):
            nn.init.normal_(p, std=0.02)
        self.shared_expert: SwiGLU | None = None
        self.shared_expert_gate: nn.Linear | None = None
        if shared_intermediate:
            self.shared_expert = SwiGLU(hidden, shared_intermediate)
            self.shared_expert_gate = nn.Linear(hidden, 1, bias=False)
        self.gate_up_exps: nn.Parameter | None = None  # [E, 2I, H], set by fuse() for inference
        self.router_probs: torch.Tensor | None = None  # [N, E] of the last training forward
        self.router_choices: torch.Tensor | None = None  # [N, k]

    @torch.no_grad()
    def fuse(self) -> None:
        """Gate and up of each expert as one matmul (inference only, like MLP.fuse)."""
        fused = torch.cat([self.gate_exps, self.up_exps], dim=1)
        del self.gate_exps, self.up_exps
        self.gate_up_exps = nn.Parameter(fused, requires_grad=False)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(probs [N, E] float32, top-k weights [N, k] in x's dtype, top-k expert ids [N, k])."""
        probs = self.gate(x).float().softmax(dim=-1)
        weights, choices = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return probs, weights.to(x.dtype), choices

    def _expert(self, e: int, x: torch.Tensor, weights: list[list[torch.Tensor]]) -> torch.Tensor:
        if len(weights) == 2:
            gate, up = F.linear(x, weights[0][e]).chunk(2, dim=-1)
        else:
            gate, up = F.linear(x, weights[0][e]), F.linear(x, weights[1][e])
        return F.linear(F.silu(gate) * up, weights[-1][e])

    def _grouped(self, x: torch.Tensor, weights: torch.Tensor, choices: torch.Tensor) -> torch.Tensor:
        flat = choices.flatten()  # [N*k]: slot j of token n is entry n*k + j
        order = flat.argsort(stable=True)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()  # one host sync per layer
        # Every (token, slot) row in expert order (one permutation), one matmul chain per expert over its
        # contiguous run, the inverse permutation back. Per-expert index_select/index_add, and per-expert
        # views of the stacked parameters, each cost a full-size gradient buffer (a scatter) in training.
        stacked = ([self.gate_up_exps] if self.gate_up_exps is not None else [self.gate_exps, self.up_exps])
        per_expert = [t.unbind(0) for t in (*stacked, self.down_exps)]
        rows = _permute_rows(x.repeat_interleave(self.top_k, dim=0), order, inverse).split(counts)
        ys = torch.cat([self._expert(e, r, per_expert) for e, r in enumerate(rows) if r.shape[0]])
        y = _permute_rows(ys, inverse, order).view(*choices.shape, -1)
        return (y * weights[..., None]).sum(dim=1)

    def _gathered(self, x: torch.Tensor, weights: torch.Tensor, choices: torch.Tensor) -> torch.Tensor:
        # No host sync, for torch.compile: gather each token's k experts' weights (a copy of k experts).
        xs = x.repeat_interleave(self.top_k, dim=0)[:, None]  # [N*k, 1, H]
        flat = choices.flatten()
        if self.gate_up_exps is not None:
            gate, up = (xs @ self.gate_up_exps[flat].transpose(1, 2)).chunk(2, dim=-1)
        else:
            gate = xs @ self.gate_exps[flat].transpose(1, 2)
            up = xs @ self.up_exps[flat].transpose(1, 2)
        y = (F.silu(gate) * up) @ self.down_exps[flat].transpose(1, 2)  # [N*k, 1, H]
        return (y.view(*choices.shape, -1) * weights[..., None]).sum(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs, weights, choices = self.route(x)
        if self.training:
            self.router_probs, self.router_choices = probs, choices
        if torch.compiler.is_compiling():
            out = self._gathered(x, weights, choices)
        else:
            out = self._grouped(x, weights, choices)
        if self.shared_expert is not None and self.shared_expert_gate is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.view(shape)


class _PermuteRows(torch.autograd.Function):
    """x[order] whose backward is the inverse permutation's gather (indexing's own backward is a scatter-add,
    measured 10x slower on CPU)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(inverse)
        return x.index_select(0, order)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # noqa: ANN001
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def _permute_rows(x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    return _PermuteRows.apply(x, order, inverse) if torch.is_grad_enabled() else x.index_select(0, order)


def moe_layers(model: nn.Module) -> list[MoEFeedForward]:
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]


def load_balancing_loss(model: nn.Module) -> torch.Tensor:
    """The Switch/Mixtral auxiliary loss over the last training forward of every MoE layer (0 without any).

    E * sum_e f_e * P_e with f_e summed over the k choice slots, over all layers' tokens at once (as
    transformers computes it): k when the router spreads tokens evenly, up to k * E when it sends all to one.
    """
    layers = [m for m in moe_layers(model) if m.router_probs is not None]
    if not layers:
        return torch.zeros(())
    probs = torch.cat([m.router_probs for m in layers])  # [L*N, E]
    choices = torch.cat([m.router_choices for m in layers])  # [L*N, k]
    num_experts = probs.shape[-1]
    chosen = F.one_hot(choices, num_experts).float().mean(dim=0)  # [k, E]: share of tokens per slot
    return num_experts * (chosen * probs.mean(dim=0)[None]).sum()


def clear_router_stats(model: nn.Module) -> None:
    for m in moe_layers(model):
        m.router_probs = m.router_choices = None


# ----------------------------------------------------------------------------------------------------
# checkpoint names: HF's per-expert modules <-> our stacked parameters


def is_moe_tensor(hf_name: str) -> bool:
    return bool(_EXPERT_RE.match(hf_name) or _STACKED_RE.match(hf_name) or _MODULE_RE.match(hf_name))


def our_moe_name(hf_name: str) -> str | None:
    """Our name for a non-expert tensor of a MoE block (router, shared expert); None for expert tensors."""
    if _EXPERT_RE.match(hf_name) or _STACKED_RE.match(hf_name):
        return None
    m = _MODULE_RE.match(hf_name)
    if m:
        return f"layers.{m.group(1)}.mlp.{m.group(2)}"
    return None


def stack_experts(tensors: Iterable[tuple[str, torch.Tensor]], style: str,
                  num_experts: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Our stacked gate_exps/up_exps/down_exps from HF expert tensors (per-expert or transformers 5 stacked).

    Returns (our name -> stacked tensor, problems): a problem names an expert that is missing or extra.
    """
    _, projs = HF_STYLE[style]
    kind_of = {v: k for k, v in projs.items()}
    per_expert: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    for name, t in tensors:
        m = _EXPERT_RE.match(name)
        if m:
            kind = kind_of.get(m.group(4))
            if kind is None or int(m.group(3)) >= num_experts:
                problems.append(f"unexpected tensor {name}")
                continue
            per_expert.setdefault((int(m.group(1)), kind), {})[int(m.group(3))] = t
            continue
        m = _STACKED_RE.match(name)
        if m and m.group(3) == "gate_up_proj":
            gate, up = t.chunk(2, dim=1)  # transformers 5 puts gate first
            out[f"layers.{m.group(1)}.mlp.gate_exps"] = gate.contiguous()
            out[f"layers.{m.group(1)}.mlp.up_exps"] = up.contiguous()
        elif m:
            out[f"layers.{m.group(1)}.mlp.down_exps"] = t
    for (layer, kind), experts in sorted(per_expert.items()):
        if sorted(experts) != list(range(num_experts)):
            lacking = sorted(set(range(num_experts)) - set(experts))
            problems.append(f"layer {layer} lacks {kind} weights of expert(s) {lacking}")
            continue
        out[f"layers.{layer}.mlp.{kind}_exps"] = torch.stack([experts[e] for e in range(num_experts)])
    return out, problems


def hf_moe_tensors(name: str, t: torch.Tensor, style: str) -> list[tuple[str, torch.Tensor]]:
    """HF checkpoint tensors for one of our MoE tensors (stacked experts unstacked per expert)."""
    module, projs = HF_STYLE[style]
    m = re.match(r"^layers\.(\d+)\.mlp\.(gate|up|down)_exps$", name)
    if m:
        layer, kind = m.group(1), m.group(2)
        return [(f"model.layers.{layer}.{module}.experts.{e}.{projs[kind]}.weight", t[e].contiguous())
                for e in range(t.shape[0])]
    m = re.match(r"^layers\.(\d+)\.mlp\.(.+)$", name)
    assert m, name
    return [(f"model.layers.{m.group(1)}.{module}.{m.group(2)}", t)]
