"""Retrieval quality on the labelled set (issue 12): BM25, dense, hybrid convex and RRF, rerank, via the API.

    make kb-corpus   # once, as root: Debian's python3.11-doc, the manual the passages are cut from
    flock /tmp/bench.lock .venv/bin/python bench/retrieval.py [--limit N] [--alphas 0.3,0.5,0.7]
        [--rerank qwen2.5-coder-0.5b-instruct --rerank-questions 20 --rerank-depth 10]
        [--out $FLEET_HOME/bench/retrieval] [--fresh]

A gateway is built in-process (create_app over a TestClient: the knowledge endpoints need no language model;
its knowledge store and blobs live in <out>/work, kept between runs so a rerun skips ingestion unless the
passages changed or --fresh is given) and driven with the official `openai` client.
Every passage of fleetlm.rag.labelled's corpus is uploaded as its own file and attached to one vector store
with its passage id as an attribute and `static` chunking of 800 tokens without overlap, so each passage is
exactly one chunk (the longest passage is 728 cl100k tokens). A result is judged by its file: the gold is
the passage the question was written against (one relevant id per question).

Every question is then asked through `client.vector_stores.search` (max_num_results 10) in each mode: BM25
alone, dense (MiniLM) alone, hybrid as the product serves it by default (no fleet_* field: convex, alpha
0.7, both sides min-max scaled), hybrid with reciprocal-rank fusion, and hybrid convex at each --alphas
value; plus "convex, alpha by 2-fold CV": the alpha picked on one half of the questions (by nDCG@10)
scored on the other half and vice versa, so the tuned arm is not graded on the questions that tuned it,
and the default on the odd-numbered half alone (its alpha, 0.7, was picked on the even-numbered half).

Printed: recall@5, MRR@10 and nDCG@10 per mode, for all questions and split into lexical (they name their
key words) and paraphrased ones, search latency p50, and the published BEIR anchors for orientation.
With --rerank MODEL (a catalog model, served by the same gateway on llama.cpp), an evenly spread sample of
--rerank-questions questions is asked again with the product's reranker, `ranking_options.ranker:
"fleet:MODEL"` and `fleet_rerank_depth` (rag/rerank.py: the default hybrid's top depth judged by the
model, one one-token "yes or no" answer per passage, ordered by P(yes)). The sample's default-hybrid
figures are printed beside it, so the two rows compare the same questions; the judging time is printed.

Written to --out: results.json (every figure, per-question ranks, the settings) and retrieval.png.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import statistics
import sys
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
    p.add_argument("--alphas", default="0.5,0.6,0.7,0.8,0.9", help="convex weights of the dense score")
    p.add_argument("--out", type=Path, default=None, help="default: $FLEET_HOME/bench/retrieval")
    p.add_argument("--fresh", action="store_true", help="ingest again even if <out>/work holds the passages")
    p.add_argument("--rerank", default="", help="catalog model that reranks the default hybrid's results")
    p.add_argument("--rerank-questions", type=int, default=20, help="questions in the rerank sample")
    p.add_argument("--rerank-depth", type=int, default=10, help="hybrid candidates the model judges")
    return p.parse_args(argv)


DEFAULT = "hybrid default (convex a=0.7)"


def modes_for(alphas: Sequence[float]) -> list[Mode]:
    return ([Mode("bm25", "bm25"), Mode("dense", "dense"), Mode(DEFAULT, "hybrid"),
             Mode("hybrid rrf", "hybrid", "rrf")]
            + [Mode(f"hybrid convex a={a:g}", "hybrid", "convex", a) for a in alphas])


def start_gateway(work: Path, rerank_model: str = ""):
    """The gateway with its knowledge base under `work`, and an openai client bound to it (in-process)."""
    import openai
    from fastapi.testclient import TestClient

    from fleetlm.config import parse_config
    from fleetlm.serve.app import create_app
    from fleetlm.serve.backends import build_backends
    from fleetlm.serve.store import UsageStore

    models: dict = {"unused": {"remote": "http://127.0.0.1:9/v1"}}  # search needs no language model
    if rerank_model:
        models = {rerank_model: {"catalog": rerank_model, "engine": "llama_cpp",
                                 "price": {"input": 0.0, "output": 0.0}}}
    config = parse_config({
        "models": models,
        "knowledge": {"files_dir": str(work / "blobs"), "index_path": str(work / "knowledge.db")},
    })
    backends = build_backends(config) if rerank_model else {}
    app = create_app(config, UsageStore(f"sqlite:///{work / 'fleet.db'}"), backends)
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


def corpus_digest(passages: Sequence[Passage]) -> str:
    return hashlib.sha256("\n".join(f"{p.id}\t{p.text}" for p in passages).encode()).hexdigest()


def saved_store(work: Path, digest: str) -> dict | None:
    """The manifest of the store an earlier run ingested into `work`, if it holds these very passages."""
    manifest = work / "manifest.json"
    if not manifest.is_file():
        return None
    saved = json.loads(manifest.read_text())
    return saved if saved.get("digest") == digest else None


def reuse_or_upload(client, work: Path, passages: Sequence[Passage], digest: str) -> dict:
    """The saved store when its files are all there, else every passage ingested into a new one."""
    saved = saved_store(work, digest)
    if saved and client.vector_stores.retrieve(saved["store_id"]).file_counts.completed == len(passages):
        print(f"  reusing the store ingested earlier ({saved['ingest_seconds']:.1f} s then)", file=sys.stderr)
        return saved
    store_id, by_file, seconds = upload(client, passages)
    print(f"  ingested in {seconds:.1f} s", file=sys.stderr)
    saved = {"digest": digest, "store_id": store_id, "by_file": by_file, "ingest_seconds": seconds}
    (work / "manifest.json").write_text(json.dumps(saved))
    return saved


def ask(client, store_id: str, by_file: dict[str, str], question: Question,
        mode: Mode) -> tuple[list[str], float]:
    started = time.perf_counter()
    page = client.vector_stores.search(store_id, query=question.question, max_num_results=TOP_K,
                                       extra_body=mode.extra_body())
    took = time.perf_counter() - started
    return [by_file[r.file_id] for r in page.data], took


def ask_reranked(client, store_id: str, by_file: dict[str, str], question: Question, model: str,
                 depth: int) -> list[str]:
    """The default hybrid search reranked by the product's fleet ranker."""
    page = client.vector_stores.search(store_id, query=question.question, max_num_results=TOP_K,
                                       ranking_options={"ranker": f"fleet:{model}"},  # type: ignore[typeddict-item]
                                       extra_body={"fleet_rerank_depth": depth})
    return [by_file[r.file_id] for r in page.data]


def spread_sample(questions: Sequence[Question], n: int) -> list[Question]:
    """n questions evenly spread over the set (so lexical and paraphrased ones both appear)."""
    if n <= 0 or n >= len(questions):
        return list(questions)
    step = len(questions) / n
    return [questions[int(i * step)] for i in range(n)]


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

    work = out / "work"
    digest = corpus_digest(passages)
    if args.fresh or saved_store(work, digest) is None:
        shutil.rmtree(work, ignore_errors=True)  # an old store of other passages: start clean
    work.mkdir(exist_ok=True)
    tc, client = start_gateway(work, args.rerank)
    reranked: dict[str, list[str]] = {}
    sample: list[Question] = []
    rerank_s = 0.0
    try:
        saved = reuse_or_upload(client, work, passages, digest)
        store_id, by_file, ingest_s = saved["store_id"], saved["by_file"], saved["ingest_seconds"]
        ranked: dict[str, dict[str, list[str]]] = {}
        latency: dict[str, list[float]] = {}
        for mode in modes:
            ranked[mode.name], latency[mode.name] = {}, []
            for q in questions:
                ranked[mode.name][q.id], took = ask(client, store_id, by_file, q, mode)
                latency[mode.name].append(took)
            print(f"  asked {mode.name}", file=sys.stderr)
        if args.rerank:
            sample = spread_sample(questions, args.rerank_questions)
            started = time.perf_counter()
            for n, q in enumerate(sample):
                reranked[q.id] = ask_reranked(client, store_id, by_file, q, args.rerank, args.rerank_depth)
                if n % 5 == 0:
                    print(f"  reranked {n}/{len(sample)} ({time.perf_counter() - started:.0f} s)",
                          file=sys.stderr)
            rerank_s = time.perf_counter() - started
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
    held_out = {"all": questions[1::2], "lexical": [q for q in questions[1::2] if q.lexical],
                "paraphrased": [q for q in questions[1::2] if not q.lexical]}
    if len(questions) >= 4:
        rows.append({"mode": "default, odd half (held out from alpha)", "p50_ms": None,
                     **{k: asdict(scores_of(qs, ranked[DEFAULT])) for k, qs in held_out.items()}})

    if reranked:
        sample_splits = {"all": sample, "lexical": [q for q in sample if q.lexical],
                         "paraphrased": [q for q in sample if not q.lexical]}
        rows.append({"mode": f"default hybrid, rerank sample (n={len(sample)})", "p50_ms": None,
                     **{k: asdict(scores_of(qs, ranked[DEFAULT])) for k, qs in sample_splits.items()}})
        rows.append({"mode": f"  + rerank {args.rerank} depth {args.rerank_depth}", "p50_ms": None,
                     **{k: asdict(scores_of(qs, reranked)) for k, qs in sample_splits.items()}})

    print_table(rows)
    by_name = {r["mode"]: r for r in rows}
    best_single = max(by_name["bm25"]["all"]["recall_at_5"], by_name["dense"]["all"]["recall_at_5"])
    hybrid = by_name[DEFAULT]["all"]["recall_at_5"]
    at_10 = statistics.mean(q.passage_id in ranked[DEFAULT][q.id][:TOP_K] for q in questions)
    print(f"\n{DEFAULT}: the gold is in the top {TOP_K} for {at_10:.3f} of the questions "
          f"(the most a reranker of depth {TOP_K} can bring into the top 5)")
    if reranked:
        print(f"\nreranking took {rerank_s:.0f} s for {len(sample)} questions "
              f"({rerank_s / len(sample):.1f} s per search)")
    print(f"\n{DEFAULT} recall@5 {hybrid:.3f}: {100 * (hybrid - best_single):+.1f} points over the better "
          f"single retriever ({best_single:.3f}); {GOAL}")
    print(BEIR_ANCHORS)

    results = {
        "settings": {"top_k": TOP_K, "chunking": CHUNKING, "alphas": alphas, "passages": len(passages),
                     "questions": len(questions), "ingest_seconds": ingest_s},
        "rows": rows,
        "ranked": ranked,
        "reranked": reranked,
        "rerank": {"model": args.rerank, "depth": args.rerank_depth, "questions": [q.id for q in sample],
                   "seconds": rerank_s},
        "gold": {q.id: q.passage_id for q in questions},
        "anchors": BEIR_ANCHORS,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot(rows, out / "retrieval.png")
    print(f"wrote {out / 'results.json'} and {out / 'retrieval.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
