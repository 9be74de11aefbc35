import asyncio
import math

import pytest

from fleetlm.rag.rerank import (
    MAX_DEPTH,
    PASSAGE_CHARS,
    backend_judge,
    first_logprob,
    fleet_ranker,
    judgement_messages,
    p_yes,
    rerank,
)
from fleetlm.serve.backends import Choice, Generation


def hits(*texts):
    return [{"text": t, "score": round(1.0 - i / 10, 6), "file_id": f"f{i}"} for i, t in enumerate(texts)]


def keyword_judge(word):
    async def judge(question, passage):
        return 0.9 if word in passage else 0.1

    return judge


def test_fleet_ranker_names_the_model_only_with_the_prefix():
    assert fleet_ranker("fleet:qwen2.5-coder-0.5b-instruct") == "qwen2.5-coder-0.5b-instruct"
    assert fleet_ranker("auto") is None and fleet_ranker(None) is None and fleet_ranker(3) is None


def test_p_yes_reads_the_first_token_either_way():
    assert p_yes(" Yes", math.log(0.8)) == pytest.approx(0.8)
    assert p_yes("no", math.log(0.8)) == pytest.approx(0.2)
    assert p_yes("maybe", math.log(0.9)) == 0.0
    assert p_yes("yes", None) == 1.0
    assert first_logprob({"content": [{"token": "yes", "logprob": -0.5}]}) == -0.5
    assert first_logprob(None) is None and first_logprob({"content": []}) is None


def test_long_passages_are_cut_for_the_judgement():
    long = "word " * 2000
    user = judgement_messages("q?", long)[1]["content"]
    assert len(user) < PASSAGE_CHARS + 200 and user.startswith("Question: q?")


def test_rerank_moves_the_judged_relevant_hit_up_and_keeps_ties_in_order():
    four = hits("alpha", "beta", "gamma target", "delta target")
    ranked = asyncio.run(rerank("q", four, keyword_judge("target")))
    assert [h["text"] for h in ranked] == ["gamma target", "delta target", "alpha", "beta"]
    assert [h["score"] for h in ranked] == [0.9, 0.9, 0.1, 0.1]


def test_rerank_depth_bounds_the_calls_and_caps_the_tail_scores():
    calls = []

    async def judge(question, passage):
        calls.append(passage)
        return 0.05

    many = hits(*[f"p{i}" for i in range(30)])
    ranked = asyncio.run(rerank("q", many, judge, depth=3))
    assert len(calls) == 3 and [h["text"] for h in ranked] == [h["text"] for h in many]
    assert all(h["score"] <= 0.05 for h in ranked)
    calls.clear()
    asyncio.run(rerank("q", many, judge, depth=100))
    assert len(calls) == MAX_DEPTH
    assert asyncio.run(rerank("q", [], judge)) == []


class OneTokenBackend:
    """Answers yes (p 0.7) when the passage holds 'fox', else no (p 0.6); records the requests."""

    def __init__(self):
        self.requests = []

    async def chat(self, request):
        self.requests.append(request)
        yes = "fox" in request.messages[1].content
        token, p = ("yes", 0.7) if yes else ("no", 0.6)
        lp = {"content": [{"token": token, "logprob": math.log(p), "top_logprobs": []}]}
        return Generation([Choice(0, token, "length", None, lp)], prompt_tokens=40, completion_tokens=1)


def test_backend_judge_asks_one_token_at_temperature_zero():
    backend = OneTokenBackend()
    ranked = asyncio.run(rerank("which animal?", hits("a dog", "a fox"), backend_judge(backend, "m")))
    assert [h["text"] for h in ranked] == ["a fox", "a dog"]
    assert ranked[0]["score"] == pytest.approx(0.7) and ranked[1]["score"] == pytest.approx(0.4)
    req = backend.requests[0]
    assert req.model == "m" and req.max_tokens == 1 and req.temperature == 0 and req.logprobs
