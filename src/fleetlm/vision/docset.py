"""The visual-QA document set: seeded receipts, invoices, tables, forms, screenshots; questions; a scorer.

A document is data first: rows of cells (a receipt's item and price, a table's cells, a form's label and
value), from which come its ground-truth text (rows in reading order, cells joined by one space, one row a
line) and its questions, each with an exact answer and the rows that answer it (`evidence`). Only then is it
rendered with Pillow, in a seeded style: a font among those installed (DejaVu and Liberation on Debian;
Pillow's own scalable font where none is), a size, a small rotation, blur, Gaussian noise and JPEG artefacts.
The same seed gives the same documents, questions and pixels.

Questions come in three skills: `lookup` (the answer is printed: "What is the total?"), `compare` (the row
with the largest value: the answer is printed, finding it needs a comparison) and `count` ("How many items
cost more than $5?": the answer is the number of evidence rows, not necessarily printed).

The scorer (`normalize_answer`, `exact_match`) compares after normalising: case, surrounding whitespace and
punctuation, runs of whitespace, currency signs ($ € £) and thousands separators (a comma between digits)
are ignored, and two numbers are equal when their decimal values are ("41.2" == "$41.20"); only a reply's
first line counts. `contains_match` is the lenient reading: the normalised answer appears in the normalised
reply as whole words.
"""

from __future__ import annotations

import io
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

KINDS = ("receipt", "invoice", "table", "form", "screenshot")
SKILLS = ("lookup", "compare", "count")
QUESTIONS_PER_DOCUMENT = 4

FONT_DIRS = (Path("/usr/share/fonts/truetype/dejavu"), Path("/usr/share/fonts/truetype/liberation"))
# (family, regular file, bold file, monospaced)
FONT_FILES = (
    ("DejaVu Sans", "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", False),
    ("DejaVu Sans Condensed", "DejaVuSansCondensed.ttf", "DejaVuSansCondensed-Bold.ttf", False),
    ("DejaVu Serif", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", False),
    ("DejaVu Sans Mono", "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", True),
    ("Liberation Sans", "LiberationSans-Regular.ttf", "LiberationSans-Bold.ttf", False),
    ("Liberation Serif", "LiberationSerif-Regular.ttf", "LiberationSerif-Bold.ttf", False),
    ("Liberation Sans Narrow", "LiberationSansNarrow-Regular.ttf", "LiberationSansNarrow-Bold.ttf", False),
    ("Liberation Mono", "LiberationMono-Regular.ttf", "LiberationMono-Bold.ttf", True),
)
DEFAULT_FONT = "Pillow default"


# --- the data --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    """One printed line: its cells and how they are laid out.

    layout: `left` (cells one after another), `center`, `spread` (first cell left, last cell right: a
    receipt's item and price), `grid` (a table row: the document's grid rows share column positions),
    `rule` (a drawn line, no text), `title` (a screenshot's title bar).
    """

    cells: tuple[str, ...]
    layout: str = "left"
    bold: bool = False

    @property
    def text(self) -> str:
        return " ".join(c for c in self.cells if c)


@dataclass(frozen=True)
class Question:
    """A question on one document with its exact answer and the ground-truth rows that answer it."""

    id: str
    document: str
    kind: str
    skill: str
    question: str
    answer: str
    evidence: tuple[str, ...]


@dataclass(frozen=True)
class Style:
    """How a document is drawn: every choice seeded."""

    font: str
    font_size: int
    rotation_deg: float
    blur_radius: float
    noise_sigma: float
    jpeg_quality: int
    dark: bool = False  # light text on a dark background (a terminal)
    noise_seed: int = 0


@dataclass
class Document:
    """A generated document: its rows (the data), its questions, and the style it renders in."""

    id: str
    kind: str
    rows: list[Row]
    questions: list[Question]
    style: Style
    _image: Image.Image | None = field(default=None, repr=False, compare=False)

    @property
    def text(self) -> str:
        """The ground truth: the rows with text, in reading order, one a line."""
        return "\n".join(r.text for r in self.rows if r.layout != "rule" and r.text)

    def render(self) -> Image.Image:
        """The document as an RGB image (made once, then reused)."""
        if self._image is None:
            self._image = render(self.rows, self.style)
        return self._image.copy()


# --- vocabularies ----------------------------------------------------------------------------------------

STORES = ("Green Leaf Market", "Corner Bakery", "Blue Harbor Cafe", "Northside Hardware", "Sunrise Grocery",
          "Maple Street Deli", "Pixel Electronics", "Riverside Books", "Oak Hill Pharmacy",
          "City Garden Shop")
STREETS = ("Main St", "Oak Ave", "Elm Rd", "Lake Dr", "Hill St", "Park Ln", "River Rd", "Pine Ct")
TOWNS = ("Springfield", "Riverton", "Lakewood", "Fairview", "Ashford", "Brookside", "Kingsport", "Millbrook")
GOODS = ("Whole Milk", "Sourdough Bread", "Free Range Eggs", "Cheddar Cheese", "Green Apples", "Bananas",
         "Ground Coffee", "Olive Oil", "Pasta", "Tomato Sauce", "Orange Juice", "Greek Yogurt", "Rice 2kg",
         "Paper Towels", "Dish Soap", "AA Batteries", "Light Bulb", "Notebook", "Ballpoint Pens", "Tea Bags",
         "Chocolate Bar", "Peanut Butter", "Butter", "Honey", "Sparkling Water", "Oat Flakes",
         "Salmon Fillet")
COMPANIES = ("Northwind Traders", "Acme Supplies Ltd", "Bright Path Consulting", "Redwood Logistics",
             "Summit Software Inc", "Harbor Print Co", "Atlas Engineering", "Cobalt Design Studio")
CUSTOMERS = ("Jane Cooper", "Marcus Webb", "Priya Natarajan", "Tom Kowalski", "Elena Rossi", "David Okafor",
             "Sofia Lindqvist", "Kenji Watanabe", "Laura Schmidt", "Omar Haddad", "Grace Miller",
             "Ivan Petrov")
SERVICES = ("Website hosting", "Design review", "Consulting hours", "Software license", "Support plan",
            "Data migration", "Training session", "Printed brochures", "Delivery fee", "Server setup",
            "Logo design", "Security audit", "Cloud storage", "Maintenance visit")
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
APPS = ("PhotoVault", "MailDesk", "NoteStream", "SyncBox", "TaskPilot", "CloudDrive", "ChatWave", "CodeNest")
COMMANDS = ("nginx", "postgres", "python3", "sshd", "redis-server", "node", "cron", "dockerd", "java",
            "systemd", "bash", "vim", "htop", "gunicorn")
USERS = ("root", "www-data", "alice", "bob", "postgres")

# (title, what a row is, row names, columns: (name, low, high, decimals, suffix-free format))
TABLE_THEMES = (
    ("Regional sales (units)", "region",
     ("North", "South", "East", "West", "Central", "Coastal", "Mountain", "Lakes", "Valley", "Delta"),
     (("Q1", 100, 9999, 0), ("Q2", 100, 9999, 0), ("Q3", 100, 9999, 0), ("Q4", 100, 9999, 0))),
    ("Server metrics", "host",
     ("web-01", "web-02", "db-01", "cache-01", "api-01", "api-02", "queue-01", "auth-01"),
     (("CPU %", 1, 99, 1), ("Memory GB", 1, 64, 1), ("Requests", 1000, 99999, 0))),
    ("Product inventory", "product",
     ("Desk Lamp", "Office Chair", "Monitor Arm", "USB Hub", "Keyboard", "Webcam", "Headset", "Mouse Pad",
      "Cable Kit", "Laptop Stand"),
     (("Stock", 0, 500, 0), ("Price", 5, 400, 2), ("Sold", 0, 900, 0))),
    ("Weekly hours", "employee",
     ("Adams", "Baker", "Chen", "Diaz", "Evans", "Fischer", "Garcia", "Hughes", "Ito", "Jones"),
     (("Mon", 0, 12, 0), ("Tue", 0, 12, 0), ("Wed", 0, 12, 0), ("Thu", 0, 12, 0), ("Fri", 0, 12, 0))),
    ("City statistics", "city",
     ("Oslo", "Lyon", "Porto", "Turin", "Ghent", "Basel", "Graz", "Malmo", "Cork", "Bergen"),
     (("Population", 50000, 900000, 0), ("Area km2", 20, 500, 1), ("Parks", 3, 120, 0))),
)

FORM_TITLES = ("Membership Application", "Patient Registration", "Shipping Details", "Account Update",
               "Rental Agreement", "Course Enrollment")


def _money(x: float, thousands: bool = True) -> str:
    return f"{x:,.2f}" if thousands else f"{x:.2f}"


def _date(rng: random.Random) -> str:
    y, m, d = rng.randint(2021, 2026), rng.randint(1, 12), rng.randint(1, 28)
    return rng.choice((f"{y}-{m:02d}-{d:02d}", f"{d:02d}/{m:02d}/{y}", f"{MONTHS[m - 1]} {d}, {y}"))


def _number(x: float, decimals: int) -> str:
    return f"{x:,.{decimals}f}"


def _pick_questions(rng: random.Random, doc_id: str, kind: str,
                    candidates: list[tuple[str, str, str, tuple[str, ...]]]) -> list[Question]:
    """QUESTIONS_PER_DOCUMENT of the candidates (skill, question, answer, evidence), one per question text."""
    seen: dict[str, tuple[str, str, str, tuple[str, ...]]] = {}
    for c in candidates:
        seen.setdefault(c[1], c)
    chosen = rng.sample(list(seen.values()), min(QUESTIONS_PER_DOCUMENT, len(seen)))
    return [Question(f"{doc_id}.q{i}", doc_id, kind, skill, q, a, ev)
            for i, (skill, q, a, ev) in enumerate(chosen)]


# --- the five kinds ---------------------------------------------------------------------------------------

def _receipt(rng: random.Random, doc_id: str) -> tuple[list[Row], list[Question]]:
    store = rng.choice(STORES)
    goods = rng.sample(GOODS, rng.randint(4, 8))
    prices = _distinct_prices(rng, len(goods), 0.5, 24.0)
    subtotal = round(sum(prices), 2)
    rate = rng.choice((5, 7, 8, 10))
    tax = round(subtotal * rate / 100, 2)
    total = round(subtotal + tax, 2)
    date = _date(rng)
    item_rows = [Row((g, _money(p)), "spread") for g, p in zip(goods, prices, strict=True)]
    rows = [Row((store,), "center", bold=True),
            Row((f"{rng.randint(1, 999)} {rng.choice(STREETS)}, {rng.choice(TOWNS)}",), "center"),
            Row((f"Date: {date}", f"{rng.randint(7, 21):02d}:{rng.randint(0, 59):02d}"), "spread"),
            Row(("",), "rule"), *item_rows, Row(("",), "rule"),
            Row(("Subtotal", _money(subtotal)), "spread"),
            Row((f"Tax {rate}%", _money(tax)), "spread"),
            Row(("TOTAL", f"${_money(total)}"), "spread", bold=True),
            Row(("Thank you for shopping!",), "center")]
    threshold = rng.choice((3, 5, 8, 10))
    over = tuple(r.text for r, p in zip(item_rows, prices, strict=True) if p > threshold)
    top = max(range(len(goods)), key=lambda i: prices[i])
    k = rng.randrange(len(goods))
    candidates = [
        ("lookup", "What is the total?", _money(total), (rows[-2].text,)),
        ("lookup", "What is the tax amount?", _money(tax), (rows[-3].text,)),
        ("lookup", "What is the subtotal?", _money(subtotal), (rows[-4].text,)),
        ("lookup", "What is the date on the receipt?", date, (rows[2].text,)),
        ("lookup", "What is the name of the store?", store, (store,)),
        ("lookup", f"How much does {goods[k]} cost?", _money(prices[k]), (item_rows[k].text,)),
        ("count", f"How many items cost more than ${threshold}?", str(len(over)), over),
        ("compare", "Which item is the most expensive?", goods[top], (item_rows[top].text,)),
    ]
    return rows, _pick_questions(rng, doc_id, "receipt", candidates)


def _distinct_prices(rng: random.Random, n: int, low: float, high: float) -> list[float]:
    """n prices with no two equal (a 'most expensive' question then has one answer)."""
    prices: set[float] = set()
    while len(prices) < n:
        prices.add(round(rng.uniform(low, high), 2))
    out = list(prices)
    rng.shuffle(out)
    return out


def _invoice(rng: random.Random, doc_id: str) -> tuple[list[Row], list[Question]]:
    company, customer = rng.choice(COMPANIES), rng.choice(CUSTOMERS)
    number = f"{rng.choice(('INV', 'IN', 'BILL'))}-{rng.randint(1000, 99999)}"
    issued, due = _date(rng), _date(rng)
    services = rng.sample(SERVICES, rng.randint(3, 6))
    qtys = [rng.randint(1, 12) for _ in services]
    units = _distinct_prices(rng, len(services), 15.0, 480.0)
    amounts = [round(q * u, 2) for q, u in zip(qtys, units, strict=True)]
    while len(set(amounts)) < len(amounts):  # a 'largest amount' question needs one answer
        units = _distinct_prices(rng, len(services), 15.0, 480.0)
        amounts = [round(q * u, 2) for q, u in zip(qtys, units, strict=True)]
    total = round(sum(amounts), 2)
    lines = [Row((s, str(q), _money(u), _money(a)), "grid")
             for s, q, u, a in zip(services, qtys, units, amounts, strict=True)]
    rows = [Row((company, "INVOICE"), "spread", bold=True),
            Row((f"Invoice No: {number}",), "left"),
            Row((f"Issued: {issued}", f"Due: {due}"), "spread"),
            Row((f"Bill to: {customer}",), "left"),
            Row(("",), "rule"),
            Row(("Description", "Qty", "Unit price", "Amount"), "grid", bold=True), *lines,
            Row(("",), "rule"),
            Row(("Total due", f"${_money(total)}"), "spread", bold=True)]
    top = max(range(len(services)), key=lambda i: amounts[i])
    k = rng.randrange(len(services))
    threshold = rng.choice((100, 250, 500, 1000))
    over = tuple(r.text for r, a in zip(lines, amounts, strict=True) if a > threshold)
    candidates = [
        ("lookup", "What is the invoice number?", number, (rows[1].text,)),
        ("lookup", "Who is the invoice billed to?", customer, (rows[3].text,)),
        ("lookup", "What is the due date?", due, (rows[2].text,)),
        ("lookup", "What is the total due?", _money(total), (rows[-1].text,)),
        ("lookup", f"What is the amount for {services[k]}?", _money(amounts[k]), (lines[k].text,)),
        ("lookup", f"What is the quantity of {services[k]}?", str(qtys[k]), (lines[k].text,)),
        ("count", "How many line items are there?", str(len(lines)), tuple(r.text for r in lines)),
        ("count", f"How many line items have an amount over ${threshold}?", str(len(over)), over),
        ("compare", "Which line item has the largest amount?", services[top], (lines[top].text,)),
    ]
    return rows, _pick_questions(rng, doc_id, "invoice", candidates)


def _table(rng: random.Random, doc_id: str) -> tuple[list[Row], list[Question]]:
    title, noun, names, columns = rng.choice(TABLE_THEMES)
    names = rng.sample(names, rng.randint(4, 7))
    values: dict[str, list[float]] = {}
    for col, low, high, decimals in columns:
        seen: set[float] = set()
        while len(seen) < len(names):  # distinct per column: 'largest' and 'smallest' have one answer
            seen.add(round(rng.uniform(low, high), decimals))
        values[col] = list(seen)
        rng.shuffle(values[col])
    decimals_of = {col: d for col, _, _, d in columns}
    body = [Row((n, *(_number(values[c][i], decimals_of[c]) for c, *_ in columns)), "grid")
            for i, n in enumerate(names)]
    rows = [Row((title,), "left", bold=True),
            Row((noun.capitalize(), *(c for c, *_ in columns)), "grid", bold=True), *body]
    col = rng.choice(columns)[0]
    i = rng.randrange(len(names))
    vals = values[col]
    top, low = max(range(len(names)), key=vals.__getitem__), min(range(len(names)), key=vals.__getitem__)
    threshold = sorted(vals)[rng.randrange(len(vals) - 1)]  # not the largest: the count is not always 0
    above = tuple(r.text for r, v in zip(body, vals, strict=True) if v > threshold)
    candidates = [
        ("lookup", f"What is the {col} value for {names[i]}?", _number(vals[i], decimals_of[col]),
         (body[i].text,)),
        ("lookup", "What is the title of the table?", title, (title,)),
        ("compare", f"Which {noun} has the largest {col}?", names[top], (body[top].text,)),
        ("compare", f"Which {noun} has the smallest {col}?", names[low], (body[low].text,)),
        ("count", f"How many rows have {col} greater than {_number(threshold, decimals_of[col])}?",
         str(len(above)), above),
        ("count", f"How many {noun} rows are in the table?", str(len(body)), tuple(r.text for r in body)),
    ]
    return rows, _pick_questions(rng, doc_id, "table", candidates)


def _form(rng: random.Random, doc_id: str) -> tuple[list[Row], list[Question]]:
    name = rng.choice(CUSTOMERS)
    first, last = name.split(" ", 1)
    fields = {
        "Full name": name,
        "Date of birth": _date(rng),
        "Email": f"{first.lower()}.{last.lower()}@{rng.choice(('example.com', 'mail.net', 'post.org'))}",
        "Phone": f"555-{rng.randint(100, 999)}-{rng.randint(1000, 9999)}",
        "City": rng.choice(TOWNS),
        "Postal code": str(rng.randint(10000, 99999)),
        "Member ID": f"{rng.choice('ABCDEFGHKMNPRSTX')}{rng.randint(100000, 999999)}",
        "Account number": f"{rng.randint(10, 99)}-{rng.randint(1000000, 9999999)}",
    }
    keys = rng.sample(list(fields), rng.randint(5, len(fields)))
    title = rng.choice(FORM_TITLES)
    body = [Row((f"{k}:", fields[k]), "grid") for k in keys]
    rows = [Row((title,), "center", bold=True), Row(("",), "rule"), *body,
            Row(("",), "rule"), Row((f"Signed: {name}", f"Date: {_date(rng)}"), "spread")]
    candidates = [("lookup", f"What is the {k.lower()} on the form?", fields[k], (r.text,))
                  for k, r in zip(keys, body, strict=True)]
    candidates.append(("lookup", "What is the title of the form?", title, (title,)))
    return rows, _pick_questions(rng, doc_id, "form", candidates)


def _screenshot(rng: random.Random, doc_id: str) -> tuple[list[Row], list[Question]]:
    return (_terminal if rng.random() < 0.5 else _app_window)(rng, doc_id)


def _terminal(rng: random.Random, doc_id: str) -> tuple[list[Row], list[Question]]:
    host = f"{rng.choice(USERS[2:4])}@{rng.choice(('devbox', 'prod-3', 'build-7', 'lab'))}"
    commands = rng.sample(COMMANDS, rng.randint(4, 7))
    pids = rng.sample(range(100, 39999), len(commands))
    users = [rng.choice(USERS) for _ in commands]
    cpus: set[float] = set()
    while len(cpus) < len(commands):
        cpus.add(round(rng.uniform(0.0, 95.0), 1))
    cpu = list(cpus)
    rng.shuffle(cpu)
    body = [Row((str(p), u, f"{c:.1f}", cmd), "grid")
            for p, u, c, cmd in zip(pids, users, cpu, commands, strict=True)]
    rows = [Row((f"{host}: ~",), "title"), Row((f"{host}:~$ ps -eo pid,user,%cpu,comm",), "left"),
            Row(("PID", "USER", "%CPU", "COMMAND"), "grid"), *body, Row((f"{host}:~$",), "left")]
    k = rng.randrange(len(commands))
    top = max(range(len(commands)), key=cpu.__getitem__)
    user = rng.choice(users)
    mine = tuple(r.text for r, u in zip(body, users, strict=True) if u == user)
    candidates = [
        ("lookup", f"What is the PID of {commands[k]}?", str(pids[k]), (body[k].text,)),
        ("lookup", f"Which user runs {commands[k]}?", users[k], (body[k].text,)),
        ("compare", "Which command uses the most CPU?", commands[top], (body[top].text,)),
        ("count", f"How many processes belong to the user {user}?", str(len(mine)), mine),
    ]
    return rows, _pick_questions(rng, doc_id, "screenshot", candidates)


def _app_window(rng: random.Random, doc_id: str) -> tuple[list[Row], list[Question]]:
    app = rng.choice(APPS)
    version = f"{rng.randint(1, 9)}.{rng.randint(0, 20)}.{rng.randint(0, 99)}"
    used, quota = round(rng.uniform(0.5, 45.0), 1), rng.choice((50, 100, 200))
    unread = rng.randint(2, 99)
    sync = f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}"
    account = rng.choice(CUSTOMERS)
    error = rng.choice((404, 408, 429, 500, 502, 503))
    rows = [Row((f"{app} - Settings",), "title"),
            Row(("Account", account), "grid"),
            Row(("Version", version), "grid"),
            Row(("Storage used", f"{used} GB of {quota} GB"), "grid"),
            Row(("Last sync", sync), "grid"),
            Row((f"Error {error}: sync failed, retrying",), "left"),
            Row(("[ Save ]", "[ Cancel ]"), "spread"),
            Row((f"{unread} unread messages",), "left")]
    candidates = [
        ("lookup", "What version of the app is shown?", version, (rows[2].text,)),
        ("lookup", "How many unread messages are there?", str(unread), (rows[-1].text,)),
        ("lookup", "How much storage is used, in GB?", str(used), (rows[3].text,)),
        ("lookup", "What time was the last sync?", sync, (rows[4].text,)),
        ("lookup", "What is the error code?", str(error), (rows[5].text,)),
        ("lookup", "Which application is shown?", app, (rows[0].text,)),
        ("lookup", "Whose account is signed in?", account, (rows[1].text,)),
    ]
    return rows, _pick_questions(rng, doc_id, "screenshot", candidates)


BUILDERS: dict[str, Callable[[random.Random, str], tuple[list[Row], list[Question]]]] = {
    "receipt": _receipt, "invoice": _invoice, "table": _table, "form": _form, "screenshot": _screenshot}


# --- the set ----------------------------------------------------------------------------------------------

def available_fonts() -> list[tuple[str, Path, Path, bool]]:
    """(family, regular, bold, monospaced) of the known font files present here."""
    out = []
    for family, regular, bold, mono in FONT_FILES:
        for d in FONT_DIRS:
            if (d / regular).is_file() and (d / bold).is_file():
                out.append((family, d / regular, d / bold, mono))
                break
    return out


def _style(rng: random.Random, terminal: bool) -> Style:
    fonts = available_fonts()
    if terminal:  # a terminal prints in a monospaced font where there is one
        fonts = [f for f in fonts if f[3]] or fonts
    font = rng.choice(fonts)[0] if fonts else DEFAULT_FONT
    clean = rng.random() < 0.25  # a quarter of the set is clean: the degradations' effect shows beside it
    return Style(font=font, font_size=rng.randint(14, 26),
                 rotation_deg=0.0 if clean else round(rng.uniform(-3.0, 3.0), 2),
                 blur_radius=0.0 if clean else round(rng.uniform(0.0, 1.2), 2),
                 noise_sigma=0.0 if clean else round(rng.uniform(0.0, 14.0), 1),
                 jpeg_quality=95 if clean else rng.randint(35, 90),
                 dark=terminal, noise_seed=rng.randrange(2**32))


def make_document(index: int, seed: int = 0, kind: str | None = None) -> Document:
    """Document number `index` of the set for `seed` (kinds take turns unless one is given)."""
    kind = kind or KINDS[index % len(KINDS)]
    if kind not in BUILDERS:
        raise ValueError(f"unknown document kind {kind!r}; known: {', '.join(KINDS)}")
    rng = random.Random(f"vqa-docset:{seed}:{index}")
    doc_id = f"{kind}-{seed}-{index:04d}"
    rows, questions = BUILDERS[kind](rng, doc_id)
    terminal = any(r.layout == "title" for r in rows) and rows[-1].text.endswith("$")  # a shell prompt
    return Document(doc_id, kind, rows, questions, _style(rng, terminal))


def generate_set(n_questions: int = 300, seed: int = 0) -> tuple[list[Document], list[Question]]:
    """Documents (kinds in turn) until there are n_questions questions; the last document's may be cut."""
    if n_questions < 1:
        raise ValueError("n_questions must be >= 1")
    docs: list[Document] = []
    questions: list[Question] = []
    while len(questions) < n_questions:
        doc = make_document(len(docs), seed)
        docs.append(doc)
        questions.extend(doc.questions[:n_questions - len(questions)])
    return docs, questions


# --- rendering --------------------------------------------------------------------------------------------

def _fonts(style: Style) -> tuple[ImageFont.FreeTypeFont | ImageFont.ImageFont, ...]:
    for family, regular, bold, _ in available_fonts():
        if family == style.font:
            return (ImageFont.truetype(str(regular), style.font_size),
                    ImageFont.truetype(str(bold), style.font_size))
    default = ImageFont.load_default(size=style.font_size)  # Pillow's scalable default (no fonts installed)
    return default, default


def render(rows: list[Row], style: Style) -> Image.Image:
    """Rows drawn in the style: laid out on a page, then rotated, blurred, noised and JPEG-compressed."""
    regular, bold = _fonts(style)
    size = style.font_size
    margin, gap, line_h = size, size * 2, int(size * 1.6)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def width(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> int:
        return int(probe.textlength(text, font=font)) if text else 0

    grid = [r for r in rows if r.layout == "grid"]
    n_cols = max((len(r.cells) for r in grid), default=0)
    col_w = [max((width(r.cells[i], bold if r.bold else regular) for r in grid if i < len(r.cells)),
                 default=0) for i in range(n_cols)]
    grid_w = sum(col_w) + gap * max(0, n_cols - 1)
    content_w = max([grid_w, *(width("   ".join(r.cells), bold if r.bold else regular) + gap
                              for r in rows if r.layout != "grid")])
    page_w = max(360, content_w + 2 * margin)
    title_h = line_h + size // 2 if any(r.layout == "title" for r in rows) else 0
    page_h = 2 * margin + line_h * len(rows) + title_h // 2
    paper, ink = ((30, 30, 34), (225, 225, 225)) if style.dark else ((250, 249, 245), (20, 20, 25))
    img = Image.new("RGB", (page_w, page_h), paper)
    draw = ImageDraw.Draw(img)
    y = margin
    for row in rows:
        font = bold if row.bold else regular
        if row.layout == "title":  # a window's title bar across the top
            draw.rectangle((0, 0, page_w, title_h), fill=(70, 90, 130) if not style.dark else (60, 60, 66))
            draw.text(((page_w - width(row.text, font)) // 2, (title_h - size) // 2), row.text,
                      font=font, fill=(245, 245, 245))
            y = title_h + margin // 2
            continue
        if row.layout == "rule":
            draw.line((margin, y + line_h // 2, page_w - margin, y + line_h // 2), fill=ink, width=1)
        elif row.layout == "center":
            draw.text(((page_w - width(row.text, font)) // 2, y), row.text, font=font, fill=ink)
        elif row.layout == "spread":
            draw.text((margin, y), row.cells[0], font=font, fill=ink)
            last = row.cells[-1]
            draw.text((page_w - margin - width(last, font), y), last, font=font, fill=ink)
        elif row.layout == "grid":
            x = margin
            for i, cell in enumerate(row.cells):
                numeric = n_cols > 2 and i > 0 and re.fullmatch(r"[\d.,%$-]+", cell) is not None
                dx = col_w[i] - width(cell, font) if numeric else 0  # a table's numbers right-aligned
                draw.text((x + dx, y), cell, font=font, fill=ink)
                x += col_w[i] + gap
        else:
            draw.text((margin, y), "   ".join(row.cells), font=font, fill=ink)
        y += line_h
    return degrade(img, style, paper)


def degrade(img: Image.Image, style: Style, paper: tuple[int, int, int]) -> Image.Image:
    """The scan's faults: rotation, blur, sensor noise, JPEG artefacts (each zero in a clean style)."""
    if style.rotation_deg:
        img = img.rotate(style.rotation_deg, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=paper)
    if style.blur_radius:
        img = img.filter(ImageFilter.GaussianBlur(style.blur_radius))
    if style.noise_sigma:
        shape = (img.height, img.width, 1)  # the same noise on the three channels: grey grain
        noise = np.random.default_rng(style.noise_seed).normal(0.0, style.noise_sigma, shape)
        img = Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=style.jpeg_quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


# --- scoring ----------------------------------------------------------------------------------------------

_CURRENCY = re.compile(r"[$€£]|\busd\b|\beur\b")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_EDGE_PUNCT = " \t.,;:!?\"'`*()[]"


def normalize_answer(text: str) -> str:
    """The comparable form of an answer (see the module's docstring); a number in canonical decimal form."""
    s = text.strip().lower()
    s = _CURRENCY.sub("", s)
    s = _THOUSANDS.sub("", s)
    s = " ".join(s.split()).strip(_EDGE_PUNCT)
    return _canonical_number(s) or s


def _canonical_number(s: str) -> str | None:
    if not re.fullmatch(r"[-+]?\d+(\.\d+)?", s):
        return None
    try:
        value = Decimal(s)
    except InvalidOperation:
        return None
    text = format(value.normalize(), "f")
    return text if "." not in text else text.rstrip("0").rstrip(".")


def first_line(reply: str) -> str:
    lines = [ln for ln in reply.strip().splitlines() if ln.strip()]
    return lines[0] if lines else ""


def exact_match(reply: str | None, answer: str) -> bool:
    """The reply's first line equals the answer after normalisation."""
    return reply is not None and normalize_answer(first_line(reply)) == normalize_answer(answer)


def contains_match(reply: str | None, answer: str) -> bool:
    """The normalised answer appears in the normalised reply as whole words (the lenient reading)."""
    if reply is None:
        return False
    words = [normalize_answer(w) for w in _THOUSANDS.sub("", reply.lower()).split()]
    target = [normalize_answer(w) for w in _THOUSANDS.sub("", answer.lower()).split()]
    return any(words[i:i + len(target)] == target for i in range(len(words) - len(target) + 1))
