"""How much a compressed model lost: perplexity on held-out text the compressor never saw, and model sizes."""

from __future__ import annotations

import glob
import math

import torch
from torch import nn

from fleetlm.compress.calib import read_texts, token_windows

# Held-out text that installs offline and is not the calibration text (python3.11-doc): the common licenses
# and the Debian changelogs of the first packages by name (all of them: 23 MB, 44 s to read).
EVAL_PATHS = ["/usr/share/common-licenses", *sorted(glob.glob("/usr/share/doc/*/changelog.Debian.gz"))]
EVAL_CHARS = 3_000_000
BLOCK_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def eval_windows(tokenizer, count: int, length: int) -> tuple[torch.Tensor, int]:  # noqa: ANN001
    """(count x length token windows spread evenly over the held-out text, the text's token count)."""
    ids = tokenizer.encode(read_texts(EVAL_PATHS, EVAL_CHARS), add_special_tokens=False)
    return token_windows(ids, count, length), len(ids)


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch: int = 2) -> float:
    """exp(mean next-token NLL) over every window (each scored on its own, from its first token)."""
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch):
        ids = windows[i : i + batch]
        logits = model(ids)[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                reduction="sum")
        total += float(nll)
        count += ids[:, 1:].numel()
    return math.exp(total / count)


def block_linear_names(model: nn.Module) -> set[str]:
    """Module names of the decoder blocks' linears (what fleet compress quantizes)."""
    return {f"layers.{i}.{n}" for i in range(len(model.layers)) for n in BLOCK_LINEARS}


def float_bytes(model: nn.Module, skip: set[str]) -> int:
    """Bytes of the tensors that are not in skip, at float16 (one copy of tied embeddings)."""
    seen, total = set(), 0
    for name, p in model.named_parameters():
        if name.removesuffix(".weight") in skip or p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * 2
    return total
