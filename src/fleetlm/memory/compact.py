"""fit_context: a conversation cut to a model's context by summarising and archiving its older turns.

The system/developer messages and the newest turns that fit stay as they are; the older turns go to the
archive (searchable) and into one incremental summary; then the archived turns that best match the newest
user message come back as a marked system message, as far as the budget allows (MemGPT-style paging).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from fleetlm.errors import FleetError
from fleetlm.memory.archive import Archive

SUMMARY_PREFIX = "Summary of the earlier conversation: "
RECALL_PREFIX = "Earlier in this conversation:\n"
MAX_SUMMARY_CHARS = 1200  # bounds the summary so it cannot grow with the conversation
RECALL_K = 4
RECALL_MIN_SHARE = 0.5  # a recalled turn scores at least this share of the best match's BM25
KEEP_SHARE = 0.5  # share of the budget the newest turns may take; the rest is for summary and recall
MAX_FORKS = 8  # forks of forks followed before a conversation's key is taken as it stands


class ContextOverflow(FleetError):
    """Even the system messages and the newest message alone do not fit the context."""


def text_of(message: dict) -> str:
    """The text of a chat message whose content is a string or a list of parts."""
    content = message.get("content")
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return str(content or "")


def conversation_key(turns: list[dict]) -> str:
    """A stable id for a conversation: the hash of its first turn, which never changes as it grows."""
    first = f"{turns[0].get('role')}:{text_of(turns[0])}" if turns else ""
    return "conv_" + hashlib.sha256(first.encode()).hexdigest()[:24]


def branch_key(archive: Archive, conversation_id: str, turns: list[dict]) -> str:
    """The key this conversation's turns are archived under: `conversation_id`, unless the turns archived
    there diverge from these (another conversation with the same beginning, or a fork of a stored chain);
    then a key of its own, named by the turns up to the first difference, checked the same way."""
    ours = [(str(m.get("role", "user")), text_of(m)) for m in turns]
    key = conversation_id
    for _ in range(MAX_FORKS):
        stored = archive.turns(key)
        split = next((i for i, (a, b) in enumerate(zip(stored, ours, strict=False)) if a != b), None)
        if split is None:
            return key
        head = "\x00".join(f"{role}:{text}" for role, text in ours[: split + 1])
        key = f"{conversation_id}_{hashlib.sha256(head.encode()).hexdigest()[:16]}"
    return key


def _update_summary(
    archive: Archive, conv: str, evicted: list[dict], summarize: Callable[[list[dict]], str]
) -> str:
    summary, covered = archive.summary(conv)
    fresh = evicted[covered:]
    if not fresh:
        return summary
    prompt = ([{"role": "system", "content": SUMMARY_PREFIX + summary}] if summary else []) + fresh
    summary = summarize(prompt).strip()[:MAX_SUMMARY_CHARS]
    archive.set_summary(conv, summary, len(evicted))
    return summary


def fit_context(
    messages: list[dict],
    *,
    context_tokens: int,
    count_tokens: Callable[[list[dict]], int],
    summarize: Callable[[list[dict]], str],
    archive: Archive,
    reserve_tokens: int = 512,
    conversation_id: str | None = None,
) -> list[dict]:
    """The messages cut to fit `context_tokens - reserve_tokens`, with summary and recalled turns."""
    budget = context_tokens - reserve_tokens
    if budget <= 0:
        raise ContextOverflow(
            f"reserve_tokens {reserve_tokens} leaves no room in a {context_tokens}-token context"
        )
    if count_tokens(messages) <= budget:
        return messages
    system = [m for m in messages if m.get("role") in ("system", "developer")]
    turns = [m for m in messages if m.get("role") not in ("system", "developer")]
    if not turns or count_tokens(system + turns[-1:]) > budget:
        raise ContextOverflow(f"the system messages and the newest message exceed {budget} tokens")
    conv = branch_key(archive, conversation_id or conversation_key(turns), turns)

    start = len(turns) - 1
    while start > 0 and count_tokens(system + turns[start - 1 :]) <= budget * KEEP_SHARE:
        start -= 1
    kept, evicted = turns[start:], turns[:start]
    archive.add(conv, [{"role": m.get("role", "user"), "content": text_of(m)} for m in evicted], start=0)
    summary = _update_summary(archive, conv, evicted, summarize)

    head = list(system)
    if summary:
        note = {"role": "system", "content": SUMMARY_PREFIX + summary}
        if count_tokens(head + [note] + kept) <= budget:
            head.append(note)
    query = next((text_of(m) for m in reversed(turns) if m.get("role") == "user"), "")
    hits = [h for h in archive.search(conv, query, RECALL_K) if h["seq"] < len(evicted)]
    recalled: list[dict] = []
    for hit in hits:  # best first, so a tight budget keeps the best; weak matches (a shared common word) drop
        if hit["score"] < RECALL_MIN_SHARE * hits[0]["score"]:
            break
        trial = sorted(recalled + [hit], key=lambda h: h["seq"])
        if count_tokens(_with_recall(head, kept, trial)) <= budget:
            recalled = trial
    return _with_recall(head, kept, recalled)


def _with_recall(head: list[dict], kept: list[dict], recalled: list[dict]) -> list[dict]:
    """The recalled turns as one system message just before the newest turn: small models read what sits next
    to the question far better than what sits at the top of the context."""
    if not recalled:
        return head + kept
    note = {
        "role": "system",
        "content": RECALL_PREFIX + "\n".join(f"[{h['role']}] {h['content']}" for h in recalled),
    }
    return head + kept[:-1] + [note] + kept[-1:]


def truncate_context(
    messages: list[dict],
    *,
    context_tokens: int,
    count_tokens: Callable[[list[dict]], int],
    reserve_tokens: int = 512,
) -> list[dict]:
    """The baseline: system messages plus the newest turns that fit, older turns dropped."""
    budget = context_tokens - reserve_tokens
    system = [m for m in messages if m.get("role") in ("system", "developer")]
    turns = [m for m in messages if m.get("role") not in ("system", "developer")]
    start = len(turns)
    while start > 0 and count_tokens(system + turns[start - 1 :]) <= budget:
        start -= 1
    return system + turns[start:]
