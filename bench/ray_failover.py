"""The replica kill on Ray Serve (issue 16): N requests over two gateway replicas while one is killed.

    nice -n 10 .venv/bin/python bench/ray_failover.py [--requests 200] [--clients 4]

A local two-node Ray cluster (head plus a worker node process), the shipped-style tiny Llama (random weights,
made here) in its own deployment, two gateway replicas sharing one SQLite usage log and a throwaway Redis.
Clients send chat requests (every second one streamed) through Serve's proxy; once a third of them are done,
the gateway replica that answered last is killed (ray.kill on its actor). Printed: requests ok and failed (and
how they failed), usage rows found for the successful ones, latency p50 before and after the kill, the time
from the kill to the last failed request, and until Serve runs two gateway replicas again.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=8)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING"] = "0"  # both replicas take the proxy's traffic
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ["FLEET_COMPILE"] = "0"

    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from fleetlm.config import parse_config
    from fleetlm.model.make_tiny import make_tiny_llama
    from fleetlm.ops.local import RedisServer, free_port
    from fleetlm.serve.ray_app import APP_NAME, GATEWAY, REPLICA_HEADER, REQUEST_ID_HEADER, build_app
    from fleetlm.serve.store import UsageStore

    tmp = Path(tempfile.mkdtemp(prefix="fleet-ray-bench-"))
    model = make_tiny_llama(tmp / "tiny")
    with RedisServer() as redis:
        config = parse_config({
            "models": {"tiny": {"path": str(model), "dtype": "f32", "price": {"input": 1.0, "output": 2.0}}},
            "storage": f"sqlite:///{tmp / 'usage.db'}", "counters": redis.url,
            "ray": {"gateway": {"num_replicas": 2, "num_cpus": 0.5},
                    "models": {"tiny": {"num_replicas": 1, "num_cpus": 0.5}}},
        })
        store = UsageStore(config.storage_url())
        _, secret = store.create_key("bench", budget_usd=100.0)
        t0 = time.monotonic()
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
        try:
            cluster.add_node(num_cpus=2)
            ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
            serve.run(build_app(config), name=APP_NAME, route_prefix="/")
            print(f"cluster up and fleet deployed in {time.monotonic() - t0:.1f} s", flush=True)
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            results: list[dict] = []
            lock, kill_at = threading.Lock(), threading.Event()
            killed: dict = {}
            counter = iter(range(args.requests))

            def client_loop(client: httpx.Client) -> None:
                for i in counter:
                    body = {"model": "tiny", "messages": [{"role": "user", "content": f"hello {i}"}],
                            "max_tokens": args.max_tokens, "stream": i % 2 == 1}
                    start = time.monotonic()
                    try:
                        r = client.post(url, json=body, headers={"authorization": f"Bearer {secret}"},
                                        timeout=120)
                        ok = r.status_code == 200 and (b"[DONE]" in r.content or b'"choices"' in r.content)
                        out = {"ok": ok, "status": r.status_code, "id": r.headers.get(REQUEST_ID_HEADER),
                               "replica": r.headers.get(REPLICA_HEADER), "body": r.text[:160]}
                    except httpx.HTTPError as exc:
                        out = {"ok": False, "status": type(exc).__name__}
                    out.update(start=start, end=time.monotonic())
                    with lock:
                        results.append(out)
                        if len(results) == args.requests // 3:
                            kill_at.set()

            def watch_replicas() -> None:  # Serve notices the death, then runs two gateway replicas again
                noticed = False
                while time.monotonic() - killed["at"] < 120:
                    states = serve.status().applications[APP_NAME].deployments[GATEWAY].replica_states
                    noticed = noticed or states != {"RUNNING": 2}
                    if noticed and states == {"RUNNING": 2}:
                        killed["restored"] = time.monotonic()
                        return
                    time.sleep(0.1)

            with httpx.Client() as client:
                threads = [threading.Thread(target=client_loop, args=(client,)) for _ in range(args.clients)]
                for t in threads:
                    t.start()
                kill_at.wait()
                with lock:
                    victim = next(r["replica"] for r in reversed(results) if r["ok"])
                ray.kill(ray.get_actor(victim, namespace="serve"))
                killed["at"] = time.monotonic()
                watcher = threading.Thread(target=watch_replicas, daemon=True)
                watcher.start()
                for t in threads:
                    t.join()
                watcher.join(timeout=120)
            report(results, killed, victim, store)
        finally:
            serve.shutdown()
            ray.shutdown()
            cluster.shutdown()
            shutil.rmtree(tmp, ignore_errors=True)


def report(results: list[dict], killed: dict, victim: str, store) -> None:
    at = killed["at"]
    ok = [r for r in results if r["ok"]]
    failed = [r for r in results if not r["ok"]]
    rows = {row["request_id"]: row for row in store.requests()}
    logged = [r for r in ok if r["id"] in rows and rows[r["id"]]["status"] == 200]
    before = [(r["end"] - r["start"]) * 1000 for r in ok if r["end"] < at]
    after = [(r["end"] - r["start"]) * 1000 for r in ok if r["start"] > at]
    last_fail = max((r["end"] for r in failed), default=at)
    by_replica: dict[str, int] = {}
    for r in ok:
        by_replica[r["replica"]] = by_replica.get(r["replica"], 0) + 1
    print(f"requests: {len(results)}; ok {len(ok)}, failed {len(failed)} "
          f"({', '.join(sorted({str(r['status']) for r in failed})) or 'none'})")
    print(f"usage rows for the successful requests: {len(logged)}/{len(ok)}; rows in the log: {len(rows)} "
          f"({sum(1 for row in rows.values() if row['status'] == 200)} with status 200)")
    print("answered by: " + ", ".join(f"{k.split('#')[-1]}{' (killed)' if k == victim else ''}: {v}"
                                      for k, v in by_replica.items()))
    print(f"latency p50: before the kill {statistics.median(before):.0f} ms ({len(before)} requests), "
          f"after {statistics.median(after):.0f} ms ({len(after)})" if before and after else "latency: n/a")
    seen_before = {r["replica"] for r in ok if r["end"] < at}
    newcomer = min((r["end"] for r in ok if r["replica"] not in seen_before), default=None)
    for r in failed:  # how each failed: when it started and ended relative to the kill, who answered
        print(f"  failed: {r['status']} started {r['start'] - at:+.2f} s, ended {r['end'] - at:+.2f} s after "
              f"the kill, replica {str(r.get('replica')).split('#')[-1]}: {r.get('body', '')!r}")
    last_start = max((r["start"] for r in failed), default=at)
    print((f"the last failed request started {last_start - at:+.2f} s after the kill and ended "
           f"{last_fail - at:+.2f} s after it; " if failed else "no request failed; ")
          + (f"Serve runs 2 gateway replicas again after {killed['restored'] - at:.1f} s"
             if "restored" in killed else "the replacement replica was not running by the end")
          + (f"; the replacement answered first {newcomer - at:.1f} s after the kill" if newcomer else ""))


if __name__ == "__main__":
    main()
