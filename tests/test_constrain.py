import json
import random
import string
import time

import jsonschema
import pytest
import torch
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers

from fleetlm.engine import Engine, GenerationRequest
from fleetlm.engine.constrain import (
    Constraint,
    ConstraintError,
    GrammarConstraint,
    apply_constraints,
    close_objects,
    json_object_grammar,
    json_schema_grammar,
    lark_grammar,
)
from fleetlm.model import SHIPPED_TINY_MODEL
from fleetlm.model.tokenizer import Tokenizer

# Every kind the gateway promises: types, properties, required, enums, arrays, nested objects, closed objects.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "height": {"type": "number"},
        "member": {"type": "boolean"},
        "nothing": {"type": "null"},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "integer"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "color", "address"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine():
    return Engine.load(SHIPPED_TINY_MODEL, dtype="f32")


@pytest.fixture(scope="module")
def big_tokenizer():
    """A 32k-token byte-level BPE vocabulary (random multi-character tokens), built in a split second."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    rnd = random.Random(0)
    chars = string.ascii_letters + string.digits + ' "{}[]:,.-_\\'
    while len(vocab) < 32_000:
        word = "".join(rnd.choice(chars) for _ in range(rnd.randint(2, 8))).replace(" ", "\u0120")
        vocab.setdefault(word, len(vocab))
    backend = Backend(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<eos>"])
    return Tokenizer(backend, {"eos_token": "<eos>"})


def random_walk(constraint: GrammarConstraint, seed: int, limit: int) -> list[int]:
    """Pick uniformly among the allowed tokens, as a model with flat logits at temperature 1 would."""
    rnd, out = random.Random(seed), []
    for _ in range(limit):
        if constraint.is_done():
            break
        ids = constraint.allowed().nonzero().flatten().tolist()
        token = rnd.choice(ids)
        constraint.advance(token)
        if token in constraint.vocab.eos_ids:
            break
        out.append(token)
    return out


def test_the_protocol_is_what_the_loops_expect(engine):
    c = GrammarConstraint(json_object_grammar(), engine.tokenizer, max_tokens=16)
    assert isinstance(c, Constraint)
    mask = c.allowed()
    assert mask.dtype == torch.bool and mask.shape == (engine.tokenizer.vocab_size,)
    first = [engine.tokenizer.decode([i]) for i in mask.nonzero().flatten().tolist()]
    assert first and all(t.startswith("{") for t in first)  # an object starts with a brace, nothing else


@pytest.mark.parametrize("seed", range(4))
def test_random_weight_model_output_parses_and_matches_the_schema(engine, seed):
    grammar = json_schema_grammar(PERSON)
    reqs = [
        GenerationRequest(
            prompt="Describe a person as JSON:",
            max_tokens=150,
            temperature=1.0,
            seed=seed * 10 + k,
            constraint=GrammarConstraint(grammar, engine.tokenizer, max_tokens=150),
        )
        for k in range(2)
    ]
    texts = engine._collect(reqs)
    for text in texts:
        value = json.loads(text)
        jsonschema.validate(value, PERSON)
        assert list(value)[:2] == ["name", "age"]  # properties come in the schema's order


@pytest.mark.parametrize("seed", range(3))
def test_any_json_object_with_sampling(engine, seed):
    req = GenerationRequest(
        prompt="{", max_tokens=60, temperature=1.0, seed=seed,
        constraint=GrammarConstraint(json_object_grammar(), engine.tokenizer, max_tokens=60),
    )
    (text,) = engine._collect([req])
    assert isinstance(json.loads(text), dict)


def test_a_tight_budget_still_closes_the_json(engine):
    grammar = json_schema_grammar(PERSON)
    smallest = len(GrammarConstraint(grammar, engine.tokenizer).closing_tokens())
    for seed in range(3):
        budget = smallest + 2
        c = GrammarConstraint(grammar, engine.tokenizer, max_tokens=budget)
        req = GenerationRequest(prompt="x", max_tokens=budget, temperature=1.0, seed=seed, constraint=c)
        events = list(engine.generate(req))
        assert len(events) <= budget
        jsonschema.validate(json.loads("".join(e.text for e in events)), PERSON)


def test_multi_character_tokens_of_a_32k_vocabulary(big_tokenizer):
    grammar = json_schema_grammar(PERSON)
    spans = 0
    for seed in range(6):
        c = GrammarConstraint(grammar, big_tokenizer, max_tokens=120)
        ids = random_walk(c, seed, 120)
        spans += sum(len(big_tokenizer.decode([i])) > 1 for i in ids)
        jsonschema.validate(json.loads(big_tokenizer.decode(ids)), PERSON)
    assert spans > 10  # the walks really used tokens that cross JSON structure in one step


def test_mask_cost_per_step_on_a_32k_vocabulary(big_tokenizer):
    c = GrammarConstraint(json_schema_grammar(PERSON), big_tokenizer, max_tokens=200)
    rnd, steps, spent = random.Random(1), 0, 0.0
    while not c.is_done() and steps < 200:
        t0 = time.perf_counter()
        mask = c.allowed()
        spent += time.perf_counter() - t0
        token = rnd.choice(mask.nonzero().flatten().tolist())
        c.advance(token)
        steps += 1
    per_step_ms = spent / steps * 1000
    print(f"mask cost, 32k vocabulary: {per_step_ms:.3f} ms/step over {steps} steps")
    assert per_step_ms < 5.0


def test_apply_constraints_masks_rows_forces_eos_and_pads_the_vocabulary():
    class Fixed:
        def __init__(self, allowed_ids, done=False):
            self.ids, self.done, self.seen = allowed_ids, done, []

        def allowed(self):
            m = torch.zeros(6, dtype=torch.bool)
            m[self.ids] = True
            return m

        def advance(self, token_id):
            self.seen.append(token_id)

        def is_done(self):
            return self.done

    logits = torch.zeros(4, 8)  # the model's vocabulary (8) is wider than the tokenizer's (6)
    apply_constraints(logits, [Fixed([1, 2]), None, Fixed([3], done=True), Fixed([])], eos_token_ids=[5, 4])
    finite = [set(torch.isfinite(row).nonzero().flatten().tolist()) for row in logits]
    assert finite == [{1, 2}, set(range(8)), {5}, {5}]


def test_a_batch_mixes_constrained_and_free_rows(engine):
    free = GenerationRequest(prompt="Hello there", max_tokens=12)
    alone = engine._collect([free])[0]
    c = GrammarConstraint(json_object_grammar(), engine.tokenizer, max_tokens=40)
    both = engine._collect([GenerationRequest(prompt="Hello there", max_tokens=12),
                            GenerationRequest(prompt="Hi", max_tokens=40, constraint=c)])
    assert both[0] == alone
    assert isinstance(json.loads(both[1]), dict)


def test_close_objects_only_closes_objects_that_list_properties():
    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {}}},
                                               "c": {"type": "object"},
                                               "d": {"type": "object", "properties": {},
                                                     "additionalProperties": True}}}
    closed = close_objects(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["a"]["additionalProperties"] is False
    assert "additionalProperties" not in closed["properties"]["c"]
    assert closed["properties"]["d"]["additionalProperties"] is True
    assert "additionalProperties" not in schema  # the caller's schema is left alone


@pytest.mark.parametrize(
    "schema, words",
    [
        ({"type": "foo"}, "Invalid type"),
        ({"type": "object", "properties": {"a": {"$ref": "#/$defs/Nope"}}}, "does not exist"),
        ([1, 2], "expected an object"),
        ("{not json", "not JSON"),
    ],
)
def test_invalid_schemas_are_typed_errors(schema, words):
    with pytest.raises(ConstraintError, match=words):
        json_schema_grammar(schema)


def test_refs_and_any_of_compile_and_are_enforced(engine):
    schema = {
        "$defs": {"Item": {"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"]}},
        "type": "object",
        "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/Item"}},
                       "note": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
        "required": ["items", "note"],
    }
    grammar = json_schema_grammar(schema)
    for seed in range(3):
        c = GrammarConstraint(grammar, engine.tokenizer, max_tokens=80)
        (text,) = engine._collect([GenerationRequest(prompt="a", max_tokens=80, temperature=1.0, seed=seed,
                                                     constraint=c)])
        jsonschema.validate(json.loads(text), schema)


def test_lark_grammar_with_embedded_json(engine):
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}
    grammar = lark_grammar(f'start: "answer: " %json {json.dumps(close_objects(schema))}\n')
    c = GrammarConstraint(grammar, engine.tokenizer, max_tokens=40)
    (text,) = engine._collect([GenerationRequest(prompt="a", max_tokens=40, temperature=1.0, seed=3,
                                                 constraint=c)])
    assert text.startswith("answer: ") and isinstance(json.loads(text[len("answer: "):])["x"], int)
    with pytest.raises(ConstraintError):
        lark_grammar("start: undefined_rule\n")
