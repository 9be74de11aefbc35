"""The gateway as a Ray Serve application: our FastAPI app as the ingress deployment, a deployment per model.

`fleet serve --ray` (or `serve run fleetlm.serve.ray_app:build config=fleet.yaml`) deploys
- `gateway`: replicas of create_app's FastAPI app (keys, limits, routing, fallbacks, failover, usage log,
  /metrics, /dashboard), each answering with `x-fleet-replica` (its Ray actor's name);
- `model-<name>`: one deployment per local model (our engine, llama.cpp, recorded answers), each with its own
  replicas, that the gateway calls through a DeploymentHandle (HandleBackend), streams included. Remote models
  are called by each gateway replica directly, as without Ray.

Replicas share nothing in memory: the usage log and the keys live in the storage database (one SQLite file on
one machine, PostgreSQL across machines), budgets and rate limits in Redis (`counters:`). Both are resolved
here, in the driver, since a replica runs in another process, maybe on another machine, with another working
directory. A gateway replica that dies loses its in-flight requests only; Serve's proxy sends the next ones to
the others and the controller starts a replacement. A model replica that dies fails the requests it was
generating over to their fallbacks (serve/failover.py), like any backend that drops a stream.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

with warnings.catch_warnings():  # Ray Serve's own pydantic models use Field options pydantic deprecated
    warnings.simplefilter("ignore", DeprecationWarning)
    from ray import serve
    from ray.exceptions import RayTaskError
    from ray.serve import Application
    from ray.serve.handle import DeploymentHandle

from fleetlm.config import FleetConfig, Replicas, load_config, parse_config
from fleetlm.errors import ConfigError
from fleetlm.serve.backends import Backend, Delta, Embeddings, Generation, build_backends
from fleetlm.serve.errors import APIError, BackendError
from fleetlm.serve.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

APP_NAME = "fleet"
GATEWAY = "gateway"
REPLICA_HEADER = "x-fleet-replica"
REQUEST_ID_HEADER = "x-fleet-request-id"
CALLS = ("chat", "complete", "embed")
STREAMS = ("stream_chat", "stream_complete")
# environment a replica needs from the driver's (a cluster's workers start with the raylet's environment)
FORWARDED_ENV = re.compile(r"^(FLEET_|OTEL_|HF_|TORCHINDUCTOR_CACHE_DIR$|OMP_NUM_THREADS$)")


def model_deployment_name(model: str) -> str:
    """A model's deployment: Serve names its replica actors `app#deployment#id`, so no '#' (or '/')."""
    return "model-" + re.sub(r"[^A-Za-z0-9._-]", "_", model)


def portable_config(config: FleetConfig) -> dict:
    """The config as plain data for the replicas, with the storage URL and the counters resolved here."""
    data = config.model_dump(mode="json")
    data["storage"] = config.storage_url()  # the default SQLite file lies in the driver's working directory
    data["counters"] = config.counters or os.environ.get("FLEET_REDIS_URL")
    return data


def deployment_options(replicas: Replicas) -> dict[str, Any]:
    """Serve's options for one deployment, from its `ray:` entry in fleet.yaml."""
    env = {k: v for k, v in os.environ.items() if FORWARDED_ENV.match(k)}
    options: dict[str, Any] = {
        "max_ongoing_requests": replicas.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": replicas.num_cpus, "runtime_env": {"env_vars": env}},
        "health_check_period_s": 5.0,
        "health_check_timeout_s": 30.0,
    }
    if replicas.autoscaling is not None:
        a = replicas.autoscaling
        options["autoscaling_config"] = {"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                                         "target_ongoing_requests": a.target_ongoing_requests}
    else:
        options["num_replicas"] = replicas.num_replicas or 1
    return options


def _only(config: FleetConfig, names: list[str]) -> FleetConfig:
    """The config narrowed to some models, for build_backends (fallbacks may name models left out)."""
    return config.model_copy(update={"models": {n: config.models[n] for n in names}})


# ---------------------------------------------------------------- the model side


@serve.deployment
class ModelServer:
    """One local model in a Ray replica: its Backend, called by the gateway's HandleBackend."""

    def __init__(self, name: str, config: dict):
        self.name = name
        self.backend: Backend = build_backends(_only(parse_config(config), [name]))[name]

    def info(self) -> dict[str, Any]:
        """What the gateway reads off a backend besides its methods (labels of recorded models, engines)."""
        b = self.backend
        return {"recorded": bool(getattr(b, "recorded", False)),
                "served_name": getattr(b, "served_name", None), "fleet_info": getattr(b, "fleet_info", None)}

    async def call(self, method: str, request: Any) -> Generation | Embeddings:
        if method not in CALLS:
            raise BackendError(f"{self.name}: no method {method!r}", retryable=False)
        return await getattr(self.backend, method)(request)

    async def stream(self, method: str, request: Any) -> AsyncIterator[Delta]:
        if method not in STREAMS:
            raise BackendError(f"{self.name}: no stream {method!r}", retryable=False)
        async for delta in getattr(self.backend, method)(request):
            yield delta

    def check_health(self) -> None:
        """Serve replaces a replica whose check raises: here, when the model's engine thread has died."""
        thread = getattr(self.backend, "_thread", None)  # LocalBackend's decode worker
        if getattr(self.backend, "_closed", False) or (thread is not None and not thread.is_alive()):
            raise RuntimeError(f"{self.name}: the engine is not running")

    async def __del__(self) -> None:
        await self.backend.aclose()


def _backend_error(name: str, exc: BaseException) -> APIError:
    """An exception from a handle call, as the gateway's backends raise them: the model's own error (a
    BackendError or a client error) crosses as the cause of Ray's wrapper; anything else (the replica died,
    no replica, the call was cancelled) is a backend failure that fallbacks may cover."""
    cause = exc.cause if isinstance(exc, RayTaskError) else None
    if isinstance(cause, APIError):
        return cause
    detail = str(cause or exc).strip().splitlines()
    return BackendError(f"{name}: its Ray replica failed: {type(cause or exc).__name__}: "
                        f"{detail[0][:300] if detail else 'no detail'}")


class HandleBackend:
    """A Backend whose model runs in a Ray Serve deployment: each call goes through its DeploymentHandle."""

    def __init__(self, name: str, handle: DeploymentHandle, info: dict[str, Any]):
        self.name, self.handle = name, handle
        self.recorded = bool(info.get("recorded"))
        self.served_name = info.get("served_name")
        if info.get("fleet_info"):
            self.fleet_info = info["fleet_info"]

    @classmethod
    async def connect(cls, name: str, handle: DeploymentHandle) -> HandleBackend:
        """Waits for the model's first replica (the gateway is not ready before its models are)."""
        return cls(name, handle, await handle.info.remote())

    async def _call(self, method: str, request: Any) -> Any:
        try:
            return await self.handle.call.remote(method, request)
        except Exception as exc:  # noqa: BLE001 - every failure of the call becomes the backend's error
            raise _backend_error(self.name, exc) from None

    async def _stream(self, method: str, request: Any) -> AsyncIterator[Delta]:
        response = self.handle.options(stream=True).stream.remote(method, request)
        finished = False
        try:
            async for delta in response:
                yield delta
            finished = True
        except Exception as exc:  # noqa: BLE001
            finished = True
            raise _backend_error(self.name, exc) from None
        finally:
            if not finished:  # the client went away: the model's replica stops generating for it
                response.cancel()

    async def chat(self, request: ChatCompletionRequest) -> Generation:
        return await self._call("chat", request)

    def stream_chat(self, request: ChatCompletionRequest) -> AsyncIterator[Delta]:
        return self._stream("stream_chat", request)

    async def complete(self, request: CompletionRequest) -> Generation:
        return await self._call("complete", request)

    def stream_complete(self, request: CompletionRequest) -> AsyncIterator[Delta]:
        return self._stream("stream_complete", request)

    async def embed(self, request: EmbeddingRequest) -> Embeddings:
        return await self._call("embed", request)

    async def aclose(self) -> None:
        return None


# ---------------------------------------------------------------- the gateway side


class ReplicaHeader:
    """ASGI middleware: every HTTP response names the gateway replica that produced it (x-fleet-replica), and
    repeats the gateway's request id as x-fleet-request-id, since Serve's proxy appends its own id to
    x-request-id (the usage log's is the first of the two)."""

    def __init__(self, app: Any, replica: str):
        self.app, self.value = app, replica.encode("ascii", "replace")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_named(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), (REPLICA_HEADER.encode(), self.value)]
                ours = [v for k, v in headers if k.lower() == b"x-request-id"]
                headers += [(REQUEST_ID_HEADER.encode(), v) for v in ours]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_named)


@serve.deployment
@serve.ingress()
class GatewayServer:
    """A gateway replica: create_app's FastAPI app over HandleBackends for the local models."""

    def __init__(self, config: dict, models: dict[str, DeploymentHandle]):
        self.config, self.handles = parse_config(config), models
        self.replica = serve.get_replica_context().replica_id.to_full_id_str()

    async def __serve_build_asgi_app__(self) -> Any:
        from fleetlm.serve.app import create_app
        from fleetlm.serve.store import UsageStore

        remote = [n for n in self.config.models if n not in self.handles]
        backends: dict[str, Backend] = build_backends(_only(self.config, remote)) if remote else {}
        for name, handle in self.handles.items():
            backends[name] = await HandleBackend.connect(name, handle)
        self.store = UsageStore(self.config.storage_url())
        app = create_app(self.config, self.store, backends)
        self.limits = app.state.gateway.limits
        app.add_middleware(ReplicaHeader, replica=self.replica)
        return app

    async def check_health(self) -> None:
        """The replica is healthy while the shared state answers: the usage store, and Redis when used."""
        await asyncio.to_thread(self.store.has_keys)
        client = getattr(self.limits.counters, "client", None)  # RedisCounters
        if client is not None:
            await asyncio.to_thread(client.ping)


def build_app(config: FleetConfig) -> Application:
    """The Serve application: a deployment per local model (its `ray.models` entry, else one replica) and the
    gateway's (its `ray.gateway` entry), bound to their handles."""
    from fleetlm.serve.store import UsageStore

    ray_spec = config.ray
    data = portable_config(config)
    # the schema is made here, once: gateway replicas creating it together on a new SQLite file collide
    UsageStore(data["storage"]).close()
    models = {}
    for name, spec in config.models.items():
        if spec.kind == "remote":
            continue
        replicas = ray_spec.models.get(name, Replicas()) if ray_spec else Replicas()
        models[name] = ModelServer.options(name=model_deployment_name(name),
                                           **deployment_options(replicas)).bind(name, data)
    gateway = ray_spec.gateway if ray_spec else Replicas()
    return GatewayServer.options(name=GATEWAY, **deployment_options(gateway)).bind(data, models)


def build(args: dict[str, str]) -> Application:
    """`serve run fleetlm.serve.ray_app:build config=fleet.yaml`: Serve's application builder."""
    unknown = set(args) - {"config"}
    if unknown:
        raise ConfigError(f"serve run: unknown argument(s) {', '.join(sorted(unknown))}; give config=PATH")
    return build_app(load_config(Path(args.get("config", "fleet.yaml"))))


def run(config: FleetConfig, host: str, port: int) -> None:
    """`fleet serve --ray`: join the configured Ray cluster (or start one here), deploy, serve to Ctrl-C."""
    import ray

    ray.init(address=config.ray.address if config.ray else None, logging_level="WARNING")
    serve.start(http_options={"host": host, "port": port})
    print(f"fleet gateway on Ray Serve: deploying to http://{host}:{port}/v1 (Ctrl-C stops it)",
          file=sys.stderr, flush=True)
    try:
        serve.run(build_app(config), name=APP_NAME, route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        serve.delete(APP_NAME)  # a cluster of ours goes with this process; a joined one keeps running
