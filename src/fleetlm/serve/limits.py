"""Per-key budgets and rate limits that hold under concurrency and across gateway replicas.

Before a request runs, its worst-case cost is reserved: prompt tokens (an upper bound: the prompt's UTF-8
bytes, as a byte-level BPE token is at least one byte, plus a few tokens per message for the chat template)
plus `max_tokens` (else the model's `max_context`, else DEFAULT_MAX_TOKENS) times `n`, at the price of the
model, plus, for every model the request may move on to (fallbacks, a cascade's escalation, each step of a
checks ladder), that model's worst case with the partial answer added to its prompt. A request is admitted
while the key's settled spend plus its open reservations is below the budget; afterwards the reservation is
settled to the exact cost of the usage record. Since every admitted request was covered by the reservations
of those before it, the spend can exceed the budget by at most the last admitted request's cost.

Requests per minute and tokens per minute are sliding 60 s windows in the same counter store, so they are
global across replicas. A request is admitted while the tokens settled in the last minute are below the
key's `tpm` (the tokens of requests still running are counted when they finish).
"""

from __future__ import annotations

import os
from typing import Any

from fleetlm.config import FleetConfig
from fleetlm.serve.counters import Counters, open_counters, to_nano
from fleetlm.serve.errors import BudgetExceeded, RateLimited
from fleetlm.serve.store import ApiKey, UsageStore

DEFAULT_MAX_TOKENS = 4096  # a request without max_tokens is reserved as if it asked for this many
TOKENS_PER_MESSAGE = 8  # chat template tokens around each message (role markers, separators)
RESERVATION_TTL_S = 900.0  # a reservation not settled by then (its replica died) no longer holds budget


def _text_bytes(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, str):
        return len(value.encode("utf-8"))
    if isinstance(value, list):
        if value and all(isinstance(v, int) for v in value):
            return len(value)  # token ids: one each
        return sum(_text_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_text_bytes(v) for v in value.values())
    return len(str(value).encode("utf-8"))


def prompt_token_bound(request: Any) -> int:
    """An upper bound on a request's prompt tokens, computed without any tokenizer."""
    if hasattr(request, "messages"):
        data = request.model_dump(include={"messages", "tools"}, exclude_none=True)
        return _text_bytes(data) + TOKENS_PER_MESSAGE * len(request.messages)
    if hasattr(request, "prompt"):
        return _text_bytes(request.prompt)
    return _text_bytes(getattr(request, "input", None))


class Limits:
    def __init__(self, config: FleetConfig, store: UsageStore, counters: Counters | None = None):
        self.config, self.store = config, store
        self.counters = counters or open_counters(config.counters or os.environ.get("FLEET_REDIS_URL"))

    # ------------------------------------------------------------ before the request runs

    def check_rate(self, key: ApiKey, request_id: str) -> None:
        if key.rpm is None and key.tpm is None:
            return
        hit = self.counters.admit_rate(key.key_id, request_id, key.rpm, key.tpm)
        if hit is not None:
            raise RateLimited(f"key {key.key_id}: {hit}")

    def worst_case(self, request: Any, models: list[list[str]]) -> float:
        """The most a request can cost: `models` lists, step by step, the chain of models each step may use
        (a plain request: one step; a checks ladder: one per rung)."""
        prompt = prompt_token_bound(request)
        limit = request.token_limit() if hasattr(request, "token_limit") else 0
        total = 0.0
        for step in models:
            for i, name in enumerate(step):
                spec = self.config.models.get(name)
                if spec is None:
                    continue
                completion = (limit if limit is not None else spec.max_context or DEFAULT_MAX_TOKENS)
                completion *= getattr(request, "n", 1) or 1
                # a fallback continues a partial answer: that answer is part of its prompt
                total += spec.price.cost(prompt + (completion if i else 0), completion)
        return total

    def reserve(self, key: ApiKey, request_id: str, worst_usd: float) -> None:
        if key.budget_usd is None:
            return
        admission = self.counters.reserve(
            key.key_id, to_nano(key.budget_usd), to_nano(worst_usd), request_id, RESERVATION_TTL_S,
            lambda: to_nano(self.store.spend(key.key_id)),
        )
        if not admission.admitted:
            if admission.spent_nano >= to_nano(key.budget_usd):
                raise BudgetExceeded(f"key {key.key_id}: budget of ${key.budget_usd:.2f} is spent")
            raise BudgetExceeded(
                f"key {key.key_id}: budget of ${key.budget_usd:.2f} is held by requests in flight; retry"
            )

    # ------------------------------------------------------------ after it

    def settle(self, key: ApiKey, request_id: str, cost_usd: float, tokens: int) -> float | None:
        """The request's exact cost replaces its reservation; the key's remaining budget (None: unlimited)."""
        if key.budget_usd is None and key.tpm is None:
            return None
        spent = self.counters.settle(key.key_id, request_id, to_nano(cost_usd), tokens)
        if key.budget_usd is None or spent is None:
            return None
        return key.budget_usd - spent / 1e9
