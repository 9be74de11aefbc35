"""The typed errors of reading an image, each an API error with its status and code (OpenAI's error JSON)."""

from __future__ import annotations

from fleetlm.serve.errors import BadRequest, PayloadTooLarge


class InvalidImageUrl(BadRequest):
    code = "invalid_image_url"


class InvalidImage(BadRequest):
    code = "invalid_image"


class UnsupportedImageFormat(BadRequest):
    code = "unsupported_image_format"


class ImageTooLarge(PayloadTooLarge):
    code = "image_too_large"


class TooManyPixels(BadRequest):
    code = "image_too_many_pixels"


class RemoteFetchDisabled(BadRequest):
    code = "remote_fetch_disabled"


class ImageUrlRefused(BadRequest):
    code = "image_url_refused"


class ImageFetchFailed(BadRequest):
    code = "image_fetch_failed"
