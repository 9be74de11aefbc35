"""The local-model Backend: load a checkpoint at a chosen width and generate from it, streamed and batched."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fleetlm.engine.generate import (
    GenerationError,
    GenerationRequest,
    GenerationStats,
    TokenEvent,
    TokenizerLike,
    decode_one_token,
    generate,
)
from fleetlm.errors import FleetError

__all__ = ["DTYPES", "Engine", "GenerationError", "GenerationRequest", "GenerationStats", "TokenEvent",
           "UnsupportedDtypeError"]

# Weight widths a model can be loaded at; int8/int4 are weight-only, their activations use ACTIVATION_DTYPE.
DTYPES = ("bf16", "f32", "int8", "int4")
# Measured here (AVX2, no AVX512-BF16): _weight_int8pack_mm ran ~2x faster with bf16 than f32 activations.
ACTIVATION_DTYPE = torch.bfloat16
# Below this many parameters one thread wins: each op is microseconds, and a second OpenMP thread on a busy
# 2-core machine costs more in synchronisation than it saves (measured 10x on the tiny model under load).
SMALL_MODEL_PARAMS = 20_000_000


class UnsupportedDtypeError(FleetError):
    """A --dtype the engine does not know, or a quantized width whose kernels are not available."""


class Engine:
    """A loaded model + tokenizer that turns GenerationRequests into streamed TokenEvents."""

    def __init__(self, model: nn.Module, tokenizer: TokenizerLike, name: str = "model", dtype: str = "f32",
                 compile: bool = False, num_threads: int | None = None) -> None:
        self.model = model.eval()
        params = sum(p.numel() for p in model.parameters())
        self.num_threads = num_threads or (1 if params < SMALL_MODEL_PARAMS else None)
        self.tokenizer = tokenizer
        self.name = name
        self.dtype = dtype
        self.last_stats = GenerationStats()
        # Compiling the decode step fuses the small ops per layer: 3.1x decode tok/s on the tiny model here
        # (748 vs 240 at batch 2, identical tokens), but ~76 s to compile, so off by default and in tests.
        self._decode = torch.compile(decode_one_token, dynamic=True) if compile else decode_one_token

    @classmethod
    def load(cls, path: str | Path, dtype: str = "bf16", name: str | None = None,
             compile: bool = False) -> Engine:
        """Load an HF-layout checkpoint directory; dtype is one of bf16, f32, int8, int4."""
        from fleetlm.model.checkpoint import load_checkpoint
        from fleetlm.model.tokenizer import Tokenizer

        if dtype not in DTYPES:
            raise UnsupportedDtypeError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
        path = Path(path)
        torch_dtype = {"f32": torch.float32, "bf16": torch.bfloat16}.get(dtype, ACTIVATION_DTYPE)
        model = load_checkpoint(path, dtype=torch_dtype)
        if dtype in ("int8", "int4"):
            model = _quantize(model, dtype)
        tokenizer = Tokenizer.from_dir(path)
        return cls(model, tokenizer, name=name or path.name, dtype=dtype, compile=compile)

    def generate(self, requests: GenerationRequest | Sequence[GenerationRequest]) -> Iterator[TokenEvent]:
        """Stream TokenEvents for one request or a batch (events carry the request's index in the batch)."""
        if isinstance(requests, GenerationRequest):
            requests = [requests]
        self.last_stats = GenerationStats()
        events = generate(self.model, self.tokenizer, list(requests), decode_fn=self._decode,
                          stats=self.last_stats)
        return _with_threads(events, self.num_threads) if self.num_threads else events

    def complete(self, prompts: Sequence[str], **sampling: Any) -> list[str]:
        """Continue each prompt (batched); sampling: GenerationRequest's fields (max_tokens, stop, ...)."""
        return self._collect([GenerationRequest(prompt=p, **sampling) for p in prompts])

    def chat(self, conversations: Sequence[list[dict[str, Any]]], **sampling: Any) -> list[str]:
        """Answer each conversation (a list of {"role", "content"} messages) through the chat template."""
        return self._collect([GenerationRequest(messages=list(c), **sampling) for c in conversations])

    def _collect(self, requests: list[GenerationRequest]) -> list[str]:
        texts = [""] * len(requests)
        for event in self.generate(requests):
            texts[event.request_index] += event.text
        return texts


def _with_threads(events: Iterator[TokenEvent], n: int) -> Iterator[TokenEvent]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield from events
    finally:
        torch.set_num_threads(previous)


def _quantize(model: nn.Module, scheme: str) -> nn.Module:
    try:
        from fleetlm.engine.quant import quantize
    except ModuleNotFoundError as exc:
        if exc.name != "fleetlm.engine.quant":
            raise  # a broken import inside the quantizer is a bug, not a missing feature
        raise UnsupportedDtypeError(f"dtype {scheme} needs fleetlm.engine.quant, not available") from exc
    return quantize(model, scheme)

