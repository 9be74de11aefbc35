"""The voice round trip's data and scoring: project-written sentences with the words they should be heard as,
hard words with lexicon entries, and word error rate after one documented normalisation of both sides.

The sentence set (`sentence_set`) is seeded templates per category plus hand-written sentences; each carries
its `reference`: the sentence as it should be heard, in words ("Dr. Smith paid $4.50" -> "doctor smith paid
four dollars and fifty cents"). Speech made from `text` by our TTS and transcribed by our ASR is scored
against `reference`.

Scoring (`spoken_form`, applied to the reference and to the transcript alike, so a fair comparison is of the
spoken words, not of spelling conventions). Whisper writes what it hears in written form ("$4.50", "3:30pm",
"Dr.", "FBI"), so the written forms it uses are turned back into words, by the rules the references are
written with:
1. written forms -> words: currency amounts ("$4.50" -> "four dollars and fifty cents", "$1.2 million" ->
   "one point two million dollars", euros, pounds), percentages, dates (m/d/yyyy in US order, yyyy-mm-dd,
   "March 5" -> "march fifth", "5 March" -> "the fifth of march"), times ("3:30 pm", "3.30pm" and "330 PM"
   -> "three thirty pm", "at 22.55" -> "at twenty two fifty five", minutes 01-09 as "oh five", ":00"
   dropped), phone numbers (digit by digit), ordinals ("21st"), units after a number in their written case
   ("5 kg" -> "five kilograms"; "57MPH" stays letters: the speech said the letters), decimals ("3.14" ->
   "three point one four"), years (a bare 1100-2099 -> "twenty twenty four"), other numbers (num2words),
   abbreviations with their period (a table; "St." is "saint" before a capitalised word, else "street";
   "Dr." likewise "doctor" or "drive"), symbols (& % + @ #);
2. accents folded, lower case, apostrophes dropped ("o'clock" -> "oclock"), other punctuation -> spaces;
3. "oh" -> "zero" (phone numbers and times are read either way);
4. a run of two or more single letters is one token ("f b i" and "FBI" -> "fbi");
5. "and" between number words (or after a currency word, before a number word) is dropped ("one hundred and
   five" = "one hundred five", "four dollars and fifty cents" = "four dollars fifty cents").
WER is (substitutions + deletions + insertions) / reference words, summed over the items (jiwer aligns).

Hard words (`HARD_WORDS`): words our TTS (espeak-ng's phonemizer inside Piper) mispronounces or our ASR
(Whisper tiny.en) mishears, each with a lexicon entry (espeak-ng IPA, the alphabet Piper's voice uses) and
the spellings a transcript must contain to count as a match, spoken inside a carrier sentence.
"""

from __future__ import annotations

import random
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from num2words import num2words

CATEGORIES = ("cardinal", "decimal", "currency", "percentage", "date", "time", "phone", "ordinal",
              "abbreviation", "acronym", "name", "unit", "plain", "mixed")
TEMPLATED_PER_CATEGORY = 16
CENTS, PENCE = ("cent", "cents"), ("penny", "pence")
MONTHS = ("january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
          "november", "december")


@dataclass(frozen=True)
class Sentence:
    id: str
    category: str
    text: str       # what the TTS is given
    reference: str  # what a listener should hear, in words


@dataclass(frozen=True)
class HardWord:
    word: str                     # as written in the input (and the lexicon key)
    ipa: str                      # the lexicon entry: espeak-ng IPA as Piper's voice takes it
    carrier: str                  # the sentence it is spoken in; "@" marks the word
    accepted: tuple[str, ...] = field(default=())  # spellings that count as a match (default: the word)
    why: str = "tts"              # "tts": espeak-ng mispronounces it; "asr": said right, misheard

    @property
    def text(self) -> str:
        return self.carrier.replace("@", self.word)

    @property
    def spellings(self) -> tuple[str, ...]:
        return self.accepted or (self.word,)

    def lexicon(self) -> dict[str, dict[str, str]]:
        return {self.word: {"ipa": self.ipa}}


# --- number words, the way the references say them ----------------------------------------------------

def _clean(words: str) -> str:
    """num2words' words as the references write them: no commas or hyphens, no "and" (US style)."""
    return " ".join(w for w in words.replace(",", " ").replace("-", " ").split() if w != "and")


def cardinal(n: int | str) -> str:
    return _clean(num2words(int(str(n).replace(",", ""))))


def ordinal(n: int | str) -> str:
    return _clean(num2words(int(n), to="ordinal"))


def year(n: int | str) -> str:
    return _clean(num2words(int(n), to="year"))


def digits(s: str) -> str:
    return " ".join(cardinal(d) for d in s if d.isdigit())


def decimal(s: str) -> str:
    whole, _, frac = s.replace(",", "").partition(".")
    return f"{cardinal(whole)} point {digits(frac)}" if frac else cardinal(whole)


def money(amount: str, unit: str, cents: tuple[str, str] = ("cent", "cents")) -> str:
    """'4.50', 'dollar' -> 'four dollars and fifty cents' (one dollar, one cent; no cents when .00)."""
    whole, _, frac = amount.replace(",", "").partition(".")
    words = f"{cardinal(whole)} {unit}{'' if int(whole) == 1 else 's'}"
    if frac and int(frac[:2].ljust(2, "0")):
        c = int(frac[:2].ljust(2, "0"))
        words += f" and {cardinal(c)} {cents[0] if c == 1 else cents[1]}"
    return words


def clock(hour: int, minute: int) -> str:
    """3, 30 -> 'three thirty'; 10, 5 -> 'ten oh five'; 3, 0 -> 'three'."""
    if minute == 0:
        return cardinal(hour)
    return f"{cardinal(hour)} {'oh ' if minute < 10 else ''}{cardinal(minute)}"


# --- the sentence set --------------------------------------------------------------------------------------

FIRST = ("Maria", "James", "Priya", "Wei", "Olga", "Kenji", "Ahmed", "Fatima", "Lars", "Chloe", "Diego",
         "Aisha", "Tomasz", "Emma", "Jamal", "Sofia", "David", "Grace", "Omar", "Hannah")
LAST = ("Garcia", "Smith", "Patel", "Zhang", "Ivanova", "Watanabe", "Hassan", "Khan", "Johansson", "Martin",
        "Hernandez", "Bello", "Nowak", "Wilson", "Brooks", "Rossi", "Miller", "Turner", "Lopez", "Fischer")
THINGS = ("books", "apples", "boxes", "chairs", "tickets", "letters", "bottles", "coins", "shirts", "plants")
ITEMS = ("a sandwich", "the coffee", "a new lamp", "the taxi", "two notebooks", "the parking", "a haircut",
         "the flowers")
STREETS = ("Main", "Oak", "Elm", "Maple", "Pine", "Cedar", "Park", "Lake", "Hill", "River")
SAINTS = ("Paul", "Mary", "George", "Andrew", "Peter", "John", "Michael", "Thomas")
SPELLED = ("FBI", "CIA", "BBC", "CPU", "USB", "HTML", "PDF", "DNA", "CEO", "IBM", "GPS", "ATM", "URL", "API",
           "DVD", "NFL")
READ_AS_WORDS = ("NASA", "NATO", "UNICEF", "OPEC", "UNESCO")
UNITS = (("kg", "kilogram", "The bag weighs {}."), ("km", "kilometer", "The trail is {} long."),
         ("cm", "centimeter", "The crack is {} wide."), ("mm", "millimeter", "The screw is {} long."),
         ("ml", "milliliter", "Add {} of water."), ("mg", "milligram", "Take {} twice a day."),
         ("lb", "pound", "The turkey weighs {}."), ("oz", "ounce", "Pour {} of juice."),
         ("ft", None, "The fence is {} high."), ("mph", None, "The wind reached {}."),
         ("GB", "gigabyte", "The file is {}."), ("MB", "megabyte", "The photo is {}."),
         ("ms", "millisecond", "The reply took {}."), ("kW", "kilowatt", "The heater uses {}."),
         ("°C", None, "It is {} outside."), ("°F", None, "The oven is at {}."))
_UNIT_WORDS = {"ft": ("foot", "feet"), "GHz": ("gigahertz", "gigahertz"),
               "mph": ("mile per hour", "miles per hour"),
               "°C": ("degree celsius", "degrees celsius"), "°F": ("degree fahrenheit", "degrees fahrenheit")}


def _unit_words(unit: str, singular: str | None, n: float) -> str:
    one, many = _UNIT_WORDS.get(unit, (singular, f"{singular}s"))
    return one if n == 1 else many


def _templated(category: str, rng: random.Random, k: int) -> tuple[str, str]:  # noqa: C901 - one table
    """One (text, reference) of a category; k cycles through the category's templates."""
    name, last = rng.choice(FIRST), rng.choice(LAST)
    if category == "cardinal":
        n = [rng.randint(2, 999), rng.randint(1000, 99999), rng.randint(100000, 9999999)][k % 3]
        text = [f"{name} has {n:,} {rng.choice(THINGS)}.", f"The stadium holds {n:,} people.",
                f"There were {n:,} votes counted."][k % 3]
        return text, _ref_from(text, {f"{n:,}": cardinal(n)})
    if category == "decimal":
        x = f"{rng.randint(0, 99)}.{rng.randint(1, 99):02d}".rstrip("0")
        text = [f"The rod measures {x} meters.", f"The average score was {x}.",
                f"The needle moved {x} units."][k % 3]
        return text, _ref_from(text, {x: decimal(x)})
    if category == "currency":
        d, c = rng.randint(1, 499), rng.randint(1, 99)
        big = f"{d % 9 + 1}.{c % 9 + 1}"
        options = [(f"{name} paid ${d}.{c:02d} for {rng.choice(ITEMS)}.", f"${d}.{c:02d}",
                    money(f"{d}.{c:02d}", "dollar")),
                   (f"The ticket costs ${d}.", f"${d}", money(str(d), "dollar")),
                   (f"The rent is £{d * 5:,} a month.", f"£{d * 5:,}", money(str(d * 5), "pound", PENCE)),
                   (f"The museum charges €{d % 40 + 2} for entry.", f"€{d % 40 + 2}",
                    money(str(d % 40 + 2), "euro")),
                   (f"The company raised ${big} million.", f"${big} million",
                    f"{decimal(big)} million dollars")]
        text, written, words = options[k % len(options)]
        return text, _ref_from(text, {written: words})
    if category == "percentage":
        n, a, b = rng.randint(2, 99), rng.randint(1, 19), rng.randint(1, 9)
        text, written, words = [(f"Sales grew by {n}% last year.", f"{n}%", f"{cardinal(n)} percent"),
                                (f"The battery is at {n}%.", f"{n}%", f"{cardinal(n)} percent"),
                                (f"Interest rates rose to {a}.{b}%.", f"{a}.{b}%",
                                 f"{decimal(f'{a}.{b}')} percent")][k % 3]
        return text, _ref_from(text, {written: words})
    if category == "date":
        m, d, y = rng.randint(1, 12), rng.randint(1, 28), rng.randint(1950, 2035)
        month = MONTHS[m - 1]
        spoken = f"{month} {ordinal(d)} {year(y)}"
        text, written, words = [
            (f"The meeting is on {month.title()} {d}, {y}.", f"{month.title()} {d}, {y}", spoken),
            (f"She was born on {m}/{d}/{y}.", f"{m}/{d}/{y}", spoken),
            (f"The report is due {y}-{m:02d}-{d:02d}.", f"{y}-{m:02d}-{d:02d}", spoken),
            (f"The shop opened on {d} {month.title()} {y}.", f"{d} {month.title()} {y}",
             f"the {ordinal(d)} of {month} {year(y)}"),
            (f"The bridge was finished in {y}.", f"{y}", year(y))][k % 5]
        return text, _ref_from(text, {written: words})
    if category == "time":
        h, mm = rng.randint(1, 12), rng.choice((0, 5, 15, 20, 30, 45, 50, 7))
        ap = rng.choice(("a.m.", "p.m."))
        hh, m2 = rng.randint(13, 23), rng.choice((10, 15, 25, 30, 45, 55))
        letters = "a m" if ap == "a.m." else "p m"
        text, written, words = [
            (f"The train leaves at {h}:{mm:02d} {ap}", f"{h}:{mm:02d} {ap}", f"{clock(h, mm)} {letters}"),
            (f"The store opens at {h} {ap}", f"{h} {ap}", f"{cardinal(h)} {letters}"),
            (f"The call starts at {hh}:{m2:02d}.", f"{hh}:{m2:02d}", clock(hh, m2))][k % 3]
        return text, _ref_from(text, {written: words})
    if category == "phone":
        a, b, c = (f"{rng.randint(200, 989)}", f"{rng.randint(200, 999)}", f"{rng.randint(0, 9999):04d}")
        text, written = [(f"Call me at {b}-{c}.", f"{b}-{c}"),
                         (f"The office number is ({a}) {b}-{c}.", f"({a}) {b}-{c}")][k % 2]
        return text, _ref_from(text, {written: digits(written)})
    if category == "ordinal":
        n = [rng.randint(1, 20), rng.randint(21, 99), rng.randint(2, 12)][k % 3]
        suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
        text = [f"{name} finished {n}{suffix} in the race.", f"It is her {n}{suffix} birthday.",
                f"The office is on the {n}{suffix} floor."][k % 3]
        return text, _ref_from(text, {f"{n}{suffix}": ordinal(n)})
    if category == "abbreviation":
        street, saint = rng.choice(STREETS), rng.choice(SAINTS)
        options = [(f"Dr. {last} will see you now.", "Dr.", "doctor"),
                   (f"Mr. and Mrs. {last} arrived early.", "Mr. and Mrs.", "mister and missus"),
                   (f"The bakery is on {street} St.", "St.", "street"),
                   (f"The church of St. {saint} is old.", "St.", "saint"),
                   ("Bring pens, paper, tape, etc.", "etc.", "et cetera"),
                   (f"{last} vs. {rng.choice(LAST)} starts soon.", "vs.", "versus"),
                   (f"{last} Inc. hired more staff.", "Inc.", "incorporated"),
                   (f"Prof. {last} gave a lecture.", "Prof.", "professor"),
                   (f"{name} {last} Jr. took over the firm.", "Jr.", "junior"),
                   (f"The office is on {street} Ave.", "Ave.", "avenue"),
                   ("We meet in Jan. every year.", "Jan.", "january")]
        text, written, words = options[k % len(options)]
        return text, _ref_from(text, {written: words})
    if category == "acronym":
        if k % 4 == 3:
            acr = rng.choice(READ_AS_WORDS)
            spoken = acr.lower()
        else:
            acr = rng.choice(SPELLED)
            spoken = " ".join(acr.lower())
        text = [f"The {acr} report was published.", f"Ask the {acr} team about it.",
                f"{name} read about the {acr} online.", f"The {acr} budget was cut."][k % 4]
        return text, _ref_from(text, {acr: spoken})
    if category == "name":
        text = [f"{name} {last} joined the team today.", f"Please call {name} {last} back.",
                f"The award went to {name} {last}."][k % 3]
        return text, _ref_from(text, {})
    if category == "unit":
        unit, singular, template = UNITS[k % len(UNITS)]
        n = rng.choice((1, rng.randint(2, 95)))
        text = template.format(f"{n} {unit}" if not unit.startswith("°") else f"{n}{unit}")
        written = f"{n} {unit}" if not unit.startswith("°") else f"{n}{unit}"
        return text, _ref_from(text, {written: f"{cardinal(n)} {_unit_words(unit, singular, n)}"})
    raise ValueError(f"no templates for category {category!r}")


def _ref_from(text: str, spoken: dict[str, str]) -> str:
    """The reference of a templated sentence: its written forms replaced by their words, in lower case."""
    for written, words in spoken.items():
        text = text.replace(written, f" {words} ", 1)
    return " ".join(re.sub(r"[^\w' ]+", " ", text.lower()).split())


# Hand-written: several kinds of written form in one sentence.
HAND_WRITTEN: tuple[tuple[str, str, str], ...] = (
    ("mixed", "Dr. Smith paid $4.50 on 3/5/2024.",
     "doctor smith paid four dollars and fifty cents on march fifth twenty twenty four"),
    ("mixed", "The 3rd quarter ended with a 12% rise.",
     "the third quarter ended with a twelve percent rise"),
    ("mixed", "Mr. Lee will land at 6:45 p.m. on Friday.",
     "mister lee will land at six forty five p m on friday"),
    ("mixed", "The FBI found 1,200 files on the USB drive.",
     "the f b i found one thousand two hundred files on the u s b drive"),
    ("mixed", "NASA launched the probe on July 4, 1997.",
     "nasa launched the probe on july fourth nineteen ninety seven"),
    ("mixed", "Mrs. Patel ran 5 km in 25 minutes.",
     "missus patel ran five kilometers in twenty five minutes"),
    ("mixed", "Call 555-0134 before 9 a.m. tomorrow.",
     "call five five five zero one three four before nine a m tomorrow"),
    ("mixed", "The CEO earned $2.5 million in 2023.",
     "the c e o earned two point five million dollars in twenty twenty three"),
    ("mixed", "Prof. Garcia gave 2 lectures on the 21st.",
     "professor garcia gave two lectures on the twenty first"),
    ("mixed", "It was 38°C in Madrid on August 10.",
     "it was thirty eight degrees celsius in madrid on august tenth"),
    ("mixed", "The HTML guide has 150 pages and costs €20.",
     "the h t m l guide has one hundred fifty pages and costs twenty euros"),
    ("mixed", "St. Louis is 300 miles from Chicago.", "saint louis is three hundred miles from chicago"),
    ("mixed", "The CPU runs at 3.2 GHz.", "the c p u runs at three point two gigahertz"),
    ("mixed", "Dr. Wong moved to 42 Elm St. in 2019.",
     "doctor wong moved to forty two elm street in twenty nineteen"),
    ("mixed", "About 75% of the 400 guests came by 8:30 p.m.",
     "about seventy five percent of the four hundred guests came by eight thirty p m"),
    ("mixed", "The BBC aired the 2nd episode on 10/12/2021.",
     "the b b c aired the second episode on october twelfth twenty twenty one"),
    ("mixed", "The parcel weighs 2.5 kg and cost $18.99 to ship.",
     "the parcel weighs two point five kilograms and cost eighteen dollars and ninety nine cents to ship"),
    ("mixed", "The 1st train leaves at 5:05 a.m.", "the first train leaves at five oh five a m"),
    ("mixed", "Ms. Rossi scored 98 out of 100.", "miz rossi scored ninety eight out of one hundred"),
    ("mixed", "The temperature fell to -5 degrees.", "the temperature fell to minus five degrees"),
    ("mixed", "Room 204 is on the 2nd floor.", "room two hundred four is on the second floor"),
    ("mixed", "The GPS said 12 miles, i.e. 20 minutes.",
     "the g p s said twelve miles that is twenty minutes"),
    ("mixed", "Tom & Jerry first aired in 1940.", "tom and jerry first aired in nineteen forty"),
    ("mixed", "The bill came to £45.20 for 3 people.",
     "the bill came to forty five pounds and twenty pence for three people"),
)

# Plain sentences (the control: no written forms at all); the reference is the text in lower case.
PLAIN: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "Please close the window before you leave.",
    "We walked along the beach until the sun went down.",
    "The library is quiet in the early morning.",
    "She painted the fence a bright shade of green.",
    "My brother fixed the bike in the garage.",
    "The soup needs a little more salt.",
    "They planted tomatoes along the back wall.",
    "The children laughed at the clever puppet show.",
    "Rain is expected later this afternoon.",
    "He forgot his umbrella on the bus again.",
    "The museum opens a new exhibit next week.",
    "Our neighbors are building a small wooden shed.",
    "The coffee shop on the corner closed early.",
    "A gentle breeze moved through the tall grass.",
    "Turn left at the second traffic light.",
)


def sentence_set(n: int | None = None, *, seed: int = 0) -> list[Sentence]:
    """The round-trip sentences, interleaved across categories so that the first n cover every category."""
    rng = random.Random(seed)
    by_category: dict[str, list[Sentence]] = {c: [] for c in CATEGORIES}
    for category in CATEGORIES:
        if category in ("plain", "mixed"):
            continue
        for k in range(TEMPLATED_PER_CATEGORY):
            text, reference = _templated(category, rng, k)
            by_category[category].append(Sentence(f"{category}-{k:02d}", category, text, reference))
    for i, (category, text, reference) in enumerate(HAND_WRITTEN):
        by_category[category].append(Sentence(f"{category}-h{i:02d}", category, text, reference))
    for i, text in enumerate(PLAIN):
        by_category["plain"].append(Sentence(f"plain-h{i:02d}", "plain", text, _ref_from(text, {})))
    queues = [list(items) for items in by_category.values()]
    ordered: list[Sentence] = []
    while any(queues):
        for q in queues:
            if q:
                ordered.append(q.pop(0))
    return ordered if n is None else ordered[:n]


# --- hard words -------------------------------------------------------------------------------------------

HARD_WORDS: tuple[HardWord, ...] = (
    HardWord("Nguyen", "wˈɪn", "Doctor @ will see you now."),
    HardWord("Saoirse", "sˈɪɹʃə", "The actress @ won an award."),
    HardWord("Niamh", "nˈiːv", "My cousin @ lives in Dublin."),
    HardWord("Aoife", "ˈiːfə", "Her daughter @ started school today."),
    HardWord("Eoin", "ˈoʊɪn", "The striker @ scored twice."),
    HardWord("Siobhan", "ʃɪvˈɔːn", "I had lunch with @ yesterday.", why="asr"),
    HardWord("Joaquin", "wɑːkˈiːn", "The actor @ played the villain."),
    HardWord("Hermione", "hɚmˈaɪəni", "In the book, @ casts the spell."),
    HardWord("Beyonce", "biːˈjɑːnseɪ", "The singer @ released a new album.", ("Beyonce",)),
    HardWord("Goethe", "ɡˈɜːtə", "We read a poem by @ in class."),
    HardWord("Tchaikovsky", "tʃaɪkˈɔːfski", "The orchestra played @ tonight."),
    HardWord("Dvorak", "dvˈɔːɹʒɑːk", "The symphony by @ was lovely."),
    HardWord("Ptolemy", "tˈɑːləmi", "The astronomer @ mapped the stars."),
    HardWord("Fiennes", "fˈaɪnz", "The actor Ralph @ was there."),
    HardWord("Zhao", "dʒˈaʊ", "Professor @ teaches chemistry."),
    HardWord("Xiaomi", "ʃaʊmˈiː", "I bought a @ phone."),
    HardWord("Huawei", "wˈɑːweɪ", "The @ router stopped working."),
    HardWord("Moet", "moʊˈɛt", "They opened a bottle of @.", ("Moet",)),
    HardWord("Hermes", "ɛɹmˈɛz", "She carried an @ bag.", ("Hermes",)),
    HardWord("quinoa", "kˈiːnwɑː", "We had @ with the salad."),
    HardWord("gnocchi", "nˈjɔːki", "The @ was soft and warm."),
    HardWord("bruschetta", "bɹuːskˈɛɾə", "We ordered @ as a starter."),
    HardWord("pho", "fˈʌ", "A bowl of @ costs ten dollars."),
    HardWord("acai", "ɑːsɑːˈiː", "She ordered an @ bowl.", ("acai",)),
    HardWord("Qatar", "kˈʌtɚ", "The flight to @ was late."),
    HardWord("Uyghur", "wˈiːɡɚ", "She speaks @ and Mandarin.", ("Uyghur", "Uighur")),
    HardWord("Leicester", "lˈɛstɚ", "The train to @ leaves at noon.", why="asr"),
    HardWord("Bicester", "bˈɪstɚ", "The outlet village in @ was busy."),
    HardWord("Alnwick", "ˈænɪk", "The castle at @ is famous."),
    HardWord("Cholmondeley", "tʃˈʌmli", "Lord @ arrived late."),
    HardWord("Beaulieu", "bjˈuːli", "The motor museum at @ is open."),
    HardWord("Keighley", "kˈiːθli", "The bus to @ was full."),
    HardWord("Reykjavik", "ɹˈeɪkjəvɪk", "Our flight lands in @ tonight."),
    HardWord("Kyiv", "kˈiːjɪv", "The news came from @ this morning.", ("Kyiv", "Kiev")),
    HardWord("Gdansk", "ɡədˈɑːnsk", "The shipyard in @ is old."),
    HardWord("NumPy", "nˈʌmpaɪ", "Install @ before you run the script."),
    HardWord("LaTeX", "lˈɑːtɛk", "She wrote the paper in @."),
    HardWord("Ubuntu", "ʊbˈʊntuː", "The server runs @ Linux."),
)


# --- scoring --------------------------------------------------------------------------------------------

_NUMBER_WORDS = frozenset(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred thousand "
    "million billion trillion point first second third fourth fifth sixth seventh eighth ninth tenth "
    "eleventh twelfth thirteenth fourteenth fifteenth sixteenth seventeenth eighteenth nineteenth twentieth "
    "thirtieth fortieth fiftieth sixtieth seventieth eightieth ninetieth hundredth thousandth".split())
_MONEY_WORDS = frozenset("dollar dollars pound pounds euro euros".split())
_CURRENCY = {"$": ("dollar", CENTS), "€": ("euro", CENTS), "£": ("pound", PENCE)}
_MONTH_RE = "(?:" + "|".join([m.title() for m in MONTHS] + ["Jan", "Feb", "Mar", "Apr", "Jun", "Jul", "Aug",
                                                            "Sept", "Sep", "Oct", "Nov", "Dec"]) + ")"
_MONTH_ABBREVIATIONS = {m[:3].title(): m for m in MONTHS if m != "may"} | {"Sept": "september"}
# Abbreviations as Whisper (or an input) writes them, with their period; the words they are read as.
ABBREVIATIONS = {"Mr.": "mister", "Mrs.": "missus", "Ms.": "miz", "Prof.": "professor", "Jr.": "junior",
                 "Sr.": "senior", "Ave.": "avenue", "Mt.": "mount", "etc.": "et cetera", "vs.": "versus",
                 "e.g.": "for example", "i.e.": "that is", "Inc.": "incorporated", "Ltd.": "limited",
                 "Corp.": "corporation", "Co.": "company", "Dept.": "department", "approx.": "approximately"}
_UNIT_RE = "|".join(re.escape(u) for u, _, _ in sorted(UNITS, key=lambda u: -len(u[0]))) + "|GHz|lbs"
_UNIT_SINGULAR = {u: s for u, s, _ in UNITS} | {"GHz": "gigahertz", "lbs": "pound"}
_SYMBOLS = {"&": " and ", "%": " percent ", "+": " plus ", "@": " at ", "#": " number ", "°": " degrees "}


def _money_sub(m: re.Match[str]) -> str:
    unit, cents = _CURRENCY[m["sym"]]
    if m["mag"]:
        return f" {decimal(m['num'])} {m['mag'].lower()} {unit}s "
    return f" {money(m['num'], unit, cents)} "


def _time_sub(m: re.Match[str]) -> str:
    minute = int(m["min"] or 0)
    suffix = f" {m['ap'].lower()} m" if m["ap"] else ""
    return f" {clock(int(m['hour']), minute)}{suffix} "


def _slash_date_sub(m: re.Match[str]) -> str:
    month, day, yr = int(m[1]), int(m[2]), m[3]
    if not (1 <= month <= 12 and 1 <= day <= 31):
        return m[0]
    return f" {MONTHS[month - 1]} {ordinal(day)} {year(yr if len(yr) == 4 else '20' + yr)} "


def _iso_date_sub(m: re.Match[str]) -> str:
    yr, month, day = m[1], int(m[2]), int(m[3])
    if not (1 <= month <= 12 and 1 <= day <= 31):
        return m[0]
    return f" {MONTHS[month - 1]} {ordinal(day)} {year(yr)} "


def _unit_sub(m: re.Match[str]) -> str:
    number, unit = m["num"], m["unit"]
    value = float(number.replace(",", ""))
    words = decimal(number) if "." in number else cardinal(number)
    return f" {words} {_unit_words(unit, _UNIT_SINGULAR.get(unit), value)} "


def _title_abbreviation_sub(m: re.Match[str]) -> str:
    word = m[1]
    capital_next = bool(m[2]) and m[2][:1].isupper()
    if word == "St":
        return ("saint " if capital_next else "street ") + (m[2] or "")
    return ("doctor " if capital_next else "drive ") + (m[2] or "")


_REWRITES: tuple[tuple[re.Pattern[str], object], ...] = (
    (re.compile(r"\b([A-Z]+)-(?=[A-Z]+\b)"), r"\1"),  # "FB-I" as Whisper writes a spelled acronym
    (re.compile(r"(\d)(?!(?:st|nd|rd|th)\b)([A-Za-z]{2,})"), r"\1 \2"),  # "57MPH", "3.30pm": number, word
    (re.compile(r"\b(St|Dr)\.(?:\s+(\w+))?"), _title_abbreviation_sub),
    (re.compile(r"(?<![\w.])(" + "|".join(re.escape(a) for a in ABBREVIATIONS) + r")(?!\w)"),
     lambda m: f" {ABBREVIATIONS[m[1]]} "),
    (re.compile(r"\b(" + "|".join(_MONTH_ABBREVIATIONS) + r")\.(?=\s|$)"),
     lambda m: f" {_MONTH_ABBREVIATIONS[m[1]]} "),
    (re.compile(r"(?P<sym>[$€£])\s?(?P<num>\d[\d,]*(?:\.\d+)?)(?:\s*(?P<mag>million|billion|thousand|trillion)\b)?",
                re.IGNORECASE), _money_sub),
    (re.compile(r"(\d[\d,]*(?:\.\d+)?)\s*(?:%|percent\b)"),
     lambda m: f" {decimal(m[1])} percent "),
    (re.compile(r"\b(\d{1,2})/(\d{1,2})/(\d{4}|\d{2})\b"), _slash_date_sub),
    (re.compile(r"\b(\d{4})-(\d{2})-(\d{2})\b"), _iso_date_sub),
    (re.compile(r"\b(?P<hour>\d{1,2})(?:[:.]?(?P<min>[0-5]\d))?\s*(?P<ap>[ap])\.?\s?m\b\.?", re.IGNORECASE),
     _time_sub),
    (re.compile(r"\b(?P<hour>[01]?\d|2[0-3]):(?P<min>[0-5]\d)(?P<ap>)\b"), _time_sub),
    (re.compile(r"\b(at|by|from|until|till)\s+([01]?\d|2[0-3])\.([0-5]\d)\b(?!\.\d)"),
     lambda m: f" {m[1]} {clock(int(m[2]), int(m[3]))} "),
    (re.compile(r"\(?\b\d{3}\)?[-. ]\d{3}[-. ]\d{4}\b|\b\d{3}-\d{4}\b"), lambda m: f" {digits(m[0])} "),
    (re.compile(r"\b(\d+)(?:st|nd|rd|th)\b"), lambda m: f" {ordinal(m[1])} "),
    (re.compile(r"\b(\d{1,2})\s+(?=" + _MONTH_RE + r"\b)"), lambda m: f" the {ordinal(m[1])} of "),
    (re.compile(r"\b(\d{1,2})(?=\s+of\s+" + _MONTH_RE + r"\b)"), lambda m: f" {ordinal(m[1])} "),
    (re.compile(r"(" + _MONTH_RE + r")\.?\s+(\d{1,2})\b(?![\d:.,]\d)"),
     lambda m: f" {m[1]} {ordinal(m[2])} "),
    (re.compile(r"(?P<num>\d[\d,]*(?:\.\d+)?)\s*(?P<unit>" + _UNIT_RE + r")(?!\w)"), _unit_sub),
    (re.compile(r"-(?=\d)(?<![\w-]-)"), " minus "),
    (re.compile(r"\b\d[\d,]*\.\d+\b"), lambda m: f" {decimal(m[0])} "),
    (re.compile(r"(?<![\d.,])\b(1[1-9]\d\d|20\d\d)\b(?![.,]\d)"), lambda m: f" {year(m[1])} "),
    (re.compile(r"\b\d{1,3}(?:,\d{3})+\b|\b\d+\b"), lambda m: f" {cardinal(m[0])} "),
)


def _written_to_words(text: str) -> str:
    for pattern, repl in _REWRITES:
        text = pattern.sub(repl, text)  # type: ignore[arg-type]
    for symbol, words in _SYMBOLS.items():
        text = text.replace(symbol, words)
    return text


def _fold(text: str) -> str:
    """Accents off (é -> e), lower case, apostrophes dropped, any other non-letter-or-digit a space."""
    text = unicodedata.normalize("NFKD", text.replace("\u2019", "'"))
    text = "".join(c for c in text if not unicodedata.combining(c)).lower().replace("'", "")
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text).split())


def _join_letters(tokens: list[str]) -> list[str]:
    out: list[str] = []
    run: list[str] = []
    for tok in [*tokens, ""]:
        if len(tok) == 1 and tok.isalpha():
            run.append(tok)
            continue
        out.extend(["".join(run)] if len(run) >= 2 else run)
        run = []
        if tok:
            out.append(tok)
    return out


def _drop_number_and(tokens: list[str]) -> list[str]:
    keep = []
    for i, tok in enumerate(tokens):
        if (tok == "and" and 0 < i < len(tokens) - 1 and tokens[i + 1] in _NUMBER_WORDS
                and (tokens[i - 1] in _NUMBER_WORDS or tokens[i - 1] in _MONEY_WORDS)):
            continue
        keep.append(tok)
    return keep


def spoken_form(text: str) -> str:
    """The words a text is heard as, in the one form both sides are scored in (see the module docstring)."""
    tokens = _fold(_written_to_words(text)).split()
    tokens = ["zero" if t == "oh" else t for t in tokens]
    return " ".join(_drop_number_and(_join_letters(tokens)))


@dataclass(frozen=True)
class Errors:
    """Word errors of one or more items: (substitutions + deletions + insertions) / reference words."""
    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0
    words: int = 0

    @property
    def wer(self) -> float:
        return (self.substitutions + self.deletions + self.insertions) / self.words if self.words else 0.0

    def __add__(self, other: Errors) -> Errors:
        return Errors(self.substitutions + other.substitutions, self.deletions + other.deletions,
                      self.insertions + other.insertions, self.words + other.words)


def word_errors(reference: str, hypothesis: str) -> Errors:
    """The errors of one transcript against its reference, both in spoken_form (jiwer's alignment)."""
    import jiwer

    ref, hyp = spoken_form(reference), spoken_form(hypothesis)
    if not ref:
        raise ValueError("the reference has no words")
    if not hyp:
        return Errors(0, len(ref.split()), 0, len(ref.split()))
    out = jiwer.process_words(ref, hyp)
    return Errors(out.substitutions, out.deletions, out.insertions, len(ref.split()))


def wer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus WER: errors summed over the pairs, over reference words summed."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    return sum((word_errors(r, h) for r, h in zip(references, hypotheses, strict=True)), Errors()).wer


def contains_word(transcript: str, spellings: Iterable[str]) -> bool:
    """Whether the transcript holds one of the spellings as whole words (spoken_form on both sides)."""
    padded = f" {spoken_form(transcript)} "
    return any(f" {spoken_form(s)} " in padded for s in spellings)
