"""The usage log: one row per request, and API keys, in SQLite (default) or PostgreSQL through SQLAlchemy.

Durability: a record is committed before the response leaves the server. SQLite runs in WAL mode with
synchronous=NORMAL, so a committed row survives the process being killed (SIGKILL); a power cut may lose
the last few commits (synchronous=FULL would close that gap at an fsync per request).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

from sqlalchemy import (
    Column,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    func,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import (
    ArgumentError,
    IntegrityError,
    NoSuchModuleError,
    OperationalError,
    ProgrammingError,
)

from fleetlm.errors import ConfigError

metadata = MetaData()

requests_table = Table(
    "requests",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("request_id", String(64), nullable=False, index=True),
    Column("created", Float, nullable=False, index=True),  # unix seconds
    Column("endpoint", String(32), nullable=False),
    Column("model_requested", String(200), nullable=False),
    Column("model_used", String(200)),
    Column("route_reason", Text),
    Column("predicted_quality", Float),
    Column("fallbacks", Text),  # comma-separated models that failed before model_used answered
    Column("prompt_tokens", Integer, nullable=False, default=0),
    Column("completion_tokens", Integer, nullable=False, default=0),
    Column("cost_usd", Float, nullable=False, default=0.0),
    Column("latency_ms", Float),
    Column("ttft_ms", Float),
    Column("status", Integer, nullable=False),
    Column("error", Text),
    Column("stream", Integer, nullable=False, default=0),
    Column("key_id", String(32), index=True),
    Column("user", String(200)),
    Column("recorded", Integer, nullable=False, default=0),  # 1: the answer served was recorded (replay)
    Column("checks", Text),  # JSON: a cascade's attempts [{model, kept, checks: [{name, passed, detail}]}]
    Column("prompt", Text),  # JSON: the request's messages (chat) or prompt (completions); log_content only
    Column("response", Text),  # the first choice's answer text; log_content only
)

keys_table = Table(
    "api_keys",
    metadata,
    Column("key_id", String(32), primary_key=True),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("name", String(200)),
    Column("budget_usd", Float),  # None: unlimited
    Column("rpm", Integer),  # None: unlimited
    Column("tpm", Integer),  # tokens per minute (prompt + completion); None: unlimited
    Column("created", Float, nullable=False),
    Column("revoked", Integer, nullable=False, default=0),
)


@dataclass
class RequestRecord:
    request_id: str
    endpoint: str
    model_requested: str
    status: int
    model_used: str | None = None
    route_reason: str | None = None
    predicted_quality: float | None = None
    fallbacks: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    latency_ms: float | None = None
    ttft_ms: float | None = None
    error: str | None = None
    stream: bool = False
    key_id: str | None = None
    user: str | None = None
    recorded: bool = False
    checks: list[dict] | None = None
    prompt: str | None = None  # JSON of the messages, when the fleet logs content (log_content)
    response: str | None = None
    created: float = field(default_factory=time.time)


@dataclass
class ApiKey:
    key_id: str
    name: str | None
    budget_usd: float | None
    rpm: int | None
    created: float
    revoked: bool
    tpm: int | None = None


def hash_key(secret: str) -> str:
    # Keys are random 32-byte tokens, so a plain SHA-256 is enough (no dictionary to guard against).
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers don't block the writer
    # In WAL mode, NORMAL writes each commit to the WAL before returning, so it survives the process being
    # killed (only a power cut can lose the last commits); FULL would add an fsync (~10 ms) per request.
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=10000")  # wait for a concurrent writer instead of failing
    cur.close()


class UsageStore:
    def __init__(self, url: str):
        self.url = url
        try:
            if url.startswith("postgresql://"):
                url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
            self.engine: Engine = create_engine(url, pool_pre_ping=True, future=True)
        except (ArgumentError, NoSuchModuleError) as exc:
            raise ConfigError(f"storage: cannot use {self.url!r} ({exc})") from None
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._create_schema()

    SCHEMA_TRIES = 3

    def _create_schema(self) -> None:
        """Tables and new columns, made by whichever process comes first. Two gateways starting on one new
        file both see the table missing, and the second CREATE fails ("already exists"); a second try sees
        it, so a failure is retried before it is reported."""
        for attempt in range(self.SCHEMA_TRIES):
            try:
                metadata.create_all(self.engine)
                self._add_new_columns()
                return
            except (OperationalError, ProgrammingError, IntegrityError) as exc:
                if attempt + 1 == self.SCHEMA_TRIES:
                    raise ConfigError(f"storage: cannot open {self.url!r} ({exc.orig})") from None
                time.sleep(0.05 * (attempt + 1))

    def _add_new_columns(self) -> None:
        """A usage log written by an older gateway lacks the newer columns: add them (they are nullable or
        have a default), so that old logs keep working."""
        present = {c["name"] for c in inspect(self.engine).get_columns("requests")}
        added = {"recorded": "INTEGER NOT NULL DEFAULT 0", "checks": "TEXT", "prompt": "TEXT",
                 "response": "TEXT"}
        key_columns = {c["name"] for c in inspect(self.engine).get_columns("api_keys")}
        with self.engine.begin() as conn:
            for name, ddl in added.items():
                if name not in present:
                    conn.execute(text(f'ALTER TABLE requests ADD COLUMN "{name}" {ddl}'))
            if "tpm" not in key_columns:
                conn.execute(text('ALTER TABLE api_keys ADD COLUMN "tpm" INTEGER'))

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------ requests

    def log(self, record: RequestRecord) -> None:
        row = asdict(record)
        row["fallbacks"] = ",".join(record.fallbacks) or None
        row["stream"] = int(record.stream)
        row["recorded"] = int(record.recorded)
        row["checks"] = json.dumps(record.checks) if record.checks else None
        with self.engine.begin() as conn:
            conn.execute(requests_table.insert(), row)  # one cached compiled statement for every row

    def requests(self, since: float | None = None) -> list[dict]:
        q = select(requests_table).order_by(requests_table.c.id)
        if since is not None:
            q = q.where(requests_table.c.created >= since)
        with self.engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(q)]
        for r in rows:
            r["checks"] = json.loads(r["checks"]) if r.get("checks") else None
        return rows

    def usage(self, since: float | None = None, by: Literal["model", "key", "day"] = "model") -> list[dict]:
        """Totals grouped by the model that answered, the key, or the UTC day."""
        rows = self.requests(since)
        groups: dict[str, dict] = {}
        for r in rows:
            if by == "model":
                k = r["model_used"] or f"({r['model_requested']}, unserved)"
                if r.get("recorded"):  # a recorded model's answers are never mixed with live ones
                    k += "@recorded"
            elif by == "key":
                k = r["key_id"] or "(no key)"
            else:
                k = datetime.fromtimestamp(r["created"], tz=timezone.utc).strftime("%Y-%m-%d")
            g = groups.setdefault(
                k,
                {
                    by: k,
                    "requests": 0,
                    "errors": 0,
                    "prompt_tokens": 0,
                    "completion_tokens": 0,
                    "cost_usd": 0.0,
                    "latency_ms_sum": 0.0,
                },
            )
            g["requests"] += 1
            g["errors"] += int(r["status"] >= 400)
            g["prompt_tokens"] += r["prompt_tokens"] or 0
            g["completion_tokens"] += r["completion_tokens"] or 0
            g["cost_usd"] += r["cost_usd"] or 0.0
            g["latency_ms_sum"] += r["latency_ms"] or 0.0
        out = []
        for g in sorted(groups.values(), key=lambda g: str(g[by])):
            g["mean_latency_ms"] = g.pop("latency_ms_sum") / g["requests"]
            out.append(g)
        return out

    def spend(self, key_id: str) -> float:
        q = select(func.coalesce(func.sum(requests_table.c.cost_usd), 0.0)).where(
            requests_table.c.key_id == key_id
        )
        with self.engine.connect() as conn:
            return float(conn.execute(q).scalar_one())

    # ------------------------------------------------------------ keys

    def create_key(
        self, name: str | None = None, budget_usd: float | None = None, rpm: int | None = None,
        tpm: int | None = None,
    ) -> tuple[ApiKey, str]:
        """A new key; the secret is returned once and only its hash is stored."""
        if budget_usd is not None and budget_usd < 0:
            raise ConfigError("budget must be >= 0")
        if rpm is not None and rpm < 1:
            raise ConfigError("rpm must be >= 1")
        if tpm is not None and tpm < 1:
            raise ConfigError("tpm must be >= 1")
        secret = "fk-" + secrets.token_urlsafe(32)
        key = ApiKey(
            key_id=secrets.token_hex(6),
            name=name,
            budget_usd=budget_usd,
            rpm=rpm,
            created=time.time(),
            revoked=False,
            tpm=tpm,
        )
        with self.engine.begin() as conn:
            conn.execute(
                keys_table.insert().values(
                    key_id=key.key_id,
                    key_hash=hash_key(secret),
                    name=name,
                    budget_usd=budget_usd,
                    rpm=rpm,
                    tpm=tpm,
                    created=key.created,
                    revoked=0,
                )
            )
        return key, secret

    def find_key(self, secret: str) -> ApiKey | None:
        q = select(keys_table).where(keys_table.c.key_hash == hash_key(secret))
        with self.engine.connect() as conn:
            row = conn.execute(q).first()
        return None if row is None else _key(row._mapping)

    def keys(self) -> list[ApiKey]:
        with self.engine.connect() as conn:
            return [_key(r._mapping) for r in conn.execute(select(keys_table).order_by(keys_table.c.created))]

    def has_keys(self) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(keys_table)).scalar_one() > 0


def _key(m: Any) -> ApiKey:
    return ApiKey(
        key_id=m["key_id"],
        name=m["name"],
        budget_usd=m["budget_usd"],
        rpm=m["rpm"],
        created=m["created"],
        revoked=bool(m["revoked"]),
        tpm=m.get("tpm"),
    )
