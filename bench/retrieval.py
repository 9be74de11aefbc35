"""Retrieval quality on the labelled set (issue 12): BM25, dense, hybrid RRF and convex, through the API.

    make kb-corpus   # once, as root: Debian's python3.11-doc, the manual the passages are cut from
    flock /tmp/bench.lock .venv/bin/python bench/retrieval.py [--limit N] [--alphas 0.3,0.5,0.7]
        [--out $FLEET_HOME/bench/retrieval]

A gateway is built in-process (create_app over a TestClient: the knowledge endpoints need no language model;
its knowledge store and blobs go to a temporary directory) and driven with the official `openai` client.
Every passage of fleetlm.rag.labelled's corpus is uploaded as its own file and attached to one vector store
with its passage id as an attribute and `static` chunking of 800 tokens without overlap, so each passage is
exactly one chunk (the longest passage is 728 cl100k tokens). A result is judged by its file: the gold is
the passage the question was written against (one relevant id per question).

Every question is then asked through `client.vector_stores.search` (max_num_results 10) in each mode: BM25
alone, dense (MiniLM) alone, hybrid with reciprocal-rank fusion, and hybrid convex at each --alphas value;
plus "convex, alpha by 2-fold CV": the alpha picked on one half of the questions (by nDCG@10) scored on the
other half and vice versa, so the tuned arm is not graded on the questions that tuned it.

Printed: recall@5, MRR@10 and nDCG@10 per mode, for all questions and split into lexical (they name their
key words) and paraphrased ones, search latency p50, and the published BEIR anchors for orientation.
Written to --out: results.json (every figure, per-question ranks, the settings) and retrieval.png.
The rerank arm (a fleet model scoring relevance) is not here yet.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from fleetlm.catalog.store import fleet_home
from fleetlm.rag.labelled import DEBIAN_PACKAGE, CorpusMissing, Passage, Question, load_corpus, load_questions
from fleetlm.rag.metrics import Scores, score_runs

TOP_K = 10
CHUNKING = {"type": "static", "static": {"max_chunk_size_tokens": 800, "chunk_overlap_tokens": 0}}
BEIR_ANCHORS = ("published BEIR nDCG@10 (Thakur et al. 2021, for orientation only, other corpora): "
                "SciFact BM25 67.6 vs MiniLM 64.5, FiQA BM25 23.8 vs MiniLM 36.9")
GOAL = "goal: hybrid recall@5 >= 0.90 and >= 5 points above the better of BM25 and dense alone"


@dataclass(frozen=True)
class Mode:
    name: str
    retrieval: str
    fusion: str | None = None
    alpha: float | None = None

    def extra_body(self) -> dict:
        body: dict = {"fleet_retrieval": self.retrieval}
        if self.fusion:
            body["fleet_fusion"] = self.fusion
        if self.alpha is not None:
            body["fleet_alpha"] = self.alpha
        return body


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--limit", type=int, default=0, help="ask only the first N questions (0: all)")
    p.add_argument("--alphas", default="0.3,0.5,0.7", help="convex weights of the dense score to try")
    p.add_argument("--out", type=Path, default=None, help="default: $FLEET_HOME/bench/retrieval")
    return p.parse_args(argv)


def modes_for(alphas: Sequence[float]) -> list[Mode]:
    return ([Mode("bm25", "bm25"), Mode("dense", "dense"), Mode("hybrid rrf", "hybrid", "rrf")]
            + [Mode(f"hybrid convex a={a:g}", "hybrid", "convex", a) for a in alphas])


def start_gateway(work: Path):
    """The gateway with its knowledge base under `work`, and an openai client bound to it (in-process)."""
    import openai
    from fastapi.testclient import TestClient

    from fleetlm.config import parse_config
    from fleetlm.serve.app import create_app
    from fleetlm.serve.store import UsageStore

    config = parse_config({
        "models": {"unused": {"remote": "http://127.0.0.1:9/v1"}},  # search needs no language model
        "knowledge": {"files_dir": str(work / "blobs"), "index_path": str(work / "knowledge.db")},
    })
    app = create_app(config, UsageStore(f"sqlite:///{work / 'fleet.db'}"), {})
    tc = TestClient(app)
    tc.__enter__()  # runs the app's startup (the ingest worker); closed by the caller
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="bench", http_client=tc, max_retries=0)
    return tc, client


def upload(client, passages: Sequence[Passage]) -> tuple[str, dict[str, str], float]:
    """One vector store holding every passage as one file (one chunk); returns it, file id -> passage id."""
    started = time.perf_counter()
    store = client.vector_stores.create(name="python3.11-doc labelled set")
    by_file: dict[str, str] = {}
    for n, passage in enumerate(passages):
        name = passage.id.replace("/", "_").replace("#", "__") + ".txt"
        f = client.files.create(file=(name, io.BytesIO(passage.text.encode())), purpose="assistants")
        client.vector_stores.files.create(store.id, file_id=f.id, chunking_strategy=CHUNKING,
                                          attributes={"passage_id": passage.id, "page": passage.file})
        by_file[f.id] = passage.id
        if n % 200 == 0:
            print(f"  uploaded {n}/{len(passages)}", file=sys.stderr)
    while True:
        counts = client.vector_stores.retrieve(store.id).file_counts
        if counts.in_progress == 0:
            break
        time.sleep(0.5)
    if counts.completed != len(passages):
        raise SystemExit(f"ingestion: {counts.completed} of {len(passages)} files completed, "
                         f"{counts.failed} failed")
    return store.id, by_file, time.perf_counter() - started


def ask(client, store_id: str, by_file: dict[str, str], question: Question,
        mode: Mode) -> tuple[list[str], float]:
    started = time.perf_counter()
    page = client.vector_stores.search(store_id, query=question.question, max_num_results=TOP_K,
                                       extra_body=mode.extra_body())
    took = time.perf_counter() - started
    return [by_file[r.file_id] for r in page.data], took


def scores_of(questions: Sequence[Question], ranked: dict[str, list[str]]) -> Scores:
    return score_runs((ranked[q.id], {q.passage_id}) for q in questions)


def cross_validated_convex(questions: Sequence[Question], ranked: dict[str, dict[str, list[str]]],
                           convex: Sequence[Mode]) -> tuple[Scores, list[float]]:
    """Pick alpha by nDCG@10 on one half (even/odd question order), score it on the other, both ways."""
    halves = (questions[0::2], questions[1::2])
    picked: list[float] = []
    runs: list[tuple[list[str], set[str]]] = []
    for tune, test in (halves, halves[::-1]):
        best = max(convex, key=lambda m: scores_of(tune, ranked[m.name]).ndcg_at_10)
        picked.append(best.alpha or 0.0)
        runs.extend((ranked[best.name][q.id], {q.passage_id}) for q in test)
    return score_runs(runs), picked


def print_table(rows: list[dict]) -> None:
    head = f"{'mode':36} {'R@5':>6} {'MRR@10':>7} {'nDCG@10':>8} | {'lexical R@5':>11} {'nDCG':>6} | " \
           f"{'paraphrased R@5':>15} {'nDCG':>6} | {'p50 ms':>6}"
    print(head)
    print("-" * len(head))
    for r in rows:
        a, lx, pa = r["all"], r["lexical"], r["paraphrased"]
        p50 = f"{r['p50_ms']:6.1f}" if r.get("p50_ms") is not None else f"{'':6}"
        print(f"{r['mode']:36} {a['recall_at_5']:6.3f} {a['mrr_at_10']:7.3f} {a['ndcg_at_10']:8.3f} | "
              f"{lx['recall_at_5']:11.3f} {lx['ndcg_at_10']:6.3f} | {pa['recall_at_5']:15.3f} "
              f"{pa['ndcg_at_10']:6.3f} | {p50}")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharey=True)
    names = [r["mode"] for r in rows]
    for ax, (split, title) in zip(axes, (("all", "all questions"), ("lexical", "lexical"),
                                         ("paraphrased", "paraphrased")), strict=True):
        for i, (metric, label) in enumerate((("recall_at_5", "recall@5"), ("mrr_at_10", "MRR@10"),
                                             ("ndcg_at_10", "nDCG@10"))):
            ax.bar([x + (i - 1) * 0.27 for x in range(len(rows))], [r[split][metric] for r in rows],
                   width=0.27, label=label)
        ax.set_title(f"{title} (n={rows[0][split]['n']})")
        ax.set_xticks(range(len(rows)), names, rotation=35, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(loc="lower left")
    fig.suptitle("fleetlm retrieval on the python3.11-doc labelled set (vector_stores.search)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or fleet_home() / "bench" / "retrieval"
    out.mkdir(parents=True, exist_ok=True)
    try:
        passages = load_corpus()
    except CorpusMissing as exc:
        print(f"{exc}\n(Debian package {DEBIAN_PACKAGE})", file=sys.stderr)
        return 2
    questions = load_questions()
    if args.limit:
        questions = questions[: args.limit]
    alphas = [float(a) for a in args.alphas.split(",") if a.strip()]
    modes = modes_for(alphas)
    pages = len({p.file for p in passages})
    print(f"{len(passages)} passages from {pages} pages, {len(questions)} questions "
          f"({sum(q.lexical for q in questions)} lexical)", file=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="fleet-retrieval-") as tmp:
        tc, client = start_gateway(Path(tmp))
        try:
            store_id, by_file, ingest_s = upload(client, passages)
            print(f"  ingested in {ingest_s:.1f} s", file=sys.stderr)
            ranked: dict[str, dict[str, list[str]]] = {}
            latency: dict[str, list[float]] = {}
            for mode in modes:
                ranked[mode.name], latency[mode.name] = {}, []
                for q in questions:
                    ranked[mode.name][q.id], took = ask(client, store_id, by_file, q, mode)
                    latency[mode.name].append(took)
                print(f"  asked {mode.name}", file=sys.stderr)
        finally:
            tc.__exit__(None, None, None)

    splits = {"all": questions, "lexical": [q for q in questions if q.lexical],
              "paraphrased": [q for q in questions if not q.lexical]}
    rows = []
    for mode in modes:
        row = {"mode": mode.name, **{k: asdict(scores_of(qs, ranked[mode.name])) for k, qs in splits.items()},
               "p50_ms": 1000 * statistics.median(latency[mode.name])}
        rows.append(row)
    convex = [m for m in modes if m.fusion == "convex"]
    if len(convex) > 1 and len(questions) >= 4:
        cv_row: dict = {"mode": "hybrid convex (alpha by 2-fold CV)", "p50_ms": None}
        for split, qs in splits.items():
            scores, picked = cross_validated_convex(qs, ranked, convex)
            cv_row[split] = asdict(scores)
            cv_row.setdefault("alphas_picked", {})[split] = picked
        rows.append(cv_row)

    print_table(rows)
    by_name = {r["mode"]: r for r in rows}
    best_single = max(by_name["bm25"]["all"]["recall_at_5"], by_name["dense"]["all"]["recall_at_5"])
    hybrid = by_name["hybrid rrf"]["all"]["recall_at_5"]
    print(f"\nhybrid rrf recall@5 {hybrid:.3f}: {100 * (hybrid - best_single):+.1f} points over the better "
          f"single retriever ({best_single:.3f}); {GOAL}")
    print(BEIR_ANCHORS)

    results = {
        "settings": {"top_k": TOP_K, "chunking": CHUNKING, "alphas": alphas, "passages": len(passages),
                     "questions": len(questions), "ingest_seconds": ingest_s},
        "rows": rows,
        "ranked": ranked,
        "gold": {q.id: q.passage_id for q in questions},
        "anchors": BEIR_ANCHORS,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot(rows, out / "retrieval.png")
    print(f"wrote {out / 'results.json'} and {out / 'retrieval.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
