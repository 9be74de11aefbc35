"""Grounded chat completions: the `fleet_file_search` extension retrieves from vector stores, adds the sources
as a system message, and cites them in `message.annotations` (whole answers) or a final chunk (streams)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool

from fleetlm.rag.filters import FilterError, compile_filter
from fleetlm.serve.errors import APIError, BadRequest
from fleetlm.serve.protocol import ChatCompletionRequest, ChatMessage

if TYPE_CHECKING:  # rag.grounding is imported when first used: the gateway starts without it loaded
    from fleetlm.rag import grounding
    from fleetlm.rag.store import KnowledgeStore
    from fleetlm.serve.app import Gateway

PARAM = "fleet_file_search"
# The end of a text that may still grow into a [n] marker (grounding.MARKER, with its one leading space):
# a stream holds it back until it is known.
_MARKER_START = re.compile(r"\s?(?:\[[\d\s,]*)?$")
MAX_STORES_LISTED = 1000  # a vector store named rather than given by id is looked up among at most this many


class VectorStoreNotFound(APIError):
    status, type = 404, "not_found"


class MarkerFilter:
    """A streamed answer without its [n] markers, as grounding.cite removes them from the whole answer.

    `feed` takes the model's pieces and returns what can be sent: the text so far with its markers removed,
    less a tail that may still become a marker (a space, `[`, `[1, 2`), which later pieces resolve. Every
    piece sent is a prefix of cite's text of the whole answer, so its annotations' offsets hold for it.
    """

    def __init__(self) -> None:
        self.raw = ""  # what the model wrote, markers and all
        self.done = 0  # raw[:done] has been sent (markers removed); no marker can span this point

    def feed(self, text: str) -> str:
        from fleetlm.rag.grounding import MARKER

        self.raw += text
        held = _MARKER_START.search(self.raw, self.done)
        safe = held.start() if held else len(self.raw)
        piece = MARKER.sub("", self.raw[self.done:safe])
        self.done = safe
        return piece

    def flush(self) -> str:
        """The held tail, at the end of the answer."""
        from fleetlm.rag.grounding import MARKER

        piece = MARKER.sub("", self.raw[self.done:])
        self.done = len(self.raw)
        return piece


@dataclass
class Grounding:
    """What a grounded request retrieved, and the answer's text so far (a stream's pieces are added up)."""

    sources: list[grounding.Source]
    include_results: bool = False
    text: str = field(default="")
    markers: MarkerFilter = field(default_factory=MarkerFilter)

    def feed(self, piece: str) -> str:
        """A streamed piece of choice 0 as the client should see it: added to `text`, its markers removed
        (the gateway's stream sends this instead of the raw piece, then `flush()` at the end)."""
        self.text += piece
        return self.markers.feed(piece)

    def flush(self) -> str:
        return self.markers.flush()

    def clean(self, delta: Any) -> None:
        """A streamed piece of choice 0 (a backends.Delta), in place: its text without markers, and the held
        tail added to the piece that finishes the choice. The gateway's stream calls this on each piece of
        choice 0 before sending it (then its pieces add up to the text the citations' offsets count in)."""
        text = self.feed(delta.text) if delta.text else delta.text
        if delta.finish_reason:
            text = (text or "") + self.flush()
        delta.text = text


def requested(req: Any) -> bool:
    return isinstance(req, ChatCompletionRequest) and req.fleet_file_search is not None


def resolve_stores(
    store: KnowledgeStore, refs: list[str], param: str = f"{PARAM}.vector_store_ids"
) -> list[str]:
    """Vector store ids from ids or names (a name is friendlier in fleet.yaml); an unknown one is a 404."""
    ids: list[str] = []
    by_name: dict[str, str] | None = None
    for ref in refs:
        if store.get_store(ref) is not None:
            ids.append(ref)
            continue
        if by_name is None:
            rows, _ = store.list_stores(MAX_STORES_LISTED, "desc", None)
            by_name = {r["name"]: r["id"] for r in rows if r.get("name")}
        if ref not in by_name:
            raise VectorStoreNotFound(f"no vector store with id or name {ref!r}", param=param)
        ids.append(by_name[ref])
    return ids


def last_user_text(req: ChatCompletionRequest) -> str:
    for message in reversed(req.messages):
        if message.role == "user":
            return message.text()
    return ""


def with_sources(req: ChatCompletionRequest, prompt: str) -> ChatCompletionRequest:
    """The request with the grounding prompt as a system message after its own leading system messages
    (an assistant's instructions stay first)."""
    messages = list(req.messages)
    at = 0
    while at < len(messages) and messages[at].role in ("system", "developer"):
        at += 1
    messages.insert(at, ChatMessage(role="system", content=prompt))
    return req.model_copy(update={"messages": messages, "fleet_file_search": None})


async def prepare(gw: Gateway, req: ChatCompletionRequest, call: Any) -> ChatCompletionRequest:
    """Retrieve for the last user message and put the sources in front of the model; `call.grounding` keeps
    them for the citations. The request has been authorized already."""
    from fleetlm.rag import grounding
    from fleetlm.serve.files_api import knowledge_base  # files_api imports app.py, which imports this module

    options = req.fleet_file_search
    assert options is not None
    query = last_user_text(req).strip()
    if not query:
        raise BadRequest(f"{PARAM} needs a user message with text to search for", param="messages")
    if options.filters is not None:  # checked before any search, so a bad one is a 400 naming its part
        try:
            compile_filter(options.filters, "attributes", f"{PARAM}.filters")
        except FilterError as exc:
            raise BadRequest(str(exc), param=exc.param) from None
    kb = await run_in_threadpool(knowledge_base, gw)
    ids = await run_in_threadpool(resolve_stores, kb.store, options.vector_store_ids)
    sources = await run_in_threadpool(
        grounding.retrieve, kb.store, ids, query, kb.ingestor.embed,
        max_num_results=options.max_num_results, filters=options.filters,
        score_threshold=options.score_threshold,
    )
    call.grounding = Grounding(sources, options.include_results)
    return with_sources(req, grounding.grounding_prompt(sources))


def chat_annotations(text: str, sources: list[grounding.Source]) -> tuple[str, list[dict]]:
    """The answer's text and OpenAI chat-shaped `file_citation` annotations (grounding.cite's, nested)."""
    from fleetlm.rag import grounding

    cited, found = grounding.cite(text, sources)
    out = [
        {"type": "file_citation",
         "file_citation": {"file_id": a["file_id"], "filename": a["filename"], "index": a["index"]}}
        for a in found
    ]
    return cited, out


def results(sources: list[grounding.Source]) -> list[dict]:
    return [
        {"file_id": s.file_id, "filename": s.filename, "score": s.score, "vector_store_id": s.vector_store_id,
         "attributes": s.attributes, "content": [{"type": "text", "text": s.text}]}
        for s in sources
    ]


def annotate(data: dict, found: Grounding) -> None:
    """A whole answer's body: each choice's content cited, its annotations added, the results if asked."""
    for choice in data.get("choices", []):
        message = choice.get("message", {})
        text, annotations = chat_annotations(message.get("content") or "", found.sources)
        if message.get("content") is not None:
            message["content"] = text
        message["annotations"] = annotations
    if found.include_results:
        data["fleet_file_search_results"] = results(found.sources)


def final_chunk(found: Grounding) -> dict:
    """A stream's citations: one last chunk after the answer, whose delta carries only the annotations of
    choice 0; their offsets count in the text without its [n] markers, which the stream has already sent."""
    _, annotations = chat_annotations(found.text, found.sources)
    chunk: dict[str, Any] = {"choices": [{"index": 0, "delta": {"annotations": annotations},
                                          "finish_reason": None}]}
    if found.include_results:
        chunk["fleet_file_search_results"] = results(found.sources)
    return chunk


def sse(found: Grounding, stream_id: str, created: int, model: str) -> str:
    """final_chunk as a server-sent event of the stream `stream_id`."""
    data = {"id": stream_id, "object": "chat.completion.chunk", "created": created, "model": model,
            **final_chunk(found)}
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"
