"""The description stage two reads: image facts, OCR text in reading order, tables as rows, clear markers."""

import pytest
from PIL import Image, ImageDraw, ImageFont

from fleetlm.vision.describe import describe_image, render
from fleetlm.vision.ocr import Block, Row

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"


@pytest.fixture(scope="module")
def receipt():
    img = Image.new("RGB", (440, 300), "white")
    draw = ImageDraw.Draw(img)
    draw.text((20, 15), "GREEN LEAF MARKET", fill="black", font=ImageFont.truetype(FONT, 24))
    font = ImageFont.truetype(FONT, 18)
    draw.text((20, 55), "Receipt no. 5521", fill="black", font=font)
    for i, row in enumerate([("Item", "Qty", "Price"), ("Apples", "3", "4.50"), ("Bread", "1", "2.80"),
                             ("Total", "", "7.30")]):
        for j, cell in enumerate(row):
            draw.text((20 + j * 150, 100 + i * 34), cell, fill="black", font=font)
    draw.text((20, 260), "Thank you for shopping", fill="black", font=font)
    return describe_image(img, index=2)


def test_the_description_holds_the_text_in_reading_order_and_the_table(receipt):
    text = receipt.text
    header = "[image 2: text read from it by OCR, in reading order; 440x300 pixels, mostly white"
    assert text.startswith(header)
    assert "black text]" in text.splitlines()[0] and text.endswith("[end of image 2]")
    order = ["GREEN LEAF MARKET", "Receipt no. 5521", "Item | Qty | Price", "Apples | 3 | 4.50",
             "Bread | 1 | 2.80", "Total |  | 7.30", "Thank you for shopping"]
    positions = [text.index(s) for s in order]
    assert positions == sorted(positions)
    assert 'Table (4 rows, 3 columns, cells separated by " | "):' in text
    assert receipt.rows == order[2:6]


def test_the_description_keeps_boxes_facts_and_timing(receipt):
    assert (receipt.width, receipt.height) == (440, 300) and receipt.colours[0][0] == "white"
    assert receipt.text_colour == "black" and receipt.stage_one == "rapidocr-ppocrv4"
    assert [ln.text for ln in receipt.lines][:2] == ["GREEN LEAF MARKET", "Receipt no. 5521"]
    title = receipt.lines[0]
    assert len(title.box) == 4 and title.left < 30 and title.top < 25
    assert 0 < receipt.elapsed_s < 60


def test_render_without_text_says_so():
    assert render(1, 64, 32, [("red", 0.9)], None, []) == (
        "[image 1: OCR found no text in it; 64x32 pixels, mostly red (90%)]")
    block = Block("text", [Row([], ["Hello"])])
    assert render(3, 10, 10, [], None, [block]).splitlines() == [
        "[image 3: text read from it by OCR, in reading order; 10x10 pixels]", "Hello", "[end of image 3]"]
