"""serve/transcribe.py: /v1/audio/transcriptions and /translations through the official openai client."""

import asyncio
import json
import re
import time

import httpx
import jiwer
import openai
import pytest
from fastapi.testclient import TestClient

from fleetlm.config import parse_config
from fleetlm.serve.app import create_app
from fleetlm.serve.store import UsageStore
from voice_speech import encode, speech_wav

SPOKEN = "The red fox jumps over the dog."
UPLOAD_LIMIT = 300_000
CONFIG = {"models": {"cheap": {"remote": "http://127.0.0.1:9/v1"}},
          "transcription": {"max_upload_bytes": UPLOAD_LIMIT}}


def wer(hypothesis: str) -> float:
    clean = lambda s: " ".join(re.sub(r"[^a-z' ]", " ", s.lower()).split())  # noqa: E731
    return jiwer.wer(clean(SPOKEN), clean(hypothesis))


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """The sentence as wav, and re-encoded as mp3, ogg, webm and flac."""
    wav = speech_wav(tmp_path_factory.getbasetemp(), "one_sentence", [SPOKEN])
    out = tmp_path_factory.mktemp("clips")
    encoded = {fmt: encode(wav, out / f"clip.{fmt}", fmt) for fmt in ("mp3", "ogg", "webm", "flac")}
    return {"wav": wav, **encoded}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    store = UsageStore(f"sqlite:///{tmp_path_factory.mktemp('db') / 'g.db'}")
    app = create_app(parse_config(CONFIG), store, {})
    with TestClient(app) as client:
        sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client,
                            max_retries=0)
        yield client, sdk, store


def upload(clips, fmt):
    # the file name always says .wav: the container is found by its content
    return ("speech.wav", clips[fmt].read_bytes())


@pytest.mark.parametrize("response_format, fmt", [
    ("json", "mp3"), ("text", "ogg"), ("srt", "webm"), ("vtt", "flac"),
])
def test_every_format_through_the_official_client(served, clips, response_format, fmt):
    _, sdk, _ = served
    result = sdk.audio.transcriptions.create(file=upload(clips, fmt), model="whisper-1",
                                             response_format=response_format)
    if response_format == "json":
        assert wer(result.text) <= 0.3, result.text
        assert result.usage.type == "duration" and result.usage.seconds >= 1
        return
    assert isinstance(result, str)
    if response_format == "text":
        assert wer(result) <= 0.3, result
    elif response_format == "srt":
        assert re.match(r"1\n00:00:00,\d{3} --> 00:00:0\d,\d{3}\n.*fox", result, re.I), result
    else:
        assert re.match(r"WEBVTT\n\n00:00:00\.\d{3} --> 00:00:0\d\.\d{3}\n.*fox", result, re.I), result


def test_verbose_json_with_words_and_the_usage_row(served, clips):
    client, sdk, store = served
    raw = sdk.audio.transcriptions.with_raw_response.create(
        file=upload(clips, "wav"), model="gpt-4o-mini-transcribe", response_format="verbose_json",
        timestamp_granularities=["word", "segment"], language="en", prompt="A fox.", temperature=0.0)
    result = raw.parse()
    assert float(raw.headers["x-fleet-audio-seconds"]) == pytest.approx(result.duration, abs=0.01)
    assert raw.headers["x-fleet-model"] == "whisper-tiny.en"
    assert (result.task, result.language) == ("transcribe", "english")
    assert 1.0 < result.duration < 4.0 and wer(result.text) <= 0.3
    seg = result.segments[0]
    assert seg.id == 0 and 0.0 <= seg.start < seg.end <= result.duration and seg.tokens
    assert seg.avg_logprob < 0 and 0 <= seg.no_speech_prob <= 1 and seg.compression_ratio > 0
    assert [w.word for w in result.words][:3] == ["The", "red", "fox"]
    assert all(a.start <= b.start for a, b in zip(result.words, result.words[1:], strict=False))
    row = [r for r in store.requests() if r["request_id"] == raw.headers["x-request-id"]][0]
    assert (row["endpoint"], row["status"], row["model_requested"], row["model_used"]) == (
        "audio.transcriptions", 200, "gpt-4o-mini-transcribe", "whisper-tiny.en")
    assert row["completion_tokens"] == sum(len(s.tokens) for s in result.segments)
    assert row["route_reason"] == "alias:gpt-4o-mini-transcribe"


def test_translation_of_english_is_its_transcript(served, clips):
    _, sdk, _ = served
    raw = sdk.audio.translations.with_raw_response.create(file=upload(clips, "wav"), model="whisper-1",
                                                          response_format="verbose_json")
    assert raw.headers["x-fleet-translation"] == "identity"
    result = raw.parse()
    assert result.task == "translate" and wer(result.text) <= 0.3


def test_bad_inputs_are_400s_through_the_client(served, clips):
    _, sdk, _ = served
    with pytest.raises(openai.BadRequestError) as err:
        sdk.audio.transcriptions.create(file=upload(clips, "wav"), model="whisper-large-v3")
    assert err.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as err:
        sdk.audio.transcriptions.create(file=upload(clips, "wav"), model="whisper-1", language="fr")
    assert err.value.body["param"] == "language" and "English only" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        sdk.audio.transcriptions.create(file=("notes.mp3", b"just some text\n" * 50), model="whisper-1")
    assert err.value.body["code"] == "invalid_audio"


def post(client, files=None, path="/v1/audio/transcriptions", **data):
    return client.post(path, files=files, data=data)


def multipart(**fields: str) -> tuple[bytes, dict]:
    """A multipart body of text fields only (httpx sends a form without files urlencoded)."""
    parts = "".join(f'--zz\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
                    for k, v in fields.items())
    return (parts + "--zz--\r\n").encode(), {"content-type": "multipart/form-data; boundary=zz"}


def test_a_missing_file_or_a_file_sent_as_text_is_a_400(served):
    client, _, _ = served
    for fields, fragment in [({"model": "whisper-1"}, "`file` part is required"),
                             ({"model": "whisper-1", "file": "abc"}, "must be a file part")]:
        body, headers = multipart(**fields)
        r = client.post("/v1/audio/transcriptions", content=body, headers=headers)
        assert r.status_code == 400 and fragment in r.json()["error"]["message"]
        assert r.json()["error"]["param"] == "file"


@pytest.mark.parametrize("data, fragment, param", [
    ({"response_format": "docx"}, "response_format must be one of", "response_format"),
    ({"temperature": "hot"}, "temperature must be", "temperature"),
    ({"temperature": "1.5"}, "temperature must be", "temperature"),
    ({"timestamp_granularities[]": "word"}, "needs response_format verbose_json", "timestamp_granularities"),
    ({"timestamp_granularities[]": "char", "response_format": "verbose_json"}, "segment and word",
     "timestamp_granularities"),
    ({"stream": "true"}, "not supported", "stream"),
    ({"speaker": "me"}, "unknown field 'speaker'", "speaker"),
])
def test_bad_fields_name_themselves(served, clips, data, fragment, param):
    client, _, _ = served
    r = post(client, {"file": upload(clips, "wav")}, model="whisper-1", **data)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert fragment in error["message"] and error["param"] == param


@pytest.mark.parametrize("content, fragment", [
    (b"", "the file is empty"),
    (bytes(range(256)) * 40, "not a readable audio file"),
    (None, "truncated"),  # the clip's WAV cut in half
])
def test_corrupt_audio_is_a_400_and_is_logged(served, clips, content, fragment):
    client, _, store = served
    if content is None:
        whole = clips["wav"].read_bytes()
        content = whole[: len(whole) // 2]
    r = post(client, {"file": ("speech.mp3", content)}, model="whisper-1")
    assert r.status_code == 400 and fragment in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "file"
    row = [x for x in store.requests() if x["request_id"] == r.headers["x-request-id"]][0]
    assert row["status"] == 400 and fragment in row["error"]


def test_missing_model_plain_json_and_translation_language_are_400s(served, clips):
    client, _, _ = served
    r = post(client, {"file": upload(clips, "wav")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    r = client.post("/v1/audio/transcriptions", json={"model": "whisper-1"})
    assert r.status_code == 400 and "multipart/form-data" in r.json()["error"]["message"]
    r = client.post("/v1/audio/transcriptions", content=b"--zz\r\ngarbage",
                    headers={"content-type": "multipart/form-data"})  # no boundary
    assert r.status_code == 400 and "malformed multipart body" in r.json()["error"]["message"]
    r = post(client, {"file": upload(clips, "wav")}, path="/v1/audio/translations", model="whisper-1",
             language="en")
    assert r.status_code == 400 and r.json()["error"]["param"] == "language"


def test_uploads_past_the_limit_are_413_declared_or_chunked(served):
    client, _, _ = served
    big = b"\0" * (UPLOAD_LIMIT + 1)
    r = post(client, {"file": ("big.wav", big)}, model="whisper-1")
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    body = httpx.Request("POST", "http://testserver/", files={"file": ("big.wav", big)}, data={"model": "x"})
    payload = body.read()

    def chunks():  # no content-length: the limit is enforced as the bytes arrive
        for i in range(0, len(payload), 65536):
            yield payload[i:i + 65536]

    r = client.post("/v1/audio/transcriptions", content=chunks(),
                    headers={"content-type": body.headers["content-type"]})
    assert r.status_code == 413 and r.json()["error"]["param"] == "file"


def test_an_upload_that_stalls_is_a_408(tmp_path):
    config = parse_config({**CONFIG, "body_timeout_s": 0.5})
    app = create_app(config, UsageStore(f"sqlite:///{tmp_path / 'g.db'}"), {})
    first = b'--zz\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n--zz\r\n'
    pieces = [{"type": "http.request", "body": first, "more_body": True}]
    sent = []

    async def receive():
        if pieces:
            return pieces.pop()
        await asyncio.sleep(30)  # the rest of the upload never comes
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/audio/transcriptions", "raw_path": b"/v1/audio/transcriptions",
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1), "server": ("testserver", 80),
             "headers": [(b"content-type", b"multipart/form-data; boundary=zz")]}
    started = time.perf_counter()
    asyncio.run(asyncio.wait_for(app(scope, receive, send), timeout=10))
    status = next(m for m in sent if m["type"] == "http.response.start")["status"]
    body = json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))
    assert status == 408 and body["error"]["code"] == "request_timeout"
    assert time.perf_counter() - started < 5
