"""The fleet.yaml schema: which models the gateway serves, where they run, what they cost, how it routes.

A model is exactly one of: one of our checkpoints (`path` + `dtype`), a GGUF file (`gguf`), a catalog model
(`catalog`: a name from `fleet models list`, served like `gguf` from its installed file), a remote
OpenAI-compatible endpoint (`remote` base URL + `api_key_env`), or a recorded model (`replay`: a folder laid
out like RouteLLM's evals data, answering with `replay_model`'s recorded responses). Prices are dollars per
million tokens.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fleetlm.errors import ConfigError
from fleetlm.mcp.config import McpServers
from fleetlm.memory.config import MemorySettings
from fleetlm.rag.config import KnowledgeSettings
from fleetlm.serve.assistants import Assistants, check_assistants
from fleetlm.vision.config import RAPIDOCR, VisionConfig
from fleetlm.voice.asr import TranscriptionSettings
from fleetlm.voice.voices import VoiceConfig

DEFAULT_SQLITE_FILE = "fleet.db"
# Google Cloud's on-demand price of an n2d-standard-2 (2 vCPUs of an AMD EPYC, 8 GB) in us-central1, $0.0844
# an hour (cloud.google.com/compute/vm-instance-pricing, as quoted in October 2025): the machine a local
# model's measured tokens/s are priced at (fleetlm.fleet.measure.price_per_million); fleet.yaml may set
# its own.
DEFAULT_MACHINE_USD_PER_HOUR = 0.0844


class _Strict(BaseModel):
    # A typo in fleet.yaml should fail loudly, not be silently ignored.
    model_config = ConfigDict(extra="forbid")


class Price(_Strict):
    input: float = Field(0.0, ge=0, description="$ per 1M prompt tokens")
    output: float = Field(0.0, ge=0, description="$ per 1M completion tokens")

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input + completion_tokens * self.output) / 1e6


# List prices ($ per 1M tokens in/out) of the models RouteLLM recorded, for a replay model that sets no
# price: gpt-4-1106-preview at OpenAI's launch price, Mixtral-8x7B-Instruct at Together AI's hosted price
# (sources in docs/ROUTING.md).
RECORDED_LIST_PRICES = {
    "gpt-4-1106-preview": (10.0, 30.0),
    "mistralai/Mixtral-8x7B-Instruct-v0.1": (0.6, 0.6),
}


def recorded_list_price(model: str) -> Price | None:
    """The list price of a recorded model, by its full name or the short one ("Mixtral-8x7B-Instruct")."""
    short = model.lower().split("/")[-1]
    for name, (inp, out) in RECORDED_LIST_PRICES.items():
        if name.lower() == model.lower() or name.lower().split("/")[-1].startswith(short):
            return Price(input=inp, output=out)
    return None


class ModelSpec(_Strict):
    path: str | None = None
    dtype: Literal["bf16", "f16", "f32", "int8", "int4"] = "bf16"
    gguf: str | None = None
    catalog: str | None = Field(None, description="a catalog model (fleet models list), served like gguf")
    engine: Literal["auto", "llama_cpp", "fleetlm"] = Field(
        "auto", description="what runs a gguf model: llama.cpp, our engine (continuous batching), or auto: "
                            "the one measured faster on this machine (fleetlm.fleet.measure)"
    )
    remote: str | None = Field(
        None, description="base URL of an OpenAI-compatible API, e.g. http://h:8000/v1"
    )
    remote_model: str | None = Field(None, description="model name upstream; defaults to this model's name")
    replay: str | None = Field(None, description="a folder laid out like RouteLLM's data: recorded answers")
    replay_model: str | None = Field(None, description="the recorded model, e.g. gpt-4-1106-preview")
    replay_match: Literal["contains", "exact"] = Field(
        "contains", description="contains: the recorded question may sit inside a longer user message"
    )
    speculative: str | None = Field(
        None, description="speculative decoding, on our engine, of a request that runs alone: 'lookup' "
                          "(prompt lookup: pays on edits and document QA) or a draft model with the same "
                          "tokenizer (a catalog name or a .gguf file); same output, acceptance rate logged"
    )
    api_key_env: str | None = None
    timeout: float = Field(60.0, gt=0, description="seconds per upstream attempt")
    retries: int = Field(1, ge=0, le=10, description="extra attempts after a failed one")
    price: Price = Field(default_factory=Price)
    aliases: list[str] = Field(default_factory=list)
    fallbacks: list[str] = Field(default_factory=list)
    max_context: int | None = Field(None, gt=0)
    embeddings: bool = False
    vision: bool = Field(False, description="accepts image parts (a remote vision model): gets them as sent")
    # streaming failover (serve/failover.py): no first token within ttft_timeout, or a gap longer than
    # stall_timeout between tokens, counts as a failure and the next model of `fallbacks` takes over
    ttft_timeout: float | None = Field(None, gt=0, description="seconds to the first streamed token")
    stall_timeout: float | None = Field(None, gt=0, description="seconds allowed between streamed tokens")

    @model_validator(mode="after")
    def _exactly_one_location(self) -> ModelSpec:
        given = [k for k in ("path", "gguf", "catalog", "remote", "replay") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of path, gguf, catalog, remote, replay (got {', '.join(given) or 'none'})"
            )
        if self.catalog:
            from fleetlm.catalog import entries

            if self.catalog not in (known := entries()):
                raise ValueError(f"unknown catalog model {self.catalog!r} (the catalog has: "
                                 f"{', '.join(known)})")
        if self.remote and not self.remote.startswith(("http://", "https://")):
            raise ValueError(f"remote must be an http(s) URL, got {self.remote!r}")
        if self.speculative and self.kind not in ("local", "gguf"):
            raise ValueError("speculative needs a model our engine runs (path, gguf or catalog)")
        if self.replay and not self.replay_model:
            raise ValueError("replay needs replay_model: which recorded model answers")
        if self.replay and "price" not in self.model_fields_set:
            self.price = recorded_list_price(self.replay_model or "") or self.price
        return self

    @property
    def kind(self) -> Literal["local", "gguf", "remote", "replay"]:
        if self.replay:
            return "replay"
        return "local" if self.path else "gguf" if self.gguf or self.catalog else "remote"

    def gguf_file(self) -> str:
        """The GGUF file of a `gguf` or `catalog` model (a catalog model must be installed)."""
        if self.gguf:
            return self.gguf
        assert self.catalog is not None, "gguf_file() of a model that is neither gguf nor catalog"
        from fleetlm.catalog import installed_path

        path = installed_path(self.catalog)
        if path is None:
            raise ConfigError(f"catalog model {self.catalog} is not installed; "
                              f"run: fleet models pull {self.catalog}")
        return str(path)

    def api_key(self) -> str | None:
        if not self.api_key_env:
            return None
        value = os.environ.get(self.api_key_env)
        if value is None:
            raise ConfigError(f"environment variable {self.api_key_env} (api key) is not set")
        return value


class RouterSpec(_Strict):
    name: str = "auto"
    kind: Literal["random", "knn", "logistic", "mlp", "mf", "gbm", "ensemble", "cascade", "cheapest",
                  "strongest"] = "mlp"
    quality_floor: float = Field(0.95, ge=0, le=1)
    # request: each request's pick is predicted to reach floor x the best prediction for it; traffic: the
    # floor holds over the traffic: a pick may lose at most (1 - floor) x the strongest model's mean quality
    floor_scope: Literal["request", "traffic"] = "request"
    budget_usd_per_1k: float | None = Field(None, ge=0)
    path: str | None = Field(None, description="a fitted router saved by `fleet route fit`")
    models: list[str] | None = Field(None, description="candidates (a checks cascade: cheapest first)")
    # kind cascade with checks (and no path): the first model answers, the checks that apply to the request
    # decide whether its answer is kept, else the next model answers, up to the last (whose answer is kept)
    checks: list[Literal["code", "math", "json", "tool"]] | None = None
    unchecked: Literal["keep", "escalate"] = Field(
        "keep", description="no enabled check applies: keep the first answer, or escalate to the last model"
    )
    math_samples: int = Field(1, ge=1, le=5, description="math: samples asked for, whose final numbers agree")
    check_timeout_s: float = Field(5.0, gt=0, le=60, description="code: time for the prompt's examples")
    # agents: a request whose fleet_step is one of these kinds goes to that model before any other rule
    # (e.g. plan: the strongest, action: left to the router); see fleetlm/agent
    step_models: dict[str, str] | None = None

    @model_validator(mode="after")
    def _checks_make_a_cascade(self) -> RouterSpec:
        if self.checks is not None:
            if self.kind != "cascade":
                raise ValueError(f"router.checks needs kind cascade, not {self.kind}")
            if self.path is not None:
                raise ValueError("a cascade runs either checks or a fitted router (path), not both")
            if not self.checks:
                raise ValueError("router.checks is empty: name at least one of code, math, json, tool")
        return self


class Autoscaling(_Strict):
    """Ray Serve's autoscaling on ongoing requests: from min to max replicas, each aiming at the target."""

    min_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0, description="requests in flight per replica to aim at")

    @model_validator(mode="after")
    def _ordered(self) -> Autoscaling:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) is below min_replicas "
                             f"({self.min_replicas})")
        return self


class Replicas(_Strict):
    """One Ray Serve deployment (`fleet serve --ray`): a fixed number of replicas or autoscaling, and the
    share of the cluster each replica holds."""

    num_replicas: int | None = Field(None, ge=1, description="a fixed count; default 1 without autoscaling")
    autoscaling: Autoscaling | None = None
    num_cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves for each replica")
    max_ongoing_requests: int = Field(64, ge=1, description="requests a replica takes at once; more queue")

    @model_validator(mode="after")
    def _count_or_autoscaling(self) -> Replicas:
        if self.num_replicas is not None and self.autoscaling is not None:
            raise ValueError("give num_replicas or autoscaling, not both")
        return self


class RaySpec(_Strict):
    """`fleet serve --ray`: the gateway's replicas, and each local model's (a deployment per local model)."""

    address: str | None = Field(None, description="a running Ray cluster (auto, host:port); None: start one")
    gateway: Replicas = Field(default_factory=Replicas)
    models: dict[str, Replicas] = Field(default_factory=dict, description="model name -> its replicas")


class FleetConfig(_Strict):
    models: dict[str, ModelSpec] = Field(min_length=1)
    router: RouterSpec | None = None
    storage: str | None = None
    log_content: bool = Field(
        False, description="also store each request's messages and its answer in the usage log (what "
        "`fleet distill --from-usage` trains on); off by default, since prompts may be private"
    )
    strongest: str | None = Field(None, description="reference model for savings; default: priciest")
    require_api_key: bool | None = Field(None, description="None: required once any key exists")
    max_body_bytes: int = Field(4 * 1024 * 1024, gt=0)
    body_timeout_s: float = Field(30.0, gt=0, description="time a client gets to send its request body")
    machine_usd_per_hour: float = Field(
        DEFAULT_MACHINE_USD_PER_HOUR, gt=0,
        description="what this machine costs an hour: prices local models that set no price (measured tok/s)",
    )
    counters: str | None = Field(
        None, description="redis://host:port/db shared by gateway replicas for budgets and rate limits; "
        "None: $FLEET_REDIS_URL, else counters in this process"
    )
    ray: RaySpec | None = Field(None, description="replicas when served on Ray Serve (fleet serve --ray)")
    mcp_servers: McpServers = Field(
        default_factory=dict, description="MCP servers whose tools agents and the gateway may call "
                                          "(fleetlm.mcp.config), tools named <server>__<tool>")
    voice: VoiceConfig = Field(
        default_factory=VoiceConfig, description="speech out (/v1/audio/speech): engine, lexicon file")
    transcription: TranscriptionSettings = Field(
        default_factory=TranscriptionSettings, description="/v1/audio/transcriptions: upload limit, window")
    vision: VisionConfig = Field(
        default_factory=VisionConfig, description="images in chat, for models that cannot see")
    knowledge: KnowledgeSettings = Field(
        default_factory=KnowledgeSettings,
        description="files, vector stores and search: index file, upload limit")
    assistants: Assistants = Field(
        default_factory=dict, description="named assistants served as model names: instructions, vector "
        "stores, tools around a model (serve/assistants.py)")
    memory: MemorySettings = Field(
        default_factory=MemorySettings,
        description="conversations past a model's context: summary, archive, recall (fleetlm.memory)")

    @model_validator(mode="after")
    def _names_resolve(self) -> FleetConfig:
        seen: dict[str, str] = {}
        for name, spec in self.models.items():
            for alias in [name, *spec.aliases]:
                if alias in seen and seen[alias] != name:
                    raise ValueError(f"name {alias!r} is used by both {seen[alias]!r} and {name!r}")
                seen[alias] = name
        if self.router and self.router.name in seen:
            raise ValueError(f"router name {self.router.name!r} clashes with a model name or alias")
        for name, spec in self.models.items():
            for fb in spec.fallbacks:
                if fb not in seen:
                    raise ValueError(f"models.{name}.fallbacks: unknown model {fb!r}")
        for ref in [self.strongest, *((self.router.models or []) if self.router else [])]:
            if ref is not None and ref not in seen:
                raise ValueError(f"unknown model {ref!r}")
        stage_one = self.vision.stage_one
        if stage_one != RAPIDOCR and not (stage_one in seen and self.models[seen[stage_one]].vision):
            raise ValueError(f"vision.stage_one: {stage_one!r} is neither rapidocr nor a model with "
                             "vision: true")
        for name in self.ray.models if self.ray else []:
            if name not in self.models:
                raise ValueError(f"ray.models: unknown model {name!r} (give its name, not an alias)")
            if self.models[name].kind == "remote":
                raise ValueError(f"ray.models.{name}: a remote model has no deployment (the gateway calls "
                                 "it)")
        check_assistants(self.assistants, set(seen), self.router.name if self.router else None)
        if self.memory.summarizer is not None and self.memory.summarizer not in seen:
            raise ValueError(f"memory.summarizer: unknown model {self.memory.summarizer!r}")
        return self

    def resolve(self, name: str) -> str | None:
        """The canonical model name for a name or alias, None when unknown (the router is not a model)."""
        if name in self.models:
            return name
        for canonical, spec in self.models.items():
            if name in spec.aliases:
                return canonical
        return None

    def strongest_model(self) -> str:
        if self.strongest:
            return self.resolve(self.strongest) or self.strongest
        return max(self.models, key=lambda n: (self.models[n].price.output, self.models[n].price.input))

    def storage_url(self) -> str:
        return resolve_storage_url(self.storage)


def resolve_storage_url(configured: str | None = None) -> str:
    """The config's storage URL, else $FLEET_DB_URL, else a SQLite file in the working directory."""
    return configured or os.environ.get("FLEET_DB_URL") or f"sqlite:///{Path.cwd() / DEFAULT_SQLITE_FILE}"


def _format_error(source: str, exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "(top level)"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    msg = err["msg"].removeprefix("Value error, ")
    return f"{source}: {where}: {msg}{more}"


def parse_config(data: object, source: str = "fleet config") -> FleetConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with a 'models' section")
    try:
        config = FleetConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(source, exc)) from None
    base = Path(source).parent if source.endswith((".yaml", ".yml")) else None
    if base is not None:
        # Local paths in a config file are relative to the file, not to wherever `fleet serve` runs.
        for spec in config.models.values():
            if spec.path and not Path(spec.path).is_absolute():
                spec.path = str((base / spec.path).resolve())
            if spec.gguf and not Path(spec.gguf).is_absolute():
                spec.gguf = str((base / spec.gguf).resolve())
            if spec.replay and not Path(spec.replay).is_absolute():
                spec.replay = str((base / spec.replay).resolve())
        if config.router and config.router.path and not Path(config.router.path).is_absolute():
            config.router.path = str((base / config.router.path).resolve())
    return config


def read_config_yaml(path: Path) -> Any:
    """A config file's YAML, parsed; a ConfigError when it is missing or not YAML."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None


def load_config(path: str | Path) -> FleetConfig:
    path = Path(path)
    return parse_config(read_config_yaml(path), str(path))
