"""Hot-path counters for budgets and rate limits: in this process, or in Redis shared by gateway replicas.

Money is counted in integer nano-dollars (1e-9 $) so that thousands of increments never drift the way floats
do. Per key the store holds: `spent` (settled cost, loaded once from the usage log), `reserved` (the sum of
the open reservations, each also kept with its deadline so that a reservation of a replica that died
expires), a log of admitted requests (requests per minute) and a log of settled tokens (tokens per minute).

Both implementations have the same interface and semantics. RedisCounters runs each operation as one Lua
script (EVALSHA): Redis executes a script atomically, so two replicas can never both see the same remaining
budget (MULTI/WATCH would need retries under contention; a script never does).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from fleetlm.errors import ConfigError
from fleetlm.serve.errors import ServiceUnavailable

NANO = 1_000_000_000  # nano-dollars per dollar
WINDOW_S = 60.0


def to_nano(usd: float) -> int:
    return int(round(usd * NANO))


@dataclass(frozen=True)
class Admission:
    admitted: bool
    spent_nano: int  # settled spend when the decision was taken
    reserved_nano: int  # open reservations, including this one when admitted


class Counters(Protocol):
    def reserve(
        self, key_id: str, budget_nano: int, amount_nano: int, request_id: str, ttl_s: float,
        load_spent: Callable[[], int],
    ) -> Admission:
        """Admit the request when spent + reserved < budget, and reserve `amount_nano` for it."""

    def settle(self, key_id: str, request_id: str, cost_nano: int, tokens: int) -> int | None:
        """Release the request's reservation, add its cost and tokens; the key's spend after it (None when the
        store has not loaded the key's spend)."""

    def admit_rate(self, key_id: str, request_id: str, rpm: int | None, tpm: int | None) -> str | None:
        """None when the request is within the key's limits (and it is counted), else which limit it hit."""

    def close(self) -> None: ...


@dataclass
class _KeyState:
    spent: int | None = None
    reservations: dict[str, tuple[int, float]] = field(default_factory=dict)  # id -> (amount, deadline)
    admitted: deque = field(default_factory=deque)  # admission times
    tokens: deque = field(default_factory=deque)  # (time, tokens)


class LocalCounters:
    """The single-process implementation: a dict under a lock."""

    def __init__(self) -> None:
        self._keys: dict[str, _KeyState] = {}
        self._lock = threading.Lock()

    def _state(self, key_id: str) -> _KeyState:
        return self._keys.setdefault(key_id, _KeyState())

    def reserve(self, key_id, budget_nano, amount_nano, request_id, ttl_s, load_spent) -> Admission:
        with self._lock:
            st = self._state(key_id)
            if st.spent is None:
                st.spent = load_spent()
            now = time.monotonic()
            for rid in [r for r, (_, deadline) in st.reservations.items() if deadline <= now]:
                del st.reservations[rid]
            reserved = sum(a for a, _ in st.reservations.values())
            if st.spent + reserved >= budget_nano:
                return Admission(False, st.spent, reserved)
            st.reservations[request_id] = (amount_nano, now + ttl_s)
            return Admission(True, st.spent, reserved + amount_nano)

    def settle(self, key_id, request_id, cost_nano, tokens) -> int | None:
        with self._lock:
            st = self._state(key_id)
            st.reservations.pop(request_id, None)
            if tokens:
                st.tokens.append((time.monotonic(), tokens))
            if st.spent is None:
                return None
            st.spent += cost_nano
            return st.spent

    def admit_rate(self, key_id, request_id, rpm, tpm) -> str | None:
        with self._lock:
            st, now = self._state(key_id), time.monotonic()
            while st.admitted and st.admitted[0] <= now - WINDOW_S:
                st.admitted.popleft()
            while st.tokens and st.tokens[0][0] <= now - WINDOW_S:
                st.tokens.popleft()
            if rpm is not None and len(st.admitted) >= rpm:
                return f"more than {rpm} requests per minute"
            if tpm is not None and sum(t for _, t in st.tokens) >= tpm:
                return f"more than {tpm} tokens per minute"
            st.admitted.append(now)
            return None

    def close(self) -> None:
        return None


# KEYS: spent, reserved, reservation amounts (hash), reservation deadlines (zset)
# ARGV: budget, amount, request id, now, deadline
_RESERVE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, 0, 0} end
local expired = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', ARGV[4])
for _, id in ipairs(expired) do
  local amt = redis.call('HGET', KEYS[3], id)
  if amt then
    redis.call('DECRBY', KEYS[2], amt)
    redis.call('HDEL', KEYS[3], id)
  end
  redis.call('ZREM', KEYS[4], id)
end
local spent = tonumber(redis.call('GET', KEYS[1]))
local reserved = tonumber(redis.call('GET', KEYS[2]) or '0')
if spent + reserved >= tonumber(ARGV[1]) then return {0, spent, reserved} end
redis.call('INCRBY', KEYS[2], ARGV[2])
redis.call('HSET', KEYS[3], ARGV[3], ARGV[2])
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[3])
return {1, spent, reserved + tonumber(ARGV[2])}
"""

# KEYS: spent, reserved, amounts, deadlines, token log; ARGV: request id, cost, tokens, now
_SETTLE = """
local amt = redis.call('HGET', KEYS[3], ARGV[1])
if amt then
  redis.call('DECRBY', KEYS[2], amt)
  redis.call('HDEL', KEYS[3], ARGV[1])
  redis.call('ZREM', KEYS[4], ARGV[1])
end
if tonumber(ARGV[3]) > 0 then
  redis.call('ZADD', KEYS[5], ARGV[4], ARGV[1] .. '|' .. ARGV[3])
  redis.call('EXPIRE', KEYS[5], 120)
end
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
return redis.call('INCRBY', KEYS[1], ARGV[2])
"""

# KEYS: admission log, token log; ARGV: now, rpm (0: none), tpm (0: none), request id
_RATE = """
local now = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 60)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - 60)
local rpm, tpm = tonumber(ARGV[2]), tonumber(ARGV[3])
if rpm > 0 and redis.call('ZCARD', KEYS[1]) >= rpm then return 1 end
if tpm > 0 then
  local used = 0
  for _, m in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
    used = used + tonumber(string.match(m, '|(%d+)$'))
  end
  if used >= tpm then return 2 end
end
redis.call('ZADD', KEYS[1], now, ARGV[4])
redis.call('EXPIRE', KEYS[1], 120)
return 0
"""


class RedisCounters:
    """Counters in Redis (or Valkey), shared by every gateway replica that points at the same server."""

    def __init__(self, url: str, prefix: str = "fleet:"):
        try:
            import redis
        except ImportError:  # pragma: no cover - redis is a dependency
            raise ConfigError("counters: the redis package is not installed (pip install redis)") from None
        self.url, self.prefix = url, prefix
        try:
            self.client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
            self.client.ping()
        except (redis.RedisError, ValueError) as exc:
            raise ConfigError(f"counters: cannot reach {url!r} ({exc})") from None
        self._errors = (redis.RedisError,)
        self._reserve = self.client.register_script(_RESERVE)
        self._settle = self.client.register_script(_SETTLE)
        self._rate = self.client.register_script(_RATE)

    def _keys(self, key_id: str) -> list[str]:
        p = f"{self.prefix}{{{key_id}}}:"  # one hash tag: a key's counters stay on one Redis Cluster slot
        names = ["spent", "reserved", "res_amount", "res_deadline", "tokens", "admitted"]
        return [p + n for n in names]

    def _call(self, script, keys: list[str], args: list) -> object:
        try:
            return script(keys=keys, args=args)
        except self._errors as exc:  # fail closed: without the shared counters no limit can be enforced
            raise ServiceUnavailable(f"the counter store is unreachable ({exc})") from None

    def reserve(self, key_id, budget_nano, amount_nano, request_id, ttl_s, load_spent) -> Admission:
        keys = self._keys(key_id)[:4]
        for _ in range(2):
            now = time.time()
            ok, spent, reserved = self._call(
                self._reserve, keys, [budget_nano, amount_nano, request_id, now, now + ttl_s]
            )
            if ok != -1:
                return Admission(ok == 1, int(spent), int(reserved))
            try:  # first use of this key since Redis started: its spend comes from the usage log, once
                self.client.set(keys[0], load_spent(), nx=True)
            except self._errors as exc:
                raise ServiceUnavailable(f"the counter store is unreachable ({exc})") from None
        raise ServiceUnavailable("the counter store lost the key's spend twice in a row")

    def settle(self, key_id, request_id, cost_nano, tokens) -> int | None:
        k = self._keys(key_id)
        spent = self._call(self._settle, k[:5], [request_id, cost_nano, tokens, time.time()])
        return None if spent == -1 else int(spent)

    def admit_rate(self, key_id, request_id, rpm, tpm) -> str | None:
        k = self._keys(key_id)
        hit = self._call(self._rate, [k[5], k[4]], [time.time(), rpm or 0, tpm or 0, request_id])
        return {0: None, 1: f"more than {rpm} requests per minute", 2: f"more than {tpm} tokens per minute"}[
            int(hit)
        ]

    def close(self) -> None:
        self.client.close()


def open_counters(url: str | None) -> Counters:
    """Redis counters for a redis:// (or rediss://, unix://) URL, else the in-process ones."""
    if url is None:
        return LocalCounters()
    if not url.startswith(("redis://", "rediss://", "unix://", "valkey://")):
        raise ConfigError(f"counters: expected a redis:// URL, got {url!r}")
    return RedisCounters(url.replace("valkey://", "redis://", 1))
