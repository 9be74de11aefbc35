"""fit_context over a scripted summarizer: facts survive 3x the budget; reopen."""

from __future__ import annotations

import pytest

from fleetlm.memory import Archive, ContextOverflow, fit_context, truncate_context

FACTS = [
    ("Ingrid's locker code", "4471"),
    ("the ferry to Tromsø leaves at", "06:35"),
    ("Marek's cat is called", "Biscotti"),
]


def words(messages: list[dict]) -> int:
    return sum(len(str(m["content"]).split()) + 4 for m in messages)


def scripted_summary(messages: list[dict]) -> str:
    # keeps only the first fact it sees, so the archive must bring back the rest
    text = " ".join(str(m["content"]) for m in messages)
    return "The user talked about lockers." if "4471" in text else "Small talk."


def conversation(budget: int) -> list[dict]:
    msgs = [{"role": "system", "content": "You are a helpful assistant."}]
    for subject, value in FACTS:
        msgs += [
            {"role": "user", "content": f"Note this: {subject} {value}."},
            {"role": "assistant", "content": "Noted."},
        ]
    n = 0
    while words(msgs) < 3 * budget:
        msgs += [
            {"role": "user", "content": f"Filler question {n} about weather and clouds and rain today."},
            {"role": "assistant", "content": f"Filler answer {n}: it may rain, bring an umbrella."},
        ]
        n += 1
    return msgs


@pytest.mark.parametrize("subject,value", FACTS)
def test_planted_fact_reaches_context_within_budget(tmp_path, subject, value):
    context, reserve = 300, 50
    msgs = conversation(context) + [{"role": "user", "content": f"Remind me: {subject}?"}]
    archive = Archive(tmp_path / "memory.db")
    fitted = fit_context(
        msgs,
        context_tokens=context,
        count_tokens=words,
        summarize=scripted_summary,
        archive=archive,
        reserve_tokens=reserve,
    )
    assert words(fitted) <= context - reserve
    assert value in " ".join(m["content"] for m in fitted)
    assert fitted[0] == msgs[0] and fitted[-1] == msgs[-1]
    baseline = truncate_context(msgs, context_tokens=context, count_tokens=words, reserve_tokens=reserve)
    assert value not in " ".join(m["content"] for m in baseline)


def test_archive_and_summary_survive_reopen(tmp_path):
    path = tmp_path / "memory.db"
    archive = Archive(path)
    archive.add("c1", [{"role": "user", "content": "my locker code is 4471"}])
    archive.set_summary("c1", "locker talk", 1)
    archive.close()
    reopened = Archive(path)
    assert [h["content"] for h in reopened.search("c1", "locker code", 3)] == ["my locker code is 4471"]
    assert reopened.search("other", "locker code", 3) == []
    assert reopened.summary("c1") == ("locker talk", 1)
    assert reopened.archived("c1") == 1


def test_summary_is_incremental_and_not_redone(tmp_path):
    calls: list[int] = []

    def counting(messages: list[dict]) -> str:
        calls.append(len(messages))
        return "summary"

    archive = Archive(tmp_path / "memory.db")
    msgs = conversation(300)
    fit_context(
        msgs, context_tokens=300, count_tokens=words, summarize=counting, archive=archive, reserve_tokens=50
    )
    fit_context(
        msgs, context_tokens=300, count_tokens=words, summarize=counting, archive=archive, reserve_tokens=50
    )
    assert len(calls) == 1  # the same evicted turns are not summarised twice
    longer = msgs + [{"role": "user", "content": "more filler " * 40}, {"role": "assistant", "content": "ok"}]
    fit_context(
        longer, context_tokens=300, count_tokens=words, summarize=counting, archive=archive, reserve_tokens=50
    )
    assert len(calls) == 2 and calls[1] < calls[0] + 10  # previous summary + only the newly evicted turns


def test_short_conversation_is_unchanged_and_overflow_is_typed(tmp_path):
    archive = Archive(tmp_path / "memory.db")

    def fit(messages, reserve_tokens):
        return fit_context(
            messages,
            context_tokens=100,
            count_tokens=words,
            summarize=scripted_summary,
            archive=archive,
            reserve_tokens=reserve_tokens,
        )

    short = [{"role": "user", "content": "hi"}]
    assert fit(short, 10) == short
    with pytest.raises(ContextOverflow):
        fit([{"role": "user", "content": "word " * 500}], 10)
    with pytest.raises(ContextOverflow):
        fit(short, 100)


def test_a_conversation_that_diverges_from_the_archive_gets_its_own_key(tmp_path):
    archive = Archive(tmp_path / "memory.db")
    msgs = conversation(300) + [{"role": "user", "content": "Remind me: when does the ferry leave?"}]
    assert msgs[3]["content"] == "Note this: the ferry to Tromsø leaves at 06:35."

    def fit(messages):
        return fit_context(
            messages,
            context_tokens=300,
            count_tokens=words,
            summarize=scripted_summary,
            archive=archive,
            reserve_tokens=50,
            conversation_id="chain-1",
        )

    fit(msgs)
    # the same first turn, then another story: it must not be answered from the first one's archive
    other = [dict(m) for m in msgs]
    other[3] = {"role": "user", "content": "Note this: the ferry to Bergen leaves at 09:10."}
    fitted = " ".join(m["content"] for m in fit(other))
    assert "09:10" in fitted and "06:35" not in fitted
    assert archive.archived("chain-1") > 0
    forks = [key for (key,) in archive._conn.execute("SELECT DISTINCT conversation_id FROM mem_turns")]
    assert len(forks) == 2 and all(k.startswith("chain-1") for k in forks)
    fit(msgs)  # the first conversation again: its own key, nothing archived twice
    assert archive.turns("chain-1")[:4] == [(m["role"], m["content"]) for m in msgs[1:5]]
    assert archive.archived("chain-1") == len(archive.turns("chain-1"))


def test_add_with_start_skips_turns_a_concurrent_caller_archived(tmp_path):
    archive = Archive(tmp_path / "memory.db")
    turns = [{"role": "user", "content": f"turn {i}"} for i in range(4)]
    archive.add("c", turns[:3], start=0)
    archive.add("c", turns, start=0)  # a second caller that saw none archived yet
    assert [c for _, c in archive.turns("c")] == [t["content"] for t in turns]
