"""AWQ-style activation-aware scaling (Lin et al., 2023): before round-to-nearest, scale each input channel of
a group of linears by s = mean|x|^alpha (the salient channels, those with large activations, get finer
steps), with alpha searched on a grid to minimise the error of the linears' outputs on calibration inputs,
and fold 1/s into what produces x (the preceding RMSNorm's weight, or the preceding linear's rows), so the
unquantized function is unchanged.

Facts from the paper that carry over: alpha on a grid of 20 in [0, 1), s normalised by sqrt(max s * min s),
the pairs (input norm -> q/k/v), (v -> o, only when there is one query head per key/value head), (post-
attention norm -> gate/up), (up -> down). Differences: the loss is the scaled linears' own outputs (not the
whole attention or MLP output), and the paper's extra weight-clipping search is not done.

The loss mean((x (W_hat - W)^T)^2) is computed from the Gram matrix x^T x [K, K] when K is below the token
count (the same number, N K^2 work instead of T N K per alpha: 7x less for SmolLM2's MLP inputs), otherwise
from x directly. Calibration needs enough tokens: with 128 (4 x 32) the scales fitted those tokens and the
held-out perplexity came out worse than RTN's (docs/COMPRESS.md); with 4,096 it was clearly better.
"""

from __future__ import annotations

import torch
from torch import nn

from fleetlm.compress.grid import rtn

GRID = 20


def _fake_quant(w: torch.Tensor, bits: int, group: int, sym: bool) -> torch.Tensor:
    return rtn(w, bits, group, sym).dequantize()


@torch.no_grad()
def search_scale(x: torch.Tensor, weights: list[torch.Tensor], bits: int, group: int, sym: bool = False,
                 grid: int = GRID) -> tuple[torch.Tensor, float, float]:
    """Best per-channel scale s [K] for linears `weights` ([N_i, K]) sharing inputs x [T, K].

    Returns (s, loss at the best alpha, loss of plain RTN): alpha = 0 is s = 1, so the best is never worse
    than RTN on these inputs."""
    x = x.float().reshape(-1, x.shape[-1])
    w_all = torch.cat([w.float() for w in weights])
    t, k = x.shape
    gram = (x.double().T @ x.double()).float() if k < t else None
    act = x.abs().mean(0).clamp(min=1e-4)
    best_s, best_loss, rtn_loss = torch.ones_like(act), float("inf"), float("inf")
    for i in range(grid):
        alpha = i / grid
        s = act.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        delta = _fake_quant(w_all * s, bits, group, sym) / s - w_all
        if gram is not None:  # sum over tokens of (x delta^T)^2 = sum((delta G) * delta)
            loss = float(((delta @ gram) * delta).sum()) / (t * w_all.shape[0])
        else:
            loss = float(((x @ delta.T) ** 2).mean())
        if i == 0:
            rtn_loss = loss
        if loss < best_loss:
            best_s, best_loss = s, loss
    return best_s, best_loss, rtn_loss


@torch.no_grad()
def fold_into_norm(norm: nn.Module, linears: list[nn.Linear], s: torch.Tensor) -> None:
    """x -> x / s at the norm's output, W -> W s at the linears' inputs: the same function."""
    norm.weight.div_(s.to(norm.weight.dtype))
    for lin in linears:
        lin.weight.mul_(s.to(lin.weight.dtype)[None, :])


@torch.no_grad()
def fold_into_linear(prev: nn.Linear, linears: list[nn.Linear], s: torch.Tensor) -> None:
    """The preceding linear's output rows (and bias) divided by s, the next linears' input columns times s."""
    prev.weight.div_(s.to(prev.weight.dtype)[:, None])
    if prev.bias is not None:
        prev.bias.div_(s.to(prev.bias.dtype))
    for lin in linears:
        lin.weight.mul_(s.to(lin.weight.dtype)[None, :])


def scale_pairs(block: nn.Module) -> list[tuple[str, nn.Module, list[nn.Linear], nn.Linear]]:
    """(name, what produces x, the linears reading x, the linear whose input is captured) for one decoder
    block, in the order their scales are searched."""
    attn, mlp = block.self_attn, block.mlp
    pairs = [("qkv", block.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj], attn.q_proj)]
    if attn.n_heads == attn.n_kv_heads:  # o's input channel j comes from v's row j only without GQA
        pairs.append(("o", attn.v_proj, [attn.o_proj], attn.o_proj))
    pairs += [("gate_up", block.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj], mlp.gate_proj),
              ("down", mlp.up_proj, [mlp.down_proj], mlp.down_proj)]
    return pairs


@torch.no_grad()
def apply_awq(block: nn.Module, inputs: dict[str, torch.Tensor], bits: int, group: int,
              sym: bool = False) -> dict[str, tuple[float, float]]:
    """Search and fold the scales of one block, given captured inputs by pair name; returns each pair's
    (AWQ loss, RTN loss) on those inputs."""
    losses = {}
    for name, prev, linears, _ in scale_pairs(block):
        s, loss, base = search_scale(inputs[name], [lin.weight for lin in linears], bits, group, sym)
        if isinstance(prev, nn.Linear):
            fold_into_linear(prev, linears, s)
        else:
            fold_into_norm(prev, linears, s)
        losses[name] = (loss, base)
    return losses
