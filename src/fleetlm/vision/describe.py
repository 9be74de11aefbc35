"""The structured description of an image that stage two (a language model that cannot see) reads in its
place: image facts, then the OCR text in reading order with tables kept as rows, marked as read by OCR."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from PIL import Image

from fleetlm.vision import ocr
from fleetlm.vision.ocr import Block, OcrLine


@dataclass
class ImageDescription:
    """What stage one made of one image: `text` is the block the language model reads."""

    text: str
    lines: list[OcrLine]  # in reading order, with their boxes
    rows: list[str]  # table rows, cells joined by " | "
    width: int
    height: int
    colours: list[tuple[str, float]]  # dominant named colours and their shares
    text_colour: str | None
    elapsed_s: float
    stage_one: str = ocr.STAGE_ONE_NAME
    blocks: list[Block] = field(default_factory=list)


def describe_image(image: Image.Image, index: int = 1) -> ImageDescription:
    """Run stage one (RapidOCR with layout, image facts) on an image; `index` numbers it in the message."""
    started = time.perf_counter()
    blocks = ocr.layout(ocr.read_lines(image))
    colours = ocr.dominant_colours(image)
    ordered = [ln for block in blocks for row in block.rows for ln in row.lines]
    ink = ocr.text_colour(image, ordered)
    rows = [row.text() for block in blocks if block.kind == "table" for row in block.rows]
    text = render(index, image.width, image.height, colours, ink, blocks)
    return ImageDescription(text, ordered, rows, image.width, image.height, colours, ink,
                            time.perf_counter() - started, blocks=blocks)


def render(index: int, width: int, height: int, colours: list[tuple[str, float]], ink: str | None,
           blocks: list[Block]) -> str:
    """The description block: a header with the image facts, the text in reading order, an end marker."""
    facts = f"{width}x{height} pixels"
    if colours:
        facts += ", mostly " + ", ".join(f"{name} ({share:.0%})" for name, share in colours)
    if ink:
        facts += f", {ink} text"
    if not blocks:
        return f"[image {index}: OCR found no text in it; {facts}]"
    out = [f"[image {index}: text read from it by OCR, in reading order; {facts}]"]
    for block in blocks:
        if block.kind == "table":
            columns = max(len(r.cells) for r in block.rows)
            out.append(f"Table ({len(block.rows)} rows, {columns} columns, cells separated by \" | \"):")
        out.extend(row.text() for row in block.rows)
        if block.kind == "table":
            out.append("(end of table)")
    out.append(f"[end of image {index}]")
    return "\n".join(out)

