"""The `vision:` section of fleet.yaml: remote fetching, image limits, and which model runs stage one."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

RAPIDOCR = "rapidocr"


class VisionConfig(BaseModel):
    """How the gateway reads images in chat requests for models that cannot see them."""

    model_config = ConfigDict(extra="forbid")

    allow_remote_fetch: bool = Field(
        False, description="fetch https image URLs; off by default (only data: URLs are read then). Even on, "
        "loopback, private, link-local, multicast and reserved addresses are refused")
    max_image_bytes: int = Field(8 * 1024 * 1024, gt=0, description="largest encoded image, in bytes (413)")
    max_pixels: int = Field(25_000_000, gt=0, description="largest decoded image, width x height (400); "
                            "also Pillow's decompression-bomb limit")
    max_images: int = Field(8, ge=1, le=100, description="image parts one request may carry")
    fetch_timeout_s: float = Field(10.0, gt=0, le=120, description="time one remote image may take, all in")
    stage_one: str = Field(
        RAPIDOCR, description="what turns an image into text: rapidocr (local PP-OCRv4), or the name of a "
        "fleet model with vision: true (an OpenAI-compatible endpoint that accepts images)")
