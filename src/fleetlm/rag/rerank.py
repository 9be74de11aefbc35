"""Reranking search results with a fleet model: each (question, passage) pair judged "yes" or "no".

A search asks for it with `ranking_options.ranker: "fleet:<model>"` (any chat model of the fleet). The
first `depth` fused results (at most MAX_DEPTH, so one search costs at most that many one-token answers)
are each put to the model as "does this passage answer the question? yes or no" at temperature 0 with one
output token, and ordered by P(yes): the chosen token's probability if it says yes, one minus it if it
says no (the fleet's engines return the chosen token's logprob, not a top-k list), 0 for anything else.
Ties keep the fused order. The judged results carry P(yes) as their `score`; results past `depth` follow
in fused order, their scores capped at the lowest P(yes) so that scores still fall down the list.
Passages are cut to PASSAGE_CHARS for the judgement (a cost bound: the prompt is most of the price).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

FLEET_PREFIX = "fleet:"
OPENAI_RANKERS = {"auto", "default-2024-11-15", "none"}  # accepted as OpenAI's names: the default fusion
DEFAULT_DEPTH = 10
MAX_DEPTH = 20
PASSAGE_CHARS = 1500
SYSTEM = "You judge whether a documentation passage answers a question. Reply with yes or no."

Judge = Callable[[str, str], Awaitable[float]]


def fleet_ranker(value: Any) -> str | None:
    """The model named by a `fleet:<model>` ranker, else None (OpenAI's own rankers, or no ranker)."""
    if isinstance(value, str) and value.startswith(FLEET_PREFIX):
        return value[len(FLEET_PREFIX) :]
    return None


def judgement_messages(question: str, passage: str) -> list[dict]:
    """The chat messages that ask for one yes/no judgement."""
    text = passage if len(passage) <= PASSAGE_CHARS else passage[:PASSAGE_CHARS] + " ..."
    return [
        {"role": "system", "content": SYSTEM},
        {
            "role": "user",
            "content": f"Question: {question}\n\nPassage:\n{text}\n\n"
            "Does the passage answer the question? Answer yes or no.",
        },
    ]


def p_yes(text: str | None, logprob: float | None) -> float:
    """P(yes) from the first answer token and its logprob (a missing logprob counts as certainty)."""
    word = (text or "").strip().lower()
    p = math.exp(logprob) if logprob is not None else 1.0
    if word.startswith("yes"):
        return p
    if word.startswith("no"):
        return 1.0 - p
    return 0.0


def first_logprob(logprobs: dict | None) -> float | None:
    """The first token's logprob in OpenAI's chat shape {"content": [{"token", "logprob", ...}]}."""
    content = (logprobs or {}).get("content") or []
    return float(content[0]["logprob"]) if content and "logprob" in content[0] else None


def backend_judge(backend: Any, model: str) -> Judge:
    """A Judge over a gateway Backend (its `chat`), one single-token answer per call."""
    from fleetlm.serve.protocol import ChatCompletionRequest

    async def judge(question: str, passage: str) -> float:
        request = ChatCompletionRequest(
            model=model,
            messages=judgement_messages(question, passage),
            max_tokens=1,
            temperature=0,
            logprobs=True,
        )
        generation = await backend.chat(request)
        choice = generation.choices[0]
        return p_yes(choice.text, first_logprob(choice.logprobs))

    return judge


async def rerank(question: str, hits: Sequence[dict], judge: Judge, depth: int = DEFAULT_DEPTH) -> list[dict]:
    """`hits` (search results, best first, each with `text` and `score`) with the first `depth` reordered by
    the judge's P(yes). The judgements run concurrently, so a batching engine takes them together."""
    depth = max(0, min(depth, MAX_DEPTH, len(hits)))
    head, tail = list(hits[:depth]), [dict(h) for h in hits[depth:]]
    if not head:
        return tail
    probs = await asyncio.gather(*(judge(question, h["text"]) for h in head))
    order = sorted(range(len(head)), key=lambda i: (-probs[i], i))
    judged = [{**head[i], "score": round(float(probs[i]), 6)} for i in order]
    floor = judged[-1]["score"]
    for hit in tail:
        hit["score"] = min(hit["score"], floor)
    return judged + tail
