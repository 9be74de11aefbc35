"""Constrained decoding: each step may only pick tokens that keep the output inside a grammar.

A `Constraint` gives the decode loop a mask of allowed next tokens, is told the token that was emitted, and
says when the constrained text is complete. `GrammarConstraint` implements it with llguidance (Rust): a JSON
Schema, "any JSON object" or a Lark grammar is compiled once (and cached), and each step's mask over the
byte-level vocabulary costs a fraction of a millisecond at 32k tokens (tests/test_constrain.py prints it).

Termination. A model is free to keep a string or an array going for ever, so the constraint also watches its
token budget (`max_tokens`): once the shortest way to finish the text (forced bytes first, then the closing
byte that the grammar accepts, in a fixed preference order) needs about as many tokens as are left, it stops
offering choices and emits that completion. With enough max_tokens for the schema's smallest instance, the
output therefore always parses and matches the schema; with fewer it is cut (finish_reason "length").
This closing plan is best effort for exotic schemas (a string `pattern` the preference order cannot walk,
`minItems` of deep objects): then the text may be cut by the budget.

JSON formatting: no free whitespace, and the separators of Python's json.dumps (", " and ": "), so the output
is one line in the form chat templates render JSON in. Objects that list `properties` and say nothing about
`additionalProperties` get only the listed keys (a subset of what the schema allows, so still valid).
"""

from __future__ import annotations

import copy
import json
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol, runtime_checkable

import llguidance
import numpy as np
import torch

from fleetlm.errors import FleetError

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Tokens to keep in reserve beyond the closing plan: one free token may open a structure that needs more
# closing than it added (e.g. `[{"` adds `"]}`-ish and a required key), so the plan starts a little early.
CLOSING_SLACK = 4
MAX_CLOSING_BYTES = 512  # a closing walk longer than this is given up (no plan: the budget may cut)
GROWTH_PER_TOKEN = 16  # assumed most closing tokens one emitted token adds (sets how often to re-plan)
RETRY_CLOSING_EVERY = 8  # after a failed walk, steps before the next try (a walk that fails costs ~1 ms)
_MATCHER_CACHE = 64  # compiled grammars kept per tokenizer (a client repeats its schema)

# Closing preference: outside a string, end structures first, then the shortest values; inside, end it.
_OUTSIDE = b'}],:0"ntf[{-123456789.eE+' + bytes(range(ord("a"), ord("z") + 1))
_INSIDE = b'"a0' + bytes(range(ord("b"), ord("z") + 1)) + b"123456789 _-.,:;!?()[]{}" + b"\\"
# Then every other byte (UTF-8 continuation bytes finish a character a token left half-written), whitespace
# last: a grammar that allows free whitespace would otherwise be "closed" with blanks for ever.
_WHITESPACE = b" \t\n\r"
_OUTSIDE += bytes(b for b in range(256) if b not in _OUTSIDE and b not in _WHITESPACE) + _WHITESPACE
_INSIDE += bytes(b for b in range(256) if b not in _INSIDE)


class ConstraintError(FleetError):
    """A grammar or JSON Schema that cannot be enforced (malformed, or uses a feature we cannot compile)."""


@runtime_checkable
class Constraint(Protocol):
    def allowed(self) -> torch.Tensor | None:
        """Bool mask [vocab_size] of the tokens allowed next; None means any."""
        ...

    def advance(self, token_id: int) -> None:
        """The token that was actually emitted."""
        ...

    def is_done(self) -> bool:
        """The constrained text is complete: the row must end (EOS)."""
        ...


# ---------------------------------------------------------------- grammars


@dataclass(frozen=True)
class Grammar:
    """A validated llguidance grammar (its serialized form), independent of any tokenizer."""

    text: str
    description: str = "grammar"


@lru_cache(maxsize=256)  # clients repeat their schemas; validating compiles the grammar
def _validated(text: str, description: str) -> Grammar:
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(text)
    if is_error:
        raise ConstraintError(f"invalid {description}: {'; '.join(messages)}")
    return Grammar(text, description)


def close_objects(schema: Any) -> Any:
    """A copy of a JSON Schema where objects with `properties` but no `additionalProperties` take no others.

    Every output of the result is valid for the original schema; the point is a smaller grammar, and no
    free-form keys that a model could repeat instead of finishing the object.
    """
    if isinstance(schema, list):
        return [close_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: close_objects(v) if k not in ("enum", "const", "default", "examples") else v
           for k, v in schema.items()}
    if isinstance(schema.get("properties"), dict) and "additionalProperties" not in schema:
        if "patternProperties" not in schema and "unevaluatedProperties" not in schema:
            out["additionalProperties"] = False
    return out


def json_schema_grammar(schema: Any, *, close: bool = True) -> Grammar:
    """The grammar of JSON text that matches `schema` (a dict, or a JSON string of one)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise ConstraintError(f"invalid JSON Schema: not JSON ({exc})") from None
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    if not isinstance(schema, dict):
        raise ConstraintError(f"invalid JSON Schema: expected an object, got {type(schema).__name__}")
    if close:
        schema = close_objects(copy.deepcopy(schema))
    try:
        text = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
    except (ValueError, TypeError) as exc:
        raise ConstraintError(f"invalid JSON Schema: {exc}") from None
    return _validated(text, "JSON Schema")


def json_object_grammar() -> Grammar:
    """Any JSON object (OpenAI's response_format {"type": "json_object"})."""
    return json_schema_grammar({"type": "object"}, close=False)


def lark_json(schema: dict[str, Any]) -> str:
    """A JSON Schema as a Lark `%json` item, formatted as `json_schema_grammar` formats its output."""
    if not isinstance(schema, dict):
        raise ConstraintError(f"invalid JSON Schema: expected an object, got {type(schema).__name__}")
    closed = close_objects(copy.deepcopy(schema))
    closed["x-guidance"] = {**closed.get("x-guidance", {}), **JSON_OPTIONS}
    return "%json " + json.dumps(closed, ensure_ascii=True)


def lark_grammar(source: str) -> Grammar:
    """A Lark grammar in llguidance's dialect (`%json {...}` embeds a JSON Schema)."""
    return _validated(llguidance.LLMatcher.grammar_from_lark(source), "grammar")


# ---------------------------------------------------------------- per-tokenizer state


class _Vocab:
    """llguidance's view of one tokenizer, built once (it walks the whole vocabulary), plus its caches."""

    def __init__(self, tokenizer: Any) -> None:
        eos = [int(e) for e in tokenizer.eos_token_ids]
        if not eos:
            raise ConstraintError("constrained decoding needs a tokenizer with an end-of-sequence token")
        self.eos_ids = eos
        # A tokenizer without a `tokenizers` backend (llama.cpp's) builds llguidance's view itself.
        own = getattr(tokenizer, "llguidance_tokenizer", None)
        backend = getattr(tokenizer, "backend", None)
        if own is None and (backend is None or not hasattr(backend, "to_str")):
            raise ConstraintError("constrained decoding needs a Hugging Face `tokenizers` tokenizer")
        try:
            self.ll = own(eos) if own is not None else llguidance.LLTokenizer(backend.to_str(), eos_token=eos)
        except Exception as exc:  # the Rust side raises a bare Exception for tokenizers it cannot read
            raise ConstraintError(f"llguidance cannot read this tokenizer: {exc}") from None
        self.vocab_size = int(self.ll.vocab_size)
        eos_mask = torch.zeros(self.vocab_size, dtype=torch.bool)
        eos_mask[[e for e in eos if e < self.vocab_size]] = True
        self.eos_mask = eos_mask
        # The token spelling each single byte (byte-level BPE has one per byte): the closing walk's steps.
        self.byte_tokens: list[int | None] = []
        for b in range(256):
            toks = self.ll.tokenize_bytes(bytes([b]))
            self.byte_tokens.append(toks[0] if len(toks) == 1 else None)
        self._matchers: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    def matcher(self, grammar: Grammar) -> llguidance.LLMatcher:
        """A fresh matcher for the grammar: compiled once per tokenizer, then copied (microseconds)."""
        with self._lock:
            pristine = self._matchers.get(grammar.text)
            if pristine is None:
                pristine = llguidance.LLMatcher(self.ll, grammar.text, log_level=0)
                if pristine.is_error():
                    raise ConstraintError(f"invalid {grammar.description}: {pristine.get_error()}")
                self._matchers[grammar.text] = pristine
                if len(self._matchers) > _MATCHER_CACHE:
                    self._matchers.popitem(last=False)
            else:
                self._matchers.move_to_end(grammar.text)
            return pristine.deep_copy()


_VOCABS: weakref.WeakKeyDictionary[Any, _Vocab] = weakref.WeakKeyDictionary()
_VOCABS_LOCK = threading.Lock()


def vocab_of(tokenizer: Any) -> _Vocab:
    with _VOCABS_LOCK:
        vocab = _VOCABS.get(tokenizer)
        if vocab is None:
            vocab = _VOCABS[tokenizer] = _Vocab(tokenizer)
        return vocab


# ---------------------------------------------------------------- the constraint


class _JsonLexer:
    """Whether a byte stream is inside a JSON string: all the closing walk needs to pick its next byte."""

    def __init__(self) -> None:
        self.in_string = False
        self.escaped = False

    def push(self, data: bytes) -> None:
        for b in data:
            if self.escaped:
                self.escaped = False
            elif self.in_string and b == 0x5C:  # backslash
                self.escaped = True
            elif b == 0x22:  # quote
                self.in_string = not self.in_string

    def copy(self) -> _JsonLexer:
        other = _JsonLexer()
        other.in_string, other.escaped = self.in_string, self.escaped
        return other


class GrammarConstraint:
    """Keeps one request's output inside a grammar, and closes it before `max_tokens` runs out."""

    def __init__(self, grammar: Grammar, tokenizer: Any, max_tokens: int | None = None) -> None:
        self.grammar = grammar
        self.vocab = vocab_of(tokenizer)
        self.matcher = self.vocab.matcher(grammar)
        self.max_tokens = max_tokens
        self.produced = 0
        self.lexer = _JsonLexer()
        self.plan: list[int] | None = None  # once set: the tokens that finish the text, forced one by one
        self._byte_tokens = self.vocab.byte_tokens
        self._slack: int | None = None
        self._next_walk = 0  # produced-count at which to plan the closing again

    # -- the protocol

    def allowed(self) -> torch.Tensor | None:
        m = self.matcher
        if m.is_error() or m.is_stopped():
            return self.vocab.eos_mask
        if self.plan is None and self.max_tokens is not None:
            self._maybe_start_closing()
        if self.plan is not None:
            if not self.plan:
                return self.vocab.eos_mask
            mask = torch.zeros(self.vocab.vocab_size, dtype=torch.bool)
            mask[self.plan[0]] = True
            return mask
        bits = np.frombuffer(m.compute_bitmask(), dtype=np.uint8)
        return torch.from_numpy(np.unpackbits(bits, bitorder="little")[: self.vocab.vocab_size].astype(bool))

    def advance(self, token_id: int) -> None:
        self.produced += 1
        if token_id in self.vocab.eos_ids:
            return
        if self.plan:
            if self.plan[0] == token_id:
                self.plan.pop(0)
            else:  # the loop ignored the mask: plan again from where we really are
                self.plan = None
        if self.matcher.consume_token(token_id):
            self.lexer.push(self.vocab.ll.decode_bytes([token_id]))

    def is_done(self) -> bool:
        m = self.matcher
        finished_plan = self.plan is not None and not self.plan and m.is_accepting()
        return m.is_stopped() or m.is_error() or finished_plan

    # -- closing before the budget runs out

    def _maybe_start_closing(self) -> None:
        if self.produced < self._next_walk:
            return
        left = self.max_tokens - self.produced  # tokens this row may still emit
        plan = self.closing_tokens()
        if plan is None:
            self._next_walk = self.produced + RETRY_CLOSING_EVERY
            return
        if not plan:  # complete already (free text, a finished value): nothing to close; the budget may cut
            self._next_walk = self.produced + 1
            return
        if self._slack is None:  # the first plan is the smallest whole instance: how much one token can open
            self._slack = CLOSING_SLACK + min(len(plan) // 2, 16)
        margin = left - len(plan) - self._slack
        if margin <= 0:
            self.plan = plan
        else:  # far from the budget: one token rarely adds 16 tokens of closing, so walk again later
            self._next_walk = self.produced + 1 + margin // GROWTH_PER_TOKEN

    def closing_tokens(self) -> list[int] | None:
        """Tokens that complete the text from here (few, not always the fewest); None if no walk is found."""
        m = self.matcher.deep_copy()
        lexer = self.lexer.copy()
        out = bytearray()
        while not m.is_accepting():
            if len(out) > MAX_CLOSING_BYTES or m.is_error():
                return None
            forced = m.compute_ff_bytes()
            if forced:
                toks = self.vocab.ll.tokenize_bytes(forced)
                if m.try_consume_tokens(toks) != len(toks):
                    return None
                out += forced
                lexer.push(forced)
                continue
            for b in _INSIDE if lexer.in_string else _OUTSIDE:
                tok = self._byte_tokens[b]
                if tok is not None and m.try_consume_tokens([tok]) == 1:
                    out.append(b)
                    lexer.push(bytes([b]))
                    break
            else:
                return None
        if not out:
            return []
        toks = self.vocab.ll.tokenize_bytes(bytes(out))
        if self.matcher.validate_tokens(toks) != len(toks):  # a merged token the grammar splits differently
            toks = [self._byte_tokens[b] for b in out]
        return toks


# ---------------------------------------------------------------- the decode-loop side


def apply_constraints(logits: torch.Tensor, constraints: Sequence[Constraint | None],
                      eos_token_ids: Sequence[int]) -> None:
    """Mask logits [B, V] in place: row b may only pick what constraints[b] allows (None: unconstrained).

    A row whose constraint is done, or allows nothing but EOS (or nothing at all), is forced to end.
    Call before sampling; after sampling, call `constraints[b].advance(token)` for every live row.
    """
    rows, masks = [], []
    vocab = logits.shape[-1]
    for b, c in enumerate(constraints):
        if c is None:
            continue
        mask = _only(eos_token_ids, vocab) if c.is_done() else None
        if mask is None:
            allowed = c.allowed()
            if allowed is None:
                continue
            mask = _fit(allowed, vocab)
            if not mask.any():  # a dead end (should not happen): end the row rather than emit junk
                mask = _only(eos_token_ids, vocab)
            if mask is None:
                continue
        rows.append(b)
        masks.append(mask)
    if not rows:
        return
    keep = torch.stack(masks).to(logits.device, non_blocking=True)
    index = torch.tensor(rows, device=logits.device)
    logits[index] = logits[index].masked_fill(~keep, float("-inf"))


def advance_constraints(tokens: Sequence[int], constraints: Sequence[Constraint | None]) -> None:
    """Tell each row's constraint the token it emitted (rows without one, or finished, pass None)."""
    for token, c in zip(tokens, constraints, strict=True):
        if c is not None:
            c.advance(int(token))


def _fit(mask: torch.Tensor, vocab: int) -> torch.Tensor:
    # The model's vocabulary may be padded past the tokenizer's (or the reverse): extra ids are never allowed.
    mask = mask.to(torch.bool)
    if mask.shape[0] >= vocab:
        return mask[:vocab]
    return torch.cat([mask, torch.zeros(vocab - mask.shape[0], dtype=torch.bool)])


def _only(ids: Sequence[int], vocab: int) -> torch.Tensor | None:
    """Only the first EOS id (one way to end, so greedy and sampling agree); None without one."""
    valid = [i for i in ids if 0 <= i < vocab]
    if not valid:
        return None
    mask = torch.zeros(vocab, dtype=torch.bool)
    mask[valid[0]] = True
    return mask
