"""The flywheel's domain: contact extraction, a message in, one fixed JSON object out, checkable exactly.

A narrow task on purpose: a 135M model can plausibly learn from a 1.5B teacher to copy three fields out of a
short message into a fixed form. Items are drawn from a seed; each item's split (train, dev, test) is a hash
of its message, so however many are drawn and whatever the seed, a held-out (test) message can never be a
training one. `matches` recognises the domain's prompts in logged traffic (by the instruction they carry),
`parse` reads a model's answer (a JSON object, code fences and chatter around it allowed), `score` compares
it with the gold or with a reference answer.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from typing import Any

from fleetlm.errors import FleetError

DOMAIN = "contacts"
FIELDS = ("name", "email", "city")
INSTRUCTION = ('Extract the contact from the message. Answer with JSON only, exactly '
               '{"name": ..., "email": ..., "city": ...}.')
SPLIT_SHARES = (("train", 0.7), ("dev", 0.15))  # the rest is test: held out, never trained or fitted on

FIRST = ("Ana", "Ben", "Chloe", "Dmitri", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kofi", "Lena",
         "Mateo", "Nadia", "Oscar", "Priya", "Quentin", "Rosa", "Samir", "Tara", "Ugo", "Vera", "Wei",
         "Ximena", "Yusuf", "Zoe", "Amara", "Bruno", "Carmen", "Diego", "Emeka", "Freya", "Goran", "Hana")
LAST = ("Alvarez", "Brandt", "Costa", "Dubois", "Eriksen", "Fischer", "Garcia", "Haddad", "Ivanova", "Jensen",
        "Kowalski", "Lindqvist", "Moreau", "Nakamura", "Okafor", "Petrov", "Quinn", "Rossi", "Schmidt",
        "Tanaka", "Ueda", "Varga", "Weber", "Xu", "Yilmaz", "Zhang", "Novak", "Silva", "Kim", "Murphy")
CITIES = ("Lisbon", "Berlin", "Osaka", "Nairobi", "Toronto", "Lyon", "Krakow", "Austin", "Bergen", "Porto",
          "Seoul", "Lagos", "Denver", "Valencia", "Gdansk", "Leeds", "Turin", "Hamburg", "Quito", "Perth",
          "San Diego", "Rio de Janeiro", "Cape Town", "Buenos Aires", "New Orleans", "Salt Lake City",
          "Kuala Lumpur", "Tel Aviv", "Mexico City", "Hong Kong")
DOMAINS = ("example.com", "mail.org", "post.net", "inbox.io", "acme.co", "corp.dev")
TEMPLATES = (
    "Hi, I'm {name} from {city}. You can reach me at {email}.",
    "Please add {name} ({email}), based in {city}, to the list.",
    "New signup: {email} - {name}, {city}.",
    "The address {email} belongs to {name}, who lives in {city}.",
    "From: {name} <{email}>\nLocation: {city}\nSubject: invoice question",
    "Our {city} office contact is {name}; write to {email}.",
    "Could someone call back {name} in {city}? Their email is {email}.",
    "{name} moved to {city} last year and now uses {email} for everything.",
    "Ticket opened by {email} ({name}) from the {city} branch.",
    "Name: {name}\nEmail: {email}\nCity: {city}",
    "I met {name} at the {city} conference; follow up at {email}.",
    "Shipping to {city}. Recipient {name}, notify {email} on delivery.",
)


class DomainError(FleetError):
    """An unknown domain or a request for more items than the domain can draw."""


@dataclass(frozen=True)
class Item:
    id: str
    split: str
    message: str
    gold: dict[str, str]

    @property
    def prompt(self) -> str:
        return f"{INSTRUCTION}\n\nMessage: {self.message}"

    @property
    def answer(self) -> str:
        return json.dumps(self.gold)

    def record(self) -> dict[str, Any]:
        """Chat JSONL as `fleet tasks generate` writes it: messages (the user turn) and the gold answer."""
        return {"id": self.id, "domain": DOMAIN, "split": self.split,
                "messages": [{"role": "user", "content": self.prompt}], "answer": self.answer}


def split_of(message: str) -> str:
    u = int.from_bytes(hashlib.sha256(f"{DOMAIN}\n{message}".encode()).digest()[:8], "big") / 2**64
    edge = 0.0
    for split, share in SPLIT_SHARES:
        edge += share
        if u < edge:
            return split
    return "test"


def _email(rng: random.Random, first: str, last: str) -> str:
    user = rng.choice((f"{first}.{last}", f"{first[0]}{last}", f"{first}_{last}{rng.randint(1, 99)}",
                       f"{last}.{first[0]}"))
    return f"{user.lower()}@{rng.choice(DOMAINS)}"


def draw(rng: random.Random) -> Item:
    first, last = rng.choice(FIRST), rng.choice(LAST)
    gold = {"name": f"{first} {last}", "email": _email(rng, first, last), "city": rng.choice(CITIES)}
    message = rng.choice(TEMPLATES).format(**gold)
    return Item(f"{DOMAIN}-{hashlib.sha256(message.encode()).hexdigest()[:12]}", split_of(message), message,
                gold)


def generate(split: str, n: int, seed: int = 0) -> list[Item]:
    """n distinct items of one split, drawn from a seed (the same seed and n give the same items)."""
    if split not in ("train", "dev", "test"):
        raise DomainError(f"unknown split {split!r}: train, dev or test")
    rng, seen, out = random.Random(f"{DOMAIN}:{seed}"), set(), []
    for _ in range(200 * n + 1000):
        item = draw(rng)
        if item.split == split and item.message not in seen:
            seen.add(item.message)
            out.append(item)
            if len(out) == n:
                return out
    raise DomainError(f"could not draw {n} distinct {split} items")


def matches(prompt: str) -> bool:
    """Whether a logged user prompt is one of this domain's requests."""
    return prompt.startswith(INSTRUCTION)


def message_of(prompt: str) -> str:
    return prompt.removeprefix(INSTRUCTION).strip().removeprefix("Message:").strip()


_OBJECT = re.compile(r"\{.*?\}", re.DOTALL)


def parse(answer: str) -> dict[str, str] | None:
    """The first JSON object in the answer with exactly the domain's fields as strings, else None."""
    for m in _OBJECT.finditer(answer or ""):
        try:
            obj = json.loads(m.group(0))
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and set(obj) == set(FIELDS) and all(isinstance(obj[f], str) for f in FIELDS):
            return {f: obj[f].strip() for f in FIELDS}
    return None


def score(answer: str, reference: dict[str, str] | str | None) -> float:
    """1.0 when the answer's fields equal the reference's (gold dict, or another model's answer text)."""
    ref = parse(reference) if isinstance(reference, str) else reference
    got = parse(answer)
    return float(ref is not None and got is not None and got == ref)


def domain_module(name: str):
    """The domain by name (one today; the flywheel's commands take --domain so that more can join)."""
    import sys

    if name != DOMAIN:
        raise DomainError(f"unknown flywheel domain {name!r}; known: {DOMAIN}")
    return sys.modules[__name__]
