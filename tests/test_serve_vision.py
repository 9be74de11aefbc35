"""The gateway's image parts: turned into OCR text before routing, the x-fleet-vision header, 4xx errors."""

import base64
import io
import json

import openai
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw, ImageFont

from fleetlm.config import parse_config
from fleetlm.serve.app import create_app
from fleetlm.serve.backends import Choice, Delta, Generation, RouteDecision
from fleetlm.serve.store import UsageStore

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"


class Recording:
    """A backend that keeps every request it is sent and answers a fixed text."""

    def __init__(self, name, text="the total is 9.25"):
        self.name, self.text, self.requests = name, text, []

    async def chat(self, req):
        self.requests.append(req)
        return Generation([Choice(0, self.text, "stop")], prompt_tokens=50, completion_tokens=5)

    async def stream_chat(self, req):
        self.requests.append(req)
        yield Delta(0, self.text)
        yield Delta(0, None, "stop")
        yield Delta(usage=(50, 5))

    async def aclose(self):
        pass


class ReadingRouter:
    """Routes everything to `small` and keeps the text of the last user message it routed on."""

    name = "auto"

    def __init__(self):
        self.seen = []

    def route(self, request):
        self.seen.append(request.messages[-1].text())
        return RouteDecision("small", "test", predicted_quality=0.9)


def make_config(files_dir, **vision):
    return parse_config({
        "models": {"small": {"remote": "http://127.0.0.1:9/v1"},
                   "seer": {"remote": "http://127.0.0.1:9/v1", "vision": True}},
        "router": {"name": "auto"},
        "vision": vision,
        "knowledge": {"files_dir": str(files_dir)},
    })


@pytest.fixture
def gateway(tmp_path):
    def build(**vision):
        store = UsageStore(f"sqlite:///{tmp_path / 'v.db'}")
        backends = {"small": Recording("small"), "seer": Recording("seer", "A receipt from CORNER CAFE.")}
        router = ReadingRouter()
        client = TestClient(create_app(make_config(tmp_path / "files", **vision), store, backends,
                                       router=router))
        return client, store, backends, router

    return build


def receipt_png() -> bytes:
    img = Image.new("RGB", (420, 200), "white")
    draw = ImageDraw.Draw(img)
    draw.text((20, 15), "CORNER CAFE", fill="black", font=ImageFont.truetype(FONT, 24))
    font = ImageFont.truetype(FONT, 18)
    for i, row in enumerate([("Coffee", "2", "7.00"), ("Bagel", "1", "2.25")]):
        for j, cell in enumerate(row):
            draw.text((20 + j * 150, 70 + i * 36), cell, fill="black", font=font)
    return png(img)


def png(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(data).decode()


def image_message(url, text="What is the total?", **image_url):
    return {"role": "user", "content": [{"type": "text", "text": text},
                                        {"type": "image_url", "image_url": {"url": url, **image_url}}]}


def ask(client, *messages, model="small", **kw):
    return client.post("/v1/chat/completions", content=json.dumps({"model": model, "messages": list(messages),
                                                                    **kw}))


def test_official_client_image_reaches_the_model_as_ocr_text(gateway):
    client, store, backends, _ = gateway()
    oa = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=client, max_retries=0)
    raw = oa.chat.completions.with_raw_response.create(
        model="small", messages=[image_message(data_url(receipt_png()), detail="high")])
    assert raw.parse().choices[0].message.content == "the total is 9.25"
    assert raw.headers["x-fleet-vision"].startswith("rapidocr-ppocrv4 (1 image, ")
    (sent,) = backends["small"].requests
    parts = sent.messages[0].content
    assert [p.type for p in parts] == ["text", "text"]  # the image part became text, in its place
    text = sent.messages[0].text()
    assert text.startswith("What is the total?\n[image 1: text read from it by OCR")
    assert "CORNER CAFE" in text and "Coffee | 2 | 7.00" in text and "Bagel | 1 | 2.25" in text
    assert text.index("CORNER CAFE") < text.index("Coffee") < text.index("Bagel")
    (row,) = store.requests()
    assert "vision: rapidocr-ppocrv4 (1 image" in row["route_reason"] and row["status"] == 200


def test_auto_routes_on_the_ocr_text_and_streams(gateway):
    client, _, backends, router = gateway()
    img = Image.new("RGB", (300, 60), "white")
    ImageDraw.Draw(img).text((10, 10), "INVOICE 77", fill="black", font=ImageFont.truetype(FONT, 28))
    with client.stream("POST", "/v1/chat/completions", content=json.dumps({
            "model": "auto", "stream": True, "messages": [image_message(data_url(png(img)))]})) as r:
        body = "".join(r.iter_text())
    assert r.status_code == 200 and r.headers["x-fleet-vision"].startswith("rapidocr-ppocrv4 (1 image")
    assert "the total is 9.25" in body and body.rstrip().endswith("[DONE]")
    assert "INVOICE 77" in router.seen[0]  # the router read the text, not a bare image part
    assert "INVOICE 77" in backends["small"].requests[0].messages[0].text()


def test_a_model_that_sees_gets_the_image_part_as_sent(gateway):
    client, _, backends, _ = gateway()
    url = data_url(png(Image.new("RGB", (8, 8), "red")))
    r = ask(client, image_message(url), model="seer")
    assert r.status_code == 200 and r.headers["x-fleet-vision"].startswith("none: seer sees the images")
    part = backends["seer"].requests[0].messages[0].content[1]
    assert part.type == "image_url" and part.image_url.url == url


def test_a_vision_model_as_stage_one_describes_for_a_blind_model(gateway):
    client, _, backends, _ = gateway(stage_one="seer")
    r = ask(client, image_message(data_url(png(Image.new("RGB", (8, 8), "red")))))
    assert r.status_code == 200 and r.headers["x-fleet-vision"].startswith("seer (1 image")
    assert backends["seer"].requests[0].messages[0].content[1].type == "image_url"
    text = backends["small"].requests[0].messages[0].text()
    assert "[image 1: described by the vision model seer]\nA receipt from CORNER CAFE." in text


def test_an_uploaded_image_is_read_by_its_file_id(gateway):
    client, _, backends, _ = gateway()
    oa = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=client, max_retries=0)
    blank = oa.files.create(file=("blank.png", io.BytesIO(png(Image.new("RGB", (40, 30), "white")))),
                            purpose="vision")
    notes = oa.files.create(file=("notes.txt", io.BytesIO(b"not an image")), purpose="user_data")
    file_part = {"type": "file", "file": {"file_id": blank.id}}
    r = ask(client, {"role": "user", "content": [file_part, {"type": "text", "text": "What is this?"}]})
    assert r.status_code == 200 and r.headers["x-fleet-vision"].startswith("rapidocr-ppocrv4 (1 image")
    assert backends["small"].requests[0].messages[0].text().startswith(
        "\n[image 1: OCR found no text in it; 40x30 pixels, mostly white (100%)]")
    # a model that sees gets the upload as a data: URL (it cannot reach this gateway's files)
    assert ask(client, {"role": "user", "content": [file_part]}, model="seer").status_code == 200
    sent = backends["seer"].requests[0].messages[0].content[0]
    assert sent.type == "image_url" and sent.image_url.url.startswith("data:image/png;base64,iVBOR")
    err = _error(ask(client, {"role": "user", "content": [{"type": "file", "file": {"file_id": notes.id}}]}),
                 400, "invalid_image")
    assert err["param"] == "messages.0.content.0.file.file_id"


def _error(r, status, code=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if code is not None:
        assert err["code"] == code
    return err


def test_no_url_is_fetched_unless_the_config_allows(gateway):
    client, _, backends, _ = gateway()
    err = _error(ask(client, image_message("https://example.com/a.png")), 400, "remote_fetch_disabled")
    assert "vision.allow_remote_fetch" in err["message"] and "data:" in err["message"]
    assert err["param"] == "messages.0.content.1.image_url.url"
    assert backends["small"].requests == []


@pytest.mark.parametrize("url", [
    "https://127.0.0.1/a.png", "https://[::1]/a.png", "https://10.1.2.3/a.png",
    "https://169.254.169.254/latest/meta-data", "https://localhost/a.png", "https://[::ffff:127.0.0.1]/a.png",
])
def test_loopback_private_and_link_local_addresses_are_refused(gateway, url):
    client, _, _, _ = gateway(allow_remote_fetch=True)
    err = _error(ask(client, image_message(url)), 400, "image_url_refused")
    assert "public addresses" in err["message"]


def test_an_unreachable_url_is_a_fetch_failure(gateway):
    client, _, _, _ = gateway(allow_remote_fetch=True, fetch_timeout_s=3)
    err = _error(ask(client, image_message("https://no-such-host.invalid/a.png")), 400, "image_fetch_failed")
    assert "no-such-host.invalid" in err["message"] or "within" in err["message"]


def test_bad_images_are_clear_4xx_errors(gateway):
    client, store, _, _ = gateway(max_image_bytes=20_000, max_pixels=1_000_000)
    small_png = png(Image.new("RGB", (8, 8), "white"))
    cases = [
        (image_message("data:image/png;base64,@@not base64@@"), 400, "invalid_image_url"),
        (image_message(data_url(b"hello", "text/plain")), 400, "invalid_image"),
        (image_message(data_url(b"\x89PNG but not really", "image/png")), 400, "invalid_image"),
        (image_message(data_url(small_png[: len(small_png) // 2])), 400, "invalid_image"),  # truncated
        (image_message(data_url(png(Image.new("RGB", (8, 8)), "PPM"), "image/x-portable-pixmap")), 400,
         "unsupported_image_format"),
        (image_message(data_url(bytes(30_000))), 413, "image_too_large"),
        # a decompression bomb: 2000x2000 one-bit pixels are a few hundred bytes of PNG
        (image_message(data_url(png(Image.new("1", (2000, 2000))))), 400, "image_too_many_pixels"),
        (image_message("ftp://example.com/a.png"), 400, "invalid_image_url"),
        ({"role": "user", "content": [{"type": "image_url", "image_url": {}}]}, 400, None),
        ({"role": "user", "content": [{"type": "image_url"}]}, 400, None),
        ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": small_png.hex(),
                                                                          "detail": "max"}}]}, 400, None),
        ({"role": "user", "content": [{"type": "file", "file": {"file_id": "file-none"}}]}, 400,
         "file_not_found"),
        ({"role": "user", "content": [{"type": "file", "file": {}}]}, 400, "invalid_file_part"),
    ]
    for message, status, code in cases:
        _error(ask(client, message), status, code)
    assert {r["status"] for r in store.requests()} == {400, 413}  # logged, and never a 500


def test_too_many_images_is_a_400(gateway):
    client, _, _, _ = gateway(max_images=2)
    url = data_url(png(Image.new("RGB", (8, 8), "white")))
    message = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}] * 3}
    _error(ask(client, message), 400, "too_many_images")


def test_a_real_small_model_answers_over_an_image(tmp_path, smollm2_gguf):
    """SmolLM2-135M (llama.cpp) reads stage one's text and answers from it."""
    pytest.importorskip("llama_cpp")
    from fleetlm.serve.backends import build_backends

    img = Image.new("RGB", (400, 160), "white")
    draw = ImageDraw.Draw(img)
    draw.text((20, 15), "CORNER CAFE", fill="black", font=ImageFont.truetype(FONT, 24))
    font = ImageFont.truetype(FONT, 18)
    for i, (item, price) in enumerate([("Coffee", "3.50"), ("Bagel", "2.25"), ("Total", "5.75")]):
        draw.text((20, 60 + i * 30), item, fill="black", font=font)
        draw.text((250, 60 + i * 30), price, fill="black", font=font)
    config = parse_config({"models": {"smol": {"gguf": str(smollm2_gguf), "engine": "llama_cpp"}}})
    store = UsageStore(f"sqlite:///{tmp_path / 's.db'}")
    with TestClient(create_app(config, store, build_backends(config))) as client:
        message = image_message(data_url(png(img)), text="What is the total on this receipt?")
        message["content"].reverse()  # the image first, then the question, as clients often send it
        r = ask(client, message, model="smol", max_tokens=30, temperature=0)
    assert r.status_code == 200 and r.headers["x-fleet-vision"].startswith("rapidocr-ppocrv4 (1 image")
    assert "5.75" in r.json()["choices"][0]["message"]["content"]
