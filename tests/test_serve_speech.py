"""POST /v1/audio/speech and the lexicon API through the gateway: OpenAI's shape, streaming, clear 4xx."""

import io
import json
import time

import av
import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from fake_openai import serving
from fleetlm.config import parse_config
from fleetlm.serve.app import create_app
from fleetlm.serve.store import UsageStore
from fleetlm.voice import tts
from test_app import Scripted

SENTENCES = "The first sentence is short. Here is a second one. And a third."


def config(tmp_path, **extra):
    return parse_config({"models": {"cheap": {"remote": "http://127.0.0.1:9/v1"}},
                         "voice": {"lexicon": str(tmp_path / "lexicon.json")}, **extra})


@pytest.fixture(scope="module")
def piper():
    return tts.piper_voice()  # loaded once for the module


@pytest.fixture
def gateway(tmp_path, piper):
    store = UsageStore(f"sqlite:///{tmp_path / 'g.db'}")
    app = create_app(config(tmp_path), store, {"cheap": Scripted("cheap")})
    with TestClient(app) as client:
        yield client, store, tmp_path / "lexicon.json"


def decoded_seconds(data: bytes) -> float:
    with av.open(io.BytesIO(data)) as c:
        stream = c.streams.audio[0]
        return sum(f.samples for f in c.decode(stream)) / stream.rate


def speech(client, **body):
    return client.post("/v1/audio/speech", json={"model": "tts-1", "voice": "alloy", **body})


def test_wav_speech_and_its_usage_record(gateway):
    client, store, _ = gateway
    r = speech(client, input="Hello there.", response_format="wav")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "audio/wav"
    assert r.headers["x-fleet-model"] == "piper:alloy"
    assert 0.4 < decoded_seconds(r.content) < 3.0
    (record,) = [x for x in store.requests() if x["endpoint"] == "speech"]
    assert record["status"] == 200 and record["prompt_tokens"] == len("Hello there.")
    assert record["model_requested"] == "tts-1"


@pytest.mark.parametrize("body, status, param", [
    ({"input": ""}, 400, "input"),
    ({"input": "   "}, 400, "input"),
    ({"input": "x" * 4097}, 400, "input"),
    ({"input": "hi", "voice": "galadriel"}, 400, "voice"),
    ({"input": "hi", "model": "tts-9"}, 400, "model"),
    ({"input": "hi", "response_format": "ogg"}, 400, "response_format"),
    ({"input": "hi", "speed": 4.5}, 400, "speed"),
    ({"input": "hi", "speed": 0.1}, 400, "speed"),
    ({"input": "<speak>oops <break></speak>"}, 400, "input"),
    ({"input": "hi", "lexicon": {"hi": {"ipa": "h☃"}}}, 400, "lexicon"),
    ({"input": "hi", "lexicon": {"hi": 3}}, 400, "lexicon"),
    ({"input": "hi", "stream_format": "sse"}, 400, "stream_format"),
])
def test_bad_requests_are_openai_errors(gateway, body, status, param):
    client, _, _ = gateway
    r = speech(client, **body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]


def test_malformed_ssml_carries_the_parser_message(gateway):
    r = speech(gateway[0], input="<speak>a & b</speak>")
    assert r.status_code == 400 and "malformed SSML" in r.json()["error"]["message"]


def test_a_body_that_is_not_json_is_a_400(gateway):
    r = gateway[0].post("/v1/audio/speech", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_lexicon_api_round_trip(gateway):
    client, _, path = gateway
    r = client.put("/v1/fleet/voice/lexicon/NASA", json={"ipa": "nˈæsə"})
    assert r.status_code == 200 and r.json() == {"word": "nasa", "ipa": "nˈæsə"}
    client.put("/v1/fleet/voice/lexicon/Dr.", json={"say": "Doctor"})
    assert client.get("/v1/fleet/voice/lexicon").json()["data"] == [
        {"word": "dr.", "say": "Doctor"}, {"word": "nasa", "ipa": "nˈæsə"}]
    assert client.get("/v1/fleet/voice/lexicon/nasa").json()["ipa"] == "nˈæsə"
    assert json.loads(path.read_text())["entries"]["nasa"] == {"ipa": "nˈæsə"}
    assert client.delete("/v1/fleet/voice/lexicon/NASA").json() == {"word": "nasa", "deleted": True}
    for r in [client.get("/v1/fleet/voice/lexicon/nasa"), client.delete("/v1/fleet/voice/lexicon/nasa")]:
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize("body, fragment", [({"ipa": "n☃"}, "phoneme set"), ({"sound": "x"}, '"ipa"'),
                                            (b"{", "not valid JSON")])
def test_bad_lexicon_entries_are_400s(gateway, body, fragment):
    client, _, path = gateway
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = client.put("/v1/fleet/voice/lexicon/x", **kw)
    assert r.status_code == 400 and fragment in r.json()["error"]["message"]
    assert not path.exists()


def test_a_corrupt_lexicon_file_is_a_clear_400_not_a_crash(gateway):
    client, _, path = gateway
    path.write_text("{corrupt")
    for r in [speech(client, input="hi"), client.get("/v1/fleet/voice/lexicon")]:
        assert r.status_code == 400 and "unreadable" in r.json()["error"]["message"]


def test_the_stored_lexicon_is_applied(gateway, monkeypatch):
    client, _, _ = gateway
    client.put("/v1/fleet/voice/lexicon/zorblax", json={"ipa": "zˈɔːɹblæks"})
    seen = []
    real = tts._piper_text
    monkeypatch.setattr(tts, "_piper_text", lambda group: seen.append(real(group)) or seen[-1])
    assert speech(client, input="Meet zorblax.", response_format="pcm").status_code == 200
    assert seen == ["Meet [[zˈɔːɹblæks]]."]


def test_speech_needs_a_key_when_keys_are_required(tmp_path, piper):
    store = UsageStore(f"sqlite:///{tmp_path / 'k.db'}")
    app = create_app(config(tmp_path, require_api_key=True), store, {"cheap": Scripted("cheap")})
    with TestClient(app) as client:
        assert speech(client, input="hi").status_code == 401
        assert client.get("/v1/fleet/voice/lexicon").status_code == 401
        assert client.put("/v1/fleet/voice/lexicon/x", json={"say": "y"}).status_code == 401


def test_official_client_streams_mp3_sentence_by_sentence(tmp_path, piper):
    store = UsageStore(f"sqlite:///{tmp_path / 's.db'}")
    app = create_app(config(tmp_path), store, {"cheap": Scripted("cheap")})
    with serving(app, "gateway") as port:
        base = f"http://127.0.0.1:{port}/v1"
        client = openai.OpenAI(base_url=base, api_key="x", max_retries=0)
        out = tmp_path / "speech.mp3"
        with client.audio.speech.with_streaming_response.create(
            model="gpt-4o-mini-tts", voice="nova", input=SENTENCES, response_format="mp3",
            instructions="Speak cheerfully.",
        ) as response:
            response.stream_to_file(out)
        assert 2.0 < decoded_seconds(out.read_bytes()) < 12.0
        # Pieces arrive as the sentences are synthesised: the first long before the last.
        arrivals = []
        start = time.perf_counter()
        with httpx.stream("POST", f"{base}/audio/speech", timeout=60, json={
                "model": "tts-1", "voice": "alloy", "input": SENTENCES, "response_format": "pcm"}) as r:
            assert r.headers.get("transfer-encoding") == "chunked"
            for chunk in r.iter_raw():
                arrivals.append((time.perf_counter() - start, len(chunk)))
        assert len(arrivals) >= 3
        assert arrivals[0][0] < 0.8 * arrivals[-1][0]
        # A client that leaves after the first piece stops the synthesis and is logged as a 499.
        with httpx.stream("POST", f"{base}/audio/speech", timeout=60, json={
                "model": "tts-1", "voice": "alloy", "input": SENTENCES * 5, "response_format": "mp3"}) as r:
            next(r.iter_raw())
        deadline = time.time() + 20
        while len(store.requests()) < 3 and time.time() < deadline:
            time.sleep(0.05)
        assert [row["status"] for row in store.requests()] == [200, 200, 499]
