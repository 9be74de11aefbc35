import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from fleetlm.errors import ConfigError
from fleetlm.serve.store import RequestRecord, UsageStore, hash_key


@pytest.fixture
def store(tmp_path):
    s = UsageStore(f"sqlite:///{tmp_path / 'u.db'}")
    yield s
    s.close()


def rec(i, model="a", key=None, cost=0.0, status=200, created=None, **kw):
    return RequestRecord(
        request_id=f"r{i}",
        endpoint="chat",
        model_requested=model,
        status=status,
        model_used=model if status < 400 else None,
        prompt_tokens=10,
        completion_tokens=5,
        cost_usd=cost,
        latency_ms=20.0,
        key_id=key,
        created=created or time.time(),
        **kw,
    )


def test_sqlite_runs_in_wal_with_normal_sync(store):
    with store.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA synchronous")).scalar() == 1  # NORMAL: safe against SIGKILL in WAL


def test_records_round_trip_with_fallbacks_and_route(store):
    store.log(
        rec(
            1,
            fallbacks=["x", "y"],
            route_reason="router:cheap enough",
            predicted_quality=0.93,
            ttft_ms=4.5,
            stream=True,
        )
    )
    (row,) = store.requests()
    assert row["request_id"] == "r1" and row["fallbacks"] == "x,y" and row["stream"] == 1
    assert row["route_reason"] == "router:cheap enough" and row["predicted_quality"] == pytest.approx(0.93)
    assert row["ttft_ms"] == pytest.approx(4.5)


def test_usage_groups_by_model_key_and_day(store):
    day1 = 1_700_000_000.0  # 2023-11-14 UTC
    store.log(rec(1, "a", "k1", 0.5, created=day1))
    store.log(rec(2, "a", "k2", 0.25, created=day1 + 86400))
    store.log(rec(3, "b", "k1", 1.0, created=day1 + 86400))
    store.log(rec(4, "b", None, 0.0, status=404, created=day1 + 86400))
    by_model = {r["model"]: r for r in store.usage(by="model")}
    assert by_model["a"]["requests"] == 2 and by_model["a"]["cost_usd"] == pytest.approx(0.75)
    assert by_model["(b, unserved)"]["errors"] == 1
    by_key = {r["key"]: r for r in store.usage(by="key")}
    assert by_key["k1"]["cost_usd"] == pytest.approx(1.5) and by_key["(no key)"]["requests"] == 1
    by_day = {r["day"]: r["requests"] for r in store.usage(by="day")}
    assert by_day == {"2023-11-14": 1, "2023-11-15": 3}
    assert len(store.requests(since=day1 + 1)) == 3
    assert store.spend("k1") == pytest.approx(1.5) and store.spend("nobody") == 0.0


def test_keys_are_stored_hashed(store, tmp_path):
    assert not store.has_keys()
    key, secret = store.create_key("team", budget_usd=2.0, rpm=10)
    assert store.has_keys() and secret.startswith("fk-")
    found = store.find_key(secret)
    assert found.key_id == key.key_id and found.budget_usd == 2.0 and found.rpm == 10
    assert store.find_key(secret + "x") is None
    raw = (tmp_path / "u.db").read_bytes() + (tmp_path / "u.db-wal").read_bytes()
    assert secret.encode() not in raw and hash_key(secret).encode() in raw
    with pytest.raises(ConfigError):
        store.create_key(rpm=0)


def test_bad_url_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError):
        UsageStore("nosuchdb://x")
    with pytest.raises(ConfigError):
        UsageStore(f"sqlite:///{tmp_path}/missing/dir/u.db")


WRITER = """
import sys, time
from fleetlm.serve.store import RequestRecord, UsageStore
s = UsageStore(sys.argv[1])
i = 0
while True:
    s.log(RequestRecord(request_id=f"k{i}", endpoint="chat", model_requested="a", status=200))
    print(i, flush=True)  # printed only after the commit returned
    i += 1
"""


def test_committed_records_survive_sigkill(tmp_path):
    url = f"sqlite:///{tmp_path / 'kill.db'}"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, url], stdout=subprocess.PIPE, text=True)
    acked = []
    deadline = time.time() + 60
    while len(acked) < 50 and time.time() < deadline:
        acked.append(int(proc.stdout.readline()))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(acked) == 50
    s = UsageStore(url)
    stored = {r["request_id"] for r in s.requests()}
    assert {f"k{i}" for i in acked} <= stored


def _pg_cluster():
    """A throwaway PostgreSQL server on a loopback port: $FLEET_TEST_PG_URL, else initdb + pg_ctl here."""
    if os.environ.get("FLEET_TEST_PG_URL"):
        yield os.environ["FLEET_TEST_PG_URL"]
        return
    pytest.importorskip("psycopg")
    if not (shutil.which("initdb") and shutil.which("pg_ctl")):
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) and no $FLEET_TEST_PG_URL")
    # PostgreSQL refuses to run as root: use its own system user then, in a directory it can reach.
    as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="fleet-pg-"))
    data, port = root / "pg", _free_port()
    data.mkdir()
    if as_pg:
        shutil.chown(root, "postgres")
        shutil.chown(data, "postgres")
    subprocess.run(
        [*as_pg, "initdb", "-D", str(data), "-A", "trust", "-U", "fleet"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    opts = f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=on"
    subprocess.run(
        [*as_pg, "pg_ctl", "-D", str(data), "-o", opts, "-w", "-l", str(data / "log"), "start"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    try:
        yield f"postgresql://fleet@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*as_pg, "pg_ctl", "-D", str(data), "-m", "immediate", "stop"], capture_output=True, timeout=60
        )
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_url():
    yield from _pg_cluster()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_postgresql_storage(pg_url):
    store = UsageStore(pg_url)
    try:
        store.log(rec(1, "a", "k1", 0.5))
        store.log(rec(2, "b", "k1", 0.25, fallbacks=["a"]))
        assert [r["request_id"] for r in store.requests()] == ["r1", "r2"]
        assert store.requests()[1]["fallbacks"] == "a"
        assert store.spend("k1") == pytest.approx(0.75)
        key, secret = store.create_key("pg", budget_usd=1.0)
        assert store.find_key(secret).key_id == key.key_id
        assert {r["model"] for r in store.usage(by="model")} == {"a", "b"}
    finally:
        store.close()


def _open_store_after(barrier, url, results):
    from fleetlm.serve.store import UsageStore

    barrier.wait()
    try:
        UsageStore(url).close()
        results.put("ok")
    except Exception as exc:  # the failure itself is what the test reports
        results.put(f"{type(exc).__name__}: {exc}")


def test_gateways_starting_together_on_a_new_file_all_open_it(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    n = 6
    barrier, results = ctx.Barrier(n), ctx.Queue()
    url = f"sqlite:///{tmp_path / 'usage.db'}"
    procs = [ctx.Process(target=_open_store_after, args=(barrier, url, results)) for _ in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [results.get(timeout=5) for _ in range(n)] == ["ok"] * n
