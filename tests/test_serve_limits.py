"""Budgets and rate limits: counters in this process and in Redis (a throwaway redis-server), under
concurrency, across two gateways sharing Redis and the database, and the worst-case reservation."""

import json
import shutil
import threading
import uuid

import pytest
from fastapi.testclient import TestClient

from fleetlm.config import parse_config
from fleetlm.errors import ConfigError
from fleetlm.ops.local import RedisServer
from fleetlm.serve.app import create_app
from fleetlm.serve.counters import LocalCounters, RedisCounters, open_counters
from fleetlm.serve.errors import BudgetExceeded, RateLimited
from fleetlm.serve.limits import DEFAULT_MAX_TOKENS, Limits, prompt_token_bound
from fleetlm.serve.protocol import ChatCompletionRequest
from fleetlm.serve.store import UsageStore
from test_app import Scripted

needs_redis = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")


@pytest.fixture(scope="module")
def redis_url():
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed")
    with RedisServer() as server:
        yield server.url


@pytest.fixture(params=["local", "redis"])
def counters(request):
    if request.param == "local":
        yield LocalCounters()
    else:
        c = RedisCounters(request.getfixturevalue("redis_url"), prefix=f"t{uuid.uuid4().hex}:")
        yield c
        c.close()


def test_reservations_race_never_overspend(counters):
    """64 threads reserve $1 each against a $10 budget: exactly 10 are admitted while none settle."""
    admitted = []
    barrier = threading.Barrier(16)

    def worker(i):
        barrier.wait()
        for j in range(4):
            a = counters.reserve("k", 10 * 10**9, 10**9, f"r{i}-{j}", 60, lambda: 0)
            if a.admitted:
                admitted.append(f"r{i}-{j}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(admitted) == 10
    # settling for less frees the difference: 10 x $0.5 spent, $5 left -> 5 more admitted
    for rid in admitted:
        assert counters.settle("k", rid, 5 * 10**8, 3) is not None
    more = [counters.reserve("k", 10 * 10**9, 10**9, f"m{i}", 60, lambda: 0).admitted for i in range(8)]
    assert more == [True] * 5 + [False] * 3


def test_spend_is_loaded_once_and_expired_reservations_release(counters):
    loads = []

    def load():
        loads.append(1)
        return 7 * 10**9

    assert counters.reserve("e", 8 * 10**9, 10**9, "a", 0.0, load).admitted  # expires at once
    assert counters.reserve("e", 8 * 10**9, 10**9, "b", 60, load).admitted  # "a" no longer holds budget
    assert not counters.reserve("e", 8 * 10**9, 10**9, "c", 60, load).admitted
    assert loads == [1]


def test_rpm_and_tpm_windows(counters):
    hits = [counters.admit_rate("r", f"x{i}", 3, None) for i in range(4)]
    assert hits == [None, None, None, "more than 3 requests per minute"]
    assert counters.admit_rate("t", "a", None, 100) is None
    counters.settle("t", "a", 0, 150)
    assert counters.admit_rate("t", "b", None, 100) == "more than 100 tokens per minute"


def test_open_counters_errors():
    assert isinstance(open_counters(None), LocalCounters)
    with pytest.raises(ConfigError, match="redis:// URL"):
        open_counters("http://127.0.0.1:1")
    with pytest.raises(ConfigError, match="cannot reach"):
        open_counters("redis://127.0.0.1:1/0")


CONFIG = {
    "models": {
        "cheap": {"remote": "http://127.0.0.1:9/v1", "price": {"input": 1.0, "output": 2.0},
                  "fallbacks": ["big"]},
        "big": {"remote": "http://127.0.0.1:9/v1", "price": {"input": 10.0, "output": 30.0}},
    },
}


def test_worst_case_counts_prompt_bound_max_tokens_and_fallbacks(tmp_path):
    cfg = parse_config(CONFIG)
    limits = Limits(cfg, UsageStore(f"sqlite:///{tmp_path / 'w.db'}"))
    req = ChatCompletionRequest.model_validate(
        {"model": "cheap", "max_tokens": 100, "messages": [{"role": "user", "content": "héllo"}]})
    prompt = prompt_token_bound(req)
    assert prompt >= len("héllo".encode()) + 8
    alone = limits.worst_case(req, [["cheap"]])
    assert alone == pytest.approx((prompt * 1.0 + 100 * 2.0) / 1e6)
    with_fallback = limits.worst_case(req, [["cheap", "big"]])
    assert with_fallback == pytest.approx(alone + ((prompt + 100) * 10.0 + 100 * 30.0) / 1e6)
    no_limit = ChatCompletionRequest.model_validate({"model": "cheap", "messages": [{"role": "user",
                                                                                    "content": "x"}]})
    assert limits.worst_case(no_limit, [["cheap"]]) >= DEFAULT_MAX_TOKENS * 2.0 / 1e6


def test_limits_raise_openai_errors(tmp_path):
    store = UsageStore(f"sqlite:///{tmp_path / 'l.db'}")
    key, _ = store.create_key("k", budget_usd=1.0, rpm=1, tpm=None)
    limits = Limits(parse_config(CONFIG), store)
    limits.check_rate(key, "a")
    with pytest.raises(RateLimited, match="1 requests per minute"):
        limits.check_rate(key, "b")
    limits.reserve(key, "a", 5.0)  # admitted: nothing spent or held yet
    with pytest.raises(BudgetExceeded, match="held by requests in flight"):
        limits.reserve(key, "b", 0.1)
    assert limits.settle(key, "a", 2.0, 10) == pytest.approx(-1.0)
    with pytest.raises(BudgetExceeded, match="is spent"):
        limits.reserve(key, "c", 0.1)


@needs_redis
def test_two_gateways_share_one_budget_and_rpm(tmp_path, redis_url):
    """Two gateway apps (as two replicas) on one database and one Redis: the budget and rpm are global."""
    db = f"sqlite:///{tmp_path / 'shared.db'}"
    cfg = parse_config({**CONFIG, "counters": redis_url})
    store_a, store_b = UsageStore(db), UsageStore(db)
    _, secret = store_a.create_key("shared", budget_usd=0.005, rpm=5)
    auth = {"authorization": f"Bearer {secret}"}
    body = json.dumps({"model": "big", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]})
    apps = [create_app(cfg, s, {"cheap": Scripted("cheap"), "big": Scripted("big")})
            for s in (store_a, store_b)]
    with TestClient(apps[0]) as a, TestClient(apps[1]) as b:
        # each answer costs 1000 x $10/M + 500 x $30/M = $0.025 > budget: the first admitted spends it all
        codes = [c.post("/v1/chat/completions", content=body, headers=auth).status_code for c in (a, b, a, b)]
        assert codes == [200, 429, 429, 429]
        assert store_a.spend(store_a.keys()[0].key_id) == pytest.approx(0.025)
        codes = [c.post("/v1/chat/completions", content=body, headers=auth).json()["error"]["code"]
                 for c in (a, b)]
        assert codes == ["insufficient_quota", "rate_limit_exceeded"]  # the 6th in a minute, over both


def test_keys_create_takes_tpm(tmp_path):
    from typer.testing import CliRunner

    from fleetlm.cli import app

    db = f"sqlite:///{tmp_path / 'cli.db'}"
    result = CliRunner().invoke(app, ["keys", "create", "--tpm", "500", "--rpm", "9", "--db", db])
    assert result.exit_code == 0 and "tpm 500" in result.output
    (key,) = UsageStore(db).keys()
    assert key.tpm == 500 and key.rpm == 9
    listed = CliRunner().invoke(app, ["keys", "list", "--db", db])
    assert "tpm=500" in listed.output


@needs_redis
def test_budget_race_on_postgresql_and_redis(redis_url):
    """The replicated setup: two gateways on one PostgreSQL and one Redis, 40 requests at once against a
    budget for 10, twice: the spend never exceeds the budget by more than one request."""
    from concurrent.futures import ThreadPoolExecutor

    from test_store import _pg_cluster

    pg = _pg_cluster()
    url = next(pg)
    try:
        cfg = parse_config({**CONFIG, "counters": redis_url})
        stores = [UsageStore(url), UsageStore(url)]
        key, secret = stores[0].create_key("pg-race", budget_usd=10 * 0.002)  # cheap: 1000 x $1 + 500 x $2
        # the prompt's byte bound must cover the 1000 prompt tokens the scripted backend reports
        body = json.dumps({"model": "cheap", "max_tokens": 500,
                           "messages": [{"role": "user", "content": "x" * 1000}]})
        apps = [create_app(cfg, s, {"cheap": Scripted("cheap"), "big": Scripted("big")}) for s in stores]
        with TestClient(apps[0]) as a, TestClient(apps[1]) as b:
            def send(i):
                client = (a, b)[i % 2]
                return client.post("/v1/chat/completions", content=body,
                                   headers={"authorization": f"Bearer {secret}"}).status_code

            for _ in range(2):  # two waves: the second runs after the first has settled
                with ThreadPoolExecutor(20) as pool:
                    codes = list(pool.map(send, range(40)))
                assert set(codes) <= {200, 429} and 200 in codes, codes
        spend = stores[0].spend(key.key_id)
        answered = sum(r["status"] == 200 for r in stores[0].requests())
        assert spend == pytest.approx(answered * 0.002)
        # requests refused while others held the budget may leave some of it unspent, never overspent
        assert spend <= 0.02 + 0.002 + 1e-12
        for s in stores:
            s.close()
    finally:
        pg.close()
