"""Speculative decoding of one stream: a drafter proposes tokens, the target checks them all in one forward.

Lossless. Greedy: a drafted token is kept while it equals the target's argmax, so the output is plain greedy
decoding's, bit for bit: the verify forward attends one candidate row at a time (the model's rowwise) and our
kernels compute each row on its own, so every row's logits are a decode step's (a masked forward differs by
summation order, which quantized activations amplify into flipped near-ties).
Sampling: drafted token x is kept with probability min(1, p(x) / q(x)) and the first rejection resamples from
max(0, p - q) renormalised (Leviathan et al. 2023, Chen et al. 2023), so every token follows the target's
distribution p exactly, whatever the drafter's q.

Drafters: prompt lookup (the tokens that followed the last earlier occurrence of the text's final n-gram,
in the prompt or the text so far; q is a point mass) and a smaller model with the same tokenizer (its own KV
cache). The draft length adapts to the acceptance rate. The target's KV cache needs no rollback: the verify
forward writes the drafted positions, and slots past the kept text are overwritten before anything reads them
(attention reads slots [0, kv_len) only, and kv_len never passes the kept text plus the new candidates).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from fleetlm.engine.generate import GenerationError, ensure_caches, prefill
from fleetlm.engine.sampling import SamplingParams, logits_to_probs, sample_row


@dataclass
class SpeculativeStats:
    """Counts of one speculative generation: what was drafted, what the target kept, where time went."""

    rounds: int = 0  # target forwards after the prefill (each verifies a draft, possibly empty)
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_round(self) -> float:
        return self.emitted / self.rounds if self.rounds else 0.0


@dataclass
class Draft:
    """Proposed next tokens; probs [k, V] the drafter's distribution for each, None for a point mass."""

    tokens: list[int]
    probs: torch.Tensor | None = None


class Drafter(Protocol):
    free: bool  # proposing costs no model call: worth asking even when the draft length is 0

    def propose(self, seq: Sequence[int], k: int, params: SamplingParams,
                generator: torch.Generator | None) -> Draft: ...

    def keep(self, length: int) -> None:
        """The first `length` tokens of the text are final; anything the drafter assumed past them is not."""


class PromptLookup:
    """Drafts by copying: find the last earlier occurrence of the text's final n-gram (longest n first) and
    propose the tokens that followed it. Costs no model call; pays on edits, summaries and document QA."""

    free = True

    def __init__(self, ngram_max: int = 3, ngram_min: int = 1) -> None:
        if not 1 <= ngram_min <= ngram_max:
            raise GenerationError(f"prompt lookup needs 1 <= ngram_min <= ngram_max, "
                                  f"got {ngram_min}, {ngram_max}")
        self.ngram_max, self.ngram_min = ngram_max, ngram_min
        self._last: dict[tuple[int, ...], int] = {}  # n-gram -> the position just past its latest occurrence
        self._indexed = 0  # n-grams ending before this position are in _last
        self._seq: list[int] = []

    def propose(self, seq: Sequence[int], k: int, params: SamplingParams,
                generator: torch.Generator | None) -> Draft:
        self._index(seq)
        for n in range(min(self.ngram_max, len(seq) - 1), self.ngram_min - 1, -1):
            end = self._last.get(tuple(seq[-n:]))
            if end is not None:
                return Draft(list(seq[end:end + k]))
        return Draft([])

    def keep(self, length: int) -> None:
        pass  # the index covers final text only (see _index)

    def _index(self, seq: Sequence[int]) -> None:
        # Incremental: every n-gram that ends before the last token, so a lookup of the final n-gram finds an
        # earlier occurrence, never itself. A new text (not an extension of the indexed one) starts over.
        if self._seq[: self._indexed] != list(seq[: self._indexed]):
            self._last, self._indexed = {}, 0
        for end in range(max(self._indexed, 1), len(seq)):
            for n in range(self.ngram_min, min(self.ngram_max, end) + 1):
                self._last[tuple(seq[end - n:end])] = end
        self._indexed = max(self._indexed, len(seq) - 1)
        self._seq = list(seq)


class DraftModel:
    """Drafts with a smaller model of the same vocabulary, greedily or by sampling with the request's
    parameters; its KV cache holds the final text plus its own proposals, trimmed back by keep()."""

    free = False

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval()
        self._cached = 0  # tokens of the text whose keys/values sit in the draft's cache

    @torch.inference_mode()
    def propose(self, seq: Sequence[int], k: int, params: SamplingParams,
                generator: torch.Generator | None) -> Draft:
        if k < 1:
            return Draft([])
        device = next(self.model.parameters()).device
        before = self.model.layers[0].self_attn.kv_cache
        ensure_caches(self.model, 1, len(seq) + k)
        if self.model.layers[0].self_attn.kv_cache is not before:  # a new, bigger cache holds nothing yet
            self._cached = 0
        start = min(self._cached, len(seq) - 1)
        new = torch.tensor([list(seq[start:])], device=device)
        pos = torch.arange(start, len(seq), device=device)[None]
        logits = self.model(new, pos, kv_len=len(seq), last=torch.tensor([new.shape[1] - 1]))[:, -1].float()
        tokens, probs = [], []
        for i in range(k):
            if params.greedy:
                token = int(torch.argmax(logits[0]))
            else:
                p = full_probs(logits[0], params)
                token = int(torch.multinomial(p, 1, generator=generator))
                probs.append(p)
            tokens.append(token)
            if i + 1 < k:  # the last proposal is never fed: the target decides what follows it
                at = len(seq) + i
                step = torch.tensor([[token]], device=device)
                logits = self.model(step, torch.tensor([[at]], device=device), kv_len=at + 1).float()[:, -1]
        self._cached = len(seq) + k - 1
        return Draft(tokens, torch.stack(probs) if probs else None)

    def keep(self, length: int) -> None:
        self._cached = min(self._cached, length)


def full_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The sampling distribution of a 1-D logits row over the whole vocabulary (zeros outside top-k/top-p)."""
    probs, ids = logits_to_probs(logits, params)
    if ids is None:
        return probs
    return torch.zeros(logits.shape[-1], dtype=probs.dtype, device=probs.device).index_copy_(0, ids, probs)


def accept_greedy(draft: Sequence[int], logits: torch.Tensor) -> tuple[int, int]:
    """(kept drafted tokens, the target's own next token) for logits [k + 1, V] of the verify forward."""
    best = torch.argmax(logits, dim=-1).tolist()
    n = 0
    while n < len(draft) and draft[n] == best[n]:
        n += 1
    return n, best[n]


def accept_sampled(draft: Draft, logits: torch.Tensor, params: SamplingParams,
                   generator: torch.Generator | None) -> tuple[int, int]:
    """Rejection sampling: (kept drafted tokens, the next token), distributed as the target's sampling."""
    for i, token in enumerate(draft.tokens):
        p = full_probs(logits[i], params)
        q_token = 1.0 if draft.probs is None else float(draft.probs[i, token])
        u = float(torch.rand((), generator=generator))
        if u * q_token < float(p[token]):  # u < p/q without dividing by a zero q
            continue
        # Rejected: the residual max(0, p - q) holds exactly the mass that acceptance under-covers.
        if draft.probs is None:
            residual = p.clone()
            residual[token] = 0.0
        else:
            residual = (p - draft.probs[i]).clamp(min=0.0)
        total = float(residual.sum())
        residual = residual / total if total > 0 else p  # p == q: nothing left over (rejection had prob. 0)
        return i, int(torch.multinomial(residual, 1, generator=generator))
    return len(draft.tokens), int(torch.multinomial(full_probs(logits[-1], params), 1, generator=generator))


# Cost of one forward of T rows over one of a single row, T = 1, 2, ...: Qwen2.5-Coder-1.5B int4 on this
# project's 2 AVX2 cores (docs/SPECULATIVE.md, "Verify cost"; rows in between interpolated). A machine's own
# figures come from measure_verify_cost().
DEFAULT_VERIFY_COST = (1.0, 1.1, 1.2, 1.34, 1.67, 2.0, 2.33, 2.67, 3.0, 3.34, 3.67, 4.0, 4.34)


@dataclass
class DraftLength:
    """How many tokens to draft next: the k that maximises expected tokens per unit of time, from a running
    estimate of the per-token acceptance a and the cost of verifying T rows (in decode steps).

    k drafted tokens yield 1 + a + ... + a^k tokens (the target's own token always comes) for
    verify_cost[k] + k * draft_cost steps; k = 0 is a plain decode step (1 token, 1 step). With a cheap
    drafter and a = 0.9 that picks long drafts, with a = 0.1 none: a drafter that rarely guesses right never
    slows decoding by more than its own cost."""

    verify_cost: tuple[float, ...] = DEFAULT_VERIFY_COST
    draft_cost: float = 0.0  # one drafted token, in target decode steps (0: prompt lookup)
    acceptance: float = 0.6  # the running estimate, starting from this prior
    low: int = 0
    high: int = 12
    memory: float = 0.7  # weight of the past in the running estimate

    def cost(self, k: int) -> float:
        table = self.verify_cost
        if k < len(table):
            verify = table[k]
        else:  # past the table: its last slope
            slope = table[-1] - table[-2] if len(table) > 1 else 1.0
            verify = table[-1] + slope * (k + 1 - len(table))
        return verify + k * self.draft_cost

    @property
    def k(self) -> int:
        a = min(max(self.acceptance, 0.0), 0.999)
        gain = [(1 - a ** (k + 1)) / (1 - a) / self.cost(k) for k in range(self.low, self.high + 1)]
        return self.low + max(range(len(gain)), key=gain.__getitem__)

    def observe(self, drafted: int, kept: int) -> None:
        """A verify step kept `kept` of `drafted` tokens: a geometric run, kept successes then one failure."""
        if drafted == 0:
            return
        rate = kept / (kept + (1 if kept < drafted else 0))
        self.acceptance = self.memory * self.acceptance + (1 - self.memory) * rate


def forward_seconds(model: nn.Module, rows: int, context: int = 256, reps: int = 3) -> list[float]:
    """Best-of-reps time of a rowwise forward of T = 1..rows new tokens after `context` cached ones (T = 1 is
    a decode step: rowwise changes nothing for one row)."""
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    ensure_caches(model, 1, context + rows)
    best = [float("inf")] * rows
    with torch.inference_mode():
        prompt = torch.randint(0, vocab, (1, context), device=device)
        model(prompt, torch.arange(context, device=device)[None], kv_len=context)
        for _ in range(reps):
            for t in range(1, rows + 1):
                idx = torch.randint(0, vocab, (1, t), device=device)
                pos = torch.arange(context, context + t, device=device)[None]
                t0 = time.perf_counter()
                model(idx, pos, kv_len=context + t, rowwise=True)
                best[t - 1] = min(best[t - 1], time.perf_counter() - t0)
    return best


def measure_verify_cost(model: nn.Module, rows: int = 13, context: int = 256,
                        reps: int = 3) -> tuple[float, ...]:
    """The model's own DraftLength.verify_cost on this machine: forward_seconds over the one-row time."""
    best = forward_seconds(model, rows, context, reps)
    return tuple(max(b / best[0], 1.0) for b in best)


def step_seconds(model: nn.Module, context: int = 256, reps: int = 5) -> float:
    """Best-of-reps time of a one-token decode step after `context` cached tokens (a draft's cost in target
    steps is the ratio of the two models' figures)."""
    return forward_seconds(model, 1, context, reps)[0]


@dataclass
class Round:
    """What one draft-and-verify round produced: the kept drafts, then the target's own next token."""

    tokens: list[int]
    drafted: int
    kept: int
    draft_seconds: float
    verify_seconds: float


def speculative_round(model: nn.Module, text: Sequence[int], pos: int, drafter: Drafter, policy: DraftLength,
                      params: SamplingParams, generator: torch.Generator | None, *, limit: int,
                      cache_rows: slice | None = None) -> Round:
    """Draft up to `limit` tokens after `text` and verify them in one forward. The cache (row cache_rows)
    holds `pos` slots: everything but text[-1], which the forward feeds first, at slot pos."""
    k = max(min(policy.k, limit), 0)
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    draft = drafter.propose(text, k, params, generator) if k > 0 else Draft([])
    draft.tokens = draft.tokens[:k]
    # a free drafter still guesses on a plain step: the guess, checked against the target's token, keeps
    # the acceptance estimate alive (else one bad stretch would switch drafting off for good)
    shadow = drafter.propose(text, 1, params, generator).tokens if k == 0 and drafter.free else []
    t1 = time.perf_counter()
    cand = torch.tensor([[text[-1], *draft.tokens]], device=device)
    positions = torch.arange(pos, pos + cand.shape[1], device=device)[None]
    # rowwise: each candidate row computed as a one-token decode step would, so greedy output is plain
    # decoding's bit for bit even on quantized kernels (see Attention)
    logits = model(cand, positions, cache_rows=cache_rows, kv_len=pos + cand.shape[1], rowwise=True)[0]
    logits = logits.float()
    kept, nxt = (accept_greedy(draft.tokens, logits) if params.greedy
                 else accept_sampled(draft, logits, params, generator))
    policy.observe(len(draft.tokens), kept)
    if shadow:
        policy.observe(1, int(shadow[0] == nxt))
    return Round([*draft.tokens[:kept], nxt], len(draft.tokens), kept, t1 - t0, time.perf_counter() - t1)


@torch.inference_mode()
def speculative_generate(model: nn.Module, prompt_ids: Sequence[int], drafter: Drafter, *, max_tokens: int,
                         params: SamplingParams | None = None, generator: torch.Generator | None = None,
                         stop_ids: Sequence[int] = (), draft_length: DraftLength | None = None,
                         stats: SpeculativeStats | None = None) -> Iterator[int]:
    """Stream the target model's tokens for one prompt, up to max_tokens or a stop token (yielded last)."""
    params = params or SamplingParams()
    length = draft_length or DraftLength(low=0 if drafter.free else 1)
    stats = stats if stats is not None else SpeculativeStats()
    if not prompt_ids:
        raise GenerationError("the prompt is empty: it encodes to no tokens")
    if max_tokens < 1:
        raise GenerationError(f"max_tokens must be >= 1, got {max_tokens}")
    limit = model.config.max_position_embeddings
    if len(prompt_ids) + max_tokens > limit:
        raise GenerationError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceed the "
                              f"model's context of {limit} tokens")
    device = next(model.parameters()).device
    stops = set(stop_ids)
    ensure_caches(model, 1, len(prompt_ids) + max_tokens + length.high)
    seq = [int(t) for t in prompt_ids]
    idx = torch.tensor([seq], device=device)
    logits = prefill(model, idx, torch.arange(len(seq), device=device)[None], torch.tensor([len(seq)]))
    first = int(sample_row(logits[0], params, generator))
    seq.append(first)
    produced = 1
    stats.emitted += 1
    yield first
    if first in stops:
        return
    while produced < max_tokens:
        # The target's cache holds seq[:-1]; the round feeds seq[-1] and the draft after it.
        r = speculative_round(model, seq, len(seq) - 1, drafter, length, params, generator,
                              limit=min(max_tokens - produced - 1, limit - len(seq)))
        stats.draft_seconds += r.draft_seconds
        stats.verify_seconds += r.verify_seconds
        stats.rounds += 1
        stats.drafted += r.drafted
        stats.accepted += r.kept
        for token in r.tokens:
            seq.append(token)
            produced += 1
            stats.emitted += 1
            yield token
            if token in stops or produced >= max_tokens:
                return
        drafter.keep(len(seq) - 1)
