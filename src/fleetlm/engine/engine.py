"""The local-model Backend: load a checkpoint at a chosen width and generate from it, streamed and batched."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fleetlm.engine.generate import (
    CACHE_BLOCK,
    GenerationError,
    GenerationRequest,
    GenerationStats,
    TokenEvent,
    TokenizerLike,
    decode_one_token,
    ensure_caches,
    generate,
)
from fleetlm.errors import FleetError

__all__ = ["DTYPES", "Engine", "GenerationError", "GenerationRequest", "GenerationStats", "TokenEvent",
           "UnsupportedDtypeError"]

# Weight widths a model can be loaded at. int4, and int8 without fbgemm, are weight-only with activations in
# ACTIVATION_DTYPE; int8 with fbgemm quantizes activations too (engine/quant.py DynamicInt8Linear).
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
        params = weight_count(model)
        self.num_threads = num_threads or (1 if params < SMALL_MODEL_PARAMS else None)
        self.tokenizer = tokenizer
        self.name = name
        self.dtype = dtype
        self.last_stats = GenerationStats()
        self._decode = compile_decode_step() if compile else decode_one_token

    @classmethod
    def load(cls, path: str | Path, dtype: str = "bf16", name: str | None = None,
             compile: bool = False, warm: bool = True) -> Engine:
        """Load an HF-layout checkpoint directory or a `.gguf` file; dtype is one of bf16, f32, int8, int4.
        compile: decode through the compiled step, compiled here for one row unless warm=False (a caller that
        sets up its own caches, such as the gateway's batcher, warms it on those).

        A GGUF file's tensors are dequantized to the float width first; int8/int4 then round them again.
        """
        from fleetlm.model.checkpoint import load_checkpoint
        from fleetlm.model.gguf import load_gguf
        from fleetlm.model.tokenizer import Tokenizer

        path = Path(path)
        if path.suffix == ".gguf":
            model, tokenizer = load_gguf(path, dtype=torch_dtype_of(dtype))
            name = name or path.stem
        else:
            model, tokenizer = load_checkpoint(path, dtype=torch_dtype_of(dtype)), Tokenizer.from_dir(path)
        model = prepare_weights(model, dtype, compile=compile)
        engine = cls(model, tokenizer, name=name or path.name, dtype=dtype, compile=compile)
        if compile and warm:
            engine.warm_up()  # compile now, not inside the first request's tokens/s
        return engine

    @property
    def compile_seconds(self) -> float:
        """Seconds spent compiling the decode step in warm_up (0 for an eager engine)."""
        return float(getattr(self._decode, "compile_seconds", 0.0))

    def warm_up(self, batch: int = 1, length: int = CACHE_BLOCK) -> float:
        """Compile the decode step for `batch` rows on caches of `length` slots (later calls up to that size
        reuse them); returns the seconds it took (0 when the step is not compiled)."""
        warm = getattr(self._decode, "warm_up", None)
        if warm is None:
            return 0.0
        ensure_caches(self.model, batch, length)
        if self.num_threads:
            previous = torch.get_num_threads()
            torch.set_num_threads(self.num_threads)
        try:
            return warm(self.model, (batch,))
        finally:
            if self.num_threads:
                torch.set_num_threads(previous)

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

    @torch.inference_mode()
    def embed(
        self, inputs: Sequence[str | Sequence[int]], batch_size: int = 16
    ) -> tuple[torch.Tensor, list[int]]:
        """Mean-pooled, L2-normalized last hidden states [N, hidden] (float32), and each input's token count.

        A string is tokenized as a prompt is (BOS included); a token id list is taken as given. Runs the plain
        causal forward without the KV cache, so it is safe beside a generate() running in another thread.
        """
        from fleetlm.model.decoder import rope_cos_sin, rope_inv_freq

        model, cfg = self.model, self.model.config
        ids = [self.tokenizer.encode(x) if isinstance(x, str) else list(x) for x in inputs]
        for i, seq in enumerate(ids):
            if not seq:
                raise GenerationError(f"input {i} has no tokens")
            if len(seq) > cfg.max_position_embeddings:
                raise GenerationError(
                    f"input {i} has {len(seq)} tokens; the context is {cfg.max_position_embeddings}"
                )
            bad = next((t for t in seq if not 0 <= t < cfg.vocab_size), None)
            if bad is not None:
                raise GenerationError(
                    f"input {i}: token id {bad} is outside the vocabulary (0..{cfg.vocab_size - 1})"
                )
        out = torch.empty(len(ids), cfg.hidden_size, dtype=torch.float32)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths batch together
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            t = max(len(ids[i]) for i in rows)
            # Right padding under causal attention: a real token never attends to the padding after it.
            idx = torch.zeros(len(rows), t, dtype=torch.long)
            valid = torch.zeros(len(rows), t, 1)
            for r, i in enumerate(rows):
                idx[r, : len(ids[i])] = torch.tensor(ids[i])
                valid[r, : len(ids[i])] = 1
            # The decoder's plain (uncached) forward, stopped before lm_head: the vocabulary projection is
            # the most expensive matmul and embeddings do not need it.
            pos = torch.arange(t)[None].expand(len(rows), t)
            x = model.embed_tokens(idx)
            inv_freq = rope_inv_freq(cfg, t) if cfg.rope_type == "dynamic" else model.inv_freq
            cos, sin = rope_cos_sin(inv_freq, pos, x.dtype)
            mask = None
            if cfg.sliding_window is not None and t > cfg.sliding_window:
                q, k = pos[:, :, None], pos[:, None, :]
                mask = ((k <= q) & (k > q - cfg.sliding_window))[:, None]
            for layer in model.layers:
                x = layer(x, cos, sin, mask, None)
            h = model.norm(x).float()
            pooled = (h * valid).sum(1) / valid.sum(1)
            out[rows] = torch.nn.functional.normalize(pooled, dim=-1)
        return out, [len(s) for s in ids]

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


def weight_count(model: nn.Module) -> int:
    """Weights of every width: parameters, quantized buffers (not KV caches) and prepacked linears."""
    from fleetlm.engine.packed import opaque_linears

    tensors = [t for name, t in model.named_buffers() if "cache" not in name] + list(model.parameters())
    packed = sum(m.numel for m in opaque_linears(model))
    return sum(t.numel() for t in tensors) + packed


def torch_dtype_of(dtype: str) -> torch.dtype:
    """The float width a checkpoint is loaded at before prepare_weights: int8/int4 keep bf16 activations."""
    if dtype not in DTYPES:
        raise UnsupportedDtypeError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if dtype in ("int8", "int4") and our_kernels() or dtype == "int8" and _int8_kernel() == "dynamic":
        return torch.float32  # fbgemm's int8 GEMM and our kernels quantize f32 activations themselves
    return {"f32": torch.float32, "bf16": torch.bfloat16}.get(dtype, ACTIVATION_DTYPE)


def our_kernels() -> bool:
    """Our own CPU kernels (engine/kernels) are built and usable here; FLEET_KERNELS=0 turns them off."""
    from fleetlm.engine import kernels

    return kernels.available()


def half_kv_cache() -> bool:
    """KV caches in float16, attended by our kernel (engine/kernels attend_f16): where our kernels run, unless
    FLEET_KV_CACHE=f32 keeps the f32 cache (PyTorch's attention; the "before" of bench/long_context.py)."""
    return os.environ.get("FLEET_KV_CACHE", "f16") != "f32" and our_kernels()


def _int8_kernel() -> str:
    from fleetlm.engine.quant import dynamic_int8_available

    if our_kernels():
        return "ours"
    return "dynamic" if dynamic_int8_available() else "weight_only"


def compile_decode_step() -> Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]:
    """decode_one_token compiled by Inductor (engine/compiled.py: freezing, cpp_wrapper, artifacts cached in
    the fleet home, batch sizes in buckets). The first calls compile; Engine.load(compile=True) makes them."""
    from fleetlm.engine.compiled import CompiledDecodeStep

    return CompiledDecodeStep()


def prepare_weights(model: nn.Module, dtype: str, compile: bool = False) -> nn.Module:
    """Make a loaded model's linears ready to generate at `dtype`: q/k/v and gate/up fused; every width on our
    own kernels where they build (engine/kernels; FLEET_KERNELS=0: off). Otherwise: int8 on fbgemm's
    dynamic int8 GEMM where PyTorch has it (1.6x the weight-only kernel here), int4 weight-only; bf16
    prepacked for oneDNN where the CPU has native bf16 (its matmuls 2x faster here: 59 -> 29 ms a step),
    unless the decode step is to be compiled (Inductor's freezing packs plain linears, and cannot trace
    ours)."""
    if hasattr(model, "fuse_projections"):
        model.fuse_projections()
    if hasattr(model, "half_cache_attention") and half_kv_cache():
        from fleetlm.engine.kernels import attend_f16

        model.half_cache_attention = attend_f16  # a float16 KV cache, read by our attention kernel
    if dtype in ("int8", "int4"):
        return _quantize(model, dtype)
    if dtype == "bf16" and next(model.parameters()).device.type == "cpu":
        from fleetlm.engine.packed import bf16_packing_available, pack_linears

        if our_kernels():  # ours are plain buffers and a registered op: eager and compiled alike
            pack_linears(model, kernels=True)
        elif bf16_packing_available() and not compile:
            pack_linears(model)
    return model


def _quantize(model: nn.Module, scheme: str) -> nn.Module:
    try:
        from fleetlm.engine.quant import quantize
    except ModuleNotFoundError as exc:
        if exc.name != "fleetlm.engine.quant":
            raise  # a broken import inside the quantizer is a bug, not a missing feature
        raise UnsupportedDtypeError(f"dtype {scheme} needs fleetlm.engine.quant, not available") from exc
    return quantize(model, scheme, int8_kernel=_int8_kernel(), kernels=our_kernels())

