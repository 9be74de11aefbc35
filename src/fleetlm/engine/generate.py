"""The hot path: prefill, decode one token, and the batched streaming generation loop.

Prompts of different lengths share one batch: they are right-padded and every row carries its own
positions, so row b writes its keys/values at slots 0..len_b-1 and then decodes at len_b, len_b+1, ...
Rows finish on their own (stop token, stop string, max tokens); a finished row keeps riding along in the
batch (cheaper than reshaping the caches) but emits nothing more.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import nn

from fleetlm.engine.constrain import Constraint, advance_constraints, apply_constraints
from fleetlm.engine.sampling import Detokenizer, SamplingParams, StopStrings, make_generator, sample
from fleetlm.errors import FleetError

FinishReason = Literal["stop", "length"]


class GenerationError(FleetError):
    """A request the engine cannot run (empty prompt, too long for the model, bad max_tokens)."""


@dataclass
class GenerationRequest:
    """One prompt to continue: `prompt` text, ready `prompt_ids`, or chat `messages` (OpenAI format)."""

    prompt: str | None = None
    prompt_ids: list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    max_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False  # keep going past the tokenizer's end-of-sequence tokens
    logprobs: bool = False  # fill TokenEvent.logprob (log-probability under the model, temperature 1)
    constraint: Constraint | None = None  # masks each step's tokens (JSON Schema...): engine/constrain.py

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)


@dataclass
class TokenEvent:
    """One generated token of one request, with the text it adds to the stream."""

    request_index: int
    token_id: int
    text: str
    finish_reason: FinishReason | None = None
    logprob: float | None = None
    draft: tuple[int, int] | None = None  # speculative decoding: (drafted, kept) tokens, on the last event


@dataclass
class GenerationStats:
    """Timings of the last generate call, for tokens/s reports."""

    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0  # tokens produced by decode steps (the first token comes from prefill)
    decode_seconds: float = 0.0

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0


class TokenizerLike(Protocol):
    eos_token_ids: list[int]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str: ...


def prefill(model: nn.Module, idx: torch.Tensor, input_pos: torch.Tensor,
            lengths: torch.Tensor) -> torch.Tensor:
    """Run the padded prompts [B, T] through the model, filling the caches; logits [B, V] at last tokens."""
    # the prompt's slots only, not the whole cache; logits at each prompt's last token only: all of an 8k
    # prompt's would be 8192 x 151936 floats (5 GB) for Qwen2.5
    logits = model(idx, input_pos, kv_len=idx.shape[1], last=lengths - 1)
    return logits[:, 0].float()


CACHE_BLOCK = 512  # KV cache slots are allocated in blocks of this many


def ensure_caches(model: nn.Module, batch: int, length: int) -> None:
    """Give the model KV caches of at least batch rows x length slots, reusing the ones it has when they are
    big enough: attention reads only the filled slots (kv_len), and new cache tensors at every call would
    make a compiled decode step recompile. Slots past a row's position are never read, so no reset."""
    if model.max_batch_size < batch or model.max_seq_length < length:
        # whole blocks of slots, so that a run of calls of growing length allocates (and compiles) rarely
        blocks = -(-length // CACHE_BLOCK) * CACHE_BLOCK
        model.setup_caches(batch, max(length, min(blocks, model.config.max_position_embeddings)))


def decode_one_token(model: nn.Module, token: torch.Tensor, input_pos: torch.Tensor,
                     kv_len: int | None = None, unmasked: bool | None = None) -> torch.Tensor:
    """One decode step for every row: token [B, 1] at positions [B, 1] -> next-token logits [B, V].

    kv_len (default: the furthest position + 1) and unmasked (see Transformer.forward) may be given by a
    caller that has read them already."""
    # attend over the filled slots only: when all rows stand at the same position this needs no mask
    kv_len = int(input_pos.max()) + 1 if kv_len is None else kv_len
    extra = {} if unmasked is None else {"unmasked": unmasked}
    return model(token, input_pos, kv_len=kv_len, **extra)[:, -1].float()


def encode_request(tokenizer: TokenizerLike, request: GenerationRequest) -> list[int]:
    """The prompt token ids of a request; a chat is rendered with the tokenizer's chat template first."""
    given = [x is not None for x in (request.prompt, request.prompt_ids, request.messages)]
    if sum(given) != 1:
        raise GenerationError("a request needs exactly one of prompt, prompt_ids or messages")
    if request.prompt_ids is not None:
        ids = [int(i) for i in request.prompt_ids]
    elif request.messages is not None:
        text = tokenizer.apply_chat_template(request.messages, add_generation_prompt=True)
        # The template already writes the BOS token (transformers' apply_chat_template(tokenize=True) agrees).
        ids = tokenizer.encode(text, add_special_tokens=False)
    else:
        ids = tokenizer.encode(request.prompt, add_special_tokens=True)
    if not ids:
        raise GenerationError("the prompt is empty: it encodes to no tokens")
    return ids


class _Row:
    """Book-keeping of one request while it streams: its text pipeline and when it must stop."""

    def __init__(self, index: int, request: GenerationRequest, eos_ids: Sequence[int],
                 decode: Callable[[list[int]], str]) -> None:
        self.index = index
        self.request = request
        self.stop_ids = set(request.stop_token_ids) | (set() if request.ignore_eos else set(eos_ids))
        self.detok = Detokenizer(decode)
        self.stops = StopStrings(request.stop)
        self.produced = 0
        self.done = False

    def step(self, token: int, logprob: float | None) -> TokenEvent:
        self.produced += 1
        if token in self.stop_ids:
            self.done = True
            return TokenEvent(self.index, token, self._drain()[0], "stop", logprob)
        text, hit = self.stops.push(self.detok.push(token))
        if hit:
            self.done = True
            return TokenEvent(self.index, token, text, "stop", logprob)
        if self.produced >= self.request.max_tokens:
            self.done = True
            tail, hit = self._drain()
            return TokenEvent(self.index, token, text + tail, "stop" if hit else "length", logprob)
        return TokenEvent(self.index, token, text, None, logprob)

    def _drain(self) -> tuple[str, bool]:
        # At the end of the stream: what the detokenizer and the stop matcher still hold.
        text, hit = self.stops.push(self.detok.flush())
        return (text, True) if hit else (text + self.stops.flush(), False)


@torch.inference_mode()
def generate(model: nn.Module, tokenizer: TokenizerLike, requests: Sequence[GenerationRequest], *,
             decode_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] = decode_one_token,
             stats: GenerationStats | None = None) -> Iterator[TokenEvent]:
    """Stream TokenEvents for a batch of requests, in step order (row order within a step)."""
    if not requests:
        return
    for r in requests:
        if r.max_tokens < 1:
            raise GenerationError(f"max_tokens must be >= 1, got {r.max_tokens}")
    params = [r.sampling_params() for r in requests]
    prompts = [encode_request(tokenizer, r) for r in requests]
    batch, longest = len(prompts), max(len(p) for p in prompts)
    steps = max(r.max_tokens for r in requests)
    limit = model.config.max_position_embeddings
    if longest + steps > limit:
        raise GenerationError(f"prompt ({longest} tokens) + max_tokens ({steps}) exceed the model's "
                              f"context of {limit} tokens")
    device = next(model.parameters()).device
    ensure_caches(model, batch, longest + steps)

    idx = torch.zeros(batch, longest, dtype=torch.long)
    for b, p in enumerate(prompts):
        idx[b, :len(p)] = torch.tensor(p)
    lengths = torch.tensor([len(p) for p in prompts])
    input_pos = torch.arange(longest).expand(batch, longest)
    generators = [make_generator(r.seed) for r in requests]
    want_logprobs = any(r.logprobs for r in requests)
    rows = [_Row(b, r, tokenizer.eos_token_ids, tokenizer.decode) for b, r in enumerate(requests)]
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens, stats.decode_tokens = int(lengths.sum()), 0

    t0 = time.perf_counter()
    logits = prefill(model, idx.to(device), input_pos.to(device), lengths.to(device))
    pos = lengths.to(device).view(batch, 1)  # the next free slot of each row
    constrained = any(r.constraint is not None for r in requests)
    for step in range(steps):
        if constrained:
            live = [None if row.done else row.request.constraint for row in rows]
            apply_constraints(logits, live, tokenizer.eos_token_ids)
        tokens = sample(logits, params, generators)
        chosen = tokens.tolist()  # the one host sync per step: a streamed token must be seen to be sent
        if constrained:
            advance_constraints(chosen, live)
        if step == 0:
            stats.prefill_seconds = time.perf_counter() - t0
            t0 = time.perf_counter()
        else:
            stats.decode_tokens += sum(not row.done for row in rows)
        logprobs = (torch.log_softmax(logits, dim=-1).gather(1, tokens.view(-1, 1)).view(-1).tolist()
                    if want_logprobs else [None] * batch)
        for row in rows:
            if not row.done:
                yield row.step(chosen[row.index], logprobs[row.index] if row.request.logprobs else None)
        if all(row.done for row in rows):
            break
        logits = decode_fn(model, tokens.view(batch, 1), pos)
        pos = pos + 1
    stats.decode_seconds = time.perf_counter() - t0
