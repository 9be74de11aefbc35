import asyncio

import pytest

from fake_openai import UpstreamServer, free_port
from fleetlm.config import parse_config
from fleetlm.errors import ConfigError
from fleetlm.serve.backends import Backend, RemoteBackend, UnavailableBackend, build_backends
from fleetlm.serve.errors import BackendError
from fleetlm.serve.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest


@pytest.fixture(scope="module")
def upstream():
    with UpstreamServer() as up:
        yield up


def chat_req(model="m", **kw):
    return ChatCompletionRequest(model=model, messages=[{"role": "user", "content": "hello there"}], **kw)


def run(coro):
    return asyncio.run(coro)


async def _with(backend: RemoteBackend, fn):
    try:
        return await fn(backend)
    finally:
        await backend.aclose()


def test_chat_replaces_the_model_name_and_sends_the_key(upstream):
    b = RemoteBackend("local-name", upstream.base_url, upstream_model="m", api_key="sk-test", timeout=5)
    gen = run(_with(b, lambda b: b.chat(chat_req("local-name", max_tokens=5))))
    assert gen.choices[0].text == "echo: hello there" and gen.choices[0].finish_reason == "stop"
    assert (gen.prompt_tokens, gen.completion_tokens) == (2, 3)
    assert upstream.payloads[-1]["model"] == "m" and upstream.payloads[-1]["max_tokens"] == 5
    assert upstream.headers[-1]["authorization"] == "Bearer sk-test"


def test_streaming_chat_yields_text_and_usage(upstream):
    async def go(b):
        return [d async for d in b.stream_chat(chat_req())]

    deltas = run(_with(RemoteBackend("m", upstream.base_url, timeout=5), go))
    assert "".join(d.text or "" for d in deltas).strip() == "echo: hello there"
    assert [d.finish_reason for d in deltas if d.finish_reason] == ["stop"]
    assert deltas[-1].usage == (2, 3)
    assert upstream.payloads[-1]["stream_options"] == {"include_usage": True}


def test_completions_and_embeddings(upstream):
    b = RemoteBackend("m", upstream.base_url, timeout=5)
    gen = run(_with(b, lambda b: b.complete(CompletionRequest(model="m", prompt="one two"))))
    assert gen.choices[0].text == " completed: one two" and gen.prompt_tokens == 2

    async def stream(b):
        return [d async for d in b.stream_complete(CompletionRequest(model="m", prompt="x", stream=True))]

    deltas = run(_with(RemoteBackend("m", upstream.base_url, timeout=5), stream))
    assert "".join(d.text or "" for d in deltas) == "completed:x"  # the upstream drops spaces when split
    emb = run(
        _with(
            RemoteBackend("m", upstream.base_url, timeout=5),
            lambda b: b.embed(EmbeddingRequest(model="m", input=["ab", "abc"])),
        )
    )
    assert emb.vectors == [[2.0, 1.0, 0.0], [3.0, 1.0, 0.0]] and emb.prompt_tokens == 2


def test_a_failed_attempt_is_retried(upstream):
    upstream.calls["flaky"] = 0
    upstream.flaky_failures = 1
    gen = run(
        _with(
            RemoteBackend("flaky", upstream.base_url, retries=1, timeout=5),
            lambda b: b.chat(chat_req("flaky")),
        )
    )
    assert gen.choices[0].text.startswith("echo") and upstream.calls["flaky"] == 2


def test_retries_run_out_on_a_broken_upstream(upstream):
    upstream.calls["broken"] = 0
    with pytest.raises(BackendError, match="500") as exc:
        run(
            _with(
                RemoteBackend("broken", upstream.base_url, retries=2, timeout=5),
                lambda b: b.chat(chat_req("broken")),
            )
        )
    assert exc.value.retryable and upstream.calls["broken"] == 3


def test_a_client_error_is_not_retried(upstream):
    upstream.calls["badreq"] = 0
    with pytest.raises(BackendError, match="context too long") as exc:
        run(
            _with(
                RemoteBackend("badreq", upstream.base_url, retries=3, timeout=5),
                lambda b: b.chat(chat_req("badreq")),
            )
        )
    assert not exc.value.retryable and exc.value.upstream_status == 400 and upstream.calls["badreq"] == 1


def test_timeout_and_refused_connection_are_backend_errors(upstream):
    upstream.slow_seconds = 1.0
    with pytest.raises(BackendError, match="Timeout"):
        run(
            _with(
                RemoteBackend("slow", upstream.base_url, retries=0, timeout=0.2),
                lambda b: b.chat(chat_req("slow")),
            )
        )
    dead = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(BackendError, match="ConnectError"):
        run(_with(RemoteBackend("m", dead, retries=1, timeout=2), lambda b: b.chat(chat_req())))


def test_mid_stream_failure_is_not_retried(upstream):
    upstream.calls["midfail"] = 0

    async def go(b):
        return [d async for d in b.stream_chat(chat_req("midfail"))]

    with pytest.raises(BackendError, match="mid-stream") as exc:
        run(_with(RemoteBackend("midfail", upstream.base_url, retries=2, timeout=5), go))
    assert not exc.value.retryable and upstream.calls["midfail"] == 1


def test_build_backends_refuses_a_missing_gguf_file():
    # GGUF models now run (fleetlm.serve.gguf_backend); a file that is not there is a config error at start
    cfg = parse_config({"models": {"r": {"remote": "http://127.0.0.1:9/v1"}, "l": {"gguf": "/x.gguf"}}})
    with pytest.raises(ConfigError, match="/x.gguf"):
        build_backends(cfg)
    cfg = parse_config({"models": {"r": {"remote": "http://127.0.0.1:9/v1"}}})
    backends = {**build_backends(cfg), "l": UnavailableBackend("l", "its runtime is not installed")}
    assert isinstance(backends["r"], RemoteBackend)
    assert all(isinstance(b, Backend) for b in backends.values())
    with pytest.raises(BackendError, match="unavailable"):
        run(backends["l"].chat(chat_req("l")))
    run(backends["r"].aclose())
