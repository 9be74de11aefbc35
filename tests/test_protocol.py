import json

import pytest

from fleetlm.serve.errors import BadRequest
from fleetlm.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    Usage,
    parse_request,
)


def chat(**kw) -> bytes:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw}
    return json.dumps(body).encode()


def test_chat_request_parses_and_ignores_unknown_fields():
    req = parse_request(
        ChatCompletionRequest,
        chat(
            max_tokens=7, stop="x", vendor_extra={"a": 1}, stream=True, stream_options={"include_usage": True}
        ),
    )
    assert req.model == "m" and req.max_tokens == 7 and req.stop_list() == ["x"] and req.include_usage()
    assert not hasattr(req, "vendor_extra")
    assert req.messages[0].text() == "hi"


def test_max_completion_tokens_wins_and_content_parts_join():
    req = parse_request(
        ChatCompletionRequest,
        json.dumps(
            {
                "model": "m",
                "max_tokens": 5,
                "max_completion_tokens": 9,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "a"},
                            {"type": "image_url", "image_url": {"url": "x"}},
                            {"type": "text", "text": "b"},
                        ],
                    }
                ],
            }
        ).encode(),
    )
    assert req.token_limit() == 9
    assert req.messages[0].text() == "ab"


@pytest.mark.parametrize(
    "body, param",
    [
        (chat(max_tokens="lots"), "max_tokens"),
        (chat(max_tokens=-1), "max_tokens"),
        (chat(max_tokens=10**12), "max_tokens"),
        (chat(temperature=5), "temperature"),
        (chat(top_p=0), "top_p"),
        (chat(n=0), "n"),
        (chat(stop=["a", "b", "c", "d", "e"]), "stop"),
        (chat(stream="yes please"), "stream"),
        (json.dumps({"model": "m", "messages": []}).encode(), "messages"),
        (
            json.dumps({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}).encode(),
            "messages.0.role",
        ),
        (json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(), "model"),
        (json.dumps({"model": 3, "messages": [{"role": "user", "content": "x"}]}).encode(), "model"),
    ],
)
def test_wrong_types_and_absurd_values_are_bad_requests(body, param):
    with pytest.raises(BadRequest) as exc:
        parse_request(ChatCompletionRequest, body)
    assert exc.value.status == 400 and exc.value.param == param
    assert exc.value.body()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "body, fragment",
    [
        (b"{not json", "not valid JSON"),
        (b"", "not valid JSON"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "\xff\xfe"}]}', "not valid UTF-8"),
        (b"[1, 2]", "JSON object"),
    ],
)
def test_malformed_bodies(body, fragment):
    with pytest.raises(BadRequest, match=fragment):
        parse_request(ChatCompletionRequest, body)


def test_completion_and_embedding_requests():
    req = parse_request(CompletionRequest, b'{"model": "m", "prompt": ["a", "b"], "max_tokens": 3}')
    assert req.prompts() == ["a", "b"] and req.token_limit() == 3
    with pytest.raises(BadRequest):
        parse_request(CompletionRequest, b'{"model": "m", "prompt": []}')
    emb = parse_request(EmbeddingRequest, b'{"model": "e", "input": "hello"}')
    assert emb.texts() == ["hello"]
    with pytest.raises(BadRequest):
        parse_request(EmbeddingRequest, b'{"model": "e", "input": 42}')


def test_usage_totals():
    u = Usage.of(3, 4)
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (3, 4, 7)


def test_completions_bound_the_rows_one_request_can_ask_for():
    from fleetlm.serve.protocol import MAX_COMPLETION_CHOICES, CompletionRequest

    CompletionRequest(model="m", prompt=["a"] * MAX_COMPLETION_CHOICES)
    with pytest.raises(ValueError, match="prompts x n"):
        CompletionRequest(model="m", prompt=["a"] * 5, n=16)
