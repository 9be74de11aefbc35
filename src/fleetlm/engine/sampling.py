"""Choosing the next token and turning tokens into streamed text.

`sample` picks one token per row (greedy, temperature, top-k, top-p, each row with its own seeded
generator); `Detokenizer` turns a growing list of ids into valid UTF-8 text deltas; `StopStrings` holds text
back while it could still be the start of a stop string.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fleetlm.errors import FleetError


class SamplingError(FleetError):
    """Sampling parameters that make no sense (negative temperature, top_p outside (0, 1], ...)."""


@dataclass(frozen=True)
class SamplingParams:
    """How one row picks its next token; temperature 0 means greedy (argmax)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise SamplingError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise SamplingError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def logits_to_probs(logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Probabilities over the kept candidates of a 1-D logits row, in transformers' order.

    Returns (probs, ids): with top-k only the k best are kept, so probs has length k and ids maps them back
    to the vocabulary (a k-sized softmax is far cheaper than a vocabulary-sized sort); ids is None otherwise.
    """
    logits = logits.float() / params.temperature
    ids = None
    if 0 < params.top_k < logits.shape[-1]:
        logits, ids = torch.topk(logits, params.top_k)  # sorted descending, which top-p below relies on
    if params.top_p < 1.0:
        if ids is None:
            logits, ids = torch.sort(logits, descending=True)
        probs = torch.softmax(logits, dim=-1)
        # Drop a token once the mass before it already reaches top_p; the first token always stays.
        drop = (torch.cumsum(probs, dim=-1) - probs) >= params.top_p
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.softmax(logits, dim=-1), ids


def sample_row(logits: torch.Tensor, params: SamplingParams,
               generator: torch.Generator | None) -> torch.Tensor:
    """One token id (0-d tensor) from a 1-D logits row."""
    if params.greedy:
        return torch.argmax(logits)
    probs, ids = logits_to_probs(logits, params)
    # Exponential-race sampling: argmax(p / E) with E ~ Exp(1) is a categorical draw without a host sync.
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    choice = torch.argmax(probs / noise)
    return ids[choice] if ids is not None else choice


def sample(logits: torch.Tensor, params: Sequence[SamplingParams],
           generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """Next token ids [B] from logits [B, V], each row with its own parameters and generator."""
    if all(p.greedy for p in params):
        return torch.argmax(logits, dim=-1)  # the common case: one batched op, no per-row loop
    return torch.stack([sample_row(logits[b], params[b], generators[b]) for b in range(logits.shape[0])])


def make_generator(seed: int | None) -> torch.Generator | None:
    """A CPU generator seeded for reproducible sampling, or None to use torch's global RNG."""
    if seed is None:
        return None
    return torch.Generator().manual_seed(int(seed))


class Detokenizer:
    """Turns a growing list of token ids into text deltas that are always whole UTF-8 characters.

    Decoding token by token breaks byte-level BPE (one character may span tokens) and SentencePiece-style
    decoders (a leading space is dropped at the start of a decode). So each step decodes a short window:
    the text of ids[prefix:] minus the text of ids[prefix:read]; a delta that ends in U+FFFD is an
    unfinished character and waits for the next token. The deltas add up to decode(all ids).
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self.decode = decode
        self.ids: list[int] = []
        self.prefix = 0  # window start: a few tokens of context before the unread ones
        self.read = 0  # ids[:read] are already turned into text

    def push(self, token_id: int) -> str:
        """Add one token; return the new text it completes (possibly empty)."""
        self.ids.append(token_id)
        prefix_text = self.decode(self.ids[self.prefix:self.read])
        new_text = self.decode(self.ids[self.prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text):]
            self.prefix, self.read = self.read, len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        """Whatever is still held (an unfinished character at the end becomes U+FFFD)."""
        prefix_text = self.decode(self.ids[self.prefix:self.read])
        new_text = self.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return new_text[len(prefix_text):]


class StopStrings:
    """Finds stop strings in streamed text, even when one straddles several deltas.

    Text is released only once it cannot be the start of a stop string; the stop string itself and
    everything after it are never released.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Add a delta; return (text safe to release, whether a stop string was hit)."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[:min(hits)], ""
            return out, True
        hold = self._held_suffix_length()
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        """Release what was held back (the stream ended without completing a stop string)."""
        out, self.pending = self.pending, ""
        return out

    def _held_suffix_length(self) -> int:
        # The longest tail of the pending text that some stop string starts with.
        for n in range(min(len(self.pending), max(len(s) for s in self.stops) - 1), 0, -1):
            tail = self.pending[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0
