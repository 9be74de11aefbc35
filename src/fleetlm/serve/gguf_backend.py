"""GGUF models behind the gateway: llama.cpp (llama-cpp-python) by default, or our own engine.

fleet.yaml: `gguf: model.gguf` runs the file on llama.cpp; add `engine: fleetlm` to load its weights into our
decoder instead and serve it with continuous batching (LocalBackend). llama-cpp-python's `Llama` holds one
sequence per context, so the llama.cpp backend runs requests one at a time on its worker thread (as
llama-cpp-python's own server does). Prompts, chat templates, stop strings and streamed text go through the
same code as our engine (TokenStreamBackend, Detokenizer, StopStrings), so both engines answer alike.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import warnings
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fleetlm.config import ModelSpec
from fleetlm.engine.constrain import apply_constraints
from fleetlm.engine.generate import GenerationError, GenerationRequest, TokenEvent, _Row, encode_request
from fleetlm.errors import ConfigError, FleetError
from fleetlm.model.tokenizer import SPECIAL_KEYS, Tokenizer
from fleetlm.serve.backends import Backend, Embeddings, UnavailableBackend, register_kind
from fleetlm.serve.errors import BackendError
from fleetlm.serve.local import _DONE, LocalBackend, TokenStreamBackend, _unsupported, drain
from fleetlm.serve.protocol import EmbeddingRequest

log = logging.getLogger(__name__)


class LlamaCppTokenizer(Tokenizer):
    """llama.cpp's own tokenizer, with our chat-template renderer (the template stored in the GGUF file)."""

    def __init__(self, llm: Any) -> None:  # noqa: D107 - no `tokenizers` backend: llama.cpp tokenizes
        import llama_cpp

        self.llm = llm
        meta = llm.metadata
        self.chat_template = meta.get("tokenizer.chat_template")
        model = llm._model
        vocab = llama_cpp.llama_model_get_vocab(model.model)
        # Every end-of-generation token llama.cpp knows (eos, eot, <|im_end|>, ...), in id order.
        self.eos_token_ids = [t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)]
        ids = {"bos_token": model.token_bos(), "eos_token": model.token_eos()}
        self.special_tokens = {k: self._piece(v) for k, v in ids.items() if k in SPECIAL_KEYS and v >= 0}
        self.bos_token_id = ids["bos_token"] if ids["bos_token"] >= 0 else None
        self.pad_token_id = self.eos_token_ids[0] if self.eos_token_ids else 0
        self.config = {}
        self.clean_up_spaces = False

    def llguidance_tokenizer(self, eos_token_ids: list[int]) -> Any:
        """llguidance's view of llama.cpp's vocabulary, for constrained decoding (engine/constrain.py)."""
        import llama_cpp
        from llguidance.llamacpp import lltokenizer_from_vocab

        vocab = llama_cpp.llama_model_get_vocab(self.llm._model.model)
        with warnings.catch_warnings():  # llguidance calls llama_token_get_attr, deprecated upstream
            warnings.simplefilter("ignore", DeprecationWarning)
            return lltokenizer_from_vocab(vocab, eos_token=eos_token_ids)

    def _piece(self, token: int) -> str:
        return self.llm.detokenize([token], special=True).decode("utf-8", errors="replace")

    @property
    def vocab_size(self) -> int:
        return int(self.llm.n_vocab())

    def token_id(self, token: str | None) -> int | None:
        if token is None:
            return None
        ids = self.encode(token, add_special_tokens=False)
        return ids[0] if len(ids) == 1 else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # special=True: control tokens written in the text are parsed, as `tokenizers` does
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_special_tokens, special=True)

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [self.encode(t, add_special_tokens) for t in texts]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        data = self.llm.detokenize([int(i) for i in ids], special=not skip_special_tokens)
        return data.decode("utf-8", errors="replace")  # a cut multi-byte character shows as U+FFFD


class _Job:
    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> None:
        self.request, self.loop = request, loop
        self.out: asyncio.Queue = asyncio.Queue()
        self.prompt_tokens = 0
        self.cancelled = False

    def post(self, item: Any) -> None:
        if self.cancelled:
            return
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # the caller's event loop is gone
            self.cancelled = True


class LlamaCppBackend(TokenStreamBackend):
    """A GGUF file on llama.cpp; one request at a time on one worker thread."""

    def __init__(self, name: str, path: str | Path, n_ctx: int | None = None,
                 n_threads: int | None = None) -> None:
        import llama_cpp

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"model {name!r}: GGUF file {path} does not exist")
        self.name = name
        threads = n_threads or os.cpu_count() or 1
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx or 0, n_threads=threads,
                                   n_threads_batch=threads, verbose=False)
        self.context = int(self.llm.n_ctx())
        self.tokenizer = LlamaCppTokenizer(self.llm)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"llama-{name}")
        self._lock = threading.Lock()  # the context is one sequence: one request at a time

    @classmethod
    def from_spec(cls, name: str, spec: ModelSpec) -> LlamaCppBackend:
        return cls(name, spec.gguf_file(), n_ctx=spec.max_context)

    # ------------------------------------------------------------ the worker thread

    def _run(self, job: _Job) -> None:
        with self._lock:
            try:
                self._generate(job)
            except FleetError as exc:  # too long, empty, a chat template that rejects the conversation
                job.post(_unsupported(f"{self.name}: {exc}"))
            except Exception as exc:  # noqa: BLE001 - llama.cpp failed: tell the caller, keep serving
                job.post(BackendError(f"{self.name}: llama.cpp failed: {type(exc).__name__}: {exc}"))
            job.post(_DONE)

    def _generate(self, job: _Job) -> None:
        import llama_cpp

        r = job.request
        if r.max_tokens < 1:
            raise GenerationError(f"max_tokens must be >= 1, got {r.max_tokens}")
        ids = encode_request(self.tokenizer, r)
        if len(ids) + r.max_tokens > self.context:
            raise GenerationError(f"prompt ({len(ids)} tokens) + max_tokens ({r.max_tokens}) exceed the "
                                  f"context of {self.context} tokens")
        job.prompt_tokens = len(ids)
        row = _Row(0, r, self.tokenizer.eos_token_ids, self.tokenizer.decode)
        self.llm.set_seed(llama_cpp.LLAMA_DEFAULT_SEED if r.seed is None else int(r.seed) & 0xFFFFFFFF)
        constraint = r.constraint  # response_format / forced tools: llguidance masks llama.cpp's logits
        masks = None if constraint is None else [self._masker(constraint)]
        tokens = self.llm.generate(ids, temp=r.temperature, top_k=r.top_k, top_p=r.top_p, min_p=0.0,
                                   typical_p=1.0, repeat_penalty=1.0, logits_processor=masks)
        try:
            for token in tokens:
                if job.cancelled:
                    return
                if constraint is not None:
                    constraint.advance(int(token))
                job.post(row.step(int(token), self._logprob(int(token)) if r.logprobs else None))
                if row.done:
                    return
        finally:
            tokens.close()

    def _masker(self, constraint: Any) -> Any:
        """A llama.cpp logits processor: each step's scores masked to what the grammar allows."""
        eos = self.tokenizer.eos_token_ids

        def mask(input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
            apply_constraints(torch.from_numpy(scores)[None], [constraint], eos)  # in place, shared memory
            return scores

        return mask

    def _logprob(self, token: int) -> float:
        # The logits the token was sampled from are still the context's last row (temperature 1).
        import llama_cpp

        n = self.llm.n_vocab()
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, -1), shape=(n,))
        logits = logits.astype(np.float64)
        top = logits.max()
        return float(logits[token] - top - np.log(np.exp(logits - top).sum()))

    # ------------------------------------------------------------ the async side

    def _events(self, request: GenerationRequest) -> AsyncIterator[tuple[int, TokenEvent]]:
        job = _Job(request, asyncio.get_running_loop())
        self._pool.submit(self._run, job)
        return drain(job)  # leaving early cancels the job: the worker stops it at its next token

    async def embed(self, request: EmbeddingRequest) -> Embeddings:
        raise _unsupported(f"{self.name}: embeddings are not served from llama.cpp models")

    async def aclose(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def gguf_backend(name: str, spec: ModelSpec) -> Backend:
    """The factory for `gguf:` models: llama.cpp, our engine with `engine: fleetlm`, or with `engine: auto`
    whichever decodes faster here (measured once per machine, fleetlm.fleet.measure)."""
    engine, info = spec.engine, {"engine": spec.engine, "reason": "set in the config"}
    if engine == "auto":
        import sys

        from fleetlm.fleet.measure import choose_engine

        path = Path(spec.gguf_file())
        if not path.is_file():
            raise ConfigError(f"model {name!r}: GGUF file {path} does not exist")
        choice = choose_engine(path, spec.dtype, progress=sys.stderr.isatty(), log=log.warning)
        engine, info = choice.engine, choice.to_json()
        log.warning("model %s: engine %s (auto: %s)", name, engine, choice.reason)
    if engine == "fleetlm":
        backend: Backend = LocalBackend.from_spec(name, spec)
    else:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:  # its fallbacks answer; `engine: fleetlm` needs no llama.cpp
            return UnavailableBackend(name, "llama-cpp-python is not installed "
                                            "(pip install llama-cpp-python)")
        backend = LlamaCppBackend.from_spec(name, spec)
    backend.fleet_info = info  # type: ignore[attr-defined]  # shown in /v1/models
    return backend


register_kind("gguf", gguf_backend)
