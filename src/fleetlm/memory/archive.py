"""The memory archive: evicted conversation turns (FTS5, BM25) and each conversation's running summary.

One SQLite file opened with apsw (like rag/store.py), so the archive and the summaries survive a restart
and a restarted gateway does not re-summarise turns it already summarised.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

import apsw

from fleetlm.errors import FleetError

SCHEMA = """
CREATE TABLE IF NOT EXISTS mem_turns(
  id INTEGER PRIMARY KEY, conversation_id TEXT NOT NULL, seq INTEGER NOT NULL, role TEXT NOT NULL,
  content TEXT NOT NULL, UNIQUE(conversation_id, seq));
CREATE VIRTUAL TABLE IF NOT EXISTS mem_turns_fts USING fts5(content, tokenize='porter unicode61');
CREATE TABLE IF NOT EXISTS mem_summaries(
  conversation_id TEXT PRIMARY KEY, summary TEXT NOT NULL, covered INTEGER NOT NULL);
"""

# words too common to say which archived turn a question is about
STOPWORDS = frozenset(
    "the a an and or of to in on at is are was were be what which who whom where when how why did does do "
    "you your my me i it its that this with for from as by about tell remember said say".split()
)


class ArchiveError(FleetError):
    """The memory archive cannot be opened or used."""


def fts_query(text: str) -> str | None:
    """An FTS5 OR-query of the distinctive words of `text`, or None when it has none."""
    words = [w for w in re.findall(r"\w+", text.lower()) if len(w) > 1 and w not in STOPWORDS]
    unique = list(dict.fromkeys(words))[:32]
    return " OR ".join(f'"{w}"' for w in unique) or None


class Archive:
    """The archived turns and the running summary of each conversation, in one SQLite file."""

    def __init__(self, path: str | Path):
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._conn = apsw.Connection(str(path))
            self._conn.set_busy_timeout(10_000)
            self._conn.execute(SCHEMA)
        except (apsw.Error, OSError) as exc:
            raise ArchiveError(f"cannot open the memory archive {path}: {exc}") from exc
        self._lock = threading.Lock()

    def archived(self, conversation_id: str) -> int:
        """How many turns of the conversation are archived (they are turns 0..n-1)."""
        with self._lock:
            row = self._conn.execute(
                "SELECT COALESCE(MAX(seq) + 1, 0) FROM mem_turns WHERE conversation_id = ?",
                (conversation_id,),
            ).fetchone()
        return int(row[0])

    def turns(self, conversation_id: str) -> list[tuple[str, str]]:
        """The archived (role, content) turns of the conversation, oldest first."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT role, content FROM mem_turns WHERE conversation_id = ? ORDER BY seq",
                (conversation_id,),
            ).fetchall()
        return [(role, content) for role, content in rows]

    def add(self, conversation_id: str, turns: list[dict], start: int | None = None) -> None:
        """Append turns after the ones already archived for the conversation; with `start` (the position of
        turns[0] in the conversation), turns already archived by a concurrent caller are skipped."""
        with self._lock, self._conn:
            (have,) = self._conn.execute(
                "SELECT COALESCE(MAX(seq) + 1, 0) FROM mem_turns WHERE conversation_id = ?",
                (conversation_id,),
            ).fetchone()
            skip = 0 if start is None else max(0, int(have) - start)
            for offset, turn in enumerate(turns[skip:]):
                content = str(turn.get("content") or "")
                cur = self._conn.execute(
                    "INSERT INTO mem_turns(conversation_id, seq, role, content) VALUES (?, ?, ?, ?)",
                    (conversation_id, int(have) + offset, str(turn.get("role", "user")), content),
                )
                del cur
                rowid = self._conn.last_insert_rowid()
                self._conn.execute(
                    "INSERT INTO mem_turns_fts(rowid, content) VALUES (?, ?)", (rowid, content)
                )

    def search(self, conversation_id: str, query: str, k: int = 4) -> list[dict]:
        """The k archived turns of the conversation best matching the query, best first, each with its BM25
        score (higher is better)."""
        match = fts_query(query)
        if match is None or k <= 0:
            return []
        with self._lock:
            rows = self._conn.execute(
                "SELECT t.seq, t.role, t.content, -bm25(mem_turns_fts) FROM mem_turns_fts f "
                "JOIN mem_turns t ON t.id = f.rowid "
                "WHERE mem_turns_fts MATCH ? AND t.conversation_id = ? ORDER BY bm25(mem_turns_fts) LIMIT ?",
                (match, conversation_id, k),
            ).fetchall()
        return [
            {"seq": seq, "role": role, "content": content, "score": score}
            for seq, role, content, score in rows
        ]

    def summary(self, conversation_id: str) -> tuple[str, int]:
        """The stored summary and how many turns it covers ("", 0 when none)."""
        with self._lock:
            row = self._conn.execute(
                "SELECT summary, covered FROM mem_summaries WHERE conversation_id = ?", (conversation_id,)
            ).fetchone()
        return (row[0], int(row[1])) if row else ("", 0)

    def set_summary(self, conversation_id: str, summary: str, covered: int) -> None:
        with self._lock, self._conn:
            self._conn.execute(
                "INSERT INTO mem_summaries VALUES (?, ?, ?) ON CONFLICT(conversation_id) "
                "DO UPDATE SET summary = excluded.summary, covered = excluded.covered",
                (conversation_id, summary, covered),
            )

    def close(self) -> None:
        self._conn.close()
