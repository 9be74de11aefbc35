"""The gateway on Ray Serve, for real: a local two-node Ray cluster (head plus a worker node process), a tiny
model in its own deployment, two gateway replicas sharing one SQLite usage log and one Redis; requests spread
over both replicas, streams through the model's DeploymentHandle, and a gateway replica killed mid-run."""

from __future__ import annotations

import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from fleetlm.config import Replicas, parse_config
from fleetlm.errors import ConfigError
from fleetlm.ops.local import RedisServer, free_port
from fleetlm.serve.ray_app import (
    APP_NAME,
    GATEWAY,
    REPLICA_HEADER,
    REQUEST_ID_HEADER,
    build,
    deployment_options,
    model_deployment_name,
    portable_config,
)
from fleetlm.serve.store import UsageStore

pytestmark = pytest.mark.timeout(900)  # a Ray cluster on two busy cores takes its time to start

PRICE = {"input": 1.0, "output": 2.0}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4,
        "temperature": 0}


# ---------------------------------------------------------------- config, no cluster


def test_bad_ray_config_is_one_clear_error(tiny_llama):
    base = {"models": {"tiny": {"path": str(tiny_llama)}, "far": {"remote": "http://127.0.0.1:9/v1"}}}
    cases = {
        "ray.gateway.num_replicas: Input should be greater than or equal to 1":
            {"gateway": {"num_replicas": 0}},
        "max_replicas (1) is below min_replicas (2)":
            {"models": {"tiny": {"autoscaling": {"min_replicas": 2, "max_replicas": 1}}}},
        "give num_replicas or autoscaling, not both":
            {"gateway": {"num_replicas": 2, "autoscaling": {"max_replicas": 3}}},
        "ray.models: unknown model 'nope'": {"models": {"nope": {}}},
        "ray.models.far: a remote model has no deployment": {"models": {"far": {}}},
    }
    for message, ray in cases.items():
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            parse_config({**base, "ray": ray})


def test_fleet_yaml_sets_each_deployments_replicas(tmp_path, tiny_llama, monkeypatch):
    auto = Replicas.model_validate({"autoscaling": {"min_replicas": 1, "max_replicas": 3,
                                                    "target_ongoing_requests": 4}, "num_cpus": 0.5})
    opts = deployment_options(auto)
    assert opts["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3,
                                          "target_ongoing_requests": 4.0}
    assert "num_replicas" not in opts and opts["ray_actor_options"]["num_cpus"] == 0.5
    assert deployment_options(Replicas(num_replicas=2))["num_replicas"] == 2
    assert deployment_options(Replicas())["num_replicas"] == 1
    # what replicas elsewhere cannot resolve themselves is resolved in the driver: storage and counters
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLEET_REDIS_URL", "redis://127.0.0.1:6399/0")
    data = portable_config(parse_config({"models": {"tiny": {"path": str(tiny_llama)}}}))
    assert data["storage"] == f"sqlite:///{tmp_path / 'fleet.db'}"
    assert data["counters"] == "redis://127.0.0.1:6399/0"
    assert model_deployment_name("org/model#1") == "model-org_model_1"
    with pytest.raises(ConfigError, match="unknown argument"):
        build({"config": "fleet.yaml", "port": "1"})


def test_errors_from_a_handle_become_the_gateways_errors():
    from ray.exceptions import ActorDiedError, RayTaskError

    from fleetlm.serve.errors import BackendError
    from fleetlm.serve.ray_app import _backend_error

    own = BackendError("tiny: the prompt is too long", retryable=False, upstream_status=400)
    crossed = _backend_error("tiny", RayTaskError("call", "traceback", own))
    assert crossed is own  # the model's error, with its status: a 400 stays the client's
    died = _backend_error("tiny", ActorDiedError())
    assert isinstance(died, BackendError) and died.retryable and died.upstream_status is None
    assert died.message.startswith("tiny: its Ray replica failed: ActorDiedError")


# ---------------------------------------------------------------- a real cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_checkpoint_factory):
    """(gateway URL, usage store, API key secret): the fleet deployed on a head node and a worker node."""
    ray = pytest.importorskip("ray")
    from ray import serve
    from ray.cluster_utils import Cluster

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed")
    tmp = tmp_path_factory.mktemp("ray-fleet")
    with pytest.MonkeyPatch.context() as mp, RedisServer() as redis:
        # the proxy would prefer the replica on its own node; the test wants both replicas to take traffic
        mp.setenv("RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING", "0")
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        mp.setenv("FLEET_COMPILE", "0")
        config = parse_config({
            "models": {"tiny": {"path": str(tiny_checkpoint_factory("llama")), "dtype": "f32",
                                "price": PRICE, "fallbacks": ["tiny2"]},
                       "tiny2": {"path": str(tiny_checkpoint_factory("qwen2")), "dtype": "f32",
                                 "price": PRICE}},
            "storage": f"sqlite:///{tmp / 'usage.db'}",
            "counters": redis.url,
            "ray": {"gateway": {"num_replicas": 2, "num_cpus": 0.5},
                    "models": {"tiny": {"autoscaling": {"min_replicas": 1, "max_replicas": 2,
                                                        "target_ongoing_requests": 8}, "num_cpus": 0.5},
                               "tiny2": {"num_cpus": 0.5}}},
        })
        store = UsageStore(config.storage_url())
        _, secret = store.create_key("ray-test", budget_usd=100.0)
        head = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
        try:
            head.add_node(num_cpus=2)  # a second raylet process: the worker node
            ray.init(address=head.address, logging_level="WARNING")
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
            from fleetlm.serve.ray_app import build_app

            serve.run(build_app(config), name=APP_NAME, route_prefix="/")
            yield f"http://127.0.0.1:{port}", store, secret
        finally:
            serve.shutdown()
            ray.shutdown()
            head.shutdown()


def _chat(client: httpx.Client, url: str, secret: str, **extra) -> httpx.Response:
    return client.post(f"{url}/v1/chat/completions", json={**CHAT, **extra},
                       headers={"authorization": f"Bearer {secret}"}, timeout=120)


def _rows(store: UsageStore) -> dict[str, dict]:
    return {r["request_id"]: r for r in store.requests()}


def test_two_nodes_and_requests_spread_over_both_gateway_replicas(cluster):
    import ray
    from ray import serve

    url, store, secret = cluster
    assert sum(1 for n in ray.nodes() if n["Alive"]) == 2
    app = serve.status().applications[APP_NAME]
    assert app.deployments[GATEWAY].replica_states.get("RUNNING") == 2
    assert app.deployments[model_deployment_name("tiny")].replica_states.get("RUNNING") >= 1
    with httpx.Client() as client, ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: _chat(client, url, secret), range(24)))
    assert [r.status_code for r in responses] == [200] * 24
    replicas = {r.headers[REPLICA_HEADER] for r in responses}
    assert len(replicas) == 2, replicas  # both gateway replicas answered
    rows = _rows(store)
    for r in responses:  # each answer was logged, with the model's usage, by whichever replica answered
        row = rows[r.headers[REQUEST_ID_HEADER]]
        usage = r.json()["usage"]
        assert (row["status"], row["model_used"]) == (200, "tiny")
        assert (row["prompt_tokens"], row["completion_tokens"]) == (usage["prompt_tokens"],
                                                                    usage["completion_tokens"])
        assert row["cost_usd"] == pytest.approx((usage["prompt_tokens"] * 1 + usage["completion_tokens"] * 2)
                                                / 1e6)


def test_a_stream_crosses_the_deployment_handle(cluster):
    url, store, secret = cluster
    with httpx.Client() as client, client.stream(
        "POST", f"{url}/v1/chat/completions", timeout=120, headers={"authorization": f"Bearer {secret}"},
        json={**CHAT, "max_tokens": 12, "stream": True, "stream_options": {"include_usage": True}},
    ) as response:
        assert response.status_code == 200
        events = [line[5:].strip() for line in response.iter_lines() if line.startswith("data:")]
        request_id = response.headers[REQUEST_ID_HEADER]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    pieces = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    usage = chunks[-1]["usage"]
    assert 1 <= len([p for p in pieces if p is not None]) == usage["completion_tokens"] <= 12
    row = _rows(store)[request_id]
    assert (row["status"], row["stream"], row["completion_tokens"]) == (200, 1, usage["completion_tokens"])


def test_a_models_error_crosses_the_handle_with_its_status(cluster):
    url, store, secret = cluster
    with httpx.Client() as client:
        r = _chat(client, url, secret, messages=[{"role": "user", "content": "word " * 2000}])
    assert r.status_code == 400, r.text  # too long for the model: the client's mistake, not a 5xx
    assert "tiny" in r.json()["error"]["message"]
    assert _rows(store)[r.headers[REQUEST_ID_HEADER]]["status"] == 400


def test_rate_limit_holds_across_replicas(cluster):
    url, store, _ = cluster
    _, secret = store.create_key("ray-rpm", rpm=10)
    with httpx.Client() as client, ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: _chat(client, url, secret, max_tokens=1), range(16)))
    assert sorted(r.status_code for r in responses) == [200] * 10 + [429] * 6
    assert len({r.headers[REPLICA_HEADER] for r in responses}) == 2  # the limit is one across replicas


def test_a_killed_gateway_replica_loses_no_usage_record(cluster):
    import ray

    url, store, secret = cluster
    results: list[dict] = []
    lock, stop = threading.Lock(), threading.Event()
    killed: dict = {}

    def sender(client: httpx.Client) -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                r = _chat(client, url, secret, max_tokens=3, stream=len(results) % 2 == 1)
                body = r.read()
                ok = r.status_code == 200 and (b"[DONE]" in body or b'"choices"' in body)
                out = {"ok": ok, "id": r.headers.get(REQUEST_ID_HEADER),
                       "replica": r.headers.get(REPLICA_HEADER)}
            except httpx.HTTPError as exc:
                out = {"ok": False, "error": repr(exc)}
            out.update(start=started, end=time.monotonic())
            with lock:
                results.append(out)

    with httpx.Client() as client:
        threads = [threading.Thread(target=sender, args=(client,)) for _ in range(4)]
        for t in threads:
            t.start()
        while len(results) < 20 and not stop.is_set():
            time.sleep(0.05)
        victim = next(r["replica"] for r in reversed(results) if r["ok"])
        ray.kill(ray.get_actor(victim, namespace="serve"))
        killed.update(name=victim, at=time.monotonic())
        # keep sending until a dozen requests have started well after the kill (on a quiet machine the
        # requests of a fixed count could all end within a second of it)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and sum(r["start"] > killed["at"] + 1.0 for r in results) < 12:
            time.sleep(0.1)
        stop.set()
        for t in threads:
            t.join(timeout=600)
    after = [r for r in results if r["start"] > killed["at"] + 1.0]
    failed = [r for r in results if not r["ok"]]
    assert len(failed) <= 4, failed  # at most the requests in flight on the killed replica
    assert after and all(r["ok"] for r in after[-10:])  # the traffic is carried on
    assert all(r["replica"] != victim for r in after if r["ok"])
    rows = _rows(store)
    succeeded = [r for r in results if r["ok"]]
    assert all(r["id"] in rows and rows[r["id"]]["status"] == 200 for r in succeeded)  # no lost usage record


def test_a_killed_model_replica_fails_over_mid_stream(cluster):
    """Last: every replica of `tiny` is killed while one of its streams runs; the stream ends on tiny2."""
    import ray

    url, store, secret = cluster
    prefix = f"SERVE_REPLICA::{APP_NAME}#{model_deployment_name('tiny')}#"
    with httpx.Client() as client, client.stream(
        "POST", f"{url}/v1/chat/completions", timeout=120, headers={"authorization": f"Bearer {secret}"},
        json={**CHAT, "max_tokens": 400, "stream": True},
    ) as response:
        lines = (line[5:].strip() for line in response.iter_lines() if line.startswith("data:"))
        first = json.loads(next(lines))
        for actor in ray.util.list_named_actors(all_namespaces=True):
            if actor["name"].startswith(prefix):
                ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]))
        rest = list(lines)
        request_id = response.headers[REQUEST_ID_HEADER]
    assert first["choices"][0]["delta"]["role"] == "assistant" and rest[-1] == "[DONE]"
    chunks = [json.loads(e) for e in rest[:-1]]
    assert not any("error" in c for c in chunks)  # one uninterrupted stream
    switch = [c["fleet"] for c in chunks if "fleet" in c]
    assert len(switch) == 1 and switch[0]["model"] == "tiny2", switch
    assert (switch[0]["failover"][0]["from"], switch[0]["failover"][0]["to"]) == ("tiny", "tiny2")
    assert "its Ray replica failed" in switch[0]["failover"][0]["error"]
    row = _rows(store)[request_id]
    assert (row["status"], row["model_used"], row["fallbacks"]) == (200, "tiny2", "tiny")
