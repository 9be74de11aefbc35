import pytest

from fleetlm.rag.chunking import (
    AUTO_MAX_TOKENS,
    AUTO_OVERLAP_TOKENS,
    ChunkingError,
    Strategy,
    chunk_stream,
    count_tokens,
    encoding,
    parse_strategy,
)

TEXT = " ".join(f"word{i} is number {i} of the text." for i in range(600))


def test_auto_is_800_tokens_with_400_overlap():
    s = parse_strategy({"type": "auto"})
    assert (s.max_tokens, s.overlap_tokens) == (AUTO_MAX_TOKENS, AUTO_OVERLAP_TOKENS) == (800, 400)
    assert parse_strategy(None) == s
    assert s.as_openai() == {
        "type": "static",
        "static": {"max_chunk_size_tokens": 800, "chunk_overlap_tokens": 400},
    }


def test_static_chunks_have_the_size_and_overlap_asked_for():
    s = parse_strategy(
        {"type": "static", "static": {"max_chunk_size_tokens": 100, "chunk_overlap_tokens": 20}}
    )
    chunks = list(chunk_stream([TEXT], s))
    ids = encoding().encode_ordinary(TEXT)
    assert all(c.tokens == 100 for c in chunks[:-1]) and 0 < chunks[-1].tokens <= 100
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    # consecutive chunks share exactly the overlap: chunk k starts 80 tokens after chunk k-1
    assert chunks[1].text.startswith(encoding().decode(ids[80:90]))
    # every token is covered, and the chunk count is what the step says
    assert len(chunks) == -(-(len(ids) - 20) // 80)
    assert chunks[-1].text.rstrip().endswith("of the text.")


def test_streamed_pieces_give_the_chunks_of_the_whole_text():
    s = Strategy(120, 30, auto=False)
    whole = [c.text for c in chunk_stream([TEXT], s)]
    pieces = [TEXT[i : i + 777] for i in range(0, len(TEXT), 777)]  # cuts fall inside words
    assert [c.text for c in chunk_stream(pieces, s)] == whole


def test_short_and_blank_texts():
    assert [c.text for c in chunk_stream(["just a few words"], Strategy())] == ["just a few words"]
    assert list(chunk_stream(["   \n\n  "], Strategy())) == []
    assert count_tokens("hello world") == 2


@pytest.mark.parametrize(
    "raw, param",
    [
        ("auto", "chunking_strategy"),
        ({"type": "fancy"}, "chunking_strategy.type"),
        ({"type": "static"}, "chunking_strategy.static"),
        (
            {"type": "static", "static": {"max_chunk_size_tokens": 99, "chunk_overlap_tokens": 0}},
            "chunking_strategy.static.max_chunk_size_tokens",
        ),
        (
            {"type": "static", "static": {"max_chunk_size_tokens": 5000, "chunk_overlap_tokens": 0}},
            "chunking_strategy.static.max_chunk_size_tokens",
        ),
        (
            {"type": "static", "static": {"max_chunk_size_tokens": 200, "chunk_overlap_tokens": 101}},
            "chunking_strategy.static.chunk_overlap_tokens",
        ),
        (
            {"type": "static", "static": {"max_chunk_size_tokens": 200, "chunk_overlap_tokens": -1}},
            "chunking_strategy.static.chunk_overlap_tokens",
        ),
        (
            {"type": "static", "static": {"max_chunk_size_tokens": "200", "chunk_overlap_tokens": 0}},
            "chunking_strategy.static.max_chunk_size_tokens",
        ),
        ({"type": "auto", "static": {}}, "chunking_strategy"),
    ],
)
def test_bad_strategies_name_the_bad_field(raw, param):
    with pytest.raises(ChunkingError) as err:
        parse_strategy(raw)
    assert err.value.param == param
