"""How fast a local model runs here on each engine, cached in the fleet home, and what that makes it cost.

`measure(path, engine, dtype)` loads a GGUF file (or one of our checkpoints) on llama.cpp or on our engine and
times one stream on MEASURE_THREADS threads: a PROMPT_TOKENS-token prompt, then NEW_TOKENS new tokens, after a
short warm-up, best of REPEATS runs. The result is saved as
`fleet_home()/measure/<model key>-<engine>-<dtype>-<machine id>-<build id>.json`, so it is made once per
machine and engine build: a rebuilt kernel (new sources, flags or torch) or another llama.cpp is timed anew.
`choose_engine` picks, for `engine: auto`, the engine with the higher decode tokens/s (measuring what is
missing). `price_per_million` turns tokens/s into dollars per million tokens at a machine's hourly price:
the price of local models that set no `price:` in fleet.yaml.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fleetlm.catalog import fleet_home
from fleetlm.config import DEFAULT_MACHINE_USD_PER_HOUR, Price
from fleetlm.errors import FleetError

ENGINES = ("llama_cpp", "fleetlm")
MEASURE_THREADS = 2
PROMPT_TOKENS = 64
NEW_TOKENS = 32
WARMUP_TOKENS = 8
REPEATS = 2
# CPU features that change which kernels run (and so the speed); part of the machine id.
_SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")


class MeasureError(FleetError):
    """A model that cannot be measured (missing file, an engine that cannot run it)."""


def price_per_million(tokens_per_second: float, machine_usd_per_hour: float) -> float:
    """Dollars per million tokens of a machine costing `machine_usd_per_hour` that makes `tokens_per_second`:

        $/1M tokens = machine_usd_per_hour / (tokens_per_second x 3600) x 1e6

    i.e. the machine's price for the hour spent on one million tokens, single stream (a batched server makes
    more tokens per hour, so this is an upper bound on what a local token costs here).
    """
    if tokens_per_second <= 0:
        raise MeasureError(f"a price needs a positive speed, got {tokens_per_second} tokens/s")
    return machine_usd_per_hour / (tokens_per_second * 3600.0) * 1e6


@dataclass
class Measurement:
    """One engine's single-stream speed on one model file, on this machine."""

    model: str  # the file's name
    model_key: str
    engine: str
    dtype: str
    prompt_tokens_per_second: float
    decode_tokens_per_second: float
    prompt_tokens: int
    new_tokens: int
    threads: int
    load_seconds: float
    machine: dict[str, Any] = field(default_factory=dict)
    measured_at: str = ""

    def price(self, machine_usd_per_hour: float = DEFAULT_MACHINE_USD_PER_HOUR) -> Price:
        """Prompt tokens priced at the prompt speed, completion tokens at the decode speed."""
        return Price(input=round(price_per_million(self.prompt_tokens_per_second, machine_usd_per_hour), 6),
                     output=round(price_per_million(self.decode_tokens_per_second, machine_usd_per_hour), 6))

    def summary(self) -> str:
        return (f"{self.engine} {self.dtype}: prompt {self.prompt_tokens_per_second:.1f} tok/s, decode "
                f"{self.decode_tokens_per_second:.1f} tok/s ({self.threads} threads, "
                f"{self.measured_at[:16]})")


def machine_fingerprint() -> dict[str, Any]:
    """The CPU (model name, logical cores, speed-relevant flags) and the runtimes' versions."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count() or 1, "flags": [f for f in _SPEED_FLAGS if f in flags]}


def machine_id(fingerprint: dict[str, Any] | None = None) -> str:
    fp = fingerprint or machine_fingerprint()
    text = f"{fp['cpu']}|{fp['cores']}|{','.join(fp['flags'])}"
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def model_key(path: str | Path) -> str:
    """A catalog model's sha256 (from the manifest its pull wrote), else the file's name and size."""
    path = Path(path)
    try:
        manifest = json.loads((path.parent / "model.json").read_text(encoding="utf-8"))
        if manifest.get("file") == path.name and manifest.get("sha256"):
            return f"{manifest['name']}-{manifest['sha256'][:12]}"
    except (OSError, ValueError, AttributeError):
        pass
    if path.is_dir():  # one of our checkpoints: its weights' total size
        size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    else:
        size = path.stat().st_size
    return f"{path.stem if path.is_file() else path.name}-{size}"


def serves_compiled(path: str | Path) -> bool:
    """Whether the gateway runs this model on our engine through the compiled decode step (serve/local.py
    decides; the measurement must time what will be served)."""
    try:
        from fleetlm.serve.local import wants_compile
    except ImportError:  # a gateway that never compiles
        return False
    return bool(wants_compile(path))


def _mode(engine: str, dtype: str, path: str | Path) -> str:
    # llama.cpp runs the file's own quantization: its dtype is always "gguf"
    if engine == "llama_cpp":
        return "gguf"
    return f"{dtype}-compiled" if serves_compiled(path) else dtype


def engine_build_id(engine: str) -> str:
    """Which build of the engine a measurement timed: for ours, fleetlm's version and the kernels' build
    folder (torch version, sources and flags); for llama.cpp, llama-cpp-python's version."""
    from importlib.metadata import PackageNotFoundError, version

    if engine == "llama_cpp":
        try:
            text = f"llama-cpp-python {version('llama_cpp_python')}"
        except PackageNotFoundError:
            text = "llama-cpp-python missing"
    else:
        from fleetlm.engine.kernels import build_dir

        try:
            text = f"fleetlm {version('fleetlm')}"
        except PackageNotFoundError:
            text = "fleetlm source"
        text += f" {build_dir().name}"
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _cache_file(path: str | Path, engine: str, mode: str) -> Path:
    name = f"{model_key(path)}-{engine}-{mode}-{machine_id()}-{engine_build_id(engine)}.json"
    return fleet_home() / "measure" / name


def cache_path(path: str | Path, engine: str, dtype: str) -> Path:
    return _cache_file(path, engine, _mode(engine, dtype, path))


def cached(path: str | Path, engine: str, dtype: str) -> Measurement | None:
    """The saved measurement of this model on this engine and machine, or None."""
    try:
        data = json.loads(cache_path(path, engine, dtype).read_text(encoding="utf-8"))
        return Measurement(**data)
    except (OSError, ValueError, TypeError):
        return None


def save(m: Measurement, path: str | Path) -> Path:
    out = _cache_file(path, m.engine, m.dtype)  # m.dtype is the mode already ("gguf", "bf16-compiled")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(m), indent=1), encoding="utf-8")
    tmp.replace(out)
    return out


def engines_for(path: str | Path) -> list[str]:
    """The engines that can run this model here: llama.cpp (when installed) for GGUF files, ours for the
    architectures our decoder has (and for our checkpoints)."""
    path = Path(path)
    if path.is_dir():
        return ["fleetlm"]
    if not path.is_file():
        raise MeasureError(f"{path}: no such model file")
    from fleetlm.catalog.inspect import read_gguf
    from fleetlm.model.gguf import LOAD_ARCH

    out = []
    try:
        import llama_cpp  # noqa: F401

        out.append("llama_cpp")
    except ImportError:
        pass
    if read_gguf(path).metadata.get("general.architecture") in LOAD_ARCH:
        out.append("fleetlm")
    return out


def _prompt_ids(vocab: int, n: int, seed: int) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(10, min(vocab, 2000)) for _ in range(n)]


def _rates(prompt_len: int, start: float, stamps: list[float]) -> tuple[float, float]:
    """(prompt tok/s, decode tok/s) from the start time and each new token's time."""
    prefill = stamps[0] - start
    decode = stamps[-1] - stamps[0]
    return (prompt_len / prefill if prefill > 0 else 0.0,
            (len(stamps) - 1) / decode if decode > 0 else 0.0)


def _time_llama_cpp(path: Path, threads: int, step: Callable[[], None]) -> tuple[float, list[tuple]]:
    import llama_cpp

    start = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=PROMPT_TOKENS + NEW_TOKENS + 16, n_threads=threads,
                          n_threads_batch=threads, n_batch=PROMPT_TOKENS, verbose=False)
    load = time.perf_counter() - start
    step()
    vocab = llm.n_vocab()

    def run(n: int, seed: int) -> tuple[float, float]:
        ids = _prompt_ids(vocab, PROMPT_TOKENS, seed)
        llm.reset()  # no prefix of an earlier prompt is reused
        stamps: list[float] = []
        t0 = time.perf_counter()
        for _ in llm.generate(ids, top_k=1, temp=0.0, reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) >= n:
                break
        return _rates(len(ids), t0, stamps)

    try:
        return load, _repeat(run, step)
    finally:
        llm.close()


def _time_fleetlm(path: Path, dtype: str, threads: int, step: Callable[[], None]) -> tuple[float, list]:
    import torch

    from fleetlm.engine import Engine, GenerationRequest

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        start = time.perf_counter()  # a compiled step is compiled (or read from its cache) inside load
        engine = Engine.load(path, dtype=dtype, compile=serves_compiled(path))
        load = time.perf_counter() - start
        step()
        vocab = int(engine.model.config.vocab_size)

        def run(n: int, seed: int) -> tuple[float, float]:
            ids = _prompt_ids(vocab, PROMPT_TOKENS, seed)
            req = GenerationRequest(prompt_ids=ids, max_tokens=n, temperature=0.0, ignore_eos=True)
            stamps: list[float] = []
            t0 = time.perf_counter()
            for _ in engine.generate(req):
                stamps.append(time.perf_counter())
            return _rates(len(ids), t0, stamps)

        return load, _repeat(run, step)
    finally:
        torch.set_num_threads(previous)
        # let go of what a compiled step may still hold (dynamo's caches keep its graphs and frozen weights)
        # before the next model is measured in this process: a three-model run was OOM-killed here
        import gc

        torch._dynamo.reset()
        gc.collect()


def _repeat(run: Callable[[int, int], tuple[float, float]], step: Callable[[], None]) -> list[tuple]:
    run(WARMUP_TOKENS, 0)  # first calls allocate caches and pick kernels: not what a request pays
    step()
    out = []
    for i in range(REPEATS):
        out.append(run(NEW_TOKENS, i + 1))
        step()
    return out


def measure(path: str | Path, engine: str, dtype: str = "bf16", *, threads: int = MEASURE_THREADS,
            progress: bool = True) -> Measurement:
    """Time `engine` on the model (load, warm-up, REPEATS timed runs; best of them) and save the result."""
    path = Path(path)
    if engine not in ENGINES:
        raise MeasureError(f"unknown engine {engine!r}; expected one of {', '.join(ENGINES)}")
    if engine not in engines_for(path):
        why = ("llama-cpp-python is not installed" if engine == "llama_cpp"
               else "our decoder does not have this model's architecture")
        raise MeasureError(f"{path.name}: cannot run on {engine} ({why})")
    from tqdm import tqdm

    bar = tqdm(total=2 + REPEATS, desc=f"measure {path.name} on {engine}", unit="step", disable=not progress,
               leave=False)
    try:
        if engine == "llama_cpp":
            load, runs = _time_llama_cpp(path, threads, lambda: bar.update(1))
        else:
            load, runs = _time_fleetlm(path, dtype, threads, lambda: bar.update(1))
    finally:
        bar.close()
    m = Measurement(
        model=path.name, model_key=model_key(path), engine=engine, dtype=_mode(engine, dtype, path),
        prompt_tokens_per_second=round(max(r[0] for r in runs), 2),
        decode_tokens_per_second=round(max(r[1] for r in runs), 2),
        prompt_tokens=PROMPT_TOKENS, new_tokens=NEW_TOKENS, threads=threads, load_seconds=round(load, 2),
        machine={**machine_fingerprint(), "id": machine_id()},
        measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    save(m, path)
    return m


@dataclass
class EngineChoice:
    """Which engine runs a model, why, and the measurements the choice (and the price) came from."""

    engine: str
    reason: str
    measurements: dict[str, Measurement]

    @property
    def chosen(self) -> Measurement | None:
        return self.measurements.get(self.engine)

    def to_json(self) -> dict[str, Any]:
        return {"engine": self.engine, "reason": self.reason,
                "measured": {e: {"prompt_tokens_per_second": m.prompt_tokens_per_second,
                                 "decode_tokens_per_second": m.decode_tokens_per_second, "dtype": m.dtype,
                                 "measured_at": m.measured_at}
                             for e, m in self.measurements.items()}}


def choose_engine(path: str | Path, dtype: str = "bf16", *, engines: list[str] | None = None,
                  measure_missing: bool = True, progress: bool = True,
                  log: Callable[[str], None] | None = None) -> EngineChoice:
    """`engine: auto`: the engine with the higher measured decode tokens/s on this machine. Cached
    measurements are reused; missing ones are made now (with a line through `log`) unless measure_missing
    is False, in which case only the cached ones compete."""
    path = Path(path)
    candidates = engines or engines_for(path)
    if not candidates:
        raise MeasureError(f"{path.name}: no engine here can run it (llama-cpp-python is not installed and "
                           "our decoder does not have its architecture)")
    found: dict[str, Measurement] = {}
    for engine in candidates:
        m = cached(path, engine, dtype)
        if m is None and measure_missing:
            if log is not None:
                log(f"measuring {path.name} on {engine} (once per machine; saved in "
                    f"{fleet_home() / 'measure'})")
            m = measure(path, engine, dtype, progress=progress)
        if m is not None:
            found[engine] = m
    if not found:
        return EngineChoice(candidates[0], f"not measured yet; {candidates[0]} by default", {})
    best = max(found.values(), key=lambda m: m.decode_tokens_per_second)
    if len(found) == 1:
        alone = "can run it here" if engines_for(path) == [best.engine] else "was measured"
        reason = f"only {best.engine} {alone} ({best.decode_tokens_per_second:.1f} tok/s decode)"
    else:
        others = ", ".join(f"{m.engine} {m.decode_tokens_per_second:.1f}"
                           for m in found.values() if m is not best)
        reason = f"faster decode here: {best.engine} {best.decode_tokens_per_second:.1f} tok/s vs {others}"
    return EngineChoice(best.engine, reason, found)


@dataclass
class ModelCost:
    """What `fleet serve` reports per local model: its engine (and why) and its price (and where from)."""

    engine: str
    reason: str
    price: Price
    price_source: str
    measurement: Measurement | None = None


def price_local_models(config: Any, *, measure_missing: bool = True, progress: bool = True,
                       log: Callable[[str], None] | None = None) -> dict[str, ModelCost]:
    """Settle each local model's engine and price: `engine: auto` is chosen by measurement, and a model that
    sets no `price:` gets the measured price of its engine at config.machine_usd_per_hour (in place).
    Remote and recorded models are left alone."""
    out: dict[str, ModelCost] = {}
    for name, spec in config.models.items():
        if spec.kind not in ("gguf", "local"):
            continue
        explicit_price = "price" in spec.model_fields_set
        if spec.kind == "local":
            path, engine = Path(spec.path), "fleetlm"
        else:
            path, engine = Path(spec.gguf_file()), spec.engine
        if engine == "auto":
            choice = choose_engine(path, spec.dtype, measure_missing=measure_missing, progress=progress,
                                   log=log)
            engine, reason, m = choice.engine, choice.reason, choice.chosen
        else:
            reason = "set in the config"
            m = cached(path, engine, spec.dtype)
            if m is None and not explicit_price and measure_missing:
                if log is not None:
                    log(f"measuring {path.name} on {engine} (once per machine) to price it")
                m = measure(path, engine, spec.dtype, progress=progress)
        if explicit_price:
            source = "set in the config"
        elif m is not None:
            spec.price = m.price(config.machine_usd_per_hour)
            source = (f"measured: ${config.machine_usd_per_hour}/h / ({engine} tok/s x 3600) x 1e6, "
                      f"prompt {m.prompt_tokens_per_second:.1f} tok/s, "
                      f"decode {m.decode_tokens_per_second:.1f}")
        else:
            source = "not measured: no price"
        out[name] = ModelCost(engine, reason, spec.price, source, m)
    return out


def describe(path: str | Path, name: str | None = None, dtype: str = "bf16",
             machine_usd_per_hour: float = DEFAULT_MACHINE_USD_PER_HOUR) -> list[str]:
    """`fleet models info`'s lines: each cached measurement, the price it gives, and what auto picks."""
    path = Path(path)
    name = name or str(path)
    runnable = engines_for(path)
    lines = [f"engines here: {', '.join(runnable) or 'none'}"]
    found = {e: m for e in runnable if (m := cached(path, e, dtype)) is not None}
    for m in found.values():
        p = m.price(machine_usd_per_hour)
        lines.append(f"  {m.summary()} -> ${p.input:.4f} in / ${p.output:.4f} out per 1M tokens")
    if found:
        choice = choose_engine(path, dtype, engines=runnable, measure_missing=False)
        lines.append(f"engine auto: {choice.engine} ({choice.reason})")
        lines.append(f"price: ${machine_usd_per_hour}/h / (tok/s x 3600) x 1e6, prompt and completion apart "
                     "(fleet.yaml: machine_usd_per_hour, or a model's own price:)")
    missing = [e for e in runnable if e not in found]
    if missing:
        lines.append(f"not measured on {', '.join(missing)}; run: fleet models measure {name}")
    return lines
