"""input_image parts in /v1/responses: read by the gateway's vision stage (serve/vision.py) for a model that
cannot see (RapidOCR, real), passed as sent to one that can, stored with the input items."""

import base64
import io

import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw, ImageFont

from fleetlm.config import parse_config
from fleetlm.serve.app import create_app
from fleetlm.serve.store import UsageStore
from responses_fakes import ScriptBackend, connect

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"


def sign_png() -> str:
    image = Image.new("RGB", (520, 120), "white")
    ImageDraw.Draw(image).text((20, 30), "CORNER CAFE 9.25", fill="black", font=ImageFont.truetype(FONT, 44))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("responses-vision")
    config = parse_config({"models": {"blind": {"remote": "http://127.0.0.1:9/v1"},
                                      "seer": {"remote": "http://127.0.0.1:9/v1", "vision": True}},
                           "knowledge": {"files_dir": str(root / "blobs")}})
    backends = {"blind": ScriptBackend(), "seer": ScriptBackend()}
    for name, b in backends.items():
        b.name = name
    with TestClient(create_app(config, UsageStore(f"sqlite:///{root / 'fleet.db'}"), backends)) as tc:
        yield tc, connect(tc), backends


def ask(image_url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "input_text", "text": "What does the sign say?"},
                                         {"type": "input_image", "image_url": image_url, "detail": "high"}]}]


def test_a_model_that_cannot_see_gets_the_ocr_text(served):
    tc, client, backends = served
    raw = client.responses.with_raw_response.create(model="blind", input=ask(sign_png()))
    assert raw.headers["x-fleet-vision"].startswith("rapidocr")
    text = backends["blind"].requests[-1].messages[0].text()
    assert text.startswith("What does the sign say?") and "CORNER CAFE" in text
    items = client.responses.input_items.list(raw.parse().id).data
    assert [p.type for p in items[0].content] == ["input_text", "input_image"]


def test_a_model_that_sees_gets_the_image_part(served):
    _, client, backends = served
    url = sign_png()
    client.responses.create(model="seer", input=ask(url))
    parts = backends["seer"].requests[-1].messages[0].content
    assert [p.type for p in parts] == ["text", "image_url"]
    assert parts[1].image_url.url == url and parts[1].image_url.detail == "high"


@pytest.mark.parametrize("item, param", [
    ({"role": "user", "content": [{"type": "input_image"}]}, "input[0].content[0].image_url"),
    ({"role": "user", "content": [{"type": "input_image", "image_url": "data:,", "detail": "max"}]},
     "input[0].content[0].detail"),
    ({"role": "assistant", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]},
     "input[0].content"),
    ({"role": "user", "content": [{"type": "input_file", "file_id": "file-1"}]}, "input[0].content[0].type"),
])
def test_bad_image_parts_are_400s(served, item, param):
    tc, _, _ = served
    r = tc.post("/v1/responses", json={"model": "blind", "input": [item]})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
