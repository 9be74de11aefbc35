"""Top-1 agreement of a quantized model with its float reference on the reference's own greedy tokens."""

from __future__ import annotations

import torch
from torch import nn


@torch.inference_mode()
def greedy_tokens(model: nn.Module, prompt_ids: list[int], n: int) -> list[int]:
    """n greedy tokens after the prompt, decoded one at a time through the model's static KV cache."""
    model.setup_caches(1, len(prompt_ids) + n)
    idx = torch.tensor([prompt_ids])
    logits = model(idx, torch.arange(len(prompt_ids)).view(1, -1))[:, -1]
    out: list[int] = []
    for step in range(n):
        token = int(logits.argmax(-1))
        out.append(token)
        if step + 1 < n:
            pos = torch.tensor([[len(prompt_ids) + step]])
            logits = model(torch.tensor([[token]]), pos)[:, -1]
    return out


@torch.inference_mode()
def top1_agreement(model: nn.Module, prompt_ids: list[int], reference_tokens: list[int]) -> float:
    """Share of positions where the model's argmax equals the reference's greedy token (teacher-forced).

    Teacher forcing scores every one of the reference's tokens: a free-running comparison would stop
    meaning anything after the first divergence.
    """
    seq = torch.tensor([prompt_ids + reference_tokens[:-1]])
    logits = model(seq)[0, len(prompt_ids) - 1:]
    predicted = logits.argmax(-1)
    return float((predicted == torch.tensor(reference_tokens)).float().mean())
