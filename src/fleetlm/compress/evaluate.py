"""How much a compressed model lost: perplexity on held-out text the compressor never saw, HumanEval pass@1 of
an in-memory model through our engine, and model sizes."""

from __future__ import annotations

import glob
import math
from typing import Any

import torch
from torch import nn

from fleetlm.compress.calib import read_texts, token_windows
from fleetlm.evals.runners import EngineRunner

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


# HumanEval for compressed models: a fixed seeded subset (the same problems for every row of a table), chat
# mode (the catalog models are instruct models), greedy, replies scored in the sandbox by evals.humaneval.
HUMANEVAL_SEED = 0


class ModelRunner(EngineRunner):
    """evals' engine runner on a model already in memory (a compressed copy), not a path: generates in the
    model's own float width, without fusing or repacking its linears (the caller goes on using it)."""

    def __init__(self, model: nn.Module, tokenizer: Any, batch_size: int = 8) -> None:  # noqa: ANN401
        from fleetlm.engine import Engine

        self.engine = Engine(model, tokenizer, name="compressed", dtype="f32")
        self.batch_size = batch_size


def humaneval_subset(limit: int, seed: int = HUMANEVAL_SEED) -> list:
    """`limit` HumanEval problems drawn with `seed` from all 164 (the same list on every call)."""
    from fleetlm.evals import humaneval
    from fleetlm.evals.harness import select

    return select(humaneval.items(), "all", limit, seed)


def humaneval_pass1(model: nn.Module, tokenizer: Any, limit: int, max_tokens: int = 256,  # noqa: ANN401
                    seed: int = HUMANEVAL_SEED, batch_size: int = 8, progress: bool = True) -> float:
    """Greedy pass@1 of `model` on `limit` seeded HumanEval problems, through our engine, in chat mode, each
    reply's program run against the problem's tests in the sandbox."""
    from fleetlm.evals import humaneval
    from fleetlm.evals.harness import run_benchmark

    items = humaneval_subset(limit, seed)
    bench = humaneval.benchmark(items)
    bench.max_tokens = max_tokens
    with torch.inference_mode():
        results = run_benchmark(bench, ModelRunner(model, tokenizer, batch_size), items, model="compressed",
                                progress=progress)
    return sum(r.score for r in results) / len(results)
