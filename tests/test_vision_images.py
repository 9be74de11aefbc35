"""Reading an image part's URL: data: URLs, the fetch switch, byte and pixel limits, formats, EXIF."""

import asyncio
import base64
import io

import pytest
from PIL import Image

from fleetlm.vision import images
from fleetlm.vision.config import VisionConfig
from fleetlm.vision.errors import (
    ImageTooLarge,
    InvalidImage,
    InvalidImageUrl,
    RemoteFetchDisabled,
    TooManyPixels,
    UnsupportedImageFormat,
)
from fleetlm.vision.images import decode_image, image_bytes, parse_data_url

CONFIG = VisionConfig(max_image_bytes=50_000, max_pixels=250_000)


def encode(img: Image.Image, fmt: str = "PNG", **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def test_data_url_is_decoded_with_line_breaks_allowed():
    data = encode(Image.new("RGB", (4, 4), "blue"))
    b64 = base64.b64encode(data).decode()
    wrapped = "\n".join(b64[i:i + 8] for i in range(0, len(b64), 8))
    assert parse_data_url(f"data:image/png;base64,{wrapped}", 1000) == data
    assert parse_data_url(f"data:IMAGE/PNG;charset=x;BASE64,{b64}", 1000) == data


@pytest.mark.parametrize("url, error", [
    ("data:image/png;base64", InvalidImageUrl),  # no comma
    ("data:text/plain;base64,aGVsbG8=", InvalidImage),
    ("data:,hello", InvalidImage),  # no media type: text/plain
    ("data:image/png,rawbytes", InvalidImageUrl),  # not base64
    ("data:image/png;base64,a$b=", InvalidImageUrl),
    ("data:image/png;base64,abc", InvalidImageUrl),  # bad padding
    ("data:image/png;base64," + "A" * 2000, ImageTooLarge),  # refused before decoding
])
def test_bad_data_urls(url, error):
    with pytest.raises(error):
        parse_data_url(url, 1000)


def test_image_too_large_is_a_413():
    with pytest.raises(ImageTooLarge) as caught:
        decode_image(bytes(60_000), CONFIG)
    assert caught.value.status == 413 and caught.value.code == "image_too_large"


def test_urls_are_fetched_only_when_allowed(monkeypatch):
    with pytest.raises(RemoteFetchDisabled, match="allow_remote_fetch"):
        asyncio.run(image_bytes("https://example.com/a.png", CONFIG))
    with pytest.raises(InvalidImageUrl):
        asyncio.run(image_bytes("file:///etc/passwd", CONFIG.model_copy(update={"allow_remote_fetch": True})))
    fetched = []

    async def fake_fetch(url, *, max_bytes, timeout_s):
        fetched.append((url, max_bytes, timeout_s))
        return b"bytes"

    monkeypatch.setattr(images, "fetch_image", fake_fetch)
    allowed = CONFIG.model_copy(update={"allow_remote_fetch": True, "fetch_timeout_s": 3.0})
    assert asyncio.run(image_bytes("https://example.com/a.png", allowed)) == b"bytes"
    assert fetched == [("https://example.com/a.png", 50_000, 3.0)]


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), "white")
    img.paste((255, 0, 0), (0, 0, 10, 20))  # red stripe on the left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: turn 90 degrees clockwise to show upright
    upright = decode_image(encode(img, "JPEG", exif=exif.tobytes(), quality=95), CONFIG)
    assert upright.size == (20, 40) and upright.mode == "RGB"
    r, g, b = upright.getpixel((10, 2))
    assert r > 200 and g < 60  # the left stripe is now the top


def test_transparent_pixels_become_white_and_gif_gives_its_first_frame():
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert decode_image(encode(clear), CONFIG).getpixel((3, 3)) == (255, 255, 255)
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "green")]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    r, g, _ = decode_image(gif, CONFIG).getpixel((3, 3))
    assert r > 200 and g < 60


def test_formats_and_broken_data():
    for fmt in ("PNG", "JPEG", "WEBP", "BMP", "TIFF"):
        assert decode_image(encode(Image.new("RGB", (6, 5), "white"), fmt), CONFIG).size == (6, 5)
    with pytest.raises(UnsupportedImageFormat, match="PPM"):
        decode_image(encode(Image.new("RGB", (6, 5)), "PPM"), CONFIG)
    with pytest.raises(InvalidImage):
        decode_image(b"GIF89a-but-nothing-else", CONFIG)
    whole = encode(Image.effect_noise((64, 64), 50).convert("RGB"))
    with pytest.raises(InvalidImage, match="truncated or corrupt"):
        decode_image(whole[: len(whole) // 2], CONFIG)


def test_pixel_limit_and_decompression_bomb():
    with pytest.raises(TooManyPixels, match="600x500"):
        decode_image(encode(Image.new("RGB", (600, 500), "white")), CONFIG)
    bomb = encode(Image.new("1", (3000, 3000)))  # 9 million pixels in a few kilobytes
    assert len(bomb) < CONFIG.max_image_bytes
    with pytest.raises(TooManyPixels):
        decode_image(bomb, CONFIG)
    assert Image.MAX_IMAGE_PIXELS == CONFIG.max_pixels
