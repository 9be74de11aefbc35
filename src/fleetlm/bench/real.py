"""The decode benchmark on a real GGUF model: the model reference, its chat prompt, llama.cpp files of other
widths made from the same weights, and the gateway's own single-stream speed (`fleet serve`, client-side)."""

from __future__ import annotations

import ctypes
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fleetlm.errors import FleetError

DEFAULT_CHAT = ("Write a Python function that returns the n-th Fibonacci number, with a docstring, type "
                "hints and three doctest examples, then explain how it works.")
# llama.cpp file types made from the catalog file (width -> llama.cpp type name) and their ftype ids
DERIVED_TYPES = {"bf16": "BF16", "int8": "Q8_0", "int4": "Q4_0"}
SERVE_START_TIMEOUT_S = 1800.0  # loading and compiling three widths of a 1.5B model on 2 busy cores


class RealModelError(FleetError):
    """A model reference the benchmark cannot use (not a GGUF file, not installed, a URL)."""


def resolve_gguf(ref: str) -> Path:
    """A catalog name or a path to a .gguf file -> the file (through fleetlm.catalog.resolve_model)."""
    from fleetlm.catalog import resolve_model

    model = resolve_model(ref)
    if model.kind != "gguf":
        raise RealModelError(f"{ref}: the decode benchmark needs a GGUF model (a catalog name or a .gguf "
                             f"file), got a {model.kind} reference")
    return Path(model.location)


def gguf_metadata(path: Path) -> object:
    """The file opened the way model/gguf.py reads it (its own reader where it has one, else gguf's)."""
    from fleetlm.model import gguf as loader

    opener = getattr(loader, "GGUFFile", None)
    if opener is not None:
        return opener(path)
    from gguf import GGUFReader

    return GGUFReader(str(path))


def gguf_config(path: Path) -> object:
    """Our ModelConfig of a GGUF file, from its metadata alone."""
    from fleetlm.model.gguf import gguf_model_config

    return gguf_model_config(gguf_metadata(path))


def chat_prompt_ids(path: Path, message: str) -> list[int]:
    """Token ids of one user message through the model's own chat template (as the gateway renders it)."""
    from fleetlm.model.gguf import gguf_tokenizer

    tokenizer = gguf_tokenizer(gguf_metadata(path))
    text = tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def gguf_file_type(path: Path) -> str:
    """The file's llama.cpp type name from its metadata (Q4_K_M, Q4_1, BF16, ...)."""
    from gguf import GGUFReader, LlamaFileType

    field = GGUFReader(str(path)).get_field("general.file_type")
    if field is None:
        return "?"
    try:
        return LlamaFileType(int(field.contents())).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        return f"ftype {int(field.contents())}"


def derived_dir() -> Path:
    from fleetlm.catalog import fleet_home

    return fleet_home() / "derived"


def derived_file(source: Path, width: str) -> Path:
    """llama.cpp's own requantization of `source` to DERIVED_TYPES[width] (allow_requantize: the catalog
    file's weights, dequantized and quantized again); cached under fleet_home()/derived/."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise RealModelError("llama-cpp-python is not installed (pip install llama-cpp-python)") from exc
    qtype = DERIVED_TYPES[width]
    out = derived_dir() / f"{source.stem}.{qtype}.gguf"
    if out.is_file() and out.stat().st_mtime >= source.stat().st_mtime:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}")
    params.allow_requantize = True
    params.nthread = 2
    partial = out.with_suffix(".partial")
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), ctypes.byref(params))
    if rc != 0:
        partial.unlink(missing_ok=True)
        raise RealModelError(f"llama.cpp could not requantize {source} to {qtype} (code {rc})")
    partial.replace(out)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_rates(source: Path, widths: tuple[str, ...], message: str, max_tokens: int, threads: int,
                log: Path | None = None) -> dict[str, tuple[float, int, float]]:
    """Single-stream decode tokens/s through `fleet serve` (engine: fleetlm), one model per width in one
    gateway, one streamed chat request each with the OpenAI client, timed client-side: width -> (tokens/s,
    completion tokens, gateway start-up seconds). Loading and compiling happen before the gateway listens."""
    import httpx
    import yaml
    from openai import OpenAI

    work = Path(tempfile.mkdtemp(prefix="fleet-bench-serve-"))
    models = {f"bench-{w}": {"gguf": str(source), "engine": "fleetlm", "dtype": w} for w in widths}
    config = {"models": models, "storage": f"sqlite:///{work / 'usage.db'}"}
    (work / "fleet.yaml").write_text(yaml.safe_dump(config))
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    out = open(log or work / "serve.log", "w")  # noqa: SIM115 - closed in finally
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "fleetlm", "serve", "--config", str(work / "fleet.yaml"),
                             "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=work)
    try:
        base = f"http://127.0.0.1:{port}"
        while True:
            if proc.poll() is not None:
                raise RealModelError(f"fleet serve exited with code {proc.returncode}: "
                                     f"{(log or work / 'serve.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - start > SERVE_START_TIMEOUT_S:
                raise RealModelError(f"fleet serve did not start within {SERVE_START_TIMEOUT_S:.0f} s")
            time.sleep(1.0)
        startup = time.perf_counter() - start
        client = OpenAI(base_url=f"{base}/v1", api_key="none", timeout=600)
        rates = {}
        for w in widths:
            stamps: list[float] = []
            usage = 0
            stream = client.chat.completions.create(
                model=f"bench-{w}", messages=[{"role": "user", "content": message}], max_tokens=max_tokens,
                temperature=0.0, stream=True, stream_options={"include_usage": True})
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content is not None:
                    stamps.append(time.perf_counter())
                if chunk.usage is not None:
                    usage = int(chunk.usage.completion_tokens)
            # the first token comes from prefill: decode speed is the tokens after it over the time they took
            span = stamps[-1] - stamps[0] if len(stamps) > 1 else 0.0
            rate = (len(stamps) - 1) / span if span > 0 else 0.0  # one streamed chunk per token
            rates[w] = (rate, usage or len(stamps), startup)
        return rates
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        out.close()
