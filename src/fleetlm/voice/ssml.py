"""The SSML subset: input that starts with `<speak>` parsed into segments (text, words, phonemes, breaks).

Supported: `<speak>`, `<p>` and `<s>` (a sentence pause), `<phoneme alphabet="ipa" ph="...">`,
`<say-as interpret-as="cardinal|ordinal|characters|spell-out|date|time|telephone|currency" format="...">`,
`<break time="500ms|1.5s"/>` or `<break strength="none..x-strong"/>`, `<sub alias="...">`. Anything else is
an SsmlError (a 400 at the gateway) rather than silently spoken markup. Text that does not start with
`<speak>` is plain text, whatever `<` it holds.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Literal

from fleetlm.errors import FleetError

SegmentKind = Literal["text", "words", "phonemes", "break"]
ELEMENTS = ("speak", "p", "s", "break", "phoneme", "say-as", "sub")
# The kinds the issue asks for; the normaliser (normalize.say_as) may know more and judges the kind itself.
SAY_AS_KINDS = ("cardinal", "ordinal", "characters", "spell-out", "date", "time", "telephone", "currency")
# Pauses per SSML 1.1's strength names, in seconds (the spec leaves the values to the engine).
BREAK_STRENGTHS = {"none": 0.0, "x-weak": 0.1, "weak": 0.25, "medium": 0.4, "strong": 0.6, "x-strong": 1.0}
MAX_BREAK_S = 10.0
SENTENCE_PAUSE_S = 0.3
_TIME = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s)\s*$")


class SsmlError(FleetError):
    """Malformed or unsupported SSML: the parser's message, or what is not in the subset."""


@dataclass(frozen=True)
class Segment:
    """A piece of input: `text` (goes through lexicon and normaliser), `words` (spoken as written),
    `phonemes` (espeak-ng IPA, spoken as given) or `break` (`seconds` of silence)."""

    kind: SegmentKind
    value: str = ""
    seconds: float = 0.0


def is_ssml(text: str) -> bool:
    """Input that starts with <speak> (or an XML declaration or DOCTYPE before it, to be refused)."""
    head = text.lstrip()[:9].lower()
    return head.startswith(("<speak", "<?xml", "<!doctype"))


def parse_input(text: str) -> list[Segment]:
    """Plain text as one text segment; SSML as its segments."""
    return parse_ssml(text) if is_ssml(text) else [Segment("text", text)]


def parse_ssml(text: str) -> list[Segment]:
    # No DTD may be declared, so no entity can be defined or expanded (billion laughs, external files).
    if re.search(r"<!(DOCTYPE|ENTITY)", text, re.IGNORECASE):
        raise SsmlError("SSML may not declare a DOCTYPE or entities")
    try:
        root = ET.fromstring(text.strip())
    except ET.ParseError as exc:
        raise SsmlError(f"malformed SSML: {exc}") from None
    if _local(root.tag) != "speak":
        raise SsmlError("SSML must have <speak> as its root element")
    segments: list[Segment] = []
    _walk(root, segments)
    return [s for s in segments if s.kind == "break" or s.value]


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]  # the SSML namespace, if declared, is ignored


def _walk(el: ET.Element, out: list[Segment]) -> None:
    if el.text:
        out.append(Segment("text", el.text))
    for child in el:
        _element(child, out)
        if child.tail:
            out.append(Segment("text", child.tail))


def _element(el: ET.Element, out: list[Segment]) -> None:
    tag = _local(el.tag)
    inner = "".join(el.itertext())
    if tag in ("p", "s"):
        _walk(el, out)
        out.append(Segment("break", seconds=SENTENCE_PAUSE_S))
    elif tag == "break":
        out.append(Segment("break", seconds=_break_seconds(el)))
    elif tag == "phoneme":
        alphabet = el.get("alphabet", "ipa")
        if alphabet != "ipa":
            raise SsmlError(f'<phoneme alphabet="{alphabet}">: only alphabet="ipa" (espeak-ng IPA) works')
        ph = el.get("ph")
        if not ph or not ph.strip():
            raise SsmlError("<phoneme> needs a ph attribute")
        out.append(Segment("phonemes", ph.strip()))
    elif tag == "say-as":
        kind = el.get("interpret-as", "")
        out.append(Segment("words", _say_as(inner, kind, el.get("format"))))
    elif tag == "sub":
        alias = el.get("alias")
        if alias is None:
            raise SsmlError("<sub> needs an alias attribute")
        out.append(Segment("words", alias))
    else:
        raise SsmlError(f"unsupported SSML element <{tag}>; the subset is: {', '.join(ELEMENTS)}")


def _break_seconds(el: ET.Element) -> float:
    time = el.get("time")
    if time is not None:
        m = _TIME.match(time)
        if m is None:
            raise SsmlError(f'<break time="{time}">: write a duration like "500ms" or "1.5s"')
        seconds = float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)
        if seconds > MAX_BREAK_S:
            raise SsmlError(f'<break time="{time}">: at most {MAX_BREAK_S:g}s')
        return seconds
    strength = el.get("strength", "medium")
    if strength not in BREAK_STRENGTHS:
        raise SsmlError(f'<break strength="{strength}">: use one of {", ".join(BREAK_STRENGTHS)}')
    return BREAK_STRENGTHS[strength]


def _say_as(text: str, kind: str, fmt: str | None) -> str:
    """The words for one <say-as>, from the text normaliser (helper module normalize.py)."""
    try:
        from fleetlm.voice.normalize import say_as
    except ImportError:  # the normaliser is not there yet: letters are still spelled, the rest kept
        if kind not in SAY_AS_KINDS:
            raise SsmlError(f'<say-as interpret-as="{kind}">: use one of {", ".join(SAY_AS_KINDS)}') from None
        return " ".join(c for c in text if not c.isspace()) if kind in ("characters", "spell-out") else text
    try:
        return say_as(text.strip(), kind, fmt)
    except ValueError as exc:  # e.g. a date the format does not fit
        raise SsmlError(f'<say-as interpret-as="{kind}">: {exc}') from None
