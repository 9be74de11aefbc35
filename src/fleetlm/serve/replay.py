"""Recorded frontier models: a backend that answers with responses recorded in a RouteLLM-style folder.

`replay: DIR` + `replay_model: NAME` in fleet.yaml serves NAME's recorded answers to the GSM8K questions in
DIR/gsm8k/gsm8k_responses.csv (RouteLLM's layout: `prompt`, a True/False column per model, `<model>_response`;
prompts in contaminated_prompts.jsonl are dropped). Any folder of that layout works.

- Matching: the last user message (a completion's prompt), Unicode-NFC and whitespace-normalised, must equal
  a recorded question, or (replay_match: contains, the default) contain one verbatim, so that a client's
  few-shot or instruction wrapper around the question still matches; the recorded question that ends last
  in the message wins. Nothing fuzzy: no recording, no answer (a 404 `recording_not_found`).
- Labels: the response's `model` is `<recorded model>@recorded`, the gateway's `x-fleet-route` and usage log
  say recorded, and the body carries `fleet.recorded` with the recording's grade (`correct`), so a report can
  score without re-grading.
- Tokens: counted with OpenAI's cl100k_base (the GPT-4 tokenizer, from the `bpe-openai` package, which ships
  its BPE table) for both models; a chat prompt costs 3 tokens per message plus 3, as OpenAI counts it.
  Mixtral's own tokenizer is not available offline, so its counts are cl100k's (an approximation).
"""

from __future__ import annotations

import functools
import re
import unicodedata
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from fleetlm.config import ModelSpec
from fleetlm.errors import ConfigError, FleetError
from fleetlm.serve.backends import Choice, Delta, Embeddings, Generation, register_kind
from fleetlm.serve.errors import APIError, BadRequest
from fleetlm.serve.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

RECORDED_SUFFIX = "@recorded"
BENCHMARK = "gsm8k"
TOKENIZER = "cl100k_base"
TOKENS_PER_MESSAGE = 3  # OpenAI's chat format: <|start|>role ... <|end|> around each message
TOKENS_TO_PRIME_REPLY = 3
STREAM_WORDS = 4  # words per streamed piece


class RecordingNotFound(APIError):
    status, type, code = 404, "invalid_request_error", "recording_not_found"


@dataclass(frozen=True)
class Recording:
    """One recorded answer: the question as recorded, the model's response, and how RouteLLM graded it."""

    prompt: str
    response: str
    correct: bool | None
    row_id: str
    model: str

    def label(self) -> dict:
        return {"model": self.model, "benchmark": BENCHMARK, "id": self.row_id, "correct": self.correct}


def normalise(text: str) -> str:
    return " ".join(unicodedata.normalize("NFC", text).split())


@functools.lru_cache(maxsize=1)
def _encoding():
    with warnings.catch_warnings():  # it reads its table with importlib.resources' deprecated open_binary
        warnings.simplefilter("ignore", DeprecationWarning)
        import bpe_openai

        return bpe_openai.get_encoding(TOKENIZER)


def count_tokens(text: str) -> int:
    return len(_encoding().encode(text)) if text else 0


def chat_prompt_tokens(request: ChatCompletionRequest) -> int:
    messages = request.messages
    return sum(TOKENS_PER_MESSAGE + count_tokens(m.role) + count_tokens(m.text()) for m in messages) + (
        TOKENS_TO_PRIME_REPLY
    )


class Recordings:
    """A recorded model's answers, indexed by normalised question."""

    def __init__(self, folder: str | Path, model: str):
        from fleetlm.route.data import import_routellm

        self.folder = Path(folder)
        try:
            rows = import_routellm(self.folder, BENCHMARK)
        except (FleetError, OSError, UnicodeDecodeError, ValueError) as exc:
            raise ConfigError(f"replay folder {self.folder}: {_one_line(exc)}") from None
        recorded = sorted({m for r in rows for m in (r.responses or {})})
        self.model = resolve_recorded_model(model, recorded, self.folder)
        self.by_prompt: dict[str, Recording] = {}
        for r in rows:
            response = (r.responses or {}).get(self.model)
            if response is None or not response.strip():
                continue
            score = r.scores.get(self.model)
            key = normalise(r.prompt)
            # the CSV pads each field with a space after the comma: the recorded text is what lies inside
            self.by_prompt.setdefault(
                key, Recording(r.prompt.strip(), response.strip(), None if score is None else score >= 0.5,
                               r.id, self.model)
            )
        if not self.by_prompt:
            raise ConfigError(f"replay folder {self.folder}: no recorded responses of {self.model}")
        # for `contains` matching: longest questions first, so a question inside another never wins
        self._by_length = sorted(self.by_prompt, key=len, reverse=True)

    def __len__(self) -> int:
        return len(self.by_prompt)

    def lookup(self, text: str, match: str = "contains") -> Recording | None:
        """The recording for a message: its exact (normalised) question, else with `contains` the recorded
        question that ends last inside it."""
        key = normalise(text)
        hit = self.by_prompt.get(key)
        if hit is not None or match == "exact" or not key:
            return hit
        best: tuple[int, int, str] | None = None
        for question in self._by_length:
            at = key.rfind(question)
            if at >= 0:
                rank = (at + len(question), len(question), question)
                if best is None or rank[:2] > best[:2]:
                    best = rank
        return self.by_prompt[best[2]] if best is not None else None


def resolve_recorded_model(given: str, recorded: list[str], folder: Path) -> str:
    """A recorded model by its full column name or a unique short form ("Mixtral-8x7B-Instruct")."""
    if given in recorded:
        return given
    short = given.lower().split("/")[-1]
    hits = [m for m in recorded if m.lower().split("/")[-1].startswith(short)]
    if len(hits) == 1:
        return hits[0]
    listed = ", ".join(recorded) or "none"
    why = "matches several" if hits else "is not recorded"
    raise ConfigError(f"replay folder {folder}: model {given!r} {why} (recorded: {listed})")


@functools.lru_cache(maxsize=8)
def load_recordings(folder: str, model: str) -> Recordings:
    """Recordings are read once per (folder, model) per process."""
    return Recordings(folder, model)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


class ReplayBackend:
    """Answers with a recorded model's responses; a prompt without a recording is a 404, never invented."""

    recorded = True

    def __init__(self, name: str, recordings: Recordings, match: str = "contains"):
        self.name = name
        self.recordings = recordings
        self.match = match
        self.served_name = recordings.model + RECORDED_SUFFIX

    @classmethod
    def from_spec(cls, name: str, spec: ModelSpec) -> ReplayBackend:
        assert spec.replay is not None and spec.replay_model is not None
        try:
            recordings = load_recordings(str(Path(spec.replay).resolve()), spec.replay_model)
        except ConfigError as exc:
            raise ConfigError(f"models.{name}: {exc}") from None
        return cls(name, recordings, spec.replay_match)

    def lookup(self, text: str) -> Recording | None:
        """For reports: the recording this backend would answer `text` with (and its grade)."""
        return self.recordings.lookup(text, self.match)

    # ------------------------------------------------------------ answering

    def _find(self, text: str) -> Recording:
        rec = self.lookup(text)
        if rec is None:
            raise RecordingNotFound(
                f"model {self.name!r} ({self.served_name}) has no recorded answer for this prompt; "
                f"it answers only the {len(self.recordings)} questions recorded in {self.recordings.folder}"
            )
        return rec

    def _refuse_unsupported(self, request: ChatCompletionRequest | CompletionRequest) -> None:
        if request.n != 1:
            raise BadRequest(f"model {self.name!r} is recorded: it has one answer per prompt, so n must be 1",
                             param="n")
        fmt = getattr(request, "response_format", None)
        if fmt is not None and fmt.type != "text":
            raise BadRequest(f"model {self.name!r} is recorded: it cannot follow response_format {fmt.type}",
                             param="response_format")
        choice = getattr(request, "tool_choice", None)
        if choice == "required" or isinstance(choice, dict):
            raise BadRequest(f"model {self.name!r} is recorded: it cannot be made to call a tool",
                             param="tool_choice")

    def _answer(self, rec: Recording, request: ChatCompletionRequest | CompletionRequest) -> tuple[str, str]:
        """The recorded text, cut where the request's stop sequences or token limit would have cut it."""
        text, finish = rec.response, "stop"
        stops = [s for s in request.stop_list() if s and s in text]
        if stops:
            text = text[: min(text.index(s) for s in stops)]
        limit = request.token_limit()
        if limit is not None:
            ids = _encoding().encode(text)
            if len(ids) > limit:
                text, finish = _encoding().decode(ids[:limit]), "length"
        return text, finish

    def _generation(self, rec: Recording, request, prompt_tokens: int) -> Generation:
        text, finish = self._answer(rec, request)
        return Generation(
            [Choice(0, text, finish)],
            prompt_tokens=prompt_tokens,
            completion_tokens=count_tokens(text),
            fleet={"recorded": rec.label()},
        )

    def _chat(self, request: ChatCompletionRequest) -> Generation:
        self._refuse_unsupported(request)
        users = [m for m in request.messages if m.role == "user"]
        rec = self._find((users[-1] if users else request.messages[-1]).text())
        return self._generation(rec, request, chat_prompt_tokens(request))

    def _complete(self, request: CompletionRequest) -> Generation:
        self._refuse_unsupported(request)
        prompts = request.prompts()
        if len(prompts) != 1 or not isinstance(prompts[0], str):
            raise BadRequest(f"model {self.name!r} is recorded: send one prompt, as text", param="prompt")
        return self._generation(self._find(prompts[0]), request, count_tokens(prompts[0]))

    async def chat(self, request: ChatCompletionRequest) -> Generation:
        return self._chat(request)

    async def complete(self, request: CompletionRequest) -> Generation:
        return self._complete(request)

    async def stream_chat(self, request: ChatCompletionRequest) -> AsyncIterator[Delta]:
        for delta in _pieces(self._chat(request)):
            yield delta

    async def stream_complete(self, request: CompletionRequest) -> AsyncIterator[Delta]:
        for delta in _pieces(self._complete(request)):
            yield delta

    async def embed(self, request: EmbeddingRequest) -> Embeddings:
        raise BadRequest(f"model {self.name!r} is a recorded chat model: it has no embeddings", param="model")

    async def aclose(self) -> None:
        return None


def _pieces(gen: Generation) -> list[Delta]:
    """The recorded text as a stream: a few words per piece, the finish reason, then the usage."""
    choice = gen.choices[0]
    words = re.findall(r"\s*\S+\s*", choice.text or "") or [choice.text or ""]
    out = [Delta(0, "".join(words[i : i + STREAM_WORDS])) for i in range(0, len(words), STREAM_WORDS)]
    out.append(Delta(0, None, choice.finish_reason))
    out.append(Delta(usage=(gen.prompt_tokens, gen.completion_tokens)))
    return out


register_kind("replay", ReplayBackend.from_spec)
