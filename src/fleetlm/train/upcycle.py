"""Continued training of a sparsely upcycled model (model/upcycle.py) against its dense original.

`continue_training` is one small loop for both sides of the comparison (dense and MoE on the same batches,
same steps, same learning rate, only the feed-forward layers and the router trainable), and `lm_eval` the
held-out perplexity. Layers below the first trainable one are frozen and identical in both models, so their
output is computed once (`frozen_prefix`) and training runs the top layers only: that is what makes a
135M-parameter run fit minutes of a 2-core CPU.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fleetlm.errors import ConfigError
from fleetlm.model.decoder import MLP, Transformer, rope_cos_sin
from fleetlm.model.moe import MoEFeedForward, clear_router_stats, load_balancing_loss
from fleetlm.model.upcycle import active_params, upcycle, upcycled_config

__all__ = ["TrainStats", "active_params", "chunks_of", "continue_training", "frozen_prefix", "lm_eval",
           "set_trainable", "top_logits", "upcycle", "upcycled_config"]


# ----------------------------------------------------------------------------------------------------
# the continued training, the same for the dense model and its upcycled copy


@dataclass
class TrainStats:
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    aux_losses: list[float] = field(default_factory=list)


def chunks_of(ids: list[int], length: int) -> torch.Tensor:
    """Consecutive [N, length] sequences of a token stream (the tail that does not fill one is dropped)."""
    n = len(ids) // length
    if n == 0:
        raise ConfigError(f"{len(ids)} tokens do not fill one sequence of {length}")
    return torch.tensor(ids[: n * length]).view(n, length)


def first_trainable_layer(model: Transformer) -> int:
    """The lowest layer whose feed-forward is trained: MoE layers of an MoE model, the same layers of the
    dense one (pass `layers` to set_trainable)."""
    return min(i for i, layer in enumerate(model.layers) if any(p.requires_grad for p in layer.parameters()))


def set_trainable(model: Transformer, layers: list[int] | None = None) -> int:
    """Freeze everything except the feed-forward layers (MLP or experts + router) of `layers` (all when None;
    an MoE model: its MoE layers). Returns the number of trainable parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    chosen = layers
    if chosen is None:
        moe = [i for i, layer in enumerate(model.layers) if isinstance(layer.mlp, MoEFeedForward)]
        chosen = moe or list(range(len(model.layers)))
    n = 0
    for i in chosen:
        mlp = model.layers[i].mlp
        if not isinstance(mlp, (MLP, MoEFeedForward)):
            raise ConfigError(f"layer {i} has no feed-forward to train")
        for p in mlp.parameters():
            p.requires_grad_(True)
            n += p.numel()
    return n


@torch.no_grad()
def frozen_prefix(model: Transformer, ids: torch.Tensor, upto: int, batch: int = 8) -> torch.Tensor:
    """Hidden states [N, T, hidden] entering layer `upto` (computed once: layers below it never change)."""
    model.eval()
    outs = []
    for start in range(0, ids.shape[0], batch):
        outs.append(_run_layers(model, model.embed_tokens(ids[start : start + batch]), 0, upto))
    return torch.cat(outs)


def _run_layers(model: Transformer, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    b, t, _ = x.shape
    pos = torch.arange(t)[None].expand(b, t)
    cos, sin = rope_cos_sin(model.inv_freq, pos, x.dtype)
    for layer in model.layers[start:stop]:
        x = layer(x, cos, sin, None, None)  # no cache, no mask: causal attention over the whole row
    return x


def top_logits(model: Transformer, hidden: torch.Tensor, start: int) -> torch.Tensor:
    """Logits from hidden states entering layer `start` (the layers above, the final norm, the output)."""
    x = _run_layers(model, hidden, start, len(model.layers))
    return model.lm_head(model.norm(x)).float()


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def continue_training(model: Transformer, hidden: torch.Tensor, ids: torch.Tensor, start: int, steps: int,
                      batch: int = 1, lr: float = 1e-4, warmup: int = 10, aux_coef: float = 0.01,
                      log: Callable[[str], None] | None = None) -> TrainStats:
    """AdamW on the trainable parameters over `steps` batches of (hidden, ids) rows, in order (row i of step s
    is (s * batch + i) mod N): the dense and the MoE run see the same tokens in the same order.

    The loss is next-token cross-entropy plus aux_coef times the load-balancing loss (MoE layers only).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("nothing to train: call set_trainable first")
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    stats = TrainStats(steps=steps, seconds=0.0)
    t0 = time.perf_counter()
    n = ids.shape[0]
    for step in range(steps):
        rows = torch.tensor([(step * batch + i) % n for i in range(batch)])
        for group in opt.param_groups:  # linear warm-up, then cosine to a tenth
            progress = max(0, step - warmup) / max(1, steps - warmup)
            scale = (step + 1) / warmup if step < warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * progress))
            group["lr"] = lr * scale
        logits = top_logits(model, hidden[rows], start)
        loss = next_token_loss(logits, ids[rows])
        aux = load_balancing_loss(model)
        total = loss + aux_coef * aux
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        clear_router_stats(model)
        stats.losses.append(loss.detach().item())
        stats.aux_losses.append(aux.detach().item())
        if log and (step + 1) % max(1, steps // 10) == 0:
            log(f"  step {step + 1}/{steps}: loss {stats.losses[-1]:.4f} aux {stats.aux_losses[-1]:.3f} "
                f"({time.perf_counter() - t0:.0f}s)")
    stats.seconds = time.perf_counter() - t0
    model.eval()
    return stats


@torch.no_grad()
def lm_eval(model: Transformer, hidden: torch.Tensor, ids: torch.Tensor, start: int, batch: int = 4) -> float:
    """Perplexity of `ids` (next-token, every position but the first of each row) from the prefix states."""
    model.eval()
    total, count = 0.0, 0
    for s in range(0, ids.shape[0], batch):
        logits = top_logits(model, hidden[s : s + batch], start)
        targets = ids[s : s + batch, 1:]
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), reduction="sum")
        total += float(loss)
        count += ids[s : s + batch, 1:].numel()
    return math.exp(total / max(count, 1))
