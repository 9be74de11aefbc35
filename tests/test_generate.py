"""The generation loop: first on a toy model whose next token is known (loop logic), then on real tiny
checkpoints of the three families against transformers' generate (numerics)."""

import os
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fleetlm.engine.generate import (
    CACHE_BLOCK,
    GenerationError,
    GenerationRequest,
    GenerationStats,
    encode_request,
    generate,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 256


class CountingModel(nn.Module):
    """Predicts token+1 (mod 256) with certainty; records the positions it is called with."""

    def __init__(self, context: int = 512) -> None:
        super().__init__()
        self.config = SimpleNamespace(max_position_embeddings=context)
        self.bias = nn.Parameter(torch.zeros(VOCAB))
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.cache_shape = None
        self.max_batch_size = self.max_seq_length = 0
        self.setups = 0

    def setup_caches(self, max_batch_size, max_seq_length, dtype=None):
        self.cache_shape = (max_batch_size, max_seq_length)
        self.max_batch_size, self.max_seq_length = max_batch_size, max_seq_length
        self.setups += 1

    def forward(self, idx, input_pos=None, kv_len=None, last=None):
        self.calls.append((idx.clone(), input_pos.clone()))
        logits = nn.functional.one_hot((idx + 1) % VOCAB, VOCAB).float() * 20 + self.bias
        return logits if last is None else logits[torch.arange(idx.shape[0]), last][:, None]


class ByteTokenizer:
    """Token id = byte value; id 0 is end-of-sequence."""

    eos_token_ids = [0]

    def encode(self, text, add_special_tokens=True):
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens=True):
        return bytes(i for i in ids if i != 0).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt=True, **kwargs):
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


def run(requests, model=None, stats=None):
    model = model or CountingModel()
    return list(generate(model, ByteTokenizer(), requests, stats=stats))


def test_max_tokens_gives_length_and_streams_every_token():
    events = run([GenerationRequest(prompt="a", max_tokens=5)])
    assert [e.token_id for e in events] == [ord(c) for c in "bcdef"]
    assert "".join(e.text for e in events) == "bcdef"
    assert [e.finish_reason for e in events] == [None] * 4 + ["length"]
    assert all(e.request_index == 0 for e in events)


def test_eos_stops_and_is_not_in_the_text():
    events = run([GenerationRequest(prompt_ids=[253], max_tokens=10)])
    assert [e.token_id for e in events] == [254, 255, 0]
    assert events[-1].finish_reason == "stop"


def test_ignore_eos_runs_past_it():
    events = run([GenerationRequest(prompt_ids=[254], max_tokens=4, ignore_eos=True)])
    assert [e.token_id for e in events] == [255, 0, 1, 2]
    assert events[-1].finish_reason == "length"


def test_stop_token_ids():
    events = run([GenerationRequest(prompt="a", max_tokens=10, stop_token_ids=[ord("d")])])
    assert "".join(e.text for e in events) == "bc"
    assert events[-1].token_id == ord("d") and events[-1].finish_reason == "stop"


def test_stop_string_across_tokens_is_held_back_then_cut():
    events = run([GenerationRequest(prompt="a", max_tokens=20, stop=["efg"])])
    texts = [e.text for e in events]
    assert "".join(texts) == "bcd"
    # "e" and "f" could start "efg", so they were never released; the stream ends on "g".
    assert texts == ["b", "c", "d", "", "", ""]
    assert events[-1].finish_reason == "stop"


def test_stop_string_completed_by_last_allowed_token_still_counts_as_stop():
    events = run([GenerationRequest(prompt="a", max_tokens=3, stop=["cd"])])
    assert "".join(e.text for e in events) == "b"
    assert events[-1].finish_reason == "stop"


def test_held_back_text_is_flushed_at_max_tokens():
    events = run([GenerationRequest(prompt="a", max_tokens=3, stop=["dX"])])
    assert "".join(e.text for e in events) == "bcd"
    assert events[-1].finish_reason == "length"


def test_unfinished_character_is_held_then_flushed_at_the_end():
    # C3 opens a two-byte character; C4 cannot continue it, so the stream ends on two replacement chars.
    events = run([GenerationRequest(prompt_ids=[0xC2], max_tokens=2)])
    assert [e.text for e in events] == ["", "\ufffd\ufffd"]


def test_batch_rows_use_own_positions_and_finish_independently():
    model = CountingModel()
    reqs = [GenerationRequest(prompt="abc", max_tokens=2), GenerationRequest(prompt="x", max_tokens=4),
            GenerationRequest(prompt="mn", max_tokens=6, stop=["q"])]
    events = run(reqs, model)
    texts = ["", "", ""]
    finish = [None, None, None]
    for e in events:
        assert finish[e.request_index] is None, "no event after a row finished"
        texts[e.request_index] += e.text
        finish[e.request_index] = e.finish_reason
    assert texts == ["de", "yz{|", "op"]
    assert finish == ["length", "length", "stop"]
    # Prefill: right-padded prompts at positions 0..T-1; decode: each row at its own next slot.
    idx, pos = model.calls[0]
    assert idx.tolist() == [[97, 98, 99], [120, 0, 0], [109, 110, 0]]
    assert pos.tolist() == [[0, 1, 2]] * 3
    assert model.calls[1][1].view(-1).tolist() == [3, 1, 2]
    assert model.calls[2][1].view(-1).tolist() == [4, 2, 3]
    assert len(model.calls) == 4  # the loop stops once every row is done
    assert model.cache_shape == (3, CACHE_BLOCK)  # 3 + 6 slots needed, allocated as a whole block


def test_caches_are_reused_while_big_enough_and_grow_by_blocks():
    model = CountingModel(context=4096)
    tok = ByteTokenizer()
    list(generate(model, tok, [GenerationRequest(prompt="abc", max_tokens=6)] * 2))
    list(generate(model, tok, [GenerationRequest(prompt="a", max_tokens=100)]))  # fewer rows, fits
    assert model.setups == 1 and model.cache_shape == (2, CACHE_BLOCK)
    list(generate(model, tok, [GenerationRequest(prompt="a", max_tokens=CACHE_BLOCK + 5)]))
    assert model.setups == 2 and model.cache_shape == (1, 2 * CACHE_BLOCK)


def test_events_come_in_step_order():
    events = run([GenerationRequest(prompt="a", max_tokens=2), GenerationRequest(prompt="k", max_tokens=2)])
    assert [(e.request_index, e.text) for e in events] == [(0, "b"), (1, "l"), (0, "c"), (1, "m")]


def test_chat_messages_go_through_the_template():
    tok = ByteTokenizer()
    ids = encode_request(tok, GenerationRequest(messages=[{"role": "user", "content": "hi"}]))
    assert bytes(ids).decode() == "<user>hi<assistant>"


def test_logprobs_only_when_asked():
    events = run([GenerationRequest(prompt="a", max_tokens=2, logprobs=True),
                  GenerationRequest(prompt="a", max_tokens=2)])
    lp = [e.logprob for e in events if e.request_index == 0]
    assert all(x is not None and -1e-3 < x <= 0 for x in lp)  # the toy model is certain
    assert all(e.logprob is None for e in events if e.request_index == 1)


def test_stats_count_prompt_and_decode_tokens():
    stats = GenerationStats()
    run([GenerationRequest(prompt="abcd", max_tokens=5)], stats=stats)
    assert stats.prompt_tokens == 4
    assert stats.decode_tokens == 4  # the first new token comes from prefill
    assert stats.decode_tokens_per_second > 0 and stats.prefill_tokens_per_second > 0


@pytest.mark.parametrize("request_", [
    GenerationRequest(prompt="", max_tokens=3),
    GenerationRequest(prompt="a", prompt_ids=[1]),
    GenerationRequest(max_tokens=3),
    GenerationRequest(prompt="a", max_tokens=0),
    GenerationRequest(prompt="a" * 500, max_tokens=100),
])
def test_bad_requests_raise_generation_error(request_):
    with pytest.raises(GenerationError):
        run([request_])


def test_seeded_sampling_reproducible_on_toy_model():
    model = CountingModel()
    with torch.no_grad():
        model.bias.copy_(torch.linspace(0, 19, VOCAB))  # blur the certainty so sampling has choices
    req = GenerationRequest(prompt="a", max_tokens=12, temperature=3.0, seed=11)
    a = [e.token_id for e in run([req], model)]
    b = [e.token_id for e in run([req], model)]
    other = GenerationRequest(prompt="a", max_tokens=12, temperature=3.0, seed=12)
    c = [e.token_id for e in run([other], model)]
    assert a == b
    assert a != c
