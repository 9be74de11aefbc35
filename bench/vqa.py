"""Visual QA on the generated document set (issue 15): two-stage accuracy per fleet model, against its bounds.

    .venv/bin/python bench/vqa.py [--questions 300] [--models smollm2-135m-instruct,...,auto] [--seed 0]
        [--subset qwen2.5-coder-1.5b-instruct=100] [--arms two-stage,ground-truth,no-image]
        [--stage-one gateway|local] [--url URL] [--out DIR]

Wrap it in `flock /tmp/bench.lock` on a shared machine: it runs real models for a long time.

The set is fleetlm.vision.docset's (seeded receipts, invoices, tables, forms and screenshots, four questions
each, exact answers). Every question is asked through the official openai client, temperature 0, max_tokens
16, "Answer with the exact value only.", three ways:
- two-stage: the document's image as an `image_url` data: URL part beside the question; the gateway's stage
  one (OCR with layout, fleetlm.vision.describe) turns it into text that the model reads. With
  --stage-one local the benchmark runs describe_image itself and sends its text in the image's place
  (the same text, without the gateway's OCR on every request: a document has four questions);
- ground-truth: the document's true text in the prompt instead (the upper bound of any stage one);
- no-image: the question alone (the floor: what the model guesses).
`auto` (the router) is asked two-stage only by default (--auto-arms). --subset MODEL=N asks that model a
seeded subset of N questions (the same subset in each of its arms), for a slow model.

Before the questions, stage one runs once on every document here: OCR character error rate (jiwer.cer)
between the ground truth and the OCR lines in reading order, whitespace runs made one space on both sides
(the layout's separators are not characters read), overall, per kind and clean against degraded scans,
with RapidOCR's time per image.

Printed: per model and arm, exact-match accuracy (docset.exact_match: case, edges, currency signs and
thousands separators ignored, numbers compared by value), the lenient "answer appears in the reply"
accuracy, mean latency, mean prompt tokens and cost (the gateway's x-fleet-cost-usd: usage times the
fleet's prices); then exact accuracy per document kind and per skill. Written to --out (default
$FLEET_HOME/bench/vqa): results.json (settings, OCR figures, summaries), answers.jsonl (every request, as
it is answered), vqa.png (the bar chart), and, when the benchmark started the gateway, fleet.yaml and its log.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
import re
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from fleetlm.vision.docset import KINDS, SKILLS, Document, Question, contains_match, exact_match, generate_set

ARMS = ("two-stage", "ground-truth", "no-image")
DEFAULT_MODELS = ("smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct",
                  "auto")
ROUTER = "auto"
INSTRUCTION = "Answer with the exact value only."
MAX_TOKENS = 16
REQUEST_TIMEOUT_S = 600.0


@dataclass
class Asked:
    """One question asked of one model in one arm: the reply, its score, what it took and cost."""

    model: str
    arm: str
    question: str
    document: str
    kind: str
    skill: str
    answer: str
    reply: str | None = None
    exact: bool = False
    contains: bool = False
    latency_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    answered_by: str = ""
    stage_one: str = ""  # two-stage: "local" (describe_image here) or the gateway's x-fleet-vision name
    stage_one_ms: float | None = None  # the gateway's stage-one time for this request (x-fleet-vision)
    error: str | None = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--questions", type=int, default=300, help="questions in the set (four per document)")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS),
                   help="fleet models and `auto`, comma-separated")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of: {', '.join(ARMS)}")
    p.add_argument("--auto-arms", default="two-stage", help="the arms `auto` is asked in")
    p.add_argument("--subset", action="append", default=[], metavar="MODEL=N",
                   help="ask MODEL only a seeded subset of N questions (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stage-one", choices=("gateway", "local"), default="gateway",
                   help="who turns the image into text in the two-stage arm")
    p.add_argument("--via-gateway", default="",
                   help="comma-separated models whose two-stage arm sends the image through the gateway")
    p.add_argument("--max-tokens", type=int, default=MAX_TOKENS)
    p.add_argument("--url", help="a running gateway's /v1 URL (default: fleet serve on the default fleet)")
    p.add_argument("--out", type=Path, help="default: $FLEET_HOME/bench/vqa")
    p.add_argument("--resume", action="store_true",
                   help="keep the answers in --out's answers.jsonl (same set and seed) and ask only the rest")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-plot", action="store_true", help="do not write vqa.png")
    args = p.parse_args(argv)
    if args.questions < 1:
        p.error("--questions must be >= 1")
    for name in ("arms", "auto_arms"):
        arms = [a.strip() for a in getattr(args, name).split(",") if a.strip()]
        if not arms or set(arms) - set(ARMS):
            p.error(f"--{name.replace('_', '-')} takes a comma-separated subset of: {', '.join(ARMS)}")
        setattr(args, name, arms)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.via_gateway = [m.strip() for m in args.via_gateway.split(",") if m.strip()]
    try:
        args.subset = {m: int(n) for m, n in (s.split("=", 1) for s in args.subset)}
    except ValueError:
        p.error("--subset takes MODEL=N")
    if any(n < 1 for n in args.subset.values()):
        p.error("--subset N must be >= 1")
    return args


# --- stage one alone: OCR character error rate ---------------------------------------------------------

def ocr_text(description: Any) -> str:
    """The OCR lines in reading order as one string, whitespace runs made one space."""
    return " ".join(" ".join(line.text for line in description.lines).split())


def ocr_pass(docs: list[Document], progress: bool) -> tuple[dict[str, str], dict[str, Any]]:
    """Stage one on every document: (description texts by document id, CER and timing figures)."""
    import jiwer

    from fleetlm.vision.describe import describe_image

    descriptions, per_doc = {}, []
    for doc in tqdm(docs, desc="stage one (OCR)", unit="doc", disable=not progress):
        desc = describe_image(doc.render())
        descriptions[doc.id] = desc.text
        ref = " ".join(doc.text.split())
        per_doc.append((doc, ref, ocr_text(desc), desc.elapsed_s))

    def cer(group: list[tuple[Document, str, str, float]]) -> float | None:
        return round(jiwer.cer([g[1] for g in group], [g[2] for g in group]), 4) if group else None

    times = [t for *_, t in per_doc]
    clean = [g for g in per_doc if not (g[0].style.rotation_deg or g[0].style.blur_radius
                                        or g[0].style.noise_sigma)]
    figures = {
        "documents": len(per_doc), "cer": cer(per_doc),
        "cer_by_kind": {k: cer([g for g in per_doc if g[0].kind == k]) for k in KINDS},
        "cer_clean": cer(clean), "cer_degraded": cer([g for g in per_doc if g not in clean]),
        "clean_documents": len(clean),
        "ocr_seconds_mean": round(statistics.mean(times), 3),
        "ocr_seconds_median": round(statistics.median(times), 3),
        "ocr_seconds_max": round(max(times), 3),
        "stage_one": desc.stage_one,
        "first_image_seconds": round(times[0], 3),  # includes loading the ONNX models
    }
    return descriptions, figures


# --- the three arms -------------------------------------------------------------------------------------

def image_data_url(doc: Document) -> str:
    buf = io.BytesIO()
    doc.render().save(buf, format="PNG")  # lossless: the scan's JPEG faults are already in the pixels
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def ask_text(q: Question) -> str:
    return f"Question: {q.question}\n{INSTRUCTION}"


def messages_for(arm: str, q: Question, doc: Document, stage_one: str,
                 descriptions: dict[str, str]) -> list[dict[str, Any]]:
    """The one user message of a question in an arm."""
    if arm == "no-image":
        content: Any = ask_text(q)
    elif arm == "ground-truth":
        content = f"Document text:\n{doc.text}\n\n{ask_text(q)}"
    elif stage_one == "local":  # what the gateway sends on: the image part made "\n<text>\n", parts joined
        content = f"\n{descriptions[doc.id]}\n{ask_text(q)}"
    else:
        content = [{"type": "image_url", "image_url": {"url": image_data_url(doc), "detail": "high"}},
                   {"type": "text", "text": ask_text(q)}]
    return [{"role": "user", "content": content}]


def stage_one_of(model: str, args: argparse.Namespace) -> str:
    return "gateway" if model in args.via_gateway else args.stage_one


def arms_of(model: str, args: argparse.Namespace) -> list[str]:
    return args.auto_arms if model == ROUTER else args.arms


def ask(client: Any, model: str, arm: str, q: Question, doc: Document, args: argparse.Namespace,
        descriptions: dict[str, str]) -> Asked:
    out = Asked(model, arm, q.id, q.document, q.kind, q.skill, q.answer)
    started = time.perf_counter()
    try:
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=messages_for(arm, q, doc, stage_one_of(model, args), descriptions),
            temperature=0, max_tokens=args.max_tokens)
        reply = raw.parse()
    except Exception as exc:  # noqa: BLE001 - a failed request counts as wrong; the benchmark goes on
        out.latency_s = time.perf_counter() - started
        body = getattr(exc, "body", None)
        message = body.get("message") if isinstance(body, dict) else None
        out.error = f"{getattr(exc, 'status_code', type(exc).__name__)} {message or exc}"[:300]
        return out
    out.latency_s = time.perf_counter() - started
    out.reply = reply.choices[0].message.content or ""
    out.exact, out.contains = exact_match(out.reply, q.answer), contains_match(out.reply, q.answer)
    if reply.usage is not None:
        out.prompt_tokens, out.completion_tokens = reply.usage.prompt_tokens, reply.usage.completion_tokens
    out.cost_usd = float(raw.headers.get("x-fleet-cost-usd") or 0.0)
    out.answered_by = raw.headers.get("x-fleet-model", "")
    vision = raw.headers.get("x-fleet-vision")
    if vision:
        out.stage_one, out.stage_one_ms = read_vision_header(vision)
    elif arm == "two-stage":
        out.stage_one = "local"
    return out


def read_vision_header(value: str) -> tuple[str, float | None]:
    """(stage one's name, its milliseconds) from x-fleet-vision, e.g. "rapidocr-ppocrv4 (1 image, 412 ms)"."""
    ms = re.search(r"([\d.]+) ms\)\s*$", value)
    return value.split(" (")[0].strip(), float(ms.group(1)) if ms else None


def questions_for(model: str, questions: list[Question], args: argparse.Namespace) -> list[Question]:
    """All questions, or the model's seeded subset in the set's order. Subsets are nested (one seeded
    shuffle, its first N): models asked different N share the smaller one's questions."""
    n = args.subset.get(model)
    if n is None or n >= len(questions):
        return questions
    order = list(range(len(questions)))
    random.Random(f"vqa-subset:{args.seed}").shuffle(order)
    keep = set(order[:n])
    return [q for i, q in enumerate(questions) if i in keep]


def load_answers(path: Path) -> list[Asked]:
    """The answers of an earlier run (--resume): they are kept and not asked again."""
    if not path.is_file():
        return []
    return [Asked(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


# --- summaries ------------------------------------------------------------------------------------------

def summarize(asked: list[Asked]) -> list[dict[str, Any]]:
    """One row per model and arm: accuracy (exact, lenient), errors, latency, tokens, cost; by kind, skill."""
    groups: dict[tuple[str, str], list[Asked]] = defaultdict(list)
    for a in asked:
        groups[(a.model, a.arm)].append(a)
    models = list(dict.fromkeys(a.model for a in asked))
    rows = []
    for (model, arm), g in sorted(groups.items(), key=lambda kv: (models.index(kv[0][0]),
                                                                  ARMS.index(kv[0][1]))):
        n = len(g)
        rows.append({
            "model": model, "arm": arm, "n": n,
            "exact": round(sum(a.exact for a in g) / n, 4),
            "contains": round(sum(a.contains for a in g) / n, 4),
            "errors": sum(a.error is not None for a in g),
            "latency_s_mean": round(statistics.mean(a.latency_s for a in g), 3),
            "prompt_tokens_mean": round(statistics.mean(a.prompt_tokens for a in g), 1),
            "cost_usd_total": round(sum(a.cost_usd for a in g), 8),
            "cost_usd_per_question": round(sum(a.cost_usd for a in g) / n, 10),
            "answered_by": dict(sorted(_count(a.answered_by or "-" for a in g).items())),
            "stage_one": sorted({a.stage_one for a in g if a.stage_one}),
            "stage_one_ms_mean": _mean([a.stage_one_ms for a in g if a.stage_one_ms is not None]),
            "by_kind": _accuracy_by(g, "kind", KINDS), "by_skill": _accuracy_by(g, "skill", SKILLS),
        })
    return rows


def _mean(xs: list[float]) -> float | None:
    return round(statistics.mean(xs), 1) if xs else None


def _count(items: Any) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for x in items:
        out[x] += 1
    return dict(out)


def _accuracy_by(g: list[Asked], attr: str, keys: tuple[str, ...]) -> dict[str, dict[str, float]]:
    out = {}
    for k in keys:
        sel = [a for a in g if getattr(a, attr) == k]
        if sel:
            out[k] = {"n": len(sel), "exact": round(sum(a.exact for a in sel) / len(sel), 4)}
    return out


def _table(head: list[str], cells: list[list[str]], left: int = 2) -> str:
    widths = [max(len(c[i]) for c in [head, *cells]) for i in range(len(head))]

    def line(c: list[str]) -> str:
        return "  ".join(x.ljust(w) if i < left else x.rjust(w) for i, (x, w) in enumerate(zip(c, widths,
                                                                                                 strict=True)))

    return "\n".join([line(head), "  ".join("-" * w for w in widths), *[line(c) for c in cells]])


def format_summary(rows: list[dict[str, Any]]) -> str:
    head = ["model", "arm", "n", "exact %", "contains %", "errors", "latency s", "prompt tok", "cost USD/q",
            "stage one"]
    cells = [[r["model"], r["arm"], str(r["n"]), f"{100 * r['exact']:.1f}", f"{100 * r['contains']:.1f}",
              str(r["errors"]), f"{r['latency_s_mean']:.2f}", f"{r['prompt_tokens_mean']:.0f}",
              f"{r['cost_usd_per_question']:.2e}", _stage_one_cell(r)] for r in rows]
    return _table(head, cells)


def _stage_one_cell(row: dict[str, Any]) -> str:
    cell = ",".join(row["stage_one"]) or "-"
    return cell + (f" ({row['stage_one_ms_mean']:.0f} ms)" if row["stage_one_ms_mean"] is not None else "")


def format_breakdown(rows: list[dict[str, Any]], field: str, keys: tuple[str, ...]) -> str:
    head = ["model", "arm", *keys]
    cells = [[r["model"], r["arm"], *(f"{100 * r[field][k]['exact']:.1f} ({r[field][k]['n']})"
                                       if k in r[field] else "-" for k in keys)] for r in rows]
    return _table(head, cells)


def format_ocr(fig: dict[str, Any]) -> str:
    kinds = ", ".join(f"{k} {100 * v:.1f}%" for k, v in fig["cer_by_kind"].items() if v is not None)
    return (f"OCR alone ({fig['stage_one']}, {fig['documents']} documents): CER {100 * fig['cer']:.2f}% "
            f"(clean {_pct(fig['cer_clean'])} on {fig['clean_documents']}, "
            f"degraded {_pct(fig['cer_degraded'])}); "
            f"by kind: {kinds}; seconds per image: mean {fig['ocr_seconds_mean']:.2f}, median "
            f"{fig['ocr_seconds_median']:.2f}, max {fig['ocr_seconds_max']:.2f} "
            f"(first, with model loading: {fig['first_image_seconds']:.2f})")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def write_plot(rows: list[dict[str, Any]], ocr: dict[str, Any] | None, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    by = {(r["model"], r["arm"]): r for r in rows}
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 8))
    width = 0.8 / len(ARMS)
    for k, arm in enumerate(ARMS):
        xs = [i + (k - 1) * width for i in range(len(models))]
        accs = [100 * by[(m, arm)]["exact"] if (m, arm) in by else 0.0 for m in models]
        bars = top.bar(xs, accs, width, label=arm)
        for bar, m, acc in zip(bars, models, accs, strict=True):
            if (m, arm) in by:
                top.annotate(f"{acc:.0f}\nn={by[(m, arm)]['n']}", (bar.get_x() + bar.get_width() / 2, acc),
                             ha="center", va="bottom", fontsize=7)
    top.set_xticks(range(len(models)), models, fontsize=8)
    top.set_ylim(0, 110)
    top.set_ylabel("exact-match accuracy %")
    title = "Visual QA on the generated document set: two-stage against ground-truth text and no image"
    if ocr:
        title += f"\n(OCR alone: CER {100 * ocr['cer']:.1f}% on {ocr['documents']} documents)"
    top.set_title(title, fontsize=9)
    top.legend(fontsize=8)
    two = [r for r in rows if r["arm"] == "two-stage"]
    width = 0.8 / max(1, len(two))
    for k, r in enumerate(two):
        xs = [i + (k - (len(two) - 1) / 2) * width for i in range(len(KINDS))]
        bottom.bar(xs, [100 * r["by_kind"].get(kind, {}).get("exact", 0.0) for kind in KINDS], width,
                   label=r["model"])
    bottom.set_xticks(range(len(KINDS)), KINDS, fontsize=8)
    bottom.set_ylim(0, 105)
    bottom.set_ylabel("two-stage exact %")
    bottom.set_title("two-stage accuracy per document kind", fontsize=9)
    if two:
        bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- the run --------------------------------------------------------------------------------------------

def default_out() -> Path:
    from fleetlm.catalog.store import fleet_home

    return fleet_home() / "bench" / "vqa"


def start_gateway(out: Path, models: list[str]) -> Any:
    """fleet serve on the default fleet (the installed catalog models, `auto`), in a child process."""
    from fleetlm.demo.run import GatewayProcess
    from fleetlm.fleet.default import default_config_data

    data = default_config_data()
    unknown = [m for m in models if m not in data["models"] and m != (data.get("router") or {}).get("name")]
    if unknown:
        sys.exit(f"error: not in the default fleet: {', '.join(unknown)} "
                 f"(installed: {', '.join(data['models'])})")
    config = out / "fleet.yaml"
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    print(f"starting fleet serve on {config}", file=sys.stderr)
    return GatewayProcess(config, f"sqlite:///{(out / 'usage.db').resolve()}", out / "gateway.log")


def main(argv: list[str] | None = None) -> int:
    import openai

    from fleetlm.errors import FleetError

    args = parse_args(argv)
    out = args.out or default_out()
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    docs, questions = generate_set(args.questions, args.seed)
    by_id = {d.id: d for d in docs}
    kinds = {k: sum(q.kind == k for q in questions) for k in KINDS}
    print(f"{len(questions)} questions on {len(docs)} documents (seed {args.seed}): {kinds}", file=sys.stderr)
    ocr_file, texts_file = out / "ocr.json", out / "descriptions.json"
    two_stage_local = any(stage_one_of(m, args) == "local" and "two-stage" in arms_of(m, args)
                          for m in args.models)
    kept = json.loads(texts_file.read_text()) if args.resume and texts_file.is_file() else {}
    if args.resume and ocr_file.is_file() and (not two_stage_local or set(by_id) <= set(kept)):
        descriptions, ocr = kept, json.loads(ocr_file.read_text())  # the earlier run's stage one
    else:
        descriptions, ocr = ocr_pass(docs, not args.no_progress)
        ocr_file.write_text(json.dumps(ocr, indent=2) + "\n")
        texts_file.write_text(json.dumps(descriptions, indent=1) + "\n")
    print(format_ocr(ocr), file=sys.stderr)
    gateway = None
    try:
        if args.url is None:
            gateway = start_gateway(out, args.models)
        url = args.url or gateway.url
        client = openai.OpenAI(base_url=url, api_key="fleet-bench", timeout=REQUEST_TIMEOUT_S, max_retries=0)
        answers = out / "answers.jsonl"
        asked = load_answers(answers) if args.resume else []
        done = {(a.model, a.arm, a.question) for a in asked}
        with answers.open("a" if args.resume else "w") as sink:
            for model in args.models:
                qs = questions_for(model, questions, args)
                for arm in arms_of(model, args):
                    todo = [q for q in qs if (model, arm, q.id) not in done]
                    for q in tqdm(todo, desc=f"{model} {arm}", unit="q", disable=args.no_progress):
                        a = ask(client, model, arm, q, by_id[q.document], args, descriptions)
                        asked.append(a)
                        sink.write(json.dumps(asdict(a)) + "\n")
                        sink.flush()
    except FleetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if gateway is not None:
            gateway.stop()
    rows = summarize(asked)
    seconds = round(time.time() - started, 1)
    print()
    print(f"Visual QA, {len(questions)} questions on {len(docs)} generated documents (seed {args.seed}), "
          f"max_tokens {args.max_tokens}, temperature 0, this run {seconds:.0f} s")
    print(format_ocr(ocr))
    print(format_summary(rows))
    print("\nexact % by document kind (n)")
    print(format_breakdown(rows, "by_kind", KINDS))
    print("\nexact % by skill (n)")
    print(format_breakdown(rows, "by_skill", SKILLS))
    for r in rows:
        if r["model"] == ROUTER:
            print(f"auto answered by: {r['answered_by']} ({r['arm']})")
    settings = {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "documents": len(docs), "kinds": kinds, "seconds": seconds, "instruction": INSTRUCTION}
    report = {"settings": settings, "ocr": ocr, "rows": rows}
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    plot = "-" if args.no_plot else write_plot(rows, ocr, out / "vqa.png")
    print(f"results: {out / 'results.json'}  answers: {out / 'answers.jsonl'}  plot: {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
