"""Runners answer batches of prompts greedily: our engine, llama.cpp on a GGUF, or an OpenAI-compatible URL.

Each has `batch_size`, `chat(conversations, max_tokens)` and `complete(prompts, max_tokens, stop)`,
both returning one `Reply` per input, in order.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fleetlm.evals.harness import EvalError, Reply

ENGINES = ("fleetlm", "llama_cpp")


class EngineRunner:
    """Our engine (`fleetlm.engine.Engine`) on an HF checkpoint directory or a GGUF file, batched."""

    def __init__(self, location: str, dtype: str = "bf16", batch_size: int = 8,
                 threads: int | None = None) -> None:
        from fleetlm.engine import Engine

        self.engine = Engine.load(location, dtype=dtype)
        self.batch_size = batch_size
        if threads:
            self.engine.num_threads = threads

    def _run(self, requests: list[Any]) -> list[Reply]:
        start = time.perf_counter()
        texts, counts = [""] * len(requests), [0] * len(requests)
        for event in self.engine.generate(requests):
            texts[event.request_index] += event.text
            counts[event.request_index] += 1
        seconds = time.perf_counter() - start
        # The batch's rows run side by side, so each row's latency is the batch's wall time.
        return [Reply(t, None, n, seconds) for t, n in zip(texts, counts, strict=True)]

    def chat(self, conversations: Sequence[list[dict[str, Any]]], max_tokens: int,
             stop: Sequence[str] = ()) -> list[Reply]:
        from fleetlm.engine.generate import GenerationRequest

        return self._run([GenerationRequest(messages=list(c), max_tokens=max_tokens, temperature=0.0,
                                            stop=list(stop)) for c in conversations])

    def complete(self, prompts: Sequence[str], max_tokens: int, stop: list[str]) -> list[Reply]:
        from fleetlm.engine.generate import GenerationRequest

        return self._run([GenerationRequest(prompt=p, max_tokens=max_tokens, temperature=0.0, stop=list(stop))
                          for p in prompts])


class LlamaCppRunner:
    """llama.cpp (llama-cpp-python) on a GGUF file, one prompt at a time, greedy, no repetition penalty."""

    batch_size = 1

    def __init__(self, location: str, n_ctx: int = 4096, threads: int | None = None) -> None:
        # On a shared machine llama.cpp's spinning threads wait on each other: one thread was 7x faster
        # than two on 2 busy cores, so the default is 1.
        try:
            from llama_cpp import Llama
        except ImportError as exc:
            raise EvalError("--engine llama_cpp needs llama-cpp-python installed") from exc
        if not location.endswith(".gguf"):
            raise EvalError(f"--engine llama_cpp needs a .gguf model, got {location}")
        self.llm = Llama(model_path=location, n_ctx=n_ctx, n_threads=threads or 1,
                         verbose=False, seed=0)

    # Greedy as our engine decodes: llama-cpp-python's defaults would add a 1.1 repetition penalty.
    _GREEDY = dict(temperature=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0)

    @staticmethod
    def _reply(out: dict[str, Any], text: str, seconds: float) -> Reply:
        usage = out.get("usage") or {}
        return Reply(text, usage.get("prompt_tokens"), usage.get("completion_tokens"), seconds)

    def chat(self, conversations: Sequence[list[dict[str, Any]]], max_tokens: int,
             stop: Sequence[str] = ()) -> list[Reply]:
        replies = []
        for messages in conversations:
            start = time.perf_counter()
            out = self.llm.create_chat_completion(messages=messages, max_tokens=max_tokens,
                                                  stop=list(stop) or None, **self._GREEDY)
            text = out["choices"][0]["message"].get("content") or ""
            replies.append(self._reply(out, text, time.perf_counter() - start))
        return replies

    def complete(self, prompts: Sequence[str], max_tokens: int, stop: list[str]) -> list[Reply]:
        replies = []
        for prompt in prompts:
            start = time.perf_counter()
            out = self.llm.create_completion(prompt, max_tokens=max_tokens, stop=stop or None, **self._GREEDY)
            replies.append(self._reply(out, out["choices"][0]["text"], time.perf_counter() - start))
        return replies


class OpenAIRunner:
    """An OpenAI-compatible API (a remote model, or our own gateway with `auto`): a few requests at once."""

    def __init__(self, base_url: str, model: str, concurrency: int = 4, timeout_s: float = 600.0,
                 api_key: str | None = None) -> None:
        import httpx

        self.base_url, self.model = base_url.rstrip("/"), model
        self.batch_size = concurrency
        key = api_key or os.environ.get("OPENAI_API_KEY") or "none"
        self.client = httpx.Client(timeout=httpx.Timeout(timeout_s, connect=10.0),
                                   headers={"Authorization": f"Bearer {key}"})

    RETRIES = 3  # a long remote run should survive a dropped connection or one 5xx answer

    def _post(self, path: str, body: dict[str, Any]) -> tuple[dict[str, Any], float]:
        import httpx

        for attempt in range(self.RETRIES):
            start = time.perf_counter()
            try:
                resp = self.client.post(f"{self.base_url}{path}", json=body)
            except httpx.TransportError as exc:
                if attempt + 1 == self.RETRIES:
                    raise EvalError(f"cannot reach {self.base_url}: {exc.__class__.__name__}: {exc}") from exc
                time.sleep(0.5 * 2**attempt)
                continue
            if resp.status_code < 500 or attempt + 1 == self.RETRIES:
                break
            time.sleep(0.5 * 2**attempt)
        if resp.status_code >= 400:
            try:
                message = resp.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = resp.text[:200]
            raise EvalError(f"{self.base_url}{path} answered {resp.status_code}: {message}")
        try:
            return resp.json(), time.perf_counter() - start
        except ValueError as exc:
            raise EvalError(f"{self.base_url}{path} did not answer JSON") from exc

    @staticmethod
    def _reply(out: dict[str, Any], text: str | None, seconds: float) -> Reply:
        usage = out.get("usage") or {}
        return Reply(text or "", usage.get("prompt_tokens"), usage.get("completion_tokens"), seconds)

    def _one_chat(self, messages: list[dict[str, Any]], max_tokens: int, stop: Sequence[str]) -> Reply:
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0}
        if stop:
            body["stop"] = list(stop)[:4]
        out, seconds = self._post("/chat/completions", body)
        try:
            text = out["choices"][0]["message"].get("content")
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise EvalError(f"{self.base_url}: not a chat completion: {str(out)[:200]}") from exc
        return self._reply(out, text, seconds)

    def _one_completion(self, prompt: str, max_tokens: int, stop: list[str]) -> Reply:
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
        if stop:
            body["stop"] = stop[:4]  # OpenAI's API takes at most four
        out, seconds = self._post("/completions", body)
        try:
            text = out["choices"][0]["text"]
        except (KeyError, IndexError, TypeError) as exc:
            raise EvalError(f"{self.base_url}: not a completion: {str(out)[:200]}") from exc
        return self._reply(out, text, seconds)

    def chat(self, conversations: Sequence[list[dict[str, Any]]], max_tokens: int,
             stop: Sequence[str] = ()) -> list[Reply]:
        with ThreadPoolExecutor(self.batch_size) as pool:
            return list(pool.map(lambda m: self._one_chat(m, max_tokens, stop), conversations))

    def complete(self, prompts: Sequence[str], max_tokens: int, stop: list[str]) -> list[Reply]:
        with ThreadPoolExecutor(self.batch_size) as pool:
            return list(pool.map(lambda p: self._one_completion(p, max_tokens, stop), prompts))


def make_runner(ref: str, engine: str = "fleetlm", dtype: str = "bf16", batch_size: int = 8,
                concurrency: int = 4, threads: int | None = None) -> tuple[Any, str]:
    """A runner for a model reference (catalog name, .gguf, HF dir, URL[#model]) and its display name."""
    from fleetlm.catalog import resolve_model
    from fleetlm.errors import FleetError

    if engine not in ENGINES:
        raise EvalError(f"unknown --engine {engine!r}; expected one of {', '.join(ENGINES)}")
    try:
        model = resolve_model(ref)
    except FleetError as exc:
        raise EvalError(str(exc)) from exc
    if model.kind == "url":
        return OpenAIRunner(model.location, model.name, concurrency=concurrency), model.name
    if engine == "llama_cpp":
        if model.kind != "gguf":
            raise EvalError(f"--engine llama_cpp needs a GGUF model; {ref} is a checkpoint directory")
        return LlamaCppRunner(model.location, threads=threads), f"{model.name}@llama.cpp"
    if batch_size < 1:
        raise EvalError(f"--batch-size must be >= 1, got {batch_size}")
    return EngineRunner(model.location, dtype=dtype, batch_size=batch_size, threads=threads), model.name
