"""An image content part's URL to a Pillow image: data: URLs, https URLs when the config allows (fetch.py);
limits on bytes, pixels and formats; EXIF rotation applied; RGB out."""

from __future__ import annotations

import base64
import binascii
import io

from PIL import Image, ImageOps

from fleetlm.vision.config import VisionConfig
from fleetlm.vision.errors import (
    ImageTooLarge,
    InvalidImage,
    InvalidImageUrl,
    RemoteFetchDisabled,
    TooManyPixels,
    UnsupportedImageFormat,
)
from fleetlm.vision.fetch import fetch_image

# Pillow's names of the formats accepted: OpenAI's four (PNG, JPEG, WEBP, GIF) plus two common lossless ones.
# Anything else Pillow can open (EPS, PSD, ICO, PPM, ...) is refused before its pixels are decoded.
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
HOW_TO_FETCH = ("send the image inline as a data: URL (data:image/png;base64,...), or let the gateway fetch "
                "https URLs by setting vision.allow_remote_fetch: true in fleet.yaml")


def parse_data_url(url: str, max_bytes: int) -> bytes:
    """The bytes of a base64 `data:image/...;base64,...` URL."""
    header, comma, payload = url.removeprefix("data:").partition(",")
    if not comma:
        raise InvalidImageUrl("a data: URL needs a comma between its media type and its data")
    media_type, *params = header.split(";")
    media_type = media_type.strip().lower() or "text/plain"
    if not media_type.startswith("image/"):
        raise InvalidImage(f"the data: URL holds {media_type}, not an image")
    if "base64" not in (p.strip().lower() for p in params):
        raise InvalidImageUrl("an image data: URL must be base64-encoded (data:image/png;base64,...)")
    payload = "".join(payload.split())  # line breaks in long base64 are common and harmless
    if len(payload) // 4 * 3 > max_bytes + 3:  # refused before decoding: 4 base64 characters hold 3 bytes
        raise ImageTooLarge(f"the image is over the limit of {max_bytes} bytes")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidImageUrl("the data: URL's base64 is malformed") from None
    if len(data) > max_bytes:
        raise ImageTooLarge(f"the image is {len(data)} bytes; the limit is {max_bytes}")
    return data


async def image_bytes(url: str, config: VisionConfig) -> bytes:
    """The encoded image an image_url part points at (fetched only when the config allows it)."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return parse_data_url(url, config.max_image_bytes)
    if scheme in ("http", "https"):
        if not config.allow_remote_fetch:
            raise RemoteFetchDisabled(f"this gateway does not fetch image URLs: {HOW_TO_FETCH}")
        return await fetch_image(url, max_bytes=config.max_image_bytes, timeout_s=config.fetch_timeout_s)
    raise InvalidImageUrl("an image URL must be a data: URL or an https:// URL")


def decode_image(data: bytes, config: VisionConfig) -> Image.Image:
    """Encoded bytes to an RGB image, upright (EXIF orientation applied), within the config's limits."""
    if len(data) > config.max_image_bytes:
        raise ImageTooLarge(f"the image is {len(data)} bytes; the limit is {config.max_image_bytes}")
    # Pillow refuses a decompression bomb (a small file that decodes to huge pixels) at twice this.
    Image.MAX_IMAGE_PIXELS = config.max_pixels
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError:
        raise TooManyPixels(f"the image has more than {config.max_pixels} pixels") from None
    except Exception:  # noqa: BLE001 - Pillow raises many kinds for garbage; all mean "not an image"
        raise InvalidImage("the data is not an image (PNG, JPEG, WEBP, GIF, BMP or TIFF)") from None
    if image.format not in ACCEPTED_FORMATS:
        raise UnsupportedImageFormat(f"{image.format} images are not supported; send one of "
                                     f"{', '.join(ACCEPTED_FORMATS)}")
    width, height = image.size
    if width * height > config.max_pixels:
        raise TooManyPixels(f"the image is {width}x{height} = {width * height} pixels; the limit is "
                            f"{config.max_pixels}")
    try:
        image.load()  # an animated GIF or WEBP: its first frame
        upright = _upright(image)
        return _on_white(upright)
    except Image.DecompressionBombError:
        raise TooManyPixels(f"the image has more than {config.max_pixels} pixels") from None
    except Exception:  # noqa: BLE001 - truncated or corrupt data fails in the decoder, in many ways
        raise InvalidImage(f"the {image.format} image is truncated or corrupt") from None


def _upright(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image) or image
    except Exception:  # noqa: BLE001 - a broken EXIF block must not cost the image; it stays as stored
        return image


def _on_white(image: Image.Image) -> Image.Image:
    """RGB; transparent pixels become white (black text on a transparent PNG would vanish on black)."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")

