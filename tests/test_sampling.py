import pytest
import torch

from fleetlm.engine.sampling import (
    Detokenizer,
    SamplingError,
    SamplingParams,
    StopStrings,
    logits_to_probs,
    make_generator,
    sample,
    sample_row,
)


def test_greedy_is_argmax_per_row():
    logits = torch.tensor([[0.1, 3.0, -1.0], [5.0, 0.0, 4.9]])
    out = sample(logits, [SamplingParams(), SamplingParams()], [None, None])
    assert out.tolist() == [1, 0]


def test_top_k_one_is_greedy_even_with_temperature():
    logits = torch.randn(50)
    for seed in range(5):
        tok = sample_row(logits, SamplingParams(temperature=2.0, top_k=1), make_generator(seed))
        assert int(tok) == int(torch.argmax(logits))


def test_same_seed_same_tokens_different_seed_differs():
    logits = torch.zeros(1000)  # uniform: every draw is pure noise
    params = SamplingParams(temperature=1.0)

    def draws(seed):
        g = make_generator(seed)
        return [int(sample_row(logits, params, g)) for _ in range(20)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_rows_with_own_seeds_do_not_depend_on_each_other():
    logits = torch.zeros(3, 500)
    params = [SamplingParams(temperature=1.0)] * 3
    a = sample(logits, params, [make_generator(1), make_generator(2), make_generator(3)])
    b = sample(logits[1:], params[1:], [make_generator(2), make_generator(3)])
    assert a[1:].tolist() == b.tolist()


def test_temperature_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = probs.log()
    g = make_generator(0)
    counts = torch.zeros(3)
    n = 4000
    for _ in range(n):
        counts[int(sample_row(logits, SamplingParams(temperature=1.0), g))] += 1
    assert torch.allclose(counts / n, probs, atol=0.03)


def test_low_temperature_sharpens():
    logits = torch.tensor([1.0, 0.0])
    probs, ids = logits_to_probs(logits, SamplingParams(temperature=0.1))
    assert ids is None
    assert probs[0] > 0.9999


def test_top_k_keeps_only_k_best():
    logits = torch.tensor([0.0, 5.0, 1.0, 4.0, 3.0])
    probs, ids = logits_to_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    assert sorted(ids.tolist()) == [1, 3]
    g = make_generator(3)
    seen = {int(sample_row(logits, SamplingParams(temperature=5.0, top_k=2), g)) for _ in range(200)}
    assert seen == {1, 3}


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    kept, ids = logits_to_probs(logits, SamplingParams(temperature=1.0, top_p=0.7))
    # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: the two best survive, renormalized.
    full = torch.zeros(4).scatter(0, ids, kept)
    assert torch.allclose(full, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=1e-6)
    g = make_generator(1)
    seen = {int(sample_row(logits, SamplingParams(temperature=1.0, top_p=0.7), g)) for _ in range(300)}
    assert seen == {0, 1}


def test_top_p_tiny_keeps_the_best_token():
    logits = torch.tensor([0.0, 2.0, 1.0])
    g = make_generator(0)
    assert {int(sample_row(logits, SamplingParams(temperature=1.0, top_p=1e-6), g)) for _ in range(50)} == {1}


def test_top_k_then_top_p():
    logits = torch.tensor([3.0, 2.9, 2.8, -5.0, 2.7])
    probs, ids = logits_to_probs(logits, SamplingParams(temperature=1.0, top_k=3, top_p=0.5))
    kept = ids[probs > 0].tolist()
    assert kept == [0, 1]


@pytest.mark.parametrize("kwargs", [{"temperature": -1.0}, {"top_k": -2}, {"top_p": 0.0}, {"top_p": 1.5}])
def test_bad_parameters_raise_typed_error(kwargs):
    with pytest.raises(SamplingError):
        SamplingParams(**kwargs)


def _stream(stops, deltas):
    s = StopStrings(stops)
    out, stopped = [], False
    for d in deltas:
        text, stopped = s.push(d)
        out.append(text)
        if stopped:
            break
    if not stopped:
        out.append(s.flush())
    return out, stopped


def test_stop_string_inside_one_delta():
    out, stopped = _stream(["STOP"], ["hello STOP world"])
    assert stopped and "".join(out) == "hello "


def test_stop_string_straddling_deltas_is_held_back():
    s = StopStrings(["</end>"])
    assert s.push("abc</") == ("abc", False)  # "</" might start the stop string: held
    assert s.push("en") == ("", False)
    assert s.push("d> tail") == ("", True)


def test_held_text_is_released_when_it_cannot_start_a_stop():
    s = StopStrings(["</end>"])
    assert s.push("a</e") == ("a", False)
    assert s.push("x") == ("</ex", False)


def test_no_stop_hit_flushes_everything():
    out, stopped = _stream(["###"], ["a #", "# b", " #"])
    assert not stopped and "".join(out) == "a ## b #"


def test_earliest_of_several_stops_wins():
    out, stopped = _stream(["world", "lo"], ["hello world"])
    assert stopped and "".join(out) == "hel"


def test_no_stops_releases_immediately():
    s = StopStrings([])
    assert s.push("abc") == ("abc", False)


class _ByteTokens:
    """A toy byte-level tokenizer: each id is one byte; bad UTF-8 decodes to U+FFFD like `tokenizers` does."""

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def test_detokenizer_never_splits_a_character():
    text = "héllo 世界 🙂!"
    ids = list(text.encode("utf-8"))
    d = Detokenizer(_ByteTokens().decode)
    deltas = [d.push(i) for i in ids]
    assert "".join(deltas) + d.flush() == text
    assert all("\ufffd" not in x for x in deltas)
    # The four bytes of the emoji produce one delta, on its last byte.
    emoji = list("🙂".encode())
    start = ids.index(emoji[0])
    assert deltas[start:start + 3] == ["", "", ""]
    assert deltas[start + 3] == "🙂"


class _SpaceDroppingTokens:
    """Like SentencePiece: '_' marks a space and the first one of a decode is dropped."""

    vocab = ["_hello", "_world", "!", "_a"]

    def decode(self, ids):
        return "".join(self.vocab[i] for i in ids).replace("_", " ").removeprefix(" ")


def test_detokenizer_keeps_inner_spaces_with_dropping_decoder():
    tok = _SpaceDroppingTokens()
    ids = [0, 1, 2, 3, 1]
    d = Detokenizer(tok.decode)
    text = "".join(d.push(i) for i in ids) + d.flush()
    assert text == tok.decode(ids) == "hello world! a world"
