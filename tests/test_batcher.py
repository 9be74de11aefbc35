"""Continuous batching: every request gets the tokens it gets when run alone, whoever joins or leaves."""

from __future__ import annotations

import copy

import pytest
import torch

from fleetlm.engine import Engine, GenerationError, GenerationRequest
from fleetlm.engine import batcher as batcher_mod
from fleetlm.engine.batcher import Batcher, Speculation, run_all
from fleetlm.engine.speculative import DraftModel, PromptLookup
from fleetlm.model import SHIPPED_TINY_MODEL

PROMPTS = ["The fleet", "A quick brown fox jumps over", "Numbers: 0 1 2", "Hi",
           "The key and value cache keeps", "Bonjour, ça va?", "def add(a: int, b: int) -> int:",
           "User: What is the capital of France?"]


@pytest.fixture(scope="module")
def engine():
    torch.set_num_threads(1)
    return Engine.load(SHIPPED_TINY_MODEL, dtype="f32")


def alone(engine, request):
    return list(engine.generate([request]))


def reqs(**kw):
    # ignore_eos keeps the random model going, so that rows of different lengths overlap for long
    return [GenerationRequest(prompt=p, max_tokens=4 + 3 * i, ignore_eos=True, **kw)
            for i, p in enumerate(PROMPTS)]


def test_greedy_tokens_equal_each_request_alone(engine):
    requests = reqs()
    b = Batcher(engine.model, engine.tokenizer, max_batch=8)
    got = run_all(b, requests)
    for h, r in enumerate(requests):
        want = alone(engine, r)
        assert [e.token_id for e in got[h]] == [e.token_id for e in want]
        assert "".join(e.text for e in got[h]) == "".join(e.text for e in want)
        assert got[h][-1].finish_reason == want[-1].finish_reason == "length"
    assert b.peak_batch == len(requests) and not b.busy


def test_requests_joining_mid_flight_and_slots_reused(engine, monkeypatch):
    requests = reqs()
    b = Batcher(engine.model, engine.tokenizer, max_batch=3)  # fewer slots than requests: rows are reused
    monkeypatch.setattr(batcher_mod, "INITIAL_CACHE_LENGTH", 16)  # and the cache must grow mid-flight
    sizes: list[int] = []
    out: dict[int, list] = {}
    handles = [b.add(requests[0])]
    late = iter(requests[1:])
    step = 0
    while b.busy:
        for ev in b.step():
            out.setdefault(ev.request_index, []).append(ev)
        sizes.append(len(b.active))
        step += 1
        if step % 2 == 0:  # a newcomer every other step, while earlier rows are mid-decode
            nxt = next(late, None)
            if nxt is not None:
                handles.append(b.add(nxt))
    assert len(handles) == len(requests)
    assert max(sizes) == 3 and b.peak_batch == 3
    assert b.capacity > 16
    for h, r in zip(handles, requests, strict=True):
        assert [e.token_id for e in out[h]] == [e.token_id for e in alone(engine, r)]


def test_seeded_sampling_stop_strings_and_logprobs_match_alone(engine):
    requests = [
        GenerationRequest(prompt="The fleet", max_tokens=12, temperature=1.0, seed=3, logprobs=True),
        GenerationRequest(prompt="Hi there", max_tokens=12, temperature=0.8, top_k=20, top_p=0.9, seed=5),
        GenerationRequest(prompt="A quick", max_tokens=20, ignore_eos=True, stop=["e"]),
        GenerationRequest(prompt="Numbers", max_tokens=9, logprobs=True),
    ]
    got = run_all(Batcher(engine.model, engine.tokenizer, max_batch=4), requests)
    for h, r in enumerate(requests):
        want = alone(engine, r)
        assert [(e.token_id, e.text, e.finish_reason) for e in got[h]] == \
            [(e.token_id, e.text, e.finish_reason) for e in want]
        if r.logprobs:
            assert [e.logprob for e in got[h]] == pytest.approx([e.logprob for e in want], abs=1e-4)
            assert all(e.logprob <= 0 for e in got[h])
        else:
            assert all(e.logprob is None for e in got[h])
    stopped = "".join(e.text for e in got[2])
    assert "e" not in stopped and got[2][-1].finish_reason == "stop"


def test_a_finished_row_frees_its_slot_at_once(engine):
    b = Batcher(engine.model, engine.tokenizer, max_batch=2)
    short = b.add(GenerationRequest(prompt="Hi", max_tokens=1))
    long_ = b.add(GenerationRequest(prompt="The fleet", max_tokens=6, ignore_eos=True))
    waiting = b.add(GenerationRequest(prompt="A quick", max_tokens=3, ignore_eos=True))
    events = b.step()  # both admitted; the short one ends on its prefill token and leaves
    assert [e.request_index for e in events if e.finish_reason] == [short]
    assert [s.handle for s in b.active] == [long_] and [s.handle for s in b.waiting] == [waiting]
    b.step()  # the waiting request takes the freed slot on the next step
    assert sorted(s.handle for s in b.active) == [long_, waiting]


def test_cancel_frees_the_row_and_the_rest_continue(engine):
    requests = reqs()[:4]
    b = Batcher(engine.model, engine.tokenizer, max_batch=4)
    handles = [b.add(r) for r in requests]
    out: dict[int, list] = {h: [] for h in handles}
    for ev in b.step():
        out[ev.request_index].append(ev)
    b.cancel(handles[0])  # row 0 leaves; the last row moves into its slot
    assert len(b.active) == 3
    while b.busy:
        for ev in b.step():
            out[ev.request_index].append(ev)
    for h, r in zip(handles[1:], requests[1:], strict=True):
        assert [e.token_id for e in out[h]] == [e.token_id for e in alone(engine, r)]


def test_bad_requests_are_refused_at_add(engine):
    b = Batcher(engine.model, engine.tokenizer, max_batch=2, context=64)
    with pytest.raises(GenerationError, match="context"):
        b.add(GenerationRequest(prompt="x " * 40, max_tokens=40))
    with pytest.raises(GenerationError, match="max_tokens"):
        b.add(GenerationRequest(prompt="x", max_tokens=0))
    with pytest.raises(GenerationError, match="empty"):
        b.add(GenerationRequest(prompt_ids=[], max_tokens=3))
    with pytest.raises(GenerationError, match="token ids"):
        b.add(GenerationRequest(prompt_ids=[1, 10**6], max_tokens=3))
    assert not b.busy


class OnlyTokens:
    """A toy constraint (engine.constrain's protocol): the first tokens must come from `ids`, then EOS."""

    def __init__(self, ids: list[int], length: int, vocab: int) -> None:
        self.mask = torch.zeros(vocab, dtype=torch.bool)
        self.mask[ids] = True
        self.length, self.seen = length, []

    def allowed(self):
        return self.mask

    def advance(self, token_id: int) -> None:
        self.seen.append(token_id)

    def is_done(self) -> bool:
        return len(self.seen) >= self.length


def test_constrained_rows_follow_their_constraint_beside_free_rows(engine):
    vocab = engine.model.config.vocab_size
    allowed = [10, 11, 12]
    c = OnlyTokens(allowed, length=5, vocab=vocab)
    free = GenerationRequest(prompt="A quick", max_tokens=8, ignore_eos=True)
    requests = [GenerationRequest(prompt="The fleet", max_tokens=20, constraint=c), free]
    got = run_all(Batcher(engine.model, engine.tokenizer, max_batch=2), requests)
    tokens = [e.token_id for e in got[0]]
    assert tokens[:5] == c.seen[:5] and set(tokens[:5]) <= set(allowed)
    assert tokens[5] == engine.tokenizer.eos_token_ids[0] and got[0][-1].finish_reason == "stop"
    assert [e.token_id for e in got[1]] == [e.token_id for e in alone(engine, free)]


def test_compiled_bucketed_decode_gives_the_eager_tokens(engine):
    """The gateway's fast path: the batcher decodes through the compiled step, batch sizes padded to buckets
    (3 active rows run as 4, then fewer as rows finish), and every request gets its eager greedy tokens."""
    from torch._dynamo.utils import counters

    from fleetlm.engine.compiled import CompiledDecodeStep

    torch._dynamo.reset()
    requests = reqs()[:5]
    eager = run_all(Batcher(engine.model, engine.tokenizer, max_batch=4), requests)
    step = CompiledDecodeStep()
    b = Batcher(engine.model, engine.tokenizer, max_batch=4, decode_fn=step, initial_length=64)
    assert b.warm_up((1, 2)) > 0 and step.compile_seconds > 0
    graphs = counters["stats"]["unique_graphs"]
    got = run_all(b, requests)
    for h in range(len(requests)):
        assert [e.token_id for e in got[h]] == [e.token_id for e in eager[h]]
    assert b.peak_batch == 4
    # batch 2 and its bucket-4 padding: at most one more graph (none where the batch dimension is dynamic)
    assert counters["stats"]["unique_graphs"] - graphs <= 1


def test_compiled_step_on_our_kernels_serves_every_batch_size_from_one_graph():
    """bf16 on our kernels (engine/kernels): their linears keep the batch size symbolic, so after the warm-up
    (1 and 2 rows) batches of 3 and 4 run unpadded on the graph of 2, with the eager greedy tokens."""
    from torch._dynamo.utils import counters

    from fleetlm.engine import kernels
    from fleetlm.engine.compiled import CompiledDecodeStep

    if not kernels.available():
        pytest.skip("our kernels do not build here")
    torch._dynamo.reset()
    eng = Engine.load(SHIPPED_TINY_MODEL, dtype="bf16")
    requests = reqs()[:4]
    eager = run_all(Batcher(eng.model, eng.tokenizer, max_batch=4), requests)
    step = CompiledDecodeStep()
    b = Batcher(eng.model, eng.tokenizer, max_batch=4, decode_fn=step, initial_length=64)
    b.warm_up((1, 2))
    assert step.dynamic_batch  # the warm-up's batch of 3 reused the graph of 2
    graphs = counters["stats"]["unique_graphs"]
    got = run_all(b, requests)
    for h in range(len(requests)):
        assert [e.token_id for e in got[h]] == [e.token_id for e in eager[h]]
    assert b.peak_batch == 4 and counters["stats"]["unique_graphs"] == graphs


def test_warm_up_refuses_a_busy_batcher(engine):
    from fleetlm.engine.compiled import CompiledDecodeStep

    b = Batcher(engine.model, engine.tokenizer, max_batch=2, decode_fn=CompiledDecodeStep())
    b.add(GenerationRequest(prompt="Hi", max_tokens=2))
    with pytest.raises(GenerationError, match="idle"):
        b.warm_up((1,))
    assert Batcher(engine.model, engine.tokenizer).warm_up() == 0.0  # eager: nothing to compile


@pytest.fixture(scope="module")
def model64(engine):
    # float64: a verify forward and a decode step sum in different orders (torch's f32 GEMM is not
    # row-independent); in float64 that cannot flip a greedy token, so equality is tested exactly
    return copy.deepcopy(engine.model).double()


def test_a_lone_request_speculates_and_gets_the_plain_tokens(engine, model64):
    request = GenerationRequest(prompt="one two three one two three one two three", max_tokens=40,
                                ignore_eos=True)
    want = run_all(Batcher(model64, engine.tokenizer), [request])[0]
    b = Batcher(model64, engine.tokenizer, speculation=Speculation(DraftModel(copy.deepcopy(model64))))
    got = run_all(b, [request])[0]
    assert [e.token_id for e in got] == [e.token_id for e in want]
    assert "".join(e.text for e in got) == "".join(e.text for e in want)
    drafted, kept = got[-1].draft
    assert drafted > 0 and kept == drafted  # the model drafting for itself: every draft is kept
    assert b.decode_steps < 20  # several tokens a step
    assert got[-1].finish_reason == "length" and not b.busy


def test_speculation_hands_over_to_batching_when_others_join(engine, model64):
    requests = reqs()[:4]
    want = run_all(Batcher(model64, engine.tokenizer, max_batch=4), requests)
    b = Batcher(model64, engine.tokenizer, max_batch=4, speculation=Speculation(PromptLookup()))
    out: dict[int, list] = {}
    handles = [b.add(requests[3])]  # the longest first, alone: it speculates
    for _ in range(3):
        for ev in b.step():
            out.setdefault(ev.request_index, []).append(ev)
    handles += [b.add(r) for r in requests[:3]]  # the others join: plain batched steps from here
    while b.busy:
        for ev in b.step():
            out.setdefault(ev.request_index, []).append(ev)
    assert b.peak_batch == 4
    for h, want_h in zip(handles, [want[3], want[0], want[1], want[2]], strict=True):
        assert [e.token_id for e in out[h]] == [e.token_id for e in want_h]


def test_logprobs_and_seeded_sampled_requests_decode_plainly(engine):
    b = Batcher(engine.model, engine.tokenizer, speculation=Speculation(PromptLookup()))
    seeded = GenerationRequest(prompt="Hi", max_tokens=6, temperature=0.8, seed=3, ignore_eos=True)
    for request in (GenerationRequest(prompt="Hi", max_tokens=6, logprobs=True, ignore_eos=True), seeded):
        [got] = run_all(b, [request]).values()
        assert got[-1].draft is None and len(got) == 6
    [again] = run_all(b, [seeded]).values()
    assert [e.token_id for e in again] == [e.token_id for e in alone(engine, seeded)]
