"""Answer accuracy on the labelled set (issue 12, figure 2): small models with file_search, a big one without.

    make kb-corpus   # once, as root: Debian's python3.11-doc, the manual the passages are cut from
    flock /tmp/bench.lock nice .venv/bin/python bench/kb_answers.py [--arms 135m+fs,0.5b+fs,1.5b]
        [--limit 100] [--seed 0] [--k 3] [--max-output-tokens 64] [--engine auto] [--out DIR] [--rerun]
        [--report-only]

The seeds' claim: a small model that reads the company's documents beats a bigger one that does not, for
less. Each arm is one fleet model asked each question of an evenly spread, seeded sample of
fleetlm.rag.labelled's questions through the official `openai` client's `client.responses.create`, with
`tools=[{"type": "file_search", "vector_store_ids": [store], "max_num_results": K}]` and
`include=["file_search_call.results"]` for the "+fs" arms and no tools for the others; the same short
`instructions`, greedy decoding and max_output_tokens everywhere.

The gateway runs in-process (create_app over a TestClient, as bench/retrieval.py builds it): the fleet is the
default fleet of `fleet serve` (fleetlm.fleet.default: the installed catalog models, engine auto unless
--engine says otherwise), priced like `fleet serve` prices it (fleetlm.fleet.measure.price_local_models:
measured tokens/s at the machine's hourly price; `fleet models info NAME` shows the same figures). The
knowledge store is bench/retrieval.py's: every passage its own file with its passage id as an attribute,
one chunk each, kept in <out>/work between runs (its functions are imported, not copied).

Judging (judge(); the same rule for every arm, deterministic, printed with examples):
  both texts are flattened (straight quotes, no backticks, **bold** unwrapped, whitespace collapsed, no
  spaces around '='); an answer is correct when
  1. the gold answer, or one of its alternatives ('re.IGNORECASE / re.I'), outer quotes stripped, occurs in
     the reply as a whole token, case-insensitively, and not already in the question; or
  2. one of its key identifiers does (key_identifiers(): code-like names in the gold answer, such as
     `copy.deepcopy()`, `frozen=True`, `ChainMap`, `re.IGNORECASE`; a dotted name counts by its last part,
     a keyword argument with _ by its name too unless the reply gives it another value: `sort_keys`);
     a key with a capital letter must match case-sensitively; a short lowercase name (< 6 letters, e.g.
     `zip()`, `enum.auto`) or one the question itself already contains (echoing it proves nothing) counts
     only when written as code: `name(` or the full dotted name; or
  3. when the gold answer has no key identifier (a phrase, e.g. "it cannot go backwards"): at least two
     thirds of its content words (fleetlm.rag.labelled.content_words, stemmed) that the question does not
     already contain occur in the reply (none beyond the question's: not correct).
A citation is gold when a `file_citation` annotation's file is the gold passage's file (each passage is its
own file; replies keep cited and retrieved files as passage ids, so they outlive a re-ingested store).

Cost per answer is the usage log's cost_usd (what the gateway charges at those prices) of each request,
averaged; latency is the client's wall time per request. The arms take turns, five questions each, in an
order where every prefix is spread over the set (ask_order); each arm's replies are saved after each turn
in <out>/arms/<arm>.json and reused while the sample and settings are the same (--rerun to ask again), so a
run stopped by its time limit (`timeout`) goes on from there next time. The table is scored over the
questions every held arm has answered. Written to --out: results.json and
kb_answers.png (accuracy against cost per answer).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from fleetlm.catalog.store import fleet_home
from fleetlm.rag.labelled import (
    DEBIAN_PACKAGE,
    CorpusMissing,
    Question,
    content_words,
    load_corpus,
    load_questions,
)
from retrieval import corpus_digest, reuse_or_upload, saved_store

SMALL, MEDIUM, LARGE = "smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"


@dataclass(frozen=True)
class Arm:
    model: str
    file_search: bool


ARMS = {
    "135m+fs": Arm(SMALL, True),
    "0.5b+fs": Arm(MEDIUM, True),
    "1.5b": Arm(LARGE, False),
    "1.5b+fs": Arm(LARGE, True),
    "0.5b": Arm(MEDIUM, False),
    "135m": Arm(SMALL, False),
}
DEFAULT_ARMS = ("0.5b+fs", "1.5b", "135m+fs")  # in the order they are asked: the claim first
INSTRUCTIONS = ("Answer the question about Python in one or two short sentences. Name the exact function, "
                "class, method, parameter or value.")
GOAL = ("goal: 0.5b+fs beats 1.5b by >= 30 points at <= 1/3 of its cost per answer; "
        "gold citations in >= 90% of correct answers")
REQUEST_TIMEOUT_S = 600.0
WARM_UP = Question("warm-up", "What does print() do?", "", "", True, "")  # not in the labelled set


# ---------------------------------------------------------------------------------------------- arguments


def parse_arms(text: str) -> list[str]:
    names = [a.strip() for a in text.split(",") if a.strip()]
    unknown = [a for a in names if a not in ARMS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown arm(s) {', '.join(unknown) or '(none given)'}: "
                                         f"choose from {', '.join(ARMS)}")
    return list(dict.fromkeys(names))


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arms", type=parse_arms, default=list(DEFAULT_ARMS),
                   help=f"arms to ask now, of {', '.join(ARMS)} (default: {','.join(DEFAULT_ARMS)})")
    p.add_argument("--limit", type=positive, default=100, help="questions in the sample")
    p.add_argument("--seed", type=int, default=0, help="where in each stride the sample picks its question")
    p.add_argument("--k", type=int, default=3, choices=range(1, 11), metavar="K",
                   help="file_search max_num_results (1-10)")
    p.add_argument("--max-output-tokens", type=positive, default=64)
    p.add_argument("--engine", choices=("auto", "llama_cpp", "fleetlm"), default="auto",
                   help="what runs the catalog models (auto: the faster one measured here, as fleet serve)")
    p.add_argument("--out", type=Path, default=None, help="default: $FLEET_HOME/bench/kb_answers")
    p.add_argument("--rerun", action="store_true", help="ask the arms again even if their replies are kept")
    p.add_argument("--report-only", action="store_true", help="ask nothing: the table over the kept arms")
    p.add_argument("--ingest-only", action="store_true", help="only build (or check) the store: no model")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- sample


def sample_questions(questions: Sequence[Question], n: int, seed: int) -> list[Question]:
    """n questions evenly spread over the set (one per stride of len/n), the seed choosing the offset
    within the stride, so lexical and paraphrased questions and every page keep their share."""
    if n >= len(questions):
        return list(questions)
    step = len(questions) / n
    offset = random.Random(seed).random() * step
    return [questions[min(len(questions) - 1, int(offset + i * step))] for i in range(n)]


# ---------------------------------------------------------------------------------------------- judge


_QUOTES = {0x2018: "'", 0x2019: "'", 0x201C: '"', 0x201D: '"'}
_BOLD = re.compile(r"\*\*(\S(?:[^*]*?\S)?)\*\*")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
_WORD = re.compile(r"[a-z]{3,}")


def flatten(text: str) -> str:
    """The text as judged: straight quotes, no backticks, **bold** unwrapped, one space, `a = b` as `a=b`."""
    text = text.translate(_QUOTES).replace("`", "")
    text = _BOLD.sub(r"\1", text)
    text = re.sub(r"\s+", " ", text).strip()
    return re.sub(r"\s*=\s*", "=", text)


def _occurs(needle: str, haystack: str, case_sensitive: bool = False) -> bool:
    """needle in haystack, not as part of a longer name (no letter, digit or _ right before or after)."""
    pattern = rf"(?<![A-Za-z0-9_]){re.escape(needle)}(?![A-Za-z0-9_])"
    return re.search(pattern, haystack, 0 if case_sensitive else re.IGNORECASE) is not None


@dataclass(frozen=True)
class Key:
    name: str  # what must appear: a dotted name's last part
    full: str  # the whole name as the gold answer writes it, without ()
    case_sensitive: bool
    strict: bool  # only `name(` or the full dotted name count


def _code_like(name: str, after: str, quoted: bool, single_word: bool) -> bool:
    camel = re.search(r"[a-z][A-Z]", name) is not None
    caps = name.isupper() and len(name) >= 6
    return ("." in name or "_" in name or after in ("(", "=") or camel or caps or quoted or single_word)


def _echoed(name: str, question: str) -> bool:
    """The question already holds the name (or a word sharing 5+ first letters with it: except/exception)."""
    name = name.lower()
    for word in _WORD.findall(question.lower()):
        prefix = min(len(word), len(name)) >= 5 and (word.startswith(name) or name.startswith(word))
        if word == name or prefix:
            return True
    return False


def key_identifiers(answer: str, question: str) -> list[Key]:
    """The code-like names in a gold answer that a correct reply must name (one of them)."""
    text = flatten(answer)
    single_word = _IDENT.fullmatch(text.strip("'()")) is not None
    keys: list[Key] = []
    for match in _IDENT.finditer(text):
        full = match.group(0)
        after = text[match.end(): match.end() + 1]
        quoted = match.start() > 0 and text[match.start() - 1] == "'" and after == "'"
        if not _code_like(full, after, quoted, single_word):
            continue
        if after == "=":  # a keyword argument: `name=value`; a name with _ also alone, unless set otherwise
            value = re.match(r"=[^\s,;/)]+", text[match.end():])
            setting = full + (value.group(0) if value else "")
            keys.append(Key(setting, setting, any(c.isupper() for c in setting), False))
            if "_" in full and value:
                keys.append(Key(full, setting, False, False))
            continue
        name = full.rsplit(".", 1)[-1]
        if "." in full and len(name) <= 3 and name.islower():  # a file name (__init__.py): all of it
            name = full
        if not re.search(r"[A-Za-z0-9]", name):
            continue
        case_sensitive = any(c.isupper() for c in name)
        short = name.isalpha() and name.islower() and len(name) < 6 and (after == "(" or "." in full)
        strict = len(name) < 3 or (not case_sensitive and (short or _echoed(name, question)))
        keys.append(Key(name, full, case_sensitive, strict))
    return keys


def _key_found(key: Key, reply: str) -> bool:
    if "=" in key.full and "=" not in key.name:  # sort_keys alone counts, sort_keys=False does not
        other = re.search(rf"(?<![A-Za-z0-9_]){re.escape(key.full)}(?![A-Za-z0-9_])", reply, re.IGNORECASE)
        given = re.search(rf"(?<![A-Za-z0-9_]){re.escape(key.name)}=", reply, re.IGNORECASE)
        return _occurs(key.name, reply) and (given is None or other is not None)
    if key.strict:
        called = re.search(rf"(?<![A-Za-z0-9_]){re.escape(key.name)}\(", reply, re.IGNORECASE) is not None
        return called or ("." in key.full and _occurs(key.full, reply))
    return _occurs(key.name, reply, key.case_sensitive)


@dataclass(frozen=True)
class Verdict:
    correct: bool
    rule: str  # "answer", "key <name>", "words a/b", or why not


def alternatives(answer: str) -> list[str]:
    """The gold answer's alternatives ('re.IGNORECASE / re.I', 'zip(*m) or ...'), outer quotes stripped."""
    out = []
    for part in re.split(r" / | \(or | or ", flatten(answer)):
        part = part.strip(" ,;")
        if part.count("(") != part.count(")"):  # "'>' (or '!')" leaves a stray parenthesis
            part = part.strip("()")
        if part := part.strip("'"):
            out.append(part)
    return out


def judge(question: Question, reply: str) -> Verdict:
    """Is `reply` a correct answer to `question`? (the rule is in the module docstring)"""
    said = flatten(reply)
    asked = flatten(question.question)
    for gold in alternatives(question.answer):
        exact = _IDENT.fullmatch(gold) is not None and gold != gold.lower()  # ChainMap, not chainmap
        if _occurs(gold, said, exact) and not _occurs(gold, asked):  # echoing the question proves nothing
            return Verdict(True, "answer")
    keys = key_identifiers(question.answer, question.question)
    for key in keys:
        if _key_found(key, said):
            return Verdict(True, f"key {key.name}")
    if keys:
        return Verdict(False, f"no key of {', '.join(k.name for k in keys)}")
    wanted = content_words(question.answer) - content_words(question.question)
    if not wanted:  # every word of the answer is in the question: only step 1 could tell
        return Verdict(False, "no answer word beyond the question's")
    found = wanted & content_words(said)
    need = math.ceil(2 * len(wanted) / 3)
    return Verdict(len(found) >= need, f"words {len(found)}/{len(wanted)} (need {need})")


# ---------------------------------------------------------------------------------------------- gateway


def fleet_config(work: Path, models: Sequence[str], engine: str):
    """The default fleet (the installed catalog models) restricted to `models`, priced as fleet serve
    prices it, with its knowledge base under `work`."""
    from fleetlm.config import parse_config
    from fleetlm.fleet.default import default_config_data
    from fleetlm.fleet.measure import price_local_models

    data = default_config_data() if models else {"models": {}}
    missing = [m for m in models if m not in data["models"]]
    if missing:
        raise SystemExit(f"not installed: {', '.join(missing)}; run: fleet models pull {' '.join(missing)}")
    data["models"] = {m: {**data["models"][m], "timeout": REQUEST_TIMEOUT_S, "retries": 0,
                          **({} if engine == "auto" else {"engine": engine})} for m in models}
    if not models:  # --ingest-only: the knowledge endpoints need no language model
        data["models"] = {"unused": {"remote": "http://127.0.0.1:9/v1"}}
    data.pop("router", None)  # each arm names its model: no cascade
    data["knowledge"] = {"files_dir": str(work / "blobs"), "index_path": str(work / "knowledge.db")}
    config = parse_config(data, "the kb_answers fleet")
    costs = price_local_models(config, log=lambda m: print(f"  {m}", file=sys.stderr))
    for name, c in costs.items():
        print(f"  {name}: engine {c.engine} ({c.reason}); ${c.price.input:.4f} in / "
              f"${c.price.output:.4f} out per 1M tokens ({c.price_source})", file=sys.stderr)
    return config, costs


def start_gateway(config, work: Path):
    """The gateway over `config` in-process, its usage log, and an openai client bound to it."""
    import openai
    from fastapi.testclient import TestClient

    from fleetlm.serve.app import create_app
    from fleetlm.serve.backends import build_backends
    from fleetlm.serve.store import UsageStore

    usage = UsageStore(f"sqlite:///{work / 'fleet.db'}")
    tc = TestClient(create_app(config, usage, build_backends(config)))
    tc.__enter__()  # runs the app's startup (the ingest worker); closed by the caller
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="bench", http_client=tc, max_retries=0,
                           timeout=REQUEST_TIMEOUT_S)
    return tc, client, usage


# ---------------------------------------------------------------------------------------------- asking


def settings_of(args: argparse.Namespace, sample: Sequence[Question]) -> dict:
    """What an arm's kept replies depend on: asked again when any of it changes."""
    return {"questions": [q.id for q in sample], "k": args.k, "max_output_tokens": args.max_output_tokens,
            "instructions": INSTRUCTIONS}


def ask_one(client, usage, arm: Arm, question: Question, manifest: dict, args: argparse.Namespace) -> dict:
    """One question through /v1/responses: the reply, cited and retrieved files as passage ids, tokens,
    the client's wall time, and what the usage log charged for it."""
    by_file = manifest["by_file"]
    extra: dict = {}
    if arm.file_search:
        tool = {"type": "file_search", "vector_store_ids": [manifest["store_id"]], "max_num_results": args.k}
        extra = {"tools": [tool], "include": ["file_search_call.results"]}
    since = time.time()
    started = time.perf_counter()
    try:
        r = client.responses.create(model=arm.model, input=question.question, instructions=INSTRUCTIONS,
                                    temperature=0, max_output_tokens=args.max_output_tokens, store=False,
                                    **extra)
    except Exception as exc:  # a failed request is a wrong answer, counted and shown, never a crash
        return {"id": question.id, "error": f"{type(exc).__name__}: {exc}"[:300],
                "seconds": time.perf_counter() - started, "cost_usd": 0.0}
    seconds = time.perf_counter() - started
    reply, cited, retrieved = "", [], []
    for item in r.output:
        if item.type == "message":
            for part in item.content:
                reply += getattr(part, "text", "") or ""
                notes = getattr(part, "annotations", None) or []
                cited += [by_file.get(a.file_id, a.file_id) for a in notes
                          if getattr(a, "type", "") == "file_citation"]
        elif item.type == "file_search_call":
            retrieved = [by_file.get(res.file_id, res.file_id) for res in (item.results or [])]
    logged = [row for row in usage.requests(since - 1)
              if row["endpoint"] == "responses" and row["model_used"] == arm.model and row["status"] == 200]
    return {"id": question.id, "reply": reply, "cited": cited, "retrieved": retrieved, "seconds": seconds,
            "input_tokens": r.usage.input_tokens, "output_tokens": r.usage.output_tokens,
            "cost_usd": logged[-1]["cost_usd"] if logged else None}


def ask_order(sample: Sequence[Question], blocks: int = 4) -> list[Question]:
    """The sample in the order it is asked: every 4th question first, then the ones between, so whatever
    prefix a run gets through before its time limit is itself spread over the whole set."""
    return [q for start in range(blocks) for q in sample[start::blocks]]


def ask_arm(client, usage, kept: dict, questions: Sequence[Question], manifest: dict,
            args: argparse.Namespace) -> dict:
    """Ask the `questions` that `kept` has no answer for yet (appended to kept["answers"])."""
    arm = ARMS[kept["arm"]]
    done = {a["id"] for a in kept["answers"]}
    for q in questions:
        if q.id not in done:
            kept["answers"].append(ask_one(client, usage, arm, q, manifest, args))
    return kept


def ask_arms(client, usage, arms: list[dict], sample: Sequence[Question], manifest: dict,
             args: argparse.Namespace, save, block: int = 5) -> None:
    """Every arm in turn on each block of `block` questions (in ask_order), saving after each, so a run
    stopped by its time limit leaves every arm with about the same questions answered."""
    order = ask_order(sample)
    for kept in arms:  # untimed: the first request of a model pays for lazy loads, not the answer
        ask_one(client, usage, ARMS[kept["arm"]], WARM_UP, manifest, args)
    started = time.perf_counter()
    for b in range(0, len(order), block):
        for kept in arms:
            ask_arm(client, usage, kept, order[b: b + block], manifest, args)
            save(kept)
        print(f"  {min(len(order), b + block)}/{len(order)} questions asked by every arm "
              f"({time.perf_counter() - started:.0f} s this run)", file=sys.stderr)


# ---------------------------------------------------------------------------------------------- scoring


def score_arm(kept: dict, questions: dict[str, Question], ids: set[str] | None = None) -> dict:
    """Accuracy (all / lexical / paraphrased), cost and latency per answer, citation shares, of one arm
    (over the questions in `ids` when given: those every arm has answered)."""
    answers = [a for a in kept["answers"] if ids is None or a["id"] in ids]
    verdicts = {a["id"]: judge(questions[a["id"]], a.get("reply", "")) if "error" not in a
                else Verdict(False, "error") for a in answers}
    correct = [a for a in answers if verdicts[a["id"]].correct]

    def share(items: list, total: int) -> float | None:
        return len(items) / total if total else None

    def accuracy(lexical: bool | None) -> float | None:
        pool = [a for a in answers if lexical is None or questions[a["id"]].lexical == lexical]
        return share([a for a in pool if verdicts[a["id"]].correct], len(pool))

    gold_cited = [a for a in correct if questions[a["id"]].passage_id in a.get("cited", [])]
    gold_found = [a for a in answers if questions[a["id"]].passage_id in a.get("retrieved", [])]
    seconds = sorted(a["seconds"] for a in answers)
    fs = kept["file_search"]
    row = {"arm": kept["arm"], "model": kept["model"], "file_search": kept["file_search"], "n": len(answers),
           "accuracy": accuracy(None), "lexical": accuracy(True), "paraphrased": accuracy(False),
           "errors": sum("error" in a for a in answers),
           "cost_per_answer_usd": statistics.fmean([a.get("cost_usd") or 0.0 for a in answers] or [0.0]),
           "unlogged": sum(a.get("cost_usd") is None for a in answers),
           "latency_p50_s": statistics.median(seconds) if seconds else None,
           "latency_p95_s": seconds[min(len(seconds) - 1, int(0.95 * len(seconds)))] if seconds else None,
           "input_tokens_mean": statistics.fmean([a.get("input_tokens", 0) for a in answers] or [0]),
           "output_tokens_mean": statistics.fmean([a.get("output_tokens", 0) for a in answers] or [0]),
           "gold_cited_of_correct": share(gold_cited, len(correct)) if fs else None,
           "gold_retrieved": share(gold_found, len(answers)) if fs else None,
           "verdicts": {k: [v.correct, v.rule] for k, v in verdicts.items()}}
    return row


def _pct(x: float | None) -> str:
    return "   -  " if x is None else f"{100 * x:5.1f}%"


def print_table(rows: list[dict]) -> None:
    head = (f"{'arm':9} {'model':28} {'n':>4} {'acc':>6} {'lexic':>6} {'para':>6} {'err':>3} | "
            f"{'$/answer':>10} {'in tok':>6} {'out':>4} | {'p50 s':>6} {'p95 s':>6} | "
            f"{'gold cited/correct':>18} {'gold in top K':>13}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['arm']:9} {r['model']:28} {r['n']:4d} {_pct(r['accuracy'])} {_pct(r['lexical'])} "
              f"{_pct(r['paraphrased'])} {r['errors']:3d} | {r['cost_per_answer_usd']:10.3g} "
              f"{r['input_tokens_mean']:6.0f} {r['output_tokens_mean']:4.0f} | {r['latency_p50_s']:6.2f} "
              f"{r['latency_p95_s']:6.2f} | {_pct(r['gold_cited_of_correct']):>18} "
              f"{_pct(r['gold_retrieved']):>13}")


def print_claim(rows: list[dict]) -> None:
    by = {r["arm"]: r for r in rows}
    if "0.5b+fs" in by and "1.5b" in by:
        small, big = by["0.5b+fs"], by["1.5b"]
        big_cost = big["cost_per_answer_usd"]
        ratio = small["cost_per_answer_usd"] / big_cost if big_cost else None
        print(f"\n0.5b+fs vs 1.5b: {100 * (small['accuracy'] - big['accuracy']):+.1f} points, cost ratio "
              f"{'-' if ratio is None else f'{ratio:.2f}'}; gold citations in "
              f"{_pct(small['gold_cited_of_correct']).strip()} of its correct answers")
    print(GOAL)


def print_examples(kept: dict, questions: dict[str, Question], per_arm: int = 3) -> None:
    """A few judged replies per arm, right and wrong, so the rule can be checked by eye."""
    right, wrong = [], []
    for a in kept["answers"]:
        if "error" in a:
            continue
        v = judge(questions[a["id"]], a["reply"])
        (right if v.correct else wrong).append((a, v))
    for a, v in right[:per_arm] + wrong[:per_arm]:
        q = questions[a["id"]]
        reply = re.sub(r"\s+", " ", a["reply"])[:160]
        print(f"  [{kept['arm']}] {q.id} {'RIGHT' if v.correct else 'WRONG'} ({v.rule}) gold {q.answer!r}\n"
              f"      Q: {q.question[:110]}\n      A: {reply}")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        cost = r["cost_per_answer_usd"] * 1000
        ax.scatter([cost], [100 * r["accuracy"]], s=60, marker="o" if r["file_search"] else "s")
        ax.annotate(f"{r['arm']} ({r['model']})", (cost, 100 * r["accuracy"]), textcoords="offset points",
                    xytext=(6, 4), fontsize=8)
    ax.set_xlabel("cost per answer (USD per 1000 answers, measured prices)")
    ax.set_ylabel("answer accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_xlim(0, 1.45 * max(r["cost_per_answer_usd"] * 1000 for r in rows) or 1)  # room for the labels
    ax.grid(alpha=0.3)
    ax.set_title(f"python3.11-doc questions (n={rows[0]['n']}): o = with file_search, s = without")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main


def new_arm(name: str, settings: dict, cost) -> dict:
    """An arm with no answers yet, with the engine and price its model is served at."""
    arm = ARMS[name]
    return {"arm": name, "model": arm.model, "file_search": arm.file_search, "answers": [],
            "settings": settings, "engine": cost.engine, "price_source": cost.price_source,
            "price": {"input": cost.price.input, "output": cost.price.output}}


def save_arm(arms_dir: Path, kept: dict) -> None:
    """Written whole or not at all (a run stopped by its time limit must not leave half a file)."""
    tmp = arms_dir / f".{kept['arm']}.json.tmp"
    tmp.write_text(json.dumps(kept, indent=1))
    tmp.replace(arms_dir / f"{kept['arm']}.json")


def kept_arm(path: Path, settings: dict) -> dict | None:
    if not path.is_file():
        return None
    kept = json.loads(path.read_text())
    return kept if kept.get("settings") == settings else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or fleet_home() / "bench" / "kb_answers"
    (out / "arms").mkdir(parents=True, exist_ok=True)
    try:
        passages = load_corpus()
    except CorpusMissing as exc:
        print(f"{exc}\n(Debian package {DEBIAN_PACKAGE})", file=sys.stderr)
        return 2
    by_id = {q.id: q for q in load_questions()}
    sample = sample_questions(list(by_id.values()), args.limit, args.seed)
    settings = settings_of(args, sample)
    arms_dir = out / "arms"
    kept = {a: k for a in ARMS if (k := kept_arm(arms_dir / f"{a}.json", settings)) is not None}
    todo = [a for a in args.arms if args.rerun or len(kept.get(a, {}).get("answers", [])) < len(sample)]
    if args.report_only or args.ingest_only:
        todo = []
    print(f"{len(passages)} passages, sample of {len(sample)} questions (seed {args.seed}, "
          f"{sum(q.lexical for q in sample)} lexical); asking {', '.join(todo) or 'nothing'}",
          file=sys.stderr)

    work = out / "work"
    digest = corpus_digest(passages)
    if saved_store(work, digest) is None:
        shutil.rmtree(work, ignore_errors=True)  # an old store of other passages: start clean
    work.mkdir(exist_ok=True)
    if todo or args.ingest_only:
        config, costs = fleet_config(work, sorted({ARMS[a].model for a in todo}), args.engine)
        tc, client, usage = start_gateway(config, work)
        try:
            manifest = reuse_or_upload(client, work, passages, digest)
            arms = []
            for name in todo:
                arm = new_arm(name, settings, costs[ARMS[name].model])
                if not args.rerun and kept.get(name, {}).get("engine") == arm["engine"]:
                    arm = kept[name]  # go on where an earlier run on the same engine stopped
                kept[name] = arm
                arms.append(arm)
            ask_arms(client, usage, arms, sample, manifest, args, partial(save_arm, arms_dir))
        finally:
            tc.__exit__(None, None, None)

    held = [k for k in kept.values() if k["answers"]]
    if not held:
        print("no arm answered this sample yet", file=sys.stderr)
        return 1
    common = set.intersection(*({a["id"] for a in k["answers"]} for k in held))  # same questions for all
    rows = [score_arm(k, by_id, common) for k in held]
    held_counts = ", ".join(f"{k['arm']} {len(k['answers'])}" for k in held)
    print(f"scored over the {len(common)} questions every arm answered (held: {held_counts})")
    print("\njudged examples:")
    for k in held:
        print_examples(k, by_id)
    print()
    print_table(rows)
    print_claim(rows)
    results = {"settings": {**settings, "seed": args.seed, "goal": GOAL},
               "prices": {k["arm"]: {"engine": k.get("engine"), **k.get("price", {}),
                                     "source": k.get("price_source")} for k in held},
               "rows": rows}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot(rows, out / "kb_answers.png")
    print(f"wrote {out / 'results.json'} and {out / 'kb_answers.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
