import asyncio
import json
import time

import pytest
from fastapi.testclient import TestClient

from fleetlm.config import parse_config
from fleetlm.engine import Engine, GenerationRequest, TokenEvent
from fleetlm.model import SHIPPED_TINY_MODEL
from fleetlm.model.tokenizer import Tokenizer
from fleetlm.serve.app import create_app
from fleetlm.serve.backends import build_backends
from fleetlm.serve.errors import BackendError
from fleetlm.serve.local import LocalBackend, TokenStreamBackend
from fleetlm.serve.protocol import ChatCompletionRequest, CompletionRequest
from fleetlm.serve.store import UsageStore


@pytest.fixture(scope="module")
def backend():
    cfg = parse_config({"models": {"tiny": {"path": str(SHIPPED_TINY_MODEL), "dtype": "f32"}}})
    b = build_backends(cfg)["tiny"]
    assert isinstance(b, LocalBackend)
    yield b
    asyncio.run(b.aclose())


def chat(content="hello", **kw):
    return ChatCompletionRequest(model="tiny", messages=[{"role": "user", "content": content}], **kw)


def test_whole_and_streamed_answers_agree(backend):
    gen = asyncio.run(backend.chat(chat(max_tokens=6, temperature=0)))
    (choice,) = gen.choices
    assert gen.prompt_tokens > 0 and 1 <= gen.completion_tokens <= 6
    assert choice.finish_reason in ("stop", "length")

    async def stream():
        return [d async for d in backend.stream_chat(chat(max_tokens=6, temperature=0))]

    deltas = asyncio.run(stream())
    assert "".join(d.text or "" for d in deltas) == choice.text
    assert deltas[-1].usage == (gen.prompt_tokens, gen.completion_tokens)


def _record_batch_sizes(backend, monkeypatch, hold_after_first: bool = False) -> list[int]:
    """Rows in each engine step; hold_after_first: after step 1, wait until another request is queued."""
    sizes: list[int] = []
    step = backend.batcher.step

    def recording():
        events = step()
        sizes.append(len(backend.batcher.active) + sum(1 for e in events if e.finish_reason))
        deadline = time.monotonic() + 10
        while hold_after_first and len(sizes) == 1 and backend._jobs.empty() and time.monotonic() < deadline:
            time.sleep(0.001)
        return events

    monkeypatch.setattr(backend.batcher, "step", recording)
    return sizes


@pytest.fixture(scope="module")
def reference():
    """A second engine on the same checkpoint: the backend's own model belongs to its worker thread."""
    return Engine.load(SHIPPED_TINY_MODEL, dtype="f32")


def _alone(engine, prompt: str, max_tokens: int) -> str:
    req = GenerationRequest(prompt=prompt, max_tokens=max_tokens, temperature=0.0)
    return "".join(e.text for e in engine.generate([req]))


def test_64_concurrent_requests_are_decoded_together(backend, reference, monkeypatch):
    sizes = _record_batch_sizes(backend, monkeypatch)
    prompts = [f"Request {i}: the fleet" for i in range(64)]

    async def go():
        calls = [
            backend.complete(CompletionRequest(model="tiny", prompt=p, max_tokens=6, temperature=0))
            for p in prompts
        ]
        return await asyncio.gather(*calls)

    results = asyncio.run(go())
    assert max(sizes) == backend.max_batch  # 64 requests, 32 slots: full batches, slots reused
    assert len(sizes) < 64  # far fewer engine steps than one request after another would take
    for p, r in zip(prompts, results, strict=True):
        assert r.choices[0].text == _alone(reference, p, 6)


def test_a_request_joins_the_running_batch(backend, reference, monkeypatch):
    sizes = _record_batch_sizes(backend, monkeypatch, hold_after_first=True)

    async def go():
        def req(prompt: str, n: int) -> CompletionRequest:
            return CompletionRequest(model="tiny", prompt=prompt, max_tokens=n, temperature=0)

        first = asyncio.create_task(backend.complete(req("The fleet", 40)))
        while not sizes:  # the first request is decoding
            await asyncio.sleep(0.001)
        second = await backend.complete(req("Hi", 3))
        return await first, second

    first, second = asyncio.run(go())
    joined, left = sizes.index(2), len(sizes) - 1 - sizes[::-1].index(2)
    assert sizes[0] == 1 and joined > 0  # the second request joined a batch already decoding ...
    assert first.completion_tokens == 40
    assert sizes[left + 1:] and set(sizes[left + 1:]) == {1}  # ... and left it while the first went on
    assert first.choices[0].text == _alone(reference, "The fleet", 40)
    assert second.choices[0].text == _alone(reference, "Hi", 3)


def test_n_choices_and_seeded_sampling(backend):
    gen = asyncio.run(backend.chat(chat(max_tokens=5, n=2, temperature=1.0, seed=7)))
    assert [c.index for c in gen.choices] == [0, 1]
    again = asyncio.run(backend.chat(chat(max_tokens=5, n=2, temperature=1.0, seed=7)))
    assert [c.text for c in gen.choices] == [c.text for c in again.choices]


def test_a_prompt_too_long_fails_alone(backend):
    async def go():
        bad = backend.complete(CompletionRequest(model="tiny", prompt="x " * 3000, max_tokens=4))
        good = backend.complete(CompletionRequest(model="tiny", prompt="fine", max_tokens=4))
        return await asyncio.gather(bad, good, return_exceptions=True)

    bad, good = asyncio.run(go())
    assert isinstance(bad, BackendError) and bad.upstream_status == 400 and "context" in bad.message
    assert good.completion_tokens >= 1


def test_unsupported_features_are_client_errors(backend):
    # Tools are served (tests/test_tools.py); a tool_choice naming no given tool is the client's error.
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    choice = {"type": "function", "function": {"name": "g"}}
    with pytest.raises(BackendError, match="tools") as exc:
        asyncio.run(backend.chat(chat(tools=tools, tool_choice=choice)))
    assert exc.value.upstream_status == 400


def test_gateway_serves_the_local_model(backend, tmp_path):
    cfg = parse_config(
        {"models": {"tiny": {"path": str(SHIPPED_TINY_MODEL), "price": {"input": 1, "output": 1}}}}
    )
    app = create_app(cfg, UsageStore(f"sqlite:///{tmp_path / 'l.db'}"), {"tiny": backend})
    with TestClient(app) as client:
        r = client.post(
            "/v1/chat/completions",
            content=json.dumps(
                {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
            ),
        )
        assert r.status_code == 200 and r.headers["x-fleet-model"] == "tiny"
        usage = r.json()["usage"]
        assert float(r.headers["x-fleet-cost-usd"]) == pytest.approx(usage["total_tokens"] / 1e6)
        r = client.post(
            "/v1/chat/completions",
            content=json.dumps(
                {
                    "model": "tiny",
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 4,
                    "stream": True,
                }
            ),
        )
        assert r.text.rstrip().endswith("data: [DONE]")


def test_after_shutdown_requests_fail_at_once_instead_of_hanging():
    cfg = parse_config({"models": {"tiny": {"path": str(SHIPPED_TINY_MODEL), "dtype": "f32"}}})
    b = build_backends(cfg)["tiny"]

    async def go():
        running = asyncio.create_task(b.chat(chat(max_tokens=200, temperature=0)))
        await asyncio.sleep(0.05)
        await b.aclose()
        with pytest.raises(BackendError, match="shut down"):
            await asyncio.wait_for(b.chat(chat(max_tokens=2)), timeout=10)
        # a request already in the engine ends (answered or failed), it does not wait forever
        try:
            await asyncio.wait_for(running, timeout=10)
        except BackendError as exc:
            assert "shut down" in str(exc)

    asyncio.run(go())


def test_completions_take_token_id_prompts():
    cfg = parse_config({"models": {"tiny": {"path": str(SHIPPED_TINY_MODEL), "dtype": "f32"}}})
    b = build_backends(cfg)["tiny"]
    ids = b.tokenizer.encode("The fleet")  # with the special tokens the text path adds itself

    def complete(prompt):
        req = CompletionRequest(model="tiny", prompt=prompt, max_tokens=5, temperature=0)
        return asyncio.run(b.complete(req))

    text, one, two = complete("The fleet"), complete(ids), complete([ids, ids])
    asyncio.run(b.aclose())
    assert one.choices[0].text == text.choices[0].text
    assert [c.text for c in two.choices] == [text.choices[0].text] * 2
    with pytest.raises(ValueError):
        CompletionRequest(model="tiny", prompt=[[]])


def test_a_compiled_backend_compiles_before_serving_and_answers_as_eager(reference):
    """The fast path: an engine loaded with compile=True is warmed in the backend's constructor (before the
    gateway would listen) on the batcher's own cache, then concurrent requests decode through it."""
    from torch._dynamo.utils import counters

    from fleetlm.engine.compiled import CompiledDecodeStep

    engine = Engine.load(SHIPPED_TINY_MODEL, dtype="f32", compile=True, warm=False)
    assert isinstance(engine._decode, CompiledDecodeStep) and engine.compile_seconds == 0
    compiled = LocalBackend("tiny", engine, max_batch=4, warm_batches=(1, 2))
    try:
        assert compiled.compile_seconds > 0 and compiled.batcher.decode_fn is engine._decode
        graphs = counters["stats"]["unique_graphs"]
        prompts = ["The fleet", "Hi", "Numbers: 0 1 2"]

        async def go():
            return await asyncio.gather(*[compiled.complete(
                CompletionRequest(model="tiny", prompt=p, max_tokens=5, temperature=0)) for p in prompts])

        for p, r in zip(prompts, asyncio.run(go()), strict=True):
            assert r.choices[0].text == _alone(reference, p, 5)
        assert counters["stats"]["unique_graphs"] - graphs <= 1  # at most the bucket of 4 (3 rows, padded)
    finally:
        asyncio.run(compiled.aclose())


def test_the_gateway_compiles_big_models_only(tmp_path, monkeypatch):
    from fleetlm.serve.local import COMPILE_MIN_BYTES, wants_compile

    small, big = tmp_path / "small.gguf", tmp_path / "big.gguf"
    small.write_bytes(b"0" * 10)
    with open(big, "wb") as f:
        f.truncate(COMPILE_MIN_BYTES)  # sparse: no disk used
    monkeypatch.delenv("FLEET_COMPILE", raising=False)
    assert not wants_compile(small) and wants_compile(big) and not wants_compile(SHIPPED_TINY_MODEL)
    monkeypatch.setenv("FLEET_COMPILE", "1")
    assert wants_compile(small)
    monkeypatch.setenv("FLEET_COMPILE", "0")
    assert not wants_compile(big)


class ScriptedBackend(TokenStreamBackend):
    """Answers with scripted texts, one per request in order; records each request's constraint."""

    def __init__(self, tokenizer, texts: list[str]) -> None:
        self.name, self.tokenizer, self.texts, self.constraints = "scripted", tokenizer, list(texts), []

    async def _events(self, request):
        self.constraints.append(request.constraint)
        text = self.texts.pop(0)
        for k, piece in enumerate(text[i:i + 4] for i in range(0, len(text), 4)):
            last = (k + 1) * 4 >= len(text)
            yield 10, TokenEvent(0, 0, piece, "stop" if last else None)


def _weather_request(**kw) -> ChatCompletionRequest:
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    return ChatCompletionRequest(model="scripted", tools=[tool], **kw,
                                 messages=[{"role": "user", "content": "Find me a restaurant"}])


UNDECLARED = '{"name": "find_restaurant", "arguments": {"city": "Rome"}}'


@pytest.mark.parametrize("stream", [False, True])
def test_a_call_of_an_undeclared_tool_is_asked_again_for_text(stream):
    tokenizer = Tokenizer.from_dir(SHIPPED_TINY_MODEL)
    backend = ScriptedBackend(tokenizer, [UNDECLARED, "I have no tool to find restaurants."])

    async def run():
        if not stream:
            return await backend.chat(_weather_request())
        return [d async for d in backend.stream_chat(_weather_request(stream=True))]

    out = asyncio.run(run())
    if stream:
        text = "".join(d.text or "" for d in out if d.usage is None)
        assert not any(d.tool_calls for d in out)
        assert [d.finish_reason for d in out if d.finish_reason] == ["stop"]
    else:
        (choice,) = out.choices
        text = choice.text
        assert choice.tool_calls is None and choice.finish_reason == "stop"
    assert text == "I have no tool to find restaurants."
    # the second request is held to text: the grammar refuses anything that opens like a call
    again = backend.constraints[1]
    assert again is not None and again.grammar.text != backend.constraints[0].grammar.text


def test_a_declared_call_is_kept_and_unconstrained_output_is_never_asked_again():
    tokenizer = Tokenizer.from_dir(SHIPPED_TINY_MODEL)
    call = '{"name": "get_weather", "arguments": {"city": "Rome"}}'
    backend = ScriptedBackend(tokenizer, [call])
    choice = asyncio.run(backend.chat(_weather_request())).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.tool_calls[0]["function"]["name"] == "get_weather"
    free = ScriptedBackend(tokenizer, [UNDECLARED])  # constrained_decoding false: the baseline, as it came
    choice = asyncio.run(free.chat(_weather_request(constrained_decoding=False))).choices[0]
    assert choice.text == UNDECLARED and choice.tool_calls is None and len(free.constraints) == 1


REPEATED = "one two three four, one two three four, one two three four, one two three four"


def test_speculative_lookup_gives_the_plain_answer_and_logs_its_acceptance(tmp_path):
    """A model with `speculative: lookup` answers a lone request with the plain backend's text (float64
    weights: see tests/test_batcher.py), and the tally reaches the body's `fleet` and the usage log."""
    import copy

    import torch

    from fleetlm.engine.batcher import Speculation
    from fleetlm.engine.speculative import PromptLookup

    base = Engine.load(SHIPPED_TINY_MODEL, dtype="f32")
    plain = LocalBackend("tiny", Engine(copy.deepcopy(base.model).to(torch.float64), base.tokenizer))
    fast = LocalBackend("tiny", Engine(copy.deepcopy(base.model).to(torch.float64), base.tokenizer),
                        speculation=Speculation(PromptLookup(), name="lookup"))
    ask = {"model": "tiny", "messages": [{"role": "user", "content": REPEATED}], "max_tokens": 40,
           "temperature": 0}
    want = asyncio.run(plain.chat(ChatCompletionRequest(**ask))).choices[0].text
    store = UsageStore(f"sqlite:///{tmp_path / 'spec.db'}")
    cfg = parse_config({"models": {"tiny": {"path": str(SHIPPED_TINY_MODEL)}}})
    try:
        with TestClient(create_app(cfg, store, {"tiny": fast})) as client:
            whole = client.post("/v1/chat/completions", json=ask)
            streamed = client.post("/v1/chat/completions", json={**ask, "stream": True})
    finally:
        asyncio.run(plain.aclose())
    assert whole.status_code == 200 and whole.json()["choices"][0]["message"]["content"] == want
    tally = whole.json()["fleet"]["speculative"]
    assert tally["drafter"] == "lookup" and tally["drafted"] >= tally["accepted"] >= 0
    text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                   for line in streamed.text.splitlines()
                   if line.startswith("data: {") and json.loads(line[6:])["choices"])
    assert text == want
    rows = store.requests()
    assert len(rows) == 2 and all("; speculative lookup: " in r["route_reason"] for r in rows)
    assert f"{tally['accepted']}/{tally['drafted']} drafts kept" in rows[0]["route_reason"]


def test_speculative_setting_is_checked():
    from fleetlm.errors import ConfigError
    from fleetlm.serve.local import speculation_for

    with pytest.raises(Exception, match="speculative needs a model our engine runs"):
        parse_config({"models": {"r": {"remote": "http://h:1/v1", "speculative": "lookup"}}})
    engine = Engine.load(SHIPPED_TINY_MODEL, dtype="f32")
    with pytest.raises(ConfigError, match="want 'lookup', a catalog model or a .gguf file"):
        speculation_for("no-such-draft", engine, "f32")
    with pytest.raises(ConfigError, match="does not exist"):
        speculation_for("/nowhere/draft.gguf", engine, "f32")
    spec = speculation_for("lookup", engine, "f32")
    assert spec.name == "lookup" and spec.policy.low == 0 and len(spec.policy.verify_cost) == 9
