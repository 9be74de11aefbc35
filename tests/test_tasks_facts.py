import random
import re

from fleetlm.tasks import facts


def _index(docs):
    """Rebuild the world from the documents' text alone, as an independent oracle."""
    person, city, company = {}, {}, {}
    for d in docs:
        person_re = r"(.+) lives in (\w+)\. \1 works at (.+) as a (\w+)\. \1 is (\d+) years old\."
        if m := re.fullmatch(person_re, d["text"]):
            person[m[1]] = {"city": m[2], "employer": m[3], "job": m[4], "age": m[5]}
        elif m := re.fullmatch(r"(\w+) is a city in (\w+)\.", d["text"]):
            city[m[1]] = m[2]
        elif m := re.fullmatch(r"(.+) is a (\w+) company based in (\w+), founded in (\d+)\.", d["text"]):
            company[m[1]] = {"industry": m[2], "city": m[3], "founded": m[4]}
        else:
            raise AssertionError(d)
    return person, city, company


def _answer(question, person, city, company):
    for p, f in person.items():
        if p in question:
            if "employer based" in question:
                return company[f["employer"]]["city"]
            if "country" in question:
                return city[f["city"]]
            if "live" in question:
                return f["city"]
            if "work" in question or "employs" in question:
                return f["employer"]
            if "job" in question or "for a living" in question:
                return f["job"]
            return f["age"]
    for c, f in company.items():
        if c in question:
            if "founded" in question:
                return f["founded"]
            return f["industry"] if "industry" in question else f["city"]
    for c, country in city.items():
        if re.search(rf"\b{c}\b", question):
            return country
    raise AssertionError(question)


def test_gold_answers_agree_with_the_exported_documents():
    for level in facts.LEVELS:
        oracle = _index(facts.documents(0, level))
        rng = random.Random(level)
        for _ in range(200):
            t = facts.generate(rng, level)
            assert t.answer == _answer(t.question, *oracle), t.question


def test_world_is_deterministic_nested_and_grows_with_level():
    assert facts.documents(3, 4) == facts.documents(3, 4)
    assert facts.documents(3, 4) != facts.documents(4, 4)
    sizes = [facts.build_world(0, lv).facts() for lv in facts.LEVELS]
    assert all(b > 1.5 * a for a, b in zip(sizes, sizes[1:], strict=False)), sizes
    small, big = facts.build_world(0, 2), facts.build_world(0, 6)
    assert big.people[: len(small.people)] == small.people
    assert set(small.cities) <= set(big.cities) and set(small.companies) <= set(big.companies)
    names = [p.name for p in big.people] + [c.name for c in big.cities] + [c.name for c in big.companies]
    assert len(names) == len(set(names))


def test_world_is_closed_and_questions_stay_inside_their_level():
    for level in facts.LEVELS:
        w = facts.build_world(0, level)
        cities, companies = {c.name for c in w.cities}, {c.name for c in w.companies}
        assert {p.city for p in w.people} <= cities and {p.employer for p in w.people} <= companies
        assert {c.city for c in w.companies} <= cities
        names = {p.name for p in w.people} | cities | companies
        rng = random.Random(0)
        for _ in range(50):
            q = facts.generate(rng, level).question
            assert any(n in q for n in names)


def test_every_relation_is_asked_in_more_than_one_wording_or_as_a_join():
    rng = random.Random(1)
    by_kind: dict[str, set[str]] = {}
    for _ in range(3000):
        t = facts.generate(rng, 6)
        by_kind.setdefault(t.kind, set()).add(re.sub(r"[A-Z][a-z]+( [A-Z][a-z]+)?", "X", t.question))
    assert len(by_kind) == 10
    assert all(len(v) >= 2 for k, v in by_kind.items() if k not in ("person_country", "employer_city"))
