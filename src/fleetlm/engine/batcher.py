"""Continuous batching: requests join and leave one running decode batch at any step (gpt-fast style).

Each active request owns one row ("slot") of a static KV cache. A newcomer is prefilled into a free row
(with the other newcomers of the same step, not with the running rows), which keep their positions; then
every decode step runs all active rows together, each at its own position. A row that finishes frees its
slot at once, so the next waiting request can take it on the next step.

Rows are kept packed: the n active requests live in cache rows 0..n-1, so a decode step reads cache rows
[0, n) as views instead of gathering them. When a request leaves, the request in the last row moves into its
slot (one row copy when a request finishes, rather than a gather of every row at every step).

With a Speculation, a step that has one request alone decodes it speculatively (engine/speculative.py): a
drafter guesses the next tokens and one rowwise forward checks them all, in the same cache row, so the request
goes back to plain batched steps the moment another one joins, and its output is the same either way.

    batcher = Batcher(model, tokenizer, max_batch=16)
    handle = batcher.add(GenerationRequest(prompt="Hi", max_tokens=8))
    while batcher.busy:
        for event in batcher.step():   # event.request_index == handle
            ...
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from fleetlm.engine.constrain import advance_constraints, apply_constraints
from fleetlm.engine.generate import (
    GenerationError,
    GenerationRequest,
    TokenEvent,
    TokenizerLike,
    _Row,
    encode_request,
)
from fleetlm.engine.sampling import SamplingParams, make_generator, sample
from fleetlm.engine.speculative import Drafter, DraftLength, speculative_round

# The cache starts this long (or as long as the first request needs) and doubles when a request needs more.
INITIAL_CACHE_LENGTH = 256
DecodeFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class _Seq:
    """One request inside the batcher: its prompt, its stop book-keeping and where it is in its cache row."""

    handle: int
    prompt_ids: list[int]
    row: _Row
    params: SamplingParams
    generator: torch.Generator | None
    logprobs: bool
    pos: int = 0  # cache slots 0..pos-1 hold this request's keys/values
    pending: int = -1  # the last sampled token, fed to the next decode step
    tokens: list[int] = field(default_factory=list)  # generated so far (a drafter reads the whole text)
    drafted: int = 0  # speculative decoding: tokens drafted for this request, and how many were kept
    accepted: int = 0


@dataclass
class Speculation:
    """Speculative decoding of a batcher's lone request: the drafter, and the draft-length policy that
    every request starts from (a copy each: its acceptance estimate is the request's own)."""

    drafter: Drafter
    policy: DraftLength = field(default_factory=DraftLength)
    name: str = "draft"  # what drafts, for reports ("lookup", the draft model's name)
    handle: int = -1  # the request the drafter's state belongs to
    current: DraftLength | None = None


def _constraints(requests: list[GenerationRequest]) -> list | None:
    """Each row's constraint (response_format, tools), or None when no row is constrained."""
    found = [getattr(r, "constraint", None) for r in requests]
    return found if any(c is not None for c in found) else None


class Batcher:
    """The continuous-batching scheduler over one model: add() requests, call step() until not busy."""

    def __init__(self, model: nn.Module, tokenizer: TokenizerLike, max_batch: int = 32,
                 context: int | None = None, decode_fn: DecodeFn | None = None,
                 initial_length: int | None = None, speculation: Speculation | None = None) -> None:
        """decode_fn: the engine's decode step (model, tokens [n, 1], positions [n, 1]) -> logits [n, V] over
        cache rows 0..n-1, e.g. the compiled step (engine/compiled.py); None: the model's eager forward.
        initial_length: cache slots per row at the first allocation (default INITIAL_CACHE_LENGTH; a compiled
        step recompiles when the cache is reallocated, so a compiled batcher starts with room)."""
        if max_batch < 1:
            raise GenerationError(f"max_batch must be >= 1, got {max_batch}")
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        self.context = int(context or model.config.max_position_embeddings)
        self.decode_fn = decode_fn
        self.initial_length = initial_length
        self.speculation = speculation
        self.device = next(model.parameters()).device
        self.capacity = 0  # cache length (slots per row); 0 until the first request arrives
        self._cache: nn.Module | None = None  # the first layer's cache as we set it up (to spot a takeover)
        self.waiting: deque[_Seq] = deque()
        self.active: list[_Seq] = []  # active[i] owns cache row i
        self._next_handle = 0
        # Counters for tests and reports.
        self.decode_steps = 0
        self.peak_batch = 0
        self.prefills = 0

    # ------------------------------------------------------------ requests in and out

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.active)

    def add(self, request: GenerationRequest) -> int:
        """Queue a request; returns its handle (the request_index of its events). Bad requests raise here."""
        if request.max_tokens < 1:
            raise GenerationError(f"max_tokens must be >= 1, got {request.max_tokens}")
        ids = encode_request(self.tokenizer, request)
        vocab = int(self.model.config.vocab_size)
        if min(ids) < 0 or max(ids) >= vocab:  # checked here: inside a step it would fail every row
            raise GenerationError(f"prompt token ids must be in [0, {vocab})")
        if len(ids) + request.max_tokens > self.context:
            raise GenerationError(f"prompt ({len(ids)} tokens) + max_tokens ({request.max_tokens}) exceed "
                                  f"the context of {self.context} tokens")
        handle, self._next_handle = self._next_handle, self._next_handle + 1
        row = _Row(handle, request, self.tokenizer.eos_token_ids, self.tokenizer.decode)
        self.waiting.append(_Seq(handle, ids, row, request.sampling_params(), make_generator(request.seed),
                                 request.logprobs))
        return handle

    def prompt_tokens(self, handle: int) -> int:
        for seq in (*self.active, *self.waiting):
            if seq.handle == handle:
                return len(seq.prompt_ids)
        raise KeyError(handle)

    @torch.inference_mode()  # the cache rows it moves were made in inference mode
    def cancel(self, handle: int) -> None:
        """Drop a request (its client went away); an active one frees its slot at once."""
        self.waiting = deque(s for s in self.waiting if s.handle != handle)
        for i, seq in enumerate(self.active):
            if seq.handle == handle:
                self._free([i])
                return

    def clear(self) -> None:
        """Forget every request (after the model failed mid-step)."""
        self.waiting.clear()
        self.active.clear()

    # ------------------------------------------------------------ the loop

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """One engine step: admit waiting requests into free slots (prefill), then decode every active row."""
        events: list[TokenEvent] = []
        if self.waiting and len(self.active) < self.max_batch:
            events += self._admit()
        if len(self.active) == 1 and self._speculates(self.active[0]):
            events += self._speculate()
        elif self.active:
            events += self._decode()
        return events

    def _admit(self) -> list[TokenEvent]:
        if self.capacity and not self._owns_cache():
            # Someone else (Engine.generate on the same model) set up caches in between: start afresh.
            if self.active:
                raise GenerationError("the model's KV cache was replaced while requests were decoding")
            self.capacity = 0
        free = self.max_batch - len(self.active)
        newcomers = [self.waiting.popleft() for _ in range(min(free, len(self.waiting)))]
        need = max(len(s.prompt_ids) + s.row.request.max_tokens for s in newcomers)
        if need > self.capacity:
            self._grow(need)
        first = len(self.active)
        self.active += newcomers
        lengths = [len(s.prompt_ids) for s in newcomers]
        longest = max(lengths)
        # Right-padded: padding writes slots past a row's prompt, which its own decode overwrites before use.
        idx = torch.zeros(len(newcomers), longest, dtype=torch.long)
        for b, s in enumerate(newcomers):
            idx[b, :len(s.prompt_ids)] = torch.tensor(s.prompt_ids)
        pos = torch.arange(longest).expand(len(newcomers), longest)
        rows = slice(first, first + len(newcomers))
        last = torch.tensor(lengths) - 1  # logits at each prompt's last token only
        logits = self.model(idx.to(self.device), pos.to(self.device), cache_rows=rows, kv_len=longest,
                            last=last)[:, 0].float()
        for s in newcomers:
            s.pos = len(s.prompt_ids)
        self.prefills += 1
        return self._emit(logits, first)

    def _decode(self) -> list[TokenEvent]:
        if not self._owns_cache():
            raise GenerationError("the model's KV cache was replaced while requests were decoding")
        n = len(self.active)
        tokens = torch.tensor([[s.pending] for s in self.active]).to(self.device)
        pos = torch.tensor([[s.pos] for s in self.active]).to(self.device)
        if self.decode_fn is not None:  # rows are packed: the active rows are cache rows 0..n-1
            logits = self.decode_fn(self.model, tokens, pos)
        else:
            kv_len = max(s.pos for s in self.active) + 1
            logits = self.model(tokens, pos, cache_rows=slice(0, n), kv_len=kv_len)[:, -1].float()
        for s in self.active:
            s.pos += 1
        self.decode_steps += 1
        self.peak_batch = max(self.peak_batch, n)
        return self._emit(logits, 0)

    def _speculates(self, seq: _Seq) -> bool:
        # logprobs and constrained decoding need every step's own logits: those requests decode plainly. So do
        # seeded sampled ones: rejection sampling draws other random numbers, and a seed promises the same
        # text whether the request ran alone or beside others (greedy text is the same either way)
        request = seq.row.request
        return (self.speculation is not None and not seq.logprobs
                and getattr(request, "constraint", None) is None
                and (seq.params.greedy or request.seed is None))

    def _speculate(self) -> list[TokenEvent]:
        """One speculative round of the lone request in cache row 0: draft, verify, keep what matches."""
        if not self._owns_cache():
            raise GenerationError("the model's KV cache was replaced while requests were decoding")
        spec, s = self.speculation, self.active[0]
        assert spec is not None
        if spec.handle != s.handle:  # a new request: the drafter's cache and estimate start over
            spec.drafter.keep(0)
            spec.handle, spec.current = s.handle, replace(spec.policy)
        policy = spec.current
        assert policy is not None
        remaining = s.row.request.max_tokens - s.row.produced
        # the pending token is the text's last: the round feeds it at slot s.pos, then the draft
        r = speculative_round(self.model, s.prompt_ids + s.tokens, s.pos, spec.drafter, policy, s.params,
                              s.generator, limit=min(remaining - 1, self.capacity - s.pos - 1),
                              cache_rows=slice(0, 1))
        s.drafted, s.accepted = s.drafted + r.drafted, s.accepted + r.kept
        events = []
        for token in r.tokens:
            event = s.row.step(token, None)
            s.tokens.append(token)
            if s.row.done:
                event.draft = (s.drafted, s.accepted)
            events.append(event)
            if s.row.done:
                break
        s.pos += r.kept + 1  # the pending token and the kept drafts now sit in the cache
        s.pending = r.tokens[-1]
        spec.drafter.keep(len(s.prompt_ids) + len(s.tokens) - 1)
        self.decode_steps += 1
        self.peak_batch = max(self.peak_batch, 1)
        if s.row.done:
            self._free([0])
        return events

    def _emit(self, logits: torch.Tensor, first: int) -> list[TokenEvent]:
        """Sample the next token of active rows first.., stream their events, free the rows that finished."""
        seqs = self.active[first:first + logits.shape[0]]
        constraints = _constraints([s.row.request for s in seqs])
        if constraints is not None:  # constrained decoding: mask what the grammar forbids, before sampling
            apply_constraints(logits, constraints, self.tokenizer.eos_token_ids)
        tokens = sample(logits, [s.params for s in seqs], [s.generator for s in seqs])
        chosen = tokens.tolist()  # the one host sync per step: a streamed token must be seen to be sent
        if constraints is not None:
            advance_constraints(chosen, constraints)
        logprobs: list[float | None] = [None] * len(seqs)
        if any(s.logprobs for s in seqs):
            logprobs = torch.log_softmax(logits, dim=-1).gather(1, tokens.view(-1, 1)).view(-1).tolist()
        events, done = [], []
        for i, (s, token) in enumerate(zip(seqs, chosen, strict=True)):
            events.append(s.row.step(token, logprobs[i] if s.logprobs else None))
            s.pending = token
            s.tokens.append(token)
            if s.row.done:
                done.append(first + i)
                if s.drafted:
                    events[-1].draft = (s.drafted, s.accepted)
        self._free(done)
        return events

    # ------------------------------------------------------------ the cache

    def _free(self, rows: list[int]) -> None:
        """Release cache rows; the request in the last row moves into each freed slot (rows stay packed)."""
        for i in sorted(rows, reverse=True):
            last = len(self.active) - 1
            if i != last:
                moved = self.active[last]
                self._copy_row(last, i, moved.pos)
                self.active[i] = moved
            self.active.pop()

    def _copy_row(self, src: int, dst: int, length: int) -> None:
        for layer in self.model.layers:
            cache = layer.self_attn.kv_cache
            cache.k_cache[dst, :, :length].copy_(cache.k_cache[src, :, :length])
            cache.v_cache[dst, :, :length].copy_(cache.v_cache[src, :, :length])

    @torch.inference_mode()
    def warm_up(self, batch_sizes: tuple[int, ...] = (1, 2)) -> float:
        """Allocate the cache and compile decode_fn for these batch sizes before any request (it must be idle:
        the warm-up writes cache rows); returns the seconds spent (0 without a compiled decode_fn)."""
        warm = getattr(self.decode_fn, "warm_up", None)
        if warm is None:
            return 0.0
        if self.busy:
            raise GenerationError("warm_up needs an idle batcher")
        if not self.capacity or not self._owns_cache():
            self.capacity = 0
            self._grow(1)
        return warm(self.model, tuple(min(b, self.max_batch) for b in batch_sizes))

    def _grow(self, need: int) -> None:
        """(Re)allocate the cache to hold `need` slots per row, keeping what the active rows hold."""
        length = min(self.context, max(need, self.initial_length or INITIAL_CACHE_LENGTH, 2 * self.capacity))
        old = [(layer.self_attn.kv_cache.k_cache, layer.self_attn.kv_cache.v_cache)
               for layer in self.model.layers] if self.capacity and self.active else []
        self.model.setup_caches(self.max_batch, length)
        for layer, (k, v) in zip(self.model.layers, old, strict=False):
            cache = layer.self_attn.kv_cache
            cache.k_cache[:, :, :k.shape[2]].copy_(k)
            cache.v_cache[:, :, :v.shape[2]].copy_(v)
        self.capacity = length
        self._cache = self.model.layers[0].self_attn.kv_cache

    def _owns_cache(self) -> bool:
        return self.model.layers[0].self_attn.kv_cache is self._cache


def run_all(batcher: Batcher, requests: list[GenerationRequest],
            on_step: Callable[[Batcher], None] | None = None) -> dict[int, list[TokenEvent]]:
    """Add requests and step until all finish; events per handle (a helper for tests and benchmarks)."""
    handles = [batcher.add(r) for r in requests]
    out: dict[int, list[TokenEvent]] = {h: [] for h in handles}
    while batcher.busy:
        for ev in batcher.step():
            out[ev.request_index].append(ev)
        if on_step is not None:
            on_step(batcher)
    return out
