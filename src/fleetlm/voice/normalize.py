"""Text normalisation for speech: numbers, money, dates, times, units, abbreviations and acronyms as words.

`normalize_text` rewrites English text the way it should be spoken before it reaches the synthesiser
(Piper reads "$4.50" or "FBI" badly on its own); `say_as` gives the words for one SSML `<say-as>`.
Number words come from num2words; the rules (what is a year, a phone number, a date ...) are the
regular expressions below, applied in a fixed order: the specific shapes (phones, dates, times, money)
before the general ones (ranges, plain numbers), so that a digit is read by the most specific rule.
The output holds no digits, and the rules are run on their own output until it no longer changes, so the
function is idempotent.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import lru_cache

from num2words import num2words

__all__ = ["normalize_text", "say_as", "SAY_AS_KINDS"]

# ---------------------------------------------------------------- number words

_DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_MAX_CARDINAL_DIGITS = 15  # longer digit strings (card numbers, ids) are read digit by digit


def _digits(digits: str) -> str:
    """One word per digit: "042" -> "zero four two"."""
    return " ".join(_DIGIT_WORDS[int(d)] for d in digits if d.isascii() and d.isdigit())


def _american(words: str) -> str:
    """num2words writes British "one thousand, two hundred and five"; speech wants no commas, no "and"."""
    return words.replace(",", "").replace(" and ", " ")


@lru_cache(maxsize=4096)  # prose repeats its numbers; num2words is the slow part
def _cardinal(digits: str) -> str:
    """An integer as words; leading zeros ("007") and very long strings are read digit by digit."""
    digits = digits.replace(",", "")
    if len(digits) > _MAX_CARDINAL_DIGITS or (len(digits) > 1 and digits.startswith("0")):
        return _digits(digits)
    return _american(num2words(int(digits)))


@lru_cache(maxsize=4096)
def _ordinal(digits: str) -> str:
    digits = digits.replace(",", "")
    if len(digits) > _MAX_CARDINAL_DIGITS:
        return _digits(digits)
    return _american(num2words(int(digits), to="ordinal"))


def _decimal(number: str) -> str:
    """ "3.5" -> "three point five", ".25" -> "point two five" (the fraction digit by digit)."""
    whole, _, fraction = number.partition(".")
    head = _cardinal(whole) if whole else ""
    if not fraction:
        return head
    return f"{head} point {_digits(fraction)}".strip()


@lru_cache(maxsize=4096)
def _year(digits: str) -> str:
    """ "1999" -> "nineteen ninety-nine", "2024" -> "twenty twenty-four", "2005" -> "two thousand five"."""
    return _american(num2words(int(digits), to="year")).replace("oh-", "oh ")


def _plural_word(words: str) -> str:
    """The decade of a year's words: "nineteen ninety" -> "nineteen nineties"."""
    if words.endswith("y"):
        return words[:-1] + "ies"
    return words + "s"


# ---------------------------------------------------------------- shared patterns

_INT = r"(?:\d{1,3}(?:,\d{3})+|\d+)"  # 1,234,567 or 1234567
_NUM = rf"{_INT}(?:\.\d+)?"
_NO_DIGIT_BEFORE = r"(?<![\d.,])"
_NO_DIGIT_AFTER = r"(?![\d,]\d|\.\d|\d)"

_MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)
_MONTH_ABBREVIATIONS = {m[:3]: m for m in _MONTHS} | {"Sept": "September"}
_MONTH = r"(?:January|February|March|April|May|June|July|August|September|October|November|December" \
    r"|(?:Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sept|Sep|Oct|Nov|Dec)\.?)"


def _month_name(token: str) -> str:
    token = token.rstrip(".")
    return _MONTH_ABBREVIATIONS.get(token, token)


def _valid_day_month(day: int, month: int) -> bool:
    return 1 <= month <= 12 and 1 <= day <= 31


# ---------------------------------------------------------------- abbreviations

# abbreviation -> (spoken, can_end_sentence). When one that can end a sentence is followed by the end
# of the text or by a capitalised word, its period is kept so the synthesiser still pauses there.
_ABBREVIATIONS: dict[str, tuple[str, bool]] = {
    "Mr.": ("Mister", False), "Mrs.": ("Missus", False), "Ms.": ("Miz", False),
    "Prof.": ("Professor", False), "Gen.": ("General", False), "Capt.": ("Captain", False),
    "Lt.": ("Lieutenant", False), "Sgt.": ("Sergeant", False), "Gov.": ("Governor", False),
    "Sen.": ("Senator", False), "Mt.": ("Mount", False), "Ft.": ("Fort", False),
    "Jr.": ("Junior", True), "Sr.": ("Senior", True),
    "Ave.": ("Avenue", True), "Blvd.": ("Boulevard", True), "Rd.": ("Road", True), "Ln.": ("Lane", True),
    "Inc.": ("Incorporated", True), "Ltd.": ("Limited", True), "Corp.": ("Corporation", True),
    "Co.": ("Company", True), "Bros.": ("Brothers", True), "Dept.": ("Department", True),
    "Univ.": ("University", True), "Fig.": ("Figure", False), "Vol.": ("Volume", False),
    "etc.": ("et cetera", True), "e.g.": ("for example", False), "E.g.": ("For example", False),
    "i.e.": ("that is", False), "I.e.": ("That is", False), "a.k.a.": ("also known as", False),
    "vs.": ("versus", False), "approx.": ("approximately", False),
    "Mon.": ("Monday", True), "Tue.": ("Tuesday", True), "Tues.": ("Tuesday", True),
    "Wed.": ("Wednesday", True), "Thu.": ("Thursday", True), "Thurs.": ("Thursday", True),
    "Fri.": ("Friday", True), "Sat.": ("Saturday", True), "Sun.": ("Sunday", True),
} | {f"{short}.": (month, True) for short, month in _MONTH_ABBREVIATIONS.items() if short != "May"}

# any word with a period ("etc.", "e.g.", "Inc."), looked up in the table (faster than one big alternation)
_ABBREVIATION_RE = re.compile(r"(?<![\w.])((?:[A-Za-z]+\.)+)(?!\w)(?P<after>\s+(?=[A-Z])|\s*$)?")


def _abbreviation(match: re.Match[str]) -> str:
    if match.group(1) not in _ABBREVIATIONS:
        return match.group(0)
    spoken, can_end = _ABBREVIATIONS[match.group(1)]
    after = match.group("after")
    if after is None:
        return spoken
    return spoken + ("." if can_end else "") + after


# "St." is Saint before a name ("St. Louis") and Street after one ("Main St."); "Dr." likewise Doctor or
# Drive. A title comes first, so it wins when both read; a house number before the name means a street.
_STREET_AFTER_NUMBER_RE = re.compile(r"\b\d+\w*\s+(?:[A-Z]\w*\s+)+(St|Dr)\.(?P<after>\s+(?=[A-Z])|\s*$)?")
_TITLE_RE = re.compile(r"(?<![\w.])(St|Dr)\.\s*(?=[A-Z])")
_STREET_RE = re.compile(r"(?<=[A-Za-z])\s+(St|Dr)\.(?P<after>\s+(?=[A-Z])|\s*$)?")
_PLACE_WORDS = {"St": ("Saint", "Street"), "Dr": ("Doctor", "Drive")}


def _street(match: re.Match[str]) -> str:
    text = match.group(0)
    start = match.start(1) - match.start(0)
    after = match.group("after")
    word = _PLACE_WORDS[match.group(1)][1] + ("." + after if after is not None else "")
    return text[:start] + word


def _expand_abbreviations(text: str) -> str:
    text = _STREET_AFTER_NUMBER_RE.sub(_street, text)
    text = _TITLE_RE.sub(lambda m: _PLACE_WORDS[m.group(1)][0] + " ", text)
    text = _STREET_RE.sub(_street, text)
    text = _ABBREVIATION_RE.sub(_abbreviation, text)
    text = re.sub(r"\bvs\b", "versus", text)
    text = re.sub(r"\bNo\.\s*(?=\d)", "number ", text)
    return _DOTTED_INITIALS_RE.sub(_dotted_initials, text)


_DOTTED_INITIALS_RE = re.compile(r"(?<![\w.])((?:[A-Z]\.){2,})(?P<after>\s*$)?")


def _dotted_initials(match: re.Match[str]) -> str:
    """ "U.S.A." -> "U S A" (the final period kept only at the end of the text)."""
    letters = " ".join(match.group(1).replace(".", ""))
    return letters + ("." if match.group("after") is not None else "")


# ---------------------------------------------------------------- phones, dates, times

_PHONE_RE = re.compile(
    r"(?<![\w+])(?:(\+\d{1,3})[\s.-]?)?(?:\((\d{3})\)\s?|(\d{3})[\s.-])(\d{3})[\s.-](\d{4})(?![\w-])"
)
# A seven-digit local number ("636-3376"): read digit by digit, never as the range "636 to 3376".
_LOCAL_PHONE_RE = re.compile(r"(?<![\w+.,$€£¥₹-])(\d{3})-(\d{4})(?![\w-]|[.,]\d)")
_INTERNATIONAL_PHONE_RE = re.compile(r"(?<![\w+])\+(\d{1,3})((?:[\s.-]\d{2,4}){2,4})(?![\w-])")


def _phone(match: re.Match[str]) -> str:
    country, area_parens, area, exchange, line = match.groups()
    groups = [g for g in (country, area_parens or area, exchange, line) if g]
    return ", ".join(_telephone_group(g) for g in groups)


_RANGE_CUES = {"pages", "page", "pp", "from", "between", "years", "rows", "lines", "items", "ages", "aged"}


def _local_phone(match: re.Match[str]) -> str:
    before = match.string[:match.start()].split()
    if before and before[-1].lower().strip(".,:;(") in _RANGE_CUES:  # "pages 100-2000" stays a range
        return match.group(0)
    return f"{_digits(match.group(1))}, {_digits(match.group(2))}"


def _international_phone(match: re.Match[str]) -> str:
    groups = [match.group(1), *re.split(r"[\s.-]", match.group(2).strip(" .-"))]
    return "plus " + ", ".join(_digits(g) for g in groups if g)


def _telephone_group(group: str) -> str:
    return "plus " + _digits(group) if group.startswith("+") else _digits(group)


def _spoken_date(day: int | None, month: int | None, year: str | None, day_first: bool = False) -> str:
    """ "March fifth, twenty twenty-four", or "the fifth of March, ..." where the day is said first."""
    month_word = _MONTHS[month - 1] if month else ""
    year_word = _year(year) if year and len(year) == 4 else (_cardinal(year) if year else "")
    if day is None:
        return " ".join(w for w in (month_word, year_word) if w)
    day_word = _ordinal(str(day))
    head = f"the {day_word} of {month_word}" if day_first else f"{month_word} {day_word}"
    if not month:
        head = f"the {day_word}"
    return f"{head}, {year_word}" if year_word else head


_ISO_DATE_RE = re.compile(r"(?<![\w.-])(\d{4})-(\d{2})-(\d{2})(?![\w-])")
_SLASH_DATE_RE = re.compile(r"(?<![\w./])(\d{1,2})/(\d{1,2})/(\d{4}|\d{2})(?![\w/])")
_DOT_DATE_RE = re.compile(r"(?<![\w.])(\d{1,2})\.(\d{1,2})\.(\d{4})(?![\w.]\w|\w)")
_MONTH_DAY_RE = re.compile(rf"\b({_MONTH})\s+(\d{{1,2}})(?:st|nd|rd|th)?(?!\d)(?:,?\s+(\d{{4}}))?(?![\w:])")
_DAY_MONTH_RE = re.compile(rf"\b(\d{{1,2}})(?:st|nd|rd|th)?\s+(?:of\s+)?({_MONTH})(?:,?\s+(\d{{4}}))?(?!\w)")
_MONTH_YEAR_RE = re.compile(rf"\b({_MONTH})\s+(\d{{4}})(?![\w:])")


def _iso_date(match: re.Match[str]) -> str:
    year, month, day = match.group(1), int(match.group(2)), int(match.group(3))
    if not _valid_day_month(day, month):
        return match.group(0)
    return _spoken_date(day, month, year)


def _slash_date(match: re.Match[str]) -> str:
    """US order: 03/05/2024 is March fifth."""
    month, day, year = int(match.group(1)), int(match.group(2)), match.group(3)
    if not _valid_day_month(day, month):
        return match.group(0)
    return _spoken_date(day, month, year)


def _dot_date(match: re.Match[str]) -> str:
    """Dotted dates are European: 05.03.2024 is the fifth of March."""
    day, month, year = int(match.group(1)), int(match.group(2)), match.group(3)
    if not _valid_day_month(day, month):
        return match.group(0)
    return _spoken_date(day, month, year, day_first=True)


def _month_day(match: re.Match[str]) -> str:
    month = _MONTHS.index(_month_name(match.group(1))) + 1
    day = int(match.group(2))
    if not _valid_day_month(day, month):
        return match.group(0)
    return _spoken_date(day, month, match.group(3))


def _day_month(match: re.Match[str]) -> str:
    day = int(match.group(1))
    month = _MONTHS.index(_month_name(match.group(2))) + 1
    if not _valid_day_month(day, month):
        return match.group(0)
    return _spoken_date(day, month, match.group(3), day_first=True)


def _month_year(match: re.Match[str]) -> str:
    return f"{_month_name(match.group(1))} {_year(match.group(2))}"


def _expand_dates(text: str) -> str:
    text = _ISO_DATE_RE.sub(_iso_date, text)
    text = _SLASH_DATE_RE.sub(_slash_date, text)
    text = _DOT_DATE_RE.sub(_dot_date, text)
    text = _MONTH_DAY_RE.sub(_month_day, text)
    text = _DAY_MONTH_RE.sub(_day_month, text)
    return _MONTH_YEAR_RE.sub(_month_year, text)


_MERIDIEM = r"(?:\s*(?P<meridiem>[AaPp])\.?\s?[Mm]\.?(?![\w]))"
_CLOCK_RE = re.compile(rf"(?<![\w:.])(\d{{1,2}}):(\d{{2}})(?::(\d{{2}}))?(?:{_MERIDIEM}|(?![\w:]))")
_HOUR_MERIDIEM_RE = re.compile(rf"(?<![\w:.,])(\d{{1,2}}){_MERIDIEM}")


def _spoken_time(hour: int, minute: int, second: int | None, meridiem: str | None) -> str:
    """ "three thirty p m", "fifteen forty-five", "nine oh five", "seven o'clock"."""
    hour_word = _cardinal(str(hour))
    if minute == 0:
        if meridiem:
            spoken = hour_word
        elif hour > 12:
            spoken = f"{hour_word} hundred"
        else:
            spoken = f"{hour_word} o'clock"
    elif minute < 10:
        spoken = f"{hour_word} oh {_cardinal(str(minute))}"
    else:
        spoken = f"{hour_word} {_cardinal(str(minute))}"
    if second is not None:
        spoken += f" and {_cardinal(str(second))} seconds"
    if meridiem:
        spoken += " a m" if meridiem.lower() == "a" else " p m"
    return spoken


def _clock(match: re.Match[str]) -> str:
    hour, minute = int(match.group(1)), int(match.group(2))
    second = int(match.group(3)) if match.group(3) else None
    meridiem = match.group("meridiem")
    if hour > 24 or minute > 59 or (second is not None and second > 59) or (meridiem and hour > 12):
        return match.group(0)
    return _spoken_time(hour, minute, second, meridiem)


def _hour_meridiem(match: re.Match[str]) -> str:
    hour = int(match.group(1))
    if not 1 <= hour <= 12:
        return match.group(0)
    return _spoken_time(hour, 0, None, match.group("meridiem"))


# "10am-2pm", "9:00–17:00": the dash of a range of times is "to" (a bare "10-20" is left to the ranges)
_TIME_RANGE_RE = re.compile(
    r"(?<![\w:.])(\d{1,2}(?::\d{2})?(?:\s?[AaPp]\.?[Mm]\.?)?)\s?[-–—]\s?"
    r"(?=\d{1,2}(?::\d{2})?\s?[AaPp]\.?[Mm](?!\w)|\d{1,2}:\d{2})"
)


def _time_range(match: re.Match[str]) -> str:
    start = match.group(1)
    return start + " to " if (":" in start or start[-1].isalpha() or start[-1] == ".") else match.group(0)


def _expand_times(text: str) -> str:
    text = _TIME_RANGE_RE.sub(_time_range, text)
    text = _CLOCK_RE.sub(_clock, text)
    return _HOUR_MERIDIEM_RE.sub(_hour_meridiem, text)


# ---------------------------------------------------------------- money and percentages

# symbol or ISO code -> (unit, units, subunit, subunits); an empty subunit means none is spoken
_CURRENCIES: dict[str, tuple[str, str, str, str]] = {
    "$": ("dollar", "dollars", "cent", "cents"),
    "USD": ("dollar", "dollars", "cent", "cents"),
    "€": ("euro", "euros", "cent", "cents"),
    "EUR": ("euro", "euros", "cent", "cents"),
    "£": ("pound", "pounds", "penny", "pence"),
    "GBP": ("pound", "pounds", "penny", "pence"),
    "¥": ("yen", "yen", "", ""),
    "JPY": ("yen", "yen", "", ""),
    "₹": ("rupee", "rupees", "paisa", "paise"),
    "INR": ("rupee", "rupees", "paisa", "paise"),
    "CHF": ("franc", "francs", "centime", "centimes"),
    "CAD": ("Canadian dollar", "Canadian dollars", "cent", "cents"),
    "AUD": ("Australian dollar", "Australian dollars", "cent", "cents"),
}
_SCALES = {
    "thousand": "thousand", "million": "million", "billion": "billion", "trillion": "trillion",
    "k": "thousand", "K": "thousand", "m": "million", "M": "million", "mn": "million",
    "b": "billion", "B": "billion", "bn": "billion", "T": "trillion",
}
_SCALE = r"(?:\s?(?P<scale>thousand|million|billion|trillion|mn|bn|[kKmMbBT])(?![\w]))"
_SYMBOLS = r"[$€£¥₹]"
_CODES = "|".join(c for c in _CURRENCIES if c.isalpha())
_AMOUNT = rf"(?P<amount>{_NUM}){_NO_DIGIT_AFTER}{_SCALE}?"
_SYMBOL_MONEY_RE = re.compile(rf"(?P<sign>-)?(?P<cur>{_SYMBOLS})\s?{_AMOUNT}")
_CODE_BEFORE_RE = re.compile(rf"\b(?P<cur>{_CODES})\s?(?P<sign>-)?{_AMOUNT}")
_CODE_AFTER_RE = re.compile(
    rf"{_NO_DIGIT_BEFORE}(?P<sign>-)?{_AMOUNT}\s?(?P<cur>{_CODES})\b"
)


def _spoken_money(amount: str, currency: str, scale: str | None = None, negative: bool = False) -> str:
    """ "four dollars and fifty cents", "one point two million dollars", "ninety-nine cents"."""
    unit, units, subunit, subunits = _CURRENCIES[currency]
    amount = amount.replace(",", "")
    whole, _, fraction = amount.partition(".")
    sign = "minus " if negative else ""
    if scale:
        return f"{sign}{_decimal(amount)} {_SCALES[scale]} {units}"
    if fraction and (len(fraction) > 2 or not subunit):
        return f"{sign}{_decimal(amount)} {units}"
    cents = int(fraction.ljust(2, "0")) if fraction else 0
    dollars = int(whole) if whole else 0
    parts = []
    if dollars or not cents:
        parts.append(f"{_cardinal(whole or '0')} {unit if dollars == 1 else units}")
    if cents:
        parts.append(f"{_cardinal(str(cents))} {subunit if cents == 1 else subunits}")
    return sign + " and ".join(parts)


def _money(match: re.Match[str]) -> str:
    negative = bool(match.group("sign"))
    return _spoken_money(match.group("amount"), match.group("cur"), match.group("scale"), negative)


_PERCENT_RE = re.compile(rf"{_NO_DIGIT_BEFORE}(?P<sign>(?<![\w])-)?(?P<amount>{_NUM})\s?%")


def _percent(match: re.Match[str]) -> str:
    sign = "minus " if match.group("sign") else ""
    return f"{sign}{_decimal(match.group('amount').replace(',', ''))} percent"


# ---------------------------------------------------------------- ordinals, decades, units, ranges

_ORDINAL_RE = re.compile(rf"{_NO_DIGIT_BEFORE}\b({_INT})(?:st|nd|rd|th)\b")
_DECADE_RE = re.compile(r"(?<![\w'’])(?:['’](\d0)|(\d{2})?(\d0))s\b")


def _decade(match: re.Match[str]) -> str:
    short, century, tens = match.groups()
    if short:
        return _plural_word(_cardinal(short))
    if century:
        return _plural_word(_year(century + tens))
    return _plural_word(_cardinal(tens))


# unit -> (singular, plural); matched case-sensitively right after a number
_UNITS: dict[str, tuple[str, str]] = {
    "mm": ("millimeter", "millimeters"), "cm": ("centimeter", "centimeters"), "m": ("meter", "meters"),
    "km": ("kilometer", "kilometers"), "mi": ("mile", "miles"), "ft": ("foot", "feet"),
    "yd": ("yard", "yards"),
    "mg": ("milligram", "milligrams"), "g": ("gram", "grams"), "kg": ("kilogram", "kilograms"),
    "lb": ("pound", "pounds"), "lbs": ("pound", "pounds"), "oz": ("ounce", "ounces"),
    "ml": ("milliliter", "milliliters"), "mL": ("milliliter", "milliliters"), "l": ("liter", "liters"),
    "L": ("liter", "liters"), "ns": ("nanosecond", "nanoseconds"), "µs": ("microsecond", "microseconds"),
    "us": ("microsecond", "microseconds"), "ms": ("millisecond", "milliseconds"), "s": ("second", "seconds"),
    "sec": ("second", "seconds"), "min": ("minute", "minutes"), "h": ("hour", "hours"),
    "hr": ("hour", "hours"),
    "hrs": ("hour", "hours"), "Hz": ("hertz", "hertz"), "kHz": ("kilohertz", "kilohertz"),
    "MHz": ("megahertz", "megahertz"), "GHz": ("gigahertz", "gigahertz"), "B": ("byte", "bytes"),
    "KB": ("kilobyte", "kilobytes"), "kB": ("kilobyte", "kilobytes"), "MB": ("megabyte", "megabytes"),
    "GB": ("gigabyte", "gigabytes"), "TB": ("terabyte", "terabytes"), "KiB": ("kibibyte", "kibibytes"),
    "MiB": ("mebibyte", "mebibytes"), "GiB": ("gibibyte", "gibibytes"), "W": ("watt", "watts"),
    "kW": ("kilowatt", "kilowatts"), "kWh": ("kilowatt hour", "kilowatt hours"), "V": ("volt", "volts"),
    "mph": ("mile per hour", "miles per hour"), "km/h": ("kilometer per hour", "kilometers per hour"),
    "°C": ("degree Celsius", "degrees Celsius"), "°F": ("degree Fahrenheit", "degrees Fahrenheit"),
    "°": ("degree", "degrees"),
}
_UNIT_NAMES = "|".join(re.escape(u) for u in sorted(_UNITS, key=len, reverse=True))
# one-letter units ("5 m", "3 s") need the space: "5m" is as often five million as five meters
_UNIT_RE = re.compile(
    rf"{_NO_DIGIT_BEFORE}(?P<sign>(?<![\w])-)?(?P<amount>{_NUM}){_NO_DIGIT_AFTER}"
    rf"(?:\s(?P<spaced>{_UNIT_NAMES})|(?P<tight>(?!s\b|[mghlLBWV]\b){_UNIT_NAMES}))(?![\w/])"
)


def _unit(match: re.Match[str]) -> str:
    amount = match.group("amount").replace(",", "")
    singular, plural = _UNITS[match.group("spaced") or match.group("tight")]
    sign = "minus " if match.group("sign") else ""
    return f"{sign}{_decimal(amount)} {singular if amount == '1' else plural}"


# "10-20" is a range; "10 - 20" with spaces is arithmetic (left to the symbol rules: "minus")
_RANGE_RE = re.compile(rf"(?<![\d.,:])({_NUM})(?:-|\s?[–—]\s?)(?={_SYMBOLS}?\d)")

_FRACTIONS = {"1/2": "one half", "1/3": "one third", "2/3": "two thirds", "1/4": "one quarter",
              "3/4": "three quarters", "24/7": "twenty-four seven"}
_FRACTION_RE = re.compile(r"(?<![\w/.])(\d{1,3})/(\d{1,3})(?![\w/])")


_DATE_CUE_RE = re.compile(r"\b(?:on|by|until|till|since|from|before|after|due|dated)\s+$", re.IGNORECASE)


def _fraction(match: re.Match[str]) -> str:
    """ "3/4" -> "three quarters"; after a date word ("on 12/25") a month and day in US order."""
    numerator, denominator = match.group(1), match.group(2)
    if _DATE_CUE_RE.search(match.string, max(0, match.start() - 8), match.start()) \
            and _valid_day_month(int(denominator), int(numerator)):
        return _spoken_date(int(denominator), int(numerator), None)
    if match.group(0) in _FRACTIONS:
        return _FRACTIONS[match.group(0)]
    if 2 < int(denominator) <= 10 and int(numerator) > 0:
        ordinal = _ordinal(denominator)
        return f"{_cardinal(numerator)} {ordinal if numerator == '1' else _plural_word(ordinal)}"
    return f"{_cardinal(numerator)} over {_cardinal(denominator)}"


# ---------------------------------------------------------------- years and plain numbers

_YEAR_CUES = (
    "in", "since", "by", "from", "of", "until", "till", "before", "after", "during", "circa", "year",
    "around", "through", "early", "late", "mid", "spring", "summer", "autumn", "fall", "winter", "to",
    "and", "c.", "ca.",
)
_YEAR_RE = re.compile(r"(?<![\w.,$€£¥₹-])(1\d{3}|20\d\d)(?![\w%]|[.,]\d|:\d)")
_FISCAL_YEAR_RE = re.compile(r"\bFY\s?(\d{4})(?!\d)")
_CUE_BEFORE_RE = re.compile(
    r"(?:^|\W)(?:" + "|".join(re.escape(c) for c in _YEAR_CUES) + r"|Q[1-4])\s+$", re.IGNORECASE
)
_YEAR_AFTER_RE = re.compile(r"\s*(?:$|[.,;:!?)\]]|\s(?:BC|AD|BCE|CE)\b|\s+(?:to|and)\s+\d{4}\b)")


def _year_or_number(match: re.Match[str]) -> str:
    """A four-digit number reads as a year after a cue ("in 1999"), before punctuation, or alone."""
    text = match.string
    before = text[max(0, match.start() - 12):match.start()]
    if _CUE_BEFORE_RE.search(before) or _YEAR_AFTER_RE.match(text, match.end()):
        return _year(match.group(1))
    return _cardinal(match.group(1))


_VERSION_RE = re.compile(r"(?<![\d.])(\d+(?:\.\d+){2,})(?!\d|\.\d)")
_NEGATIVE_RE = re.compile(rf"(?<![\w.,)\]])-(?P<amount>{_NUM}|\.\d+)(?![\d])")
_NUMBER_RE = re.compile(rf"{_NO_DIGIT_BEFORE}(?:{_NUM}|\.\d+)")
_LEFTOVER_DIGITS_RE = re.compile(r"\d+")


def _padded(match: re.Match[str], words: str) -> str:
    """Words put where digits touched letters ("v2", "1e5") get spaces, so they stay words of their own."""
    text = match.string
    before = " " if match.start() > 0 and text[match.start() - 1].isalpha() else ""
    after = " " if match.end() < len(text) and text[match.end()].isalpha() else ""
    return before + words + after


def _version(match: re.Match[str]) -> str:
    return _padded(match, " point ".join(_cardinal(part) for part in match.group(1).split(".")))


def _number(match: re.Match[str]) -> str:
    return _padded(match, _decimal(match.group(0).replace(",", "")))


def _expand_numbers(text: str) -> str:
    text = _FISCAL_YEAR_RE.sub(lambda m: "F Y " + _year(m.group(1)), text)
    text = _YEAR_RE.sub(_year_or_number, text)
    text = _VERSION_RE.sub(_version, text)
    text = _NEGATIVE_RE.sub(lambda m: "minus " + _decimal(m.group("amount").replace(",", "")), text)
    text = _NUMBER_RE.sub(_number, text)
    return _LEFTOVER_DIGITS_RE.sub(lambda m: " " + _digits(m.group(0)) + " ", text)


# ---------------------------------------------------------------- acronyms

# Initialisms read as words stay as they are; SPELLED ones are always read letter by letter. For the
# rest: no vowel -> spelled ("HTML"); four letters or fewer -> spelled ("FBI"); longer, or next to another
# such all-capital word (shouting: "WATCH OUT") -> left as a word.
ACRONYMS_READ_AS_WORDS = frozenset({
    "NASA", "NATO", "UNESCO", "UNICEF", "OPEC", "FIFA", "NAFTA", "LASER", "RADAR", "SCUBA", "AIDS",
    "COVID", "GIF", "JPEG", "PIN", "ZIP", "SIM", "RAM", "ROM", "LAN", "WAN", "SWAT", "CAPTCHA", "ASCII",
    "YAML", "JSON", "TOML", "SARS", "NASDAQ", "FEMA", "DARPA", "IKEA", "LEGO", "OSHA", "ASAP", "POTUS",
    "WASP", "LOL", "SONAR", "CERN", "ESA", "MERS", "GUI", "WIFI", "I", "A",
})
ACRONYMS_SPELLED = frozenset({
    "FBI", "CIA", "USA", "UK", "US", "EU", "UN", "API", "AI", "IBM", "CEO", "CFO", "CTO", "TV", "PC",
    "CPU", "GPU", "URL", "ID", "IT", "IO", "OS", "IOU", "UFO", "EOF", "UI", "UX", "IEEE", "AWS", "BBC",
    "USB", "DIY", "FAQ",
})
_ACRONYM_RE = re.compile(r"(?<![\w'’])([A-Z]{2,})(s?)(?![\w'’])")
_VOWELS = set("AEIOU")


def _is_shouted_word(word: str) -> bool:
    return (word not in ACRONYMS_READ_AS_WORDS and word not in ACRONYMS_SPELLED and len(word) >= 2
            and word.isascii() and word.isupper() and word.isalpha() and bool(_VOWELS & set(word)))


def _neighbours_shout(text: str, start: int, end: int) -> bool:
    before = re.search(r"([A-Za-z]+)[ \t]+$", text[max(0, start - 40):start])
    after = re.match(r"[ \t]+([A-Za-z]+)", text[end:end + 40])
    return any(m is not None and _is_shouted_word(m.group(1)) for m in (before, after))


def _acronym(match: re.Match[str]) -> str:
    word, plural = match.group(1), match.group(2)
    if word == "OK" and not plural:
        return "okay"
    if word in ACRONYMS_READ_AS_WORDS:
        return match.group(0)
    spell = (word in ACRONYMS_SPELLED or not (_VOWELS & set(word))
             or (len(word) <= 4 and not _neighbours_shout(match.string, match.start(), match.end())))
    if not spell:
        return match.group(0)
    return " ".join(word) + ("'s" if plural else "")


# ---------------------------------------------------------------- symbols and whitespace

_EMAIL_RE = re.compile(r"(?<![\w.])([\w.+-]+)@([\w-]+(?:\.[\w-]+)+)")
_SYMBOL_WORDS = {"&": "and", "%": "percent", "+": "plus", "@": "at", "=": "equals", "°": "degrees",
                 "×": "times", "±": "plus or minus", "#": "hash"}
_SYMBOL_RE = re.compile("|".join(re.escape(s) for s in _SYMBOL_WORDS))
_SPACED_MINUS_RE = re.compile(r"(?<=\w)\s+-\s+(?=\w)")


def _email(match: re.Match[str]) -> str:
    user, domain = match.group(1), match.group(2)
    return f"{user.replace('.', ' dot ')} at {domain.replace('.', ' dot ')}"


def _expand_symbols(text: str) -> str:
    text = _EMAIL_RE.sub(_email, text)
    text = _SPACED_MINUS_RE.sub(" minus ", text)
    return _SYMBOL_RE.sub(lambda m: f" {_SYMBOL_WORDS[m.group(0)]} ", text)


def _tidy_whitespace(text: str) -> str:
    """A run of spaces becomes one, a run of line breaks one; no space before punctuation or at the ends."""
    text = re.sub(r"[^\S\n]+", " ", text)
    text = re.sub(r" ?\n[\s]*", "\n", text)
    text = re.sub(r" +(?=[,.;:!?])", "", text)
    return text.strip()


# ---------------------------------------------------------------- the pipeline

_Rule = Callable[[str], str]
_DIGIT_RULES: tuple[_Rule, ...] = (  # skipped for text without a digit (every second pass, most prose)
    lambda t: re.sub(r"#(?=\d)", "number ", t),
    lambda t: _INTERNATIONAL_PHONE_RE.sub(_international_phone, _PHONE_RE.sub(_phone, t)),
    lambda t: _LOCAL_PHONE_RE.sub(_local_phone, t),
    _expand_dates,
    _expand_times,
    lambda t: _RANGE_RE.sub(lambda m: m.group(1) + " to ", t),
    lambda t: _SYMBOL_MONEY_RE.sub(_money, t),
    lambda t: _CODE_BEFORE_RE.sub(_money, _CODE_AFTER_RE.sub(_money, t)),
    lambda t: _PERCENT_RE.sub(_percent, t),
    lambda t: _DECADE_RE.sub(_decade, t),
    lambda t: _ORDINAL_RE.sub(lambda m: _ordinal(m.group(1)), t),
    lambda t: _UNIT_RE.sub(_unit, t),
    lambda t: _FRACTION_RE.sub(_fraction, t),
    _expand_numbers,
)
_ANY_DIGIT_RE = re.compile(r"\d")


_MAX_PASSES = 4


def _one_pass(text: str) -> str:
    text = _expand_abbreviations(_tidy_whitespace(text))
    if _ANY_DIGIT_RE.search(text):
        for rule in _DIGIT_RULES:
            text = rule(text)
    text = _ACRONYM_RE.sub(_acronym, text)
    return _tidy_whitespace(_expand_symbols(text))


def normalize_text(text: str) -> str:
    """English text as it should be spoken: no digits, symbols or abbreviations left for the voice to guess.

    The rules run again on their own output until it no longer changes (text runs together in odd input,
    "1999vs" or "&St.", only shows its abbreviation once the number or symbol beside it is words)."""
    for _ in range(_MAX_PASSES):
        spoken = _one_pass(text)
        if spoken == text:
            break
        text = spoken
    return text


# ---------------------------------------------------------------- SSML <say-as>

_NUMBER_ONLY_RE = re.compile(rf"\s*(-)?\s*({_NUM}|\.\d+)\s*")
_CHARACTER_NAMES = {"-": "dash", "_": "underscore", ".": "dot", "@": "at", "/": "slash", "+": "plus",
                    "#": "hash", "&": "and", ",": "comma", ":": "colon"}


def _say_cardinal(text: str, format: str | None) -> str:
    match = _NUMBER_ONLY_RE.fullmatch(text)
    if not match:
        return normalize_text(text)
    return ("minus " if match.group(1) else "") + _decimal(match.group(2).replace(",", ""))


def _say_ordinal(text: str, format: str | None) -> str:
    match = re.fullmatch(rf"\s*({_INT})(?:st|nd|rd|th)?\s*", text)
    return _ordinal(match.group(1)) if match else normalize_text(text)


def _say_characters(text: str, format: str | None) -> str:
    words = []
    for char in text:
        if char.isascii() and char.isdigit():
            words.append(_DIGIT_WORDS[int(char)])
        elif char.isalpha():
            words.append(char.upper())
        elif char in _CHARACTER_NAMES:
            words.append(_CHARACTER_NAMES[char])
    return " ".join(words)


def _say_digits(text: str, format: str | None) -> str:
    return _digits(text) or normalize_text(text)


_DATE_FORMATS = ("mdy", "dmy", "ymd", "ydm", "md", "dm", "ym", "my", "y", "m", "d")


def _month_number(field: str) -> int | None:
    """A month field: "3", "03", "Mar", "March" -> 3; None when it is none of those."""
    if field.isascii() and field.isdigit():
        return int(field)
    name = _month_name(field.capitalize())
    return _MONTHS.index(name) + 1 if name in _MONTHS else None


def _say_date(text: str, format: str | None) -> str:
    """A date in the given field order, "mdy" when none: "03/05/2024" -> "March fifth, twenty twenty-four"."""
    order = (format or "").lower() or ("ymd" if re.match(r"\s*\d{4}\D", text) else "mdy")
    if order not in _DATE_FORMATS:
        formats = ", ".join(_DATE_FORMATS)
        raise ValueError(f"say-as date format {format!r} is not supported; use one of: {formats}")
    fields = [f for f in re.split(r"[\s/.,-]+", text.strip()) if f]
    if len(fields) != len(order):
        return normalize_text(text)
    values = dict(zip(order, fields, strict=True))
    day_field, year = values.get("d"), values.get("y")
    month = _month_number(values["m"]) if "m" in values else None
    day = int(day_field) if day_field is not None and day_field.isascii() and day_field.isdigit() else None
    fits = ((year is None or (year.isascii() and year.isdigit()))
            and ("m" not in values or (month is not None and 1 <= month <= 12))
            and ("d" not in values or (day is not None and 1 <= day <= 31)))
    if not fits:
        return normalize_text(text)
    if day is None and month is None:
        return _year(year) if len(year) == 4 else _cardinal(year)
    return _spoken_date(day, month, year, day_first=order.startswith("d"))


def _say_time(text: str, format: str | None) -> str:
    stripped = text.strip()
    match = _CLOCK_RE.fullmatch(stripped)
    if match:
        return _clock(match)
    match = _HOUR_MERIDIEM_RE.fullmatch(stripped)
    return _hour_meridiem(match) if match else normalize_text(text)


def _say_telephone(text: str, format: str | None) -> str:
    groups = re.findall(r"\+?\d+", text)
    if not groups:
        return normalize_text(text)
    return ", ".join(_telephone_group(g) for g in groups)


def _say_currency(text: str, format: str | None) -> str:
    """ "$4.50" or "4.50 USD"; a bare amount takes its currency from format (an ISO code), else dollars."""
    stripped = text.strip()
    for pattern in (_SYMBOL_MONEY_RE, _CODE_BEFORE_RE, _CODE_AFTER_RE):
        match = pattern.fullmatch(stripped)
        if match:
            return _money(match)
    match = _NUMBER_ONLY_RE.fullmatch(stripped)
    currency = (format or "USD").upper()
    if not match or currency not in _CURRENCIES:
        return normalize_text(text)
    return _spoken_money(match.group(2), currency, negative=bool(match.group(1)))


_SAY_AS: dict[str, Callable[[str, str | None], str]] = {
    "cardinal": _say_cardinal, "number": _say_cardinal, "ordinal": _say_ordinal,
    "characters": _say_characters, "spell-out": _say_characters, "letters": _say_characters,
    "verbatim": _say_characters, "digits": _say_digits, "date": _say_date, "time": _say_time,
    "telephone": _say_telephone, "currency": _say_currency,
}
SAY_AS_KINDS = tuple(sorted(_SAY_AS))


def say_as(text: str, interpret_as: str, format: str | None = None) -> str:
    """The words for SSML `<say-as interpret-as=... format=...>text</say-as>`; content that does not fit the
    kind is read by `normalize_text`. An unknown interpret_as is a ValueError (the speech endpoint's 400)."""
    kind = _SAY_AS.get(interpret_as.strip().lower())
    if kind is None:
        kinds = ", ".join(SAY_AS_KINDS)
        raise ValueError(f"say-as interpret-as {interpret_as!r} is not supported; use one of: {kinds}")
    return kind(text, format)
