"""OCR with layout: rows by vertical overlap, cells, tables, two-column prose, colours; one RapidOCR run."""

from PIL import Image, ImageDraw, ImageFont

from fleetlm.vision import ocr
from fleetlm.vision.ocr import OcrLine, layout

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"


def line(text, left, top, width=None, height=20, skew=0.0):
    width = width if width is not None else 10 * len(text)
    return OcrLine(text, ((left, top), (left + width, top + skew), (left + width, top + height + skew),
                          (left, top + height)), 0.99)


def texts(blocks):
    return [(b.kind, [r.text() for r in b.rows]) for b in blocks]


def test_rows_cells_and_tables_in_reading_order():
    lines = [  # given out of order, as a detector may
        line("7.00", 300, 131), line("Coffee", 20, 130), line("2", 200, 129, skew=3),
        line("CORNER CAFE", 20, 10), line("Receipt", 20, 40), line("no. 1042", 95, 41),
        line("Date", 20, 70), line("2026-01-02", 300, 70),
        line("Bagel", 20, 160), line("2.25", 300, 161), line("1", 200, 160),
        line("Total", 20, 190), line("9.25", 300, 190),
        line("Thank you", 20, 240),
    ]
    assert texts(layout(lines)) == [
        # a narrow gap joins one phrase; a lone row of cells is a label and its value, not a table
        ("text", ["CORNER CAFE", "Receipt no. 1042", "Date | 2026-01-02"]),
        # a row short of cells keeps its values under their columns
        ("table", ["Coffee | 2 | 7.00", "Bagel | 1 | 2.25", "Total |  | 9.25"]),
        ("text", ["Thank you"]),
    ]


def test_two_columns_of_prose_are_read_column_by_column():
    left = ["the first column starts here", "and it goes on for a", "few lines of running text", "to its end"]
    right = ["the second column is read", "only after the whole first", "one, from its top down", "to here"]
    lines = [line("A TWO COLUMN PAGE WITH A LONG TITLE", 20, 10, width=560)]
    lines += [line(t, 20, 50 + 30 * i, width=250) for i, t in enumerate(left)]
    lines += [line(t, 330, 50 + 30 * i, width=250) for i, t in enumerate(right)]
    lines.append(line("a footer line that spans both columns", 20, 200, width=560))
    (block,) = layout(lines)
    assert [r.text() for r in block.rows] == [
        "A TWO COLUMN PAGE WITH A LONG TITLE", *left, *right, "a footer line that spans both columns"]


def test_a_table_of_short_cells_is_not_split_into_columns():
    lines = []
    for i, (name, price) in enumerate([("Item", "Price"), ("Tea", "1.50"), ("Cake", "3.00"), ("Jam", "2.00"),
                                       ("Milk", "0.90"), ("Eggs", "2.40")]):
        lines += [line(name, 20, 20 + 30 * i), line(price, 300, 20 + 30 * i)]
    (block,) = layout(lines)
    assert block.kind == "table" and block.rows[0].text() == "Item | Price" and len(block.rows) == 6


def test_dominant_and_text_colours_by_name():
    img = Image.new("RGB", (200, 100), "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 0, 59, 99), fill=(200, 20, 30))
    draw.text((80, 30), "blue ink", fill=(20, 40, 200), font=ImageFont.truetype(FONT, 30))
    colours = ocr.dominant_colours(img)
    assert [name for name, _ in colours][:2] == ["white", "red"]
    assert abs(dict(colours)["red"] - 0.3) < 0.05
    box = line("blue ink", 78, 30, width=120, height=36)
    assert ocr.text_colour(img, [box]) == "blue"
    assert ocr.text_colour(img, []) is None


def test_rapidocr_reads_lines_with_boxes_in_the_images_own_pixels():
    img = Image.new("RGB", (400, 160), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.truetype(FONT, 22)
    draw.text((30, 20), "Invoice number 4471", fill="black", font=font)
    draw.text((30, 90), "Due date", fill="black", font=font)
    draw.text((260, 90), "2026-03-15", fill="black", font=font)
    lines = ocr.read_lines(img)
    assert ocr.engine() is ocr.engine()  # one engine per process
    found = {ln.text: ln for ln in lines}
    assert set(found) == {"Invoice number 4471", "Due date", "2026-03-15"}
    inv = found["Invoice number 4471"]
    assert abs(inv.left - 30) < 8 and abs(inv.top - 22) < 10 and inv.right < 330  # not in upscaled pixels
    assert all(0.5 < ln.score <= 1 for ln in lines)
    assert texts(layout(lines)) == [("text", ["Invoice number 4471", "Due date | 2026-03-15"])]
