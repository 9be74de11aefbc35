"""Stage one on this machine: RapidOCR (PP-OCRv4 detection and recognition, ONNX) with layout, and basic image
facts. Lines keep their boxes; reading order is top to bottom, left to right, by clustering lines into rows
(vertical overlap), with two-column prose read column by column; rows of several cells are tables, their
cells joined by " | ". Image facts: the size and the dominant colours by name, and the colour of the text."""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field
from statistics import median

import numpy as np
from PIL import Image

STAGE_ONE_NAME = "rapidocr-ppocrv4"
CELL_SEPARATOR = " | "
# A horizontal gap wider than this many text heights separates two cells of a row (or two columns).
CELL_GAP_HEIGHTS = 1.2
COLUMN_GAP_HEIGHTS = 1.5
TABLE_GAP_HEIGHTS = 1.5  # a blank band taller than this many text heights ends a table
PROSE_WORDS_PER_LINE = 4  # columns whose lines average this many words are prose, read column by column
MIN_COLOUR_SHARE = 0.05
UPSCALE_TO, MAX_UPSCALE = 1600, 2.0  # a small image is enlarged to this longer side, at most 2x
PAD_BELOW = 300  # a strip thinner than this (pixels) is padded (see _padded)

_engine = None
_engine_lock = threading.Lock()  # one engine per process, loaded on first use
_run_lock = threading.Lock()  # RapidOCR keeps per-call settings on the instance: one image at a time


@dataclass(frozen=True)
class OcrLine:
    """One line of text the detector found: its four corner points (pixels, clockwise from top left)."""

    text: str
    box: tuple[tuple[float, float], ...]
    score: float

    @property
    def left(self) -> float:
        return min(x for x, _ in self.box)

    @property
    def right(self) -> float:
        return max(x for x, _ in self.box)

    @property
    def top(self) -> float:
        return min(y for _, y in self.box)

    @property
    def bottom(self) -> float:
        return max(y for _, y in self.box)

    @property
    def height(self) -> float:
        return max(self.bottom - self.top, 1.0)

    @property
    def middle(self) -> float:
        return (self.top + self.bottom) / 2


@dataclass
class Row:
    """Lines side by side, left to right, grouped into cells (a gap of more than CELL_GAP_HEIGHTS apart)."""

    lines: list[OcrLine]
    cells: list[str] = field(default_factory=list)
    spans: list[tuple[float, float]] = field(default_factory=list)  # each cell's left and right edge

    @property
    def is_table_row(self) -> bool:
        return len(self.cells) > 1

    def text(self) -> str:
        return CELL_SEPARATOR.join(self.cells)


@dataclass
class Block:
    """Rows in reading order: plain text, or a table (two or more consecutive rows of several cells)."""

    kind: str  # "text" | "table"
    rows: list[Row]


def engine():  # -> rapidocr_onnxruntime.RapidOCR, imported lazily (onnxruntime is slow to import)
    global _engine
    with _engine_lock:
        if _engine is None:
            from rapidocr_onnxruntime import RapidOCR

            _engine = RapidOCR()
    return _engine


def read_lines(image: Image.Image) -> list[OcrLine]:
    """Every text line RapidOCR finds, in the order it gives (roughly top to bottom), boxes in the image's
    own pixels."""
    scale = _upscale(image.width, image.height)
    if scale > 1:
        image = image.resize((round(image.width * scale), round(image.height * scale)),
                             Image.Resampling.LANCZOS)
    image = _padded(image.convert("RGB"))
    ocr = engine()
    with _run_lock:
        found, _ = ocr(image)
    lines = []
    for box, text, score in found or []:
        if text.strip():
            corners = tuple((float(x) / scale, float(y) / scale) for x, y in box)
            lines.append(OcrLine(text.strip(), corners, float(score)))
    return lines


def _padded(image: Image.Image) -> Image.Image:
    """A thin strip padded (right, bottom, in its corner's colour) to at most 2:1: the detector enlarges an
    image until its short side is 736 px, which makes a 600x120 strip 3680x736 and splits its words."""
    width, height = image.size
    if min(width, height) >= PAD_BELOW or min(width, height) * 2 >= max(width, height):
        return image
    canvas = Image.new("RGB", (max(width, height // 2), max(height, width // 2)), image.getpixel((0, 0)))
    canvas.paste(image, (0, 0))
    return canvas


def _upscale(width: int, height: int) -> float:
    """How much to enlarge a small image first: PP-OCRv4's recogniser drops the spaces between words of
    small text (measured: 18-24 px text at 1x read "Receiptno.1042", at 2x "Receipt no. 1042")."""
    return min(max(UPSCALE_TO / max(width, height, 1), 1.0), MAX_UPSCALE)


# ---------------------------------------------------------------- layout


def layout(lines: list[OcrLine]) -> list[Block]:
    """The lines as blocks in reading order."""
    rows = _reading_order(lines, depth=0)
    return _blocks(rows)


def _reading_order(lines: list[OcrLine], depth: int) -> list[Row]:
    if not lines:
        return []
    split = _column_split(lines) if depth < 2 else None
    if split is None:
        return _rows(lines)
    above, left, right, below = split
    return (_rows(above) + _reading_order(left, depth + 1) + _reading_order(right, depth + 1)
            + _reading_order(below, depth + 1))


def _rows(lines: list[OcrLine]) -> list[Row]:
    """Lines clustered into rows: a line joins the row above when their vertical middles are closer than
    half the smaller height (a slight skew or a taller font stays in its row)."""
    rows: list[list[OcrLine]] = []
    for line in sorted(lines, key=lambda ln: (ln.middle, ln.left)):
        if rows:
            last = rows[-1]
            middle = median(ln.middle for ln in last)
            height = median(ln.height for ln in last)
            if abs(line.middle - middle) < 0.5 * min(height, line.height):
                last.append(line)
                continue
        rows.append([line])
    return [_row(sorted(r, key=lambda ln: ln.left)) for r in rows]


def _row(lines: list[OcrLine]) -> Row:
    height = median(ln.height for ln in lines)
    cells: list[str] = [lines[0].text]
    spans = [(lines[0].left, lines[0].right)]
    for before, line in itertools.pairwise(lines):
        if line.left - before.right > CELL_GAP_HEIGHTS * height:
            cells.append(line.text)
            spans.append((line.left, line.right))
        else:  # one phrase the detector cut in two
            cells[-1] += " " + line.text
            spans[-1] = (spans[-1][0], line.right)
    return Row(lines, cells, spans)


def _column_split(lines: list[OcrLine]) -> tuple[list, list, list, list] | None:
    """Two columns of prose side by side: (lines above, left column, right column, lines below), or None.
    Lines wider than half the text (titles, footers) do not hide the gutter between the columns."""
    left_edge, right_edge = min(ln.left for ln in lines), max(ln.right for ln in lines)
    narrow = [ln for ln in lines if ln.right - ln.left < 0.5 * (right_edge - left_edge)]
    if len(narrow) < 6:
        return None
    height = median(ln.height for ln in narrow)
    gutter = _widest_gap(narrow, COLUMN_GAP_HEIGHTS * height)
    if gutter is None:
        return None
    left = [ln for ln in narrow if ln.right <= gutter]
    right = [ln for ln in narrow if ln.left >= gutter]
    if len(left) < 3 or len(right) < 3 or not (_prose(left) and _prose(right)):
        return None
    top = min(ln.top for ln in left + right)
    rest = [ln for ln in lines if ln not in left and ln not in right]
    above = [ln for ln in rest if ln.middle < top]
    below = [ln for ln in rest if ln.middle >= top]
    return above, left, right, below


def _widest_gap(lines: list[OcrLine], at_least: float) -> float | None:
    """The middle of the widest horizontal stretch no line covers, between the leftmost and rightmost."""
    spans = sorted((ln.left, ln.right) for ln in lines)
    best, reach = None, spans[0][1]
    for start, end in spans[1:]:
        if start - reach >= at_least and (best is None or start - reach > best[1] - best[0]):
            best = (reach, start)
        reach = max(reach, end)
    return None if best is None else (best[0] + best[1]) / 2


def _prose(lines: list[OcrLine]) -> bool:
    return sum(len(ln.text.split()) for ln in lines) / len(lines) >= PROSE_WORDS_PER_LINE


def _blocks(rows: list[Row]) -> list[Block]:
    blocks: list[Block] = []
    for row in rows:
        kind = "table" if row.is_table_row else "text"
        apart = kind == "table" and bool(blocks) and _far_below(blocks[-1].rows[-1], row)
        if blocks and blocks[-1].kind == kind and not apart:
            blocks[-1].rows.append(row)
        else:
            blocks.append(Block(kind, [row]))
    for block in blocks:  # one row of cells alone is a label and its value, not a table
        if block.kind == "table" and len(block.rows) < 2:
            block.kind = "text"
        elif block.kind == "table":
            _align_columns(block.rows)
    merged: list[Block] = []
    for block in blocks:
        if merged and merged[-1].kind == block.kind == "text":
            merged[-1].rows.extend(block.rows)
        else:
            merged.append(block)
    return merged


def _far_below(above: Row, row: Row) -> bool:
    """A blank band between two rows of cells, taller than TABLE_GAP_HEIGHTS lines, ends a table."""
    height = median(ln.height for ln in row.lines)
    return min(ln.top for ln in row.lines) - max(ln.bottom for ln in above.lines) > TABLE_GAP_HEIGHTS * height


def _align_columns(rows: list[Row]) -> None:
    """Rows with fewer cells than the table's widest row get empty cells where their columns are missing
    ("Total | | 9.25" under "Item | Qty | Price"): each cell goes to the column it overlaps most."""
    widest = max(rows, key=lambda r: len(r.cells))
    columns = [list(span) for span in widest.spans]
    for row in rows:  # a column spans every cell of the full rows
        if len(row.cells) == len(columns):
            for column, (left, right) in zip(columns, row.spans, strict=True):
                column[0], column[1] = min(column[0], left), max(column[1], right)
    for row in rows:
        if len(row.cells) == len(columns):
            continue
        slots: list[str | None] = [None] * len(columns)
        for cell, span in zip(row.cells, row.spans, strict=True):
            best = max(range(len(columns)), key=lambda c: (_overlap(span, columns[c]),
                                                          -abs(sum(span) - sum(columns[c]))))
            slots[best] = cell if slots[best] is None else f"{slots[best]} {cell}"
        row.cells = [cell or "" for cell in slots]


def _overlap(a: tuple[float, float] | list[float], b: tuple[float, float] | list[float]) -> float:
    return max(0.0, min(a[1], b[1]) - max(a[0], b[0]))


# ---------------------------------------------------------------- image facts

# Named colours (sRGB) that an image's pixels are matched to, nearest first; names a language model knows.
PALETTE: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255), "light grey": (200, 200, 200), "grey": (128, 128, 128),
    "dark grey": (64, 64, 64), "black": (0, 0, 0), "red": (210, 30, 30), "dark red": (130, 10, 10),
    "orange": (245, 140, 20), "yellow": (245, 220, 30), "beige": (235, 222, 185), "brown": (130, 80, 30),
    "green": (40, 160, 60), "dark green": (10, 90, 30), "light green": (150, 225, 150),
    "teal": (0, 128, 128), "blue": (30, 90, 220), "navy": (15, 25, 110), "light blue": (160, 200, 245),
    "purple": (120, 40, 160), "pink": (245, 160, 200),
}
_NAMES = list(PALETTE)
_RGB = np.array(list(PALETTE.values()), dtype=np.float32)


def colour_names(pixels: np.ndarray) -> np.ndarray:
    """Index into PALETTE of the nearest named colour of each RGB pixel (an (n, 3) array)."""
    distances = ((pixels[:, None, :].astype(np.float32) - _RGB[None, :, :]) ** 2).sum(axis=2)
    return distances.argmin(axis=1)


def dominant_colours(image: Image.Image, limit: int = 3) -> list[tuple[str, float]]:
    """The named colours covering the most of the image, with their shares (each at least 5%)."""
    thumb = image.convert("RGB").resize((64, 64), Image.Resampling.BILINEAR)
    return _shares(np.asarray(thumb).reshape(-1, 3), limit)


def text_colour(image: Image.Image, lines: list[OcrLine]) -> str | None:
    """The colour of the text: within the lines' boxes, the commonest named colour after the background."""
    if not lines:
        return None
    rgb = np.asarray(image.convert("RGB"))
    samples = []
    for ln in lines[:50]:
        top, bottom = max(int(ln.top), 0), min(int(ln.bottom) + 1, rgb.shape[0])
        left, right = max(int(ln.left), 0), min(int(ln.right) + 1, rgb.shape[1])
        patch = rgb[top:bottom, left:right].reshape(-1, 3)
        if len(patch):
            samples.append(patch[:: max(len(patch) // 400, 1)])
    if not samples:
        return None
    shares = _shares(np.concatenate(samples), limit=2, floor=0.02)
    return shares[1][0] if len(shares) > 1 else None


def _shares(pixels: np.ndarray, limit: int, floor: float = MIN_COLOUR_SHARE) -> list[tuple[str, float]]:
    counts = np.bincount(colour_names(pixels), minlength=len(_NAMES)) / len(pixels)
    order = np.argsort(-counts)[:limit]
    return [(_NAMES[i], float(counts[i])) for i in order if counts[i] >= floor]
