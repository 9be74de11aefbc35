"""Questions about a synthetic world of people, cities and companies; level = how many facts it holds.

The world is drawn from its own `world_seed`, independent of the sampling seed, so that a test set drawn
with a fresh seed asks about the same world the training set taught. Worlds are nested: the level-l world
is the first `PEOPLE[l]` people (and their cities and companies) of one large world, so a fact learnt at
level 1 stays true at level 6.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

from fleetlm.tasks.base import Task

DOMAIN = "facts"
LEVELS = (1, 2, 3, 4, 5, 6)
PEOPLE = {1: 4, 2: 8, 3: 16, 4: 32, 5: 64, 6: 128}
JOBS = ("baker pilot nurse teacher farmer painter lawyer chef singer doctor miner tailor "
        "judge sailor poet clerk").split()
INDUSTRIES = ("steel", "shipping", "software", "textiles", "banking", "mining", "farming", "media")
CONSONANTS, VOWELS = "bdfgklmnprstvz", "aeiou"


@dataclass(frozen=True)
class City:
    name: str
    country: str


@dataclass(frozen=True)
class Company:
    name: str
    city: str
    industry: str
    founded: int


@dataclass(frozen=True)
class Person:
    name: str
    city: str
    employer: str
    job: str
    age: int


@dataclass(frozen=True)
class World:
    people: tuple[Person, ...]
    cities: tuple[City, ...]
    companies: tuple[Company, ...]

    def facts(self) -> int:
        # Four facts per person, one per city (its country), three per company.
        return 4 * len(self.people) + len(self.cities) + 3 * len(self.companies)


def _name(rng: random.Random, syllables: int, taken: set[str]) -> str:
    while True:
        name = "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(syllables)).capitalize()
        if name not in taken:
            taken.add(name)
            return name


@functools.lru_cache(maxsize=32)
def build_world(world_seed: int = 0, level: int = max(LEVELS)) -> World:
    """The level's slice of the world drawn from `world_seed` (cached: generation asks often)."""
    rng = random.Random(f"world:{world_seed}")
    n_people = PEOPLE[max(LEVELS)]
    taken: set[str] = set()
    countries = [_name(rng, 3, taken) for _ in range(8)]
    cities = [City(_name(rng, 2, taken), rng.choice(countries)) for _ in range(n_people // 4)]
    companies = [Company(_name(rng, 3, taken) + " Co", rng.choice(cities).name, rng.choice(INDUSTRIES),
                         rng.randint(1850, 2020)) for _ in range(n_people // 4)]
    people = []
    for i in range(n_people):
        # Person i draws from the first i // 4 + 2 cities and companies, so a small (early) slice of the
        # world also has few places and firms: its fact count grows with the number of people.
        name = f"{_name(rng, 2, taken)} {_name(rng, 2, taken)}"
        city = cities[rng.randrange(min(len(cities), i // 4 + 2))].name
        employer = companies[rng.randrange(min(len(companies), i // 4 + 2))].name
        people.append(Person(name, city, employer, rng.choice(JOBS), rng.randint(18, 80)))
    n = PEOPLE[level]
    used_cities = {p.city for p in people[:n]}
    used_companies = {p.employer for p in people[:n]}
    kept_companies = tuple(c for c in companies if c.name in used_companies)
    used_cities |= {c.city for c in kept_companies}
    return World(tuple(people[:n]), tuple(c for c in cities if c.name in used_cities), kept_companies)


def _questions(world: World, rng: random.Random) -> tuple[str, str, str]:
    """One (kind, question, answer), with several phrasings per relation so that a fact seen in training
    can be asked in another wording at test time."""
    city_of = {c.name: c for c in world.cities}
    company_of = {c.name: c for c in world.companies}
    kind = rng.choice(("city", "employer", "job", "age", "country", "hq", "founded", "industry",
                       "person_country", "employer_city"))
    if kind in ("country",):
        c = rng.choice(world.cities)
        q = rng.choice(("Which country is {c} in?", "{c} is in which country?"))
        return kind, q.format(c=c.name), c.country
    if kind in ("hq", "founded", "industry"):
        co = rng.choice(world.companies)
        if kind == "hq":
            q, a = rng.choice(("Where is {co} based?", "Which city is {co} based in?")), co.city
        elif kind == "founded":
            q, a = rng.choice(("When was {co} founded?", "What year was {co} founded?")), str(co.founded)
        else:
            q, a = rng.choice(("What industry is {co} in?", "{co} works in which industry?")), co.industry
        return kind, q.format(co=co.name), a
    p = rng.choice(world.people)
    templates = {
        "city": (("Where does {p} live?", "Which city does {p} live in?"), p.city),
        "employer": (("Where does {p} work?", "Which company employs {p}?"), p.employer),
        "job": (("What is {p}'s job?", "What does {p} do for a living?"), p.job),
        "age": (("How old is {p}?", "What age is {p}?"), str(p.age)),
        # Two-hop questions: the answer joins two facts.
        "person_country": (("Which country does {p} live in?",), city_of[p.city].country),
        "employer_city": (("Where is {p}'s employer based?",), company_of[p.employer].city),
    }
    phrasings, answer = templates[kind]
    return kind, rng.choice(phrasings).format(p=p.name), answer


def generate(rng: random.Random, level: int, world_seed: int = 0) -> Task:
    kind, question, answer = _questions(build_world(world_seed, level), rng)
    return Task(DOMAIN, level, kind, question, answer, "text")


def documents(world_seed: int = 0, level: int = max(LEVELS)) -> list[dict[str, str]]:
    """The world's facts as a small document collection, one document per entity, for retrieval."""
    world = build_world(world_seed, level)
    docs = [{"id": f"person-{i}", "title": p.name,
             "text": f"{p.name} lives in {p.city}. {p.name} works at {p.employer} as a {p.job}. "
                     f"{p.name} is {p.age} years old."} for i, p in enumerate(world.people)]
    docs += [{"id": f"city-{i}", "title": c.name, "text": f"{c.name} is a city in {c.country}."}
             for i, c in enumerate(world.cities)]
    docs += [{"id": f"company-{i}", "title": c.name,
              "text": f"{c.name} is a {c.industry} company based in {c.city}, founded in {c.founded}."}
             for i, c in enumerate(world.companies)]
    return docs
