"""GGUF models in the gateway: the file loaded back into our decoder, served by llama.cpp or by our engine."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from fastapi.testclient import TestClient

from fleetlm.compress.gguf import export_gguf
from fleetlm.config import parse_config
from fleetlm.engine import Engine, GenerationRequest
from fleetlm.errors import ConfigError
from fleetlm.model import SHIPPED_TINY_MODEL, Tokenizer, load_checkpoint
from fleetlm.model.gguf import GGUFLoadError, load_gguf
from fleetlm.serve.app import create_app
from fleetlm.serve.backends import build_backends
from fleetlm.serve.local import LocalBackend
from fleetlm.serve.protocol import ChatCompletionRequest, CompletionRequest
from fleetlm.serve.store import UsageStore

llama_cpp = pytest.importorskip("llama_cpp")
from fleetlm.serve.gguf_backend import LlamaCppBackend  # noqa: E402 - needs llama_cpp

TEXTS = ["The quick brown fox jumps over the lazy dog. 123 4567", "Bonjour, ça va? 東京",
         "<|eot_id|> hi\n\n x"]


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory):
    """(checkpoint, type) -> GGUF file exported by our exporter, made once."""
    cache: dict = {}

    def make(ckpt, out_type: str = "f32"):
        key = (str(ckpt), out_type)
        if key not in cache:
            cache[key] = export_gguf(ckpt, tmp_path_factory.mktemp("gguf") / f"m-{out_type}.gguf", out_type)
        return cache[key]

    return make


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_loaded_gguf_matches_the_checkpoint(tiny_checkpoint_factory, gguf_files, arch):
    ckpt = tiny_checkpoint_factory(arch)
    model, tok = load_gguf(gguf_files(ckpt, "f32"))
    ref, ref_tok = load_checkpoint(ckpt), Tokenizer.from_dir(ckpt)
    for text in TEXTS:
        assert tok.encode(text) == ref_tok.encode(text)
        assert tok.decode(tok.encode(text)) == ref_tok.decode(ref_tok.encode(text))
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(chat) == ref_tok.apply_chat_template(chat)
    assert set(ref_tok.eos_token_ids) <= set(tok.eos_token_ids)
    ids = torch.tensor([ref_tok.encode(TEXTS[0])])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids), rtol=0, atol=1e-5)  # f32 in, f32 out: the same model


@pytest.mark.parametrize("out_type, atol", [("f16", 0.02), ("bf16", 0.1), ("q8_0", 0.2)])
def test_quantized_gguf_is_dequantized_close_to_the_checkpoint(gguf_files, out_type, atol):
    model, _ = load_gguf(gguf_files(SHIPPED_TINY_MODEL, out_type))
    ref = load_checkpoint(SHIPPED_TINY_MODEL)
    ids = torch.tensor([Tokenizer.from_dir(SHIPPED_TINY_MODEL).encode(TEXTS[0])])
    with torch.no_grad():
        got, want = model(ids), ref(ids)
    assert (got - want).abs().max().item() < atol
    assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() > 0.9


def test_a_bad_gguf_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(GGUFLoadError, match="not a readable GGUF"):
        load_gguf(bad)
    with pytest.raises(GGUFLoadError, match="does not exist"):
        load_gguf(tmp_path / "missing.gguf")


def _config(path, engine: str | None = None, **extra):
    spec = {"gguf": str(path), "price": {"input": 1, "output": 2}, **extra}
    if engine:
        spec["engine"] = engine
    return parse_config({"models": {"g": spec}})


def test_engine_field_defaults_to_auto_and_is_checked(tmp_path):
    assert _config(tmp_path / "m.gguf").models["g"].engine == "auto"  # measured: tests/test_measure.py
    with pytest.raises(ConfigError, match="engine"):
        _config(tmp_path / "m.gguf", engine="vllm")


@pytest.fixture(scope="module")
def llama_backend(gguf_files):
    cfg = _config(gguf_files(SHIPPED_TINY_MODEL, "f32"), engine="llama_cpp")
    backend = build_backends(cfg)["g"]
    assert isinstance(backend, LlamaCppBackend)
    yield cfg, backend
    asyncio.run(backend.aclose())


def _post(client, path, body):
    return client.post(path, content=json.dumps(body))


def test_llama_cpp_backend_greedy_matches_llama_cpp_and_honours_limits(llama_backend):
    _, backend = llama_backend
    gen = asyncio.run(backend.complete(CompletionRequest(model="g", prompt="A quick", max_tokens=6,
                                                         temperature=0)))
    ids = backend.tokenizer.encode("A quick")
    want = []
    for tok in backend.llm.generate(ids, temp=0.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
        if tok in backend.tokenizer.eos_token_ids or len(want) == 6:
            break
        want.append(tok)
    assert gen.choices[0].text == backend.tokenizer.decode(want)
    assert gen.completion_tokens == len(want) + (gen.choices[0].finish_reason == "stop")
    # A stop string cuts the text before it; seeded sampling repeats itself.
    text = gen.choices[0].text
    assert len(text) > 2  # " France/////" from this random model
    cut = asyncio.run(backend.complete(CompletionRequest(model="g", prompt="A quick", max_tokens=6,
                                                         temperature=0, stop=[text[1:3]])))
    assert cut.choices[0].text == text[:text.index(text[1:3])] and cut.choices[0].finish_reason == "stop"
    req = ChatCompletionRequest(model="g", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                temperature=1.0, seed=11, n=2, logprobs=True)
    a, b = asyncio.run(backend.chat(req)), asyncio.run(backend.chat(req))
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.choices[0].text != a.choices[1].text  # the n samples use different seeds
    lps = a.choices[0].logprobs["content"]
    assert lps and all(x["logprob"] <= 0 for x in lps)


def test_engine_fleetlm_serves_the_gguf_with_continuous_batching(gguf_files):
    cfg = _config(gguf_files(SHIPPED_TINY_MODEL, "f32"), engine="fleetlm", dtype="f32")
    backend = build_backends(cfg)["g"]
    assert isinstance(backend, LocalBackend)
    reference = Engine.load(SHIPPED_TINY_MODEL, dtype="f32")
    prompts = [f"The fleet {i}" for i in range(6)]

    async def go():
        return await asyncio.gather(*[
            backend.complete(CompletionRequest(model="g", prompt=p, max_tokens=5, temperature=0))
            for p in prompts
        ])

    try:
        results = asyncio.run(go())
    finally:
        asyncio.run(backend.aclose())
    assert backend.batcher.peak_batch > 1
    for p, r in zip(prompts, results, strict=True):
        want = "".join(e.text for e in reference.generate([GenerationRequest(prompt=p, max_tokens=5)]))
        assert r.choices[0].text == want


def test_llama_cpp_backend_through_the_app(llama_backend, tmp_path):
    cfg, backend = llama_backend  # last: the app closes its backends when it stops
    app = create_app(cfg, UsageStore(f"sqlite:///{tmp_path / 'g.db'}"), {"g": backend})
    with TestClient(app) as client:
        r = _post(client, "/v1/completions", {"model": "g", "prompt": "The fleet", "max_tokens": 7,
                                              "temperature": 0})
        assert r.status_code == 200 and r.headers["x-fleet-model"] == "g"
        body = r.json()
        assert body["usage"]["completion_tokens"] <= 7 and body["usage"]["prompt_tokens"] > 0
        whole = body["choices"][0]["text"]
        r = _post(client, "/v1/completions", {"model": "g", "prompt": "The fleet", "max_tokens": 7,
                                              "temperature": 0, "stream": True,
                                              "stream_options": {"include_usage": True}})
        events = [json.loads(line[6:]) for line in r.text.splitlines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
        assert r.text.rstrip().endswith("data: [DONE]")
        assert "".join(c["text"] for e in events for c in e["choices"]) == whole
        assert events[-1]["usage"] == body["usage"]
        chat = {"model": "g", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
        r = _post(client, "/v1/chat/completions", chat)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"
        r = _post(client, "/v1/completions", {"model": "g", "prompt": "x " * 3000, "max_tokens": 5})
        assert r.status_code == 400 and "context" in r.json()["error"]["message"]
        # response_format is enforced on llama.cpp too (llguidance masks its logits), even at temperature 1
        schema = {"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"}},
                  "required": ["name", "n"], "additionalProperties": False}
        typed = {"type": "json_schema", "json_schema": {"name": "t", "schema": schema, "strict": True}}
        for fmt in ({"type": "json_object"}, typed):
            body = {**chat, "max_tokens": 40, "temperature": 1.0, "seed": 3, "response_format": fmt}
            r = _post(client, "/v1/chat/completions", body)
            assert r.status_code == 200, r.text
            value = json.loads(r.json()["choices"][0]["message"]["content"])
            assert isinstance(value, dict)
            if fmt["type"] == "json_schema":
                assert set(value) == {"name", "n"} and isinstance(value["n"], int)
        again = _post(client, "/v1/completions", {"model": "g", "prompt": "A", "max_tokens": 2})
        assert again.status_code == 200  # refused requests leave the worker serving
