"""Speculative decoding (engine/speculative.py): lossless greedy, the target's distribution under sampling."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from fleetlm.engine.generate import GenerationError
from fleetlm.engine.sampling import SamplingParams
from fleetlm.engine.speculative import (
    Draft,
    DraftLength,
    DraftModel,
    PromptLookup,
    SpeculativeStats,
    accept_sampled,
    full_probs,
    measure_verify_cost,
    speculative_generate,
)
from fleetlm.model.config import ModelConfig
from fleetlm.model.decoder import Transformer


def _model(seed: int, layers: int = 2, hidden: int = 64, vocab: int = 120) -> Transformer:
    # float64: the verify forward (T rows) and a decode step (1 row) sum in different orders; in float64 the
    # difference (~1e-16) cannot flip a greedy token, so "identical to plain decoding" is tested exactly
    torch.manual_seed(seed)
    cfg = ModelConfig(arch="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_layers=layers, num_heads=4, num_kv_heads=2, max_position_embeddings=512)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0.0, 0.15)
    return model.double().eval()


def _plain_greedy(model: Transformer, prompt: list[int], n: int) -> list[int]:
    from fleetlm.bench.agreement import greedy_tokens

    return greedy_tokens(model, prompt, n)


@pytest.fixture(scope="module")
def target() -> Transformer:
    return _model(0)


def _repetitive_prompt() -> list[int]:
    # a "document" the continuation tends to copy from: lookup drafts get accepted
    return [3, 17, 29, 41, 5, 8, 17, 29, 41, 5, 8, 90, 17, 29, 41]


@pytest.mark.parametrize("drafter_kind", ["lookup", "model", "self"])
def test_greedy_output_identical_to_plain_decoding(target: Transformer, drafter_kind: str) -> None:
    prompt = _repetitive_prompt()
    want = _plain_greedy(target, prompt, 40)
    drafter = {"lookup": lambda: PromptLookup(), "model": lambda: DraftModel(_model(1, layers=1)),
               "self": lambda: DraftModel(_model(0))}[drafter_kind]()
    stats = SpeculativeStats()
    got = list(speculative_generate(target, prompt, drafter, max_tokens=40, stats=stats))
    assert got == want
    assert stats.emitted == 40 and stats.rounds < 40  # some rounds emitted more than one token
    if drafter_kind == "self":  # the target drafting for itself: every draft is kept
        assert stats.drafted > 0 and stats.accepted == stats.drafted
        assert stats.tokens_per_round > 3
    if drafter_kind == "model":  # an unrelated random draft: mostly rejected, output unchanged anyway
        assert stats.acceptance_rate < 0.9


def test_stop_token_and_max_tokens_end_the_stream(target: Transformer) -> None:
    prompt = _repetitive_prompt()
    want = _plain_greedy(target, prompt, 30)
    stop = want[12]
    first = want.index(stop)
    got = list(speculative_generate(target, prompt, DraftModel(_model(0)), max_tokens=30, stop_ids=[stop]))
    assert got == want[: first + 1]
    assert list(speculative_generate(target, prompt, PromptLookup(), max_tokens=7)) == want[:7]
    assert list(speculative_generate(target, prompt, PromptLookup(), max_tokens=1)) == want[:1]


def test_bad_requests_are_typed_errors(target: Transformer) -> None:
    with pytest.raises(GenerationError, match="empty"):
        list(speculative_generate(target, [], PromptLookup(), max_tokens=4))
    with pytest.raises(GenerationError, match="max_tokens"):
        list(speculative_generate(target, [1, 2], PromptLookup(), max_tokens=0))
    with pytest.raises(GenerationError, match="context"):
        list(speculative_generate(target, [1] * 500, PromptLookup(), max_tokens=20))
    with pytest.raises(GenerationError, match="ngram"):
        PromptLookup(ngram_max=1, ngram_min=2)


def test_prompt_lookup_copies_what_followed_the_last_earlier_occurrence() -> None:
    lookup, greedy = PromptLookup(ngram_max=2), SamplingParams()
    seq = [1, 2, 3, 4, 5, 9, 2, 3, 6, 7, 2, 3]
    # the final bigram (2, 3) last occurred before at 6..7, followed by 6, 7
    assert lookup.propose(seq, 3, greedy, None).tokens == [6, 7, 2]
    assert lookup.propose([*seq, 8], 3, greedy, None).tokens == []  # 8 never occurred before
    assert lookup.propose([*seq, 8, 4], 2, greedy, None).tokens == [5, 9]  # unigram fallback
    assert lookup.propose([5, 6, 5], 4, greedy, None).tokens == [6, 5]  # a new text: the index starts over


def test_draft_length_follows_acceptance_and_cost() -> None:
    sure, unsure = DraftLength(acceptance=0.95), DraftLength(acceptance=0.1)
    assert sure.k >= 3 and unsure.k == 0  # a plain step beats verifying guesses that fail 9 times in 10
    # rows that cost nothing extra (a memory-bound verify, as on a GPU): draft as far as allowed
    assert DraftLength(acceptance=0.95, verify_cost=(1.0,) * 13).k == 12
    assert DraftLength(acceptance=0.1, low=1).k == 1
    cheap, costly = DraftLength(acceptance=0.7), DraftLength(acceptance=0.7, draft_cost=0.5)
    assert 0 < costly.k < cheap.k
    assert cheap.cost(20) > cheap.cost(12) > cheap.cost(0) == 1.0  # past the table: its last slope
    for _ in range(20):
        unsure.observe(drafted=6, kept=6)
    assert unsure.acceptance > 0.8 and unsure.k >= 6
    for _ in range(20):
        unsure.observe(drafted=4, kept=0)
    assert unsure.acceptance < 0.05 and unsure.k == 0
    before = unsure.acceptance
    unsure.observe(drafted=0, kept=0)  # no draft: no evidence either way
    assert unsure.acceptance == before


def test_measured_verify_cost_is_a_ratio_to_one_row(target: Transformer) -> None:
    cost = measure_verify_cost(target, rows=5, context=16, reps=2)
    assert len(cost) == 5 and cost[0] == 1.0 and all(c >= 1.0 for c in cost)


def test_lookup_that_never_guesses_right_stops_drafting(target: Transformer) -> None:
    """A drafter whose guesses all fail: after a few rejected drafts the loop decodes plainly (one row per
    round), and the output is still plain decoding's."""

    class Wrong:
        free = True

        def propose(self, seq, k, params, generator):  # noqa: ANN001, ANN202
            return Draft([(seq[-1] + 1 + i) % 120 for i in range(k)])

        def keep(self, length: int) -> None:
            pass

    prompt, stats = _repetitive_prompt(), SpeculativeStats()
    got = list(speculative_generate(target, prompt, Wrong(), max_tokens=30, stats=stats))
    assert got == _plain_greedy(target, prompt, 30)
    assert stats.drafted < 20 and stats.rounds >= 25


def _chi_square_p(counts: Counter[int], probs: torch.Tensor, n: int) -> float:
    """p-value of Pearson's test that `counts` came from `probs` (cells with expectation < 5 pooled)."""
    from scipy.stats import chi2

    expected = (probs * n).tolist()
    stat, pooled_obs, pooled_exp, dof = 0.0, 0, 0.0, -1
    for token, e in enumerate(expected):
        if e >= 5:
            stat += (counts[token] - e) ** 2 / e
            dof += 1
        else:
            pooled_obs, pooled_exp = pooled_obs + counts[token], pooled_exp + e
    if pooled_exp > 0:
        stat += (pooled_obs - pooled_exp) ** 2 / pooled_exp
        dof += 1
    return float(chi2.sf(stat, dof))


@pytest.mark.parametrize("draft_kind", ["model", "point"])
def test_rejection_sampling_preserves_the_target_distribution(draft_kind: str) -> None:
    """accept_sampled's output token follows p whatever q is: 20,000 draws, chi-square against p."""
    torch.manual_seed(0)
    vocab, n = 12, 20_000
    params = SamplingParams(temperature=0.8, top_k=10)
    target_logits = torch.randn(2, vocab, dtype=torch.float64) * 1.5
    q = torch.softmax(torch.randn(vocab, dtype=torch.float64) * 1.5, dim=-1)
    p0 = full_probs(target_logits[0], params)
    gen = torch.Generator().manual_seed(1)
    counts: Counter[int] = Counter()
    for _ in range(n):
        if draft_kind == "model":
            token = int(torch.multinomial(q, 1, generator=gen))
            draft = Draft([token], q[None])
        else:
            draft = Draft([int(torch.argmax(q))])  # a lookup draft: always the same token, q a point mass
        kept, nxt = accept_sampled(draft, target_logits, params, gen)
        counts[draft.tokens[0] if kept else nxt] += 1  # the first emitted token
    assert sum(counts[t] for t in range(vocab) if p0[t] == 0) == 0  # nothing outside top-k
    assert _chi_square_p(counts, p0, n) > 1e-3


def test_sampled_speculative_stream_follows_plain_sampling(target: Transformer) -> None:
    """Whole streams: the second token's distribution under speculative sampling (draft: an unrelated model)
    equals the target's marginal, estimated exactly by enumerating the first token."""
    prompt = [3, 17, 29, 41]
    params = SamplingParams(temperature=1.0, top_k=6)
    with torch.no_grad():
        logits = target(torch.tensor([prompt]))[0, -1]
        p1 = full_probs(logits, params)
        second = torch.zeros_like(p1)
        for t in torch.nonzero(p1).view(-1).tolist():
            nxt = target(torch.tensor([[*prompt, t]]))[0, -1]
            second += p1[t] * full_probs(nxt, params)
    gen = torch.Generator().manual_seed(0)
    drafter, counts, n = DraftModel(_model(1, layers=1)), Counter(), 1500
    for _ in range(n):
        out = list(speculative_generate(target, prompt, drafter, max_tokens=3, params=params, generator=gen,
                                        draft_length=DraftLength(low=1, high=1)))
        counts[out[1]] += 1
    assert _chi_square_p(counts, second, n) > 1e-3
    assert math.isclose(float(second.sum()), 1.0, rel_tol=1e-9)


def test_draft_model_refills_a_cache_that_grew() -> None:
    """The draft's KV cache grows in blocks of 512 slots; a new cache holds nothing, so the draft feeds the
    whole text again (before this, its drafts past slot 512 read zeroed keys and were mostly rejected)."""
    target = _model(0, vocab=120)
    target.config.max_position_embeddings = 1100
    torch.manual_seed(3)
    prompt = torch.randint(0, 120, (500,)).tolist()
    draft = _model(0, vocab=120)
    draft.config.max_position_embeddings = 1100
    stats = SpeculativeStats()
    got = list(speculative_generate(target, prompt, DraftModel(draft), max_tokens=40, stats=stats))
    assert got == _plain_greedy(target, prompt, 40)
    assert draft.max_seq_length > 512 and stats.accepted == stats.drafted > 0
