"""Images in chat for models that cannot see: `prepare` swaps a chat request's image parts for stage one's
text (fleetlm/vision: RapidOCR with layout and image facts, or a fleet model with `vision: true`), before
routing, so that the router and the model read the same text.

Each image_url part becomes a text part in the same place of the same message, marked "[image N: text read
from it by OCR ...]"; a request addressed to a model with `vision: true` keeps its parts as sent. Stage one
runs in a worker thread (decoding and OCR block). `call.vision` says what ran ("rapidocr-ppocrv4 (1 image,
412 ms)"): the x-fleet-vision header and the usage log's route carry it. Bad images are 4xx errors whose
param names the part (fleetlm/vision/errors.py). A `file` part ({"file_id"} of an upload to /v1/files) is
read from the knowledge store's files like a data: URL.
"""

from __future__ import annotations

import base64
import io
import time
from typing import Any

from PIL import Image
from starlette.concurrency import run_in_threadpool

from fleetlm.serve.errors import APIError, BadRequest
from fleetlm.serve.files_api import knowledge_base
from fleetlm.serve.protocol import ChatCompletionRequest, ChatMessage, ContentPart, ImageUrl
from fleetlm.vision.config import RAPIDOCR, VisionConfig
from fleetlm.vision.describe import describe_image
from fleetlm.vision.errors import ImageTooLarge
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
    """The request with every image part replaced by stage one's text; a model that can see keeps its image
    parts (an uploaded file's becoming a data: URL, since the model cannot reach our files)."""
    config: VisionConfig = gw.config.vision
    places = _image_places(request, config)
    count = f"{len(places)} image{'s' if len(places) > 1 else ''}"
    target = gw.config.resolve(request.model)
    sees = target is not None and gw.config.models[target].vision
    started = time.perf_counter()
    replaced: dict[tuple[int, int], ContentPart] = {}
    for number, (m, p) in enumerate(places, start=1):
        part = request.messages[m].content[p]  # type: ignore[index]
        try:
            if sees:
                if part.type == "file":
                    replaced[(m, p)] = await _data_url_part(await _file_bytes(gw, part, config), config)
                continue
            text = await _stage_one(gw, config, part, number)
        except APIError as exc:
            exc.param = exc.param or f"messages.{m}.content.{p}." + (
                "file.file_id" if part.type == "file" else "image_url.url")
            raise
        replaced[(m, p)] = ContentPart(type="text", text=f"\n{text}\n")
    if sees:
        call.vision = f"none: {target} sees the images ({count})"
    else:
        elapsed_ms = (time.perf_counter() - started) * 1000
        call.vision = f"{_stage_one_name(config)} ({count}, {elapsed_ms:.0f} ms)"
    if not replaced:
        return request
    return request.model_copy(update={"messages": _with_parts(request.messages, replaced)})


def _image_places(request: ChatCompletionRequest, config: VisionConfig) -> list[tuple[int, int]]:
    """(message, part) of each image or file part, in order; too many of them is a 400."""
    places = [(m, p) for m, message in enumerate(request.messages)
              for p, part in enumerate(message.content if isinstance(message.content, list) else [])
              if part.type in IMAGE_PART_TYPES]
    if len(places) > config.max_images:
        raise BadRequest(f"the request carries {len(places)} images; the limit is {config.max_images} "
                         "(vision.max_images)", param="messages", code="too_many_images")
    return places


async def _stage_one(gw: Any, config: VisionConfig, part: ContentPart, number: int) -> str:
    if part.type == "file":
        data = await _file_bytes(gw, part, config)
        if config.stage_one == RAPIDOCR:
            return await run_in_threadpool(_describe, data, config, number)
        return await _ask_vision_model(gw, config.stage_one, await _data_url_part(data, config), number)
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


async def _file_bytes(gw: Any, part: ContentPart, config: VisionConfig) -> bytes:
    """The bytes of a `{"type": "file", "file": {"file_id": ...}}` part's upload (POST /v1/files)."""
    file_id = (part.file or {}).get("file_id")
    if not isinstance(file_id, str) or not file_id:
        raise BadRequest("a file part needs file.file_id, the id of an upload (POST /v1/files); inline "
                         "images go in image_url parts as data: URLs", code="invalid_file_part")
    kb = await run_in_threadpool(knowledge_base, gw)
    row = await run_in_threadpool(kb.store.get_file, file_id)
    if row is None:
        raise BadRequest(f"no file with id {file_id!r}", code="file_not_found")
    if row["bytes"] > config.max_image_bytes:
        raise ImageTooLarge(f"the file is {row['bytes']} bytes; the image limit is {config.max_image_bytes}")
    return await run_in_threadpool(kb.store.blob_path(row["sha256"]).read_bytes)


async def _data_url_part(data: bytes, config: VisionConfig) -> ContentPart:
    """An image_url part holding the bytes as a data: URL, after checking they are an image we accept."""
    media_type = await run_in_threadpool(_media_type, data, config)
    url = f"data:{media_type};base64," + base64.b64encode(data).decode("ascii")
    return ContentPart(type="image_url", image_url=ImageUrl(url=url))


def _media_type(data: bytes, config: VisionConfig) -> str:
    decode_image(data, config)  # the limits and the format allow-list, as for any image
    return Image.MIME.get(Image.open(io.BytesIO(data)).format or "", "application/octet-stream")


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


def _with_parts(messages: list[ChatMessage],
                replaced: dict[tuple[int, int], ContentPart]) -> list[ChatMessage]:
    """The messages with the parts at the given places swapped for their replacements."""
    out = []
    for m, message in enumerate(messages):
        if not isinstance(message.content, list) or not any(place[0] == m for place in replaced):
            out.append(message)
            continue
        parts = [replaced.get((m, p), part) for p, part in enumerate(message.content)]
        out.append(message.model_copy(update={"content": parts}))
    return out
