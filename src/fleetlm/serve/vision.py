"""Images in chat for models that cannot see: `prepare` swaps a chat request's image parts for stage one's
text (fleetlm/vision: RapidOCR with layout and image facts, or a fleet model with `vision: true`), before
routing, so that the router and the model read the same text.

Each image_url part becomes a text part in the same place of the same message, marked "[image N: text read
from it by OCR ...]"; a request addressed to a model with `vision: true` keeps its parts as sent. Stage one
runs in a worker thread (decoding and OCR block). `call.vision` says what ran ("rapidocr-ppocrv4 (1 image,
412 ms)"): the x-fleet-vision header and the usage log's route carry it. Bad images are 4xx errors whose
param names the part (fleetlm/vision/errors.py); `file` parts are a 400 until the gateway has a files API.
"""

from __future__ import annotations

import time
from typing import Any

from PIL import Image
from starlette.concurrency import run_in_threadpool

from fleetlm.serve.errors import APIError, BadRequest
from fleetlm.serve.protocol import ChatCompletionRequest, ChatMessage, ContentPart
from fleetlm.vision.config import RAPIDOCR, VisionConfig
from fleetlm.vision.describe import describe_image
from fleetlm.vision.errors import FilesApiUnavailable
from fleetlm.vision.images import decode_image, image_bytes
from fleetlm.vision.ocr import STAGE_ONE_NAME

IMAGE_PART_TYPES = ("image_url", "file")
STAGE_ONE_MAX_TOKENS = 1024
STAGE_ONE_PROMPT = (
    "Describe this image for a reader who cannot see it. First transcribe all of its text in reading order, "
    "keeping each table row on one line with cells separated by \" | \"; then say in one sentence what the "
    "image shows (kind of document or scene, main colours). Do not guess text you cannot read."
)


def requested(request: Any) -> bool:
    """Whether a chat request carries image (or file) parts."""
    return isinstance(request, ChatCompletionRequest) and any(
        isinstance(m.content, list) and any(p.type in IMAGE_PART_TYPES for p in m.content)
        for m in request.messages
    )


async def prepare(gw: Any, request: ChatCompletionRequest, call: Any) -> ChatCompletionRequest:
    """The request with every image part replaced by stage one's text (unless its model can see)."""
    config: VisionConfig = gw.config.vision
    places = _image_places(request, config)
    target = gw.config.resolve(request.model)
    if target is not None and gw.config.models[target].vision:
        call.vision = f"none: {target} sees the images ({len(places)} image{'s' if len(places) > 1 else ''})"
        return request
    started = time.perf_counter()
    texts: dict[tuple[int, int], str] = {}
    for number, (m, p) in enumerate(places, start=1):
        part = request.messages[m].content[p]  # type: ignore[index]
        try:
            texts[(m, p)] = await _stage_one(gw, config, part, number)
        except APIError as exc:
            exc.param = exc.param or f"messages.{m}.content.{p}.image_url.url"
            raise
    elapsed_ms = (time.perf_counter() - started) * 1000
    name = _stage_one_name(config)
    call.vision = f"{name} ({len(places)} image{'s' if len(places) > 1 else ''}, {elapsed_ms:.0f} ms)"
    return request.model_copy(update={"messages": _with_texts(request.messages, texts)})


def _image_places(request: ChatCompletionRequest, config: VisionConfig) -> list[tuple[int, int]]:
    """(message, part) of each image part, in order; file parts and too many images are refused here."""
    places = []
    for m, message in enumerate(request.messages):
        for p, part in enumerate(message.content if isinstance(message.content, list) else []):
            if part.type == "file":
                raise FilesApiUnavailable(
                    "file content parts reference the files API, which this gateway does not have yet: "
                    "send the image as an image_url part with a data: URL", param=f"messages.{m}.content.{p}")
            if part.type == "image_url":
                places.append((m, p))
    if len(places) > config.max_images:
        raise BadRequest(f"the request carries {len(places)} images; the limit is {config.max_images} "
                         "(vision.max_images)", param="messages", code="too_many_images")
    return places


async def _stage_one(gw: Any, config: VisionConfig, part: ContentPart, number: int) -> str:
    assert part.image_url is not None  # the protocol refuses an image_url part without one
    url = part.image_url.url
    if config.stage_one != RAPIDOCR and not url.startswith("data:"):
        # the vision model fetches the URL itself: this gateway reaches no address for it
        return await _ask_vision_model(gw, config.stage_one, part, number)
    data = await image_bytes(url, config)
    if config.stage_one == RAPIDOCR:
        return await run_in_threadpool(_describe, data, config, number)
    await run_in_threadpool(decode_image, data, config)  # a broken image is our 400, not the model's
    return await _ask_vision_model(gw, config.stage_one, part, number)


def _describe(data: bytes, config: VisionConfig, number: int) -> str:
    image: Image.Image = decode_image(data, config)
    return describe_image(image, index=number).text


async def _ask_vision_model(gw: Any, model: str, part: ContentPart, number: int) -> str:
    ask = ChatCompletionRequest(
        model=model, max_tokens=STAGE_ONE_MAX_TOKENS, temperature=0,
        messages=[ChatMessage(role="user", content=[ContentPart(type="text", text=STAGE_ONE_PROMPT), part])],
    )
    gen = await gw.backends[model].chat(ask)
    described = (gen.choices[0].text or "").strip() if gen.choices else ""
    return f"[image {number}: described by the vision model {model}]\n{described}\n[end of image {number}]"


def _stage_one_name(config: VisionConfig) -> str:
    return STAGE_ONE_NAME if config.stage_one == RAPIDOCR else config.stage_one


def _with_texts(messages: list[ChatMessage], texts: dict[tuple[int, int], str]) -> list[ChatMessage]:
    """The messages with each described image part replaced by a text part (on lines of its own)."""
    out = []
    for m, message in enumerate(messages):
        if not isinstance(message.content, list) or not any(place[0] == m for place in texts):
            out.append(message)
            continue
        parts = [ContentPart(type="text", text=f"\n{texts[(m, p)]}\n") if (m, p) in texts else part
                 for p, part in enumerate(message.content)]
        out.append(message.model_copy(update={"content": parts}))
    return out
