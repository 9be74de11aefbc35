"""Retrieval variants on the labelled set, outside the API: which dense vectors, BM25 query and fusion.

    flock /tmp/bench.lock nice .venv/bin/python bench/retrieval_variants.py [--cache PATH]

The passages and questions of fleetlm.rag.labelled, scored as bench/retrieval.py scores them (recall@5,
MRR@10, nDCG@10 of the passage ids), but ranked here directly, so that many variants cost one embedding
pass (about 17 minutes on the shared 2-core machine; --cache keeps the vectors for a rerun):
- dense: MiniLM on the first 256 word pieces (what the store holds), the mean of overlapping 254-piece
  windows (half a window apart, normalized: one vector per chunk), and the max over the windows (one
  vector per window: a schema change, measured to see what it would be worth);
- BM25: FTS5 with the store's tokenizer (porter unicode61) on the query's words OR-ed, with and without
  English stop words (rag/search.py's list);
- fusion: RRF (k 60, 20, 5), weighted RRF (dense weight 1.5, 2, 3), convex with BM25 scaled by its best
  score and the cosine as it is (the first version) or both min-max scaled, alpha 0.7, 0.8, 0.9; the
  convex runs here give a chunk that one list lacks 0 on that side, where the product computes its exact
  cosine (rag/search.py), so the product's convex figures come from bench/retrieval.py.
Each line prints all questions' figures and recall@5 on the lexical and paraphrased halves.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import apsw
import numpy as np

from fleetlm.rag.labelled import load_corpus, load_questions
from fleetlm.rag.metrics import score_runs
from fleetlm.rag.search import STOP_WORDS, WORD

Ranked = list[tuple[int, float]]  # (passage index, score), best first
WINDOW, STRIDE, DEPTH = 254, 127, 50


def minilm():
    import torch
    from sentence_transformers import SentenceTransformer

    from fleetlm.route.features import minilm_model_path

    torch.set_num_threads(1)
    return SentenceTransformer(str(minilm_model_path()), device="cpu")


def windows_of(tokenizer, text: str) -> list[list[int]]:
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if len(ids) <= WINDOW:
        return [ids]
    starts = list(range(0, len(ids) - WINDOW, STRIDE)) + [len(ids) - WINDOW]
    return [ids[s : s + WINDOW] for s in starts]


def encode_ids(st, seqs: Sequence[list[int]], batch: int = 32) -> np.ndarray:
    import torch

    tok, out = st.tokenizer, []
    for i in range(0, len(seqs), batch):
        part = seqs[i : i + batch]
        width = max(len(s) for s in part) + 2
        ids = torch.zeros(len(part), width, dtype=torch.long)
        mask = torch.zeros(len(part), width, dtype=torch.long)
        for j, s in enumerate(part):
            row = [tok.cls_token_id, *s, tok.sep_token_id]
            ids[j, : len(row)] = torch.tensor(row)
            mask[j, : len(row)] = 1
        with torch.inference_mode():
            emb = st.forward({"input_ids": ids, "attention_mask": mask,
                              "token_type_ids": torch.zeros_like(mask)})["sentence_embedding"]
        out.append(torch.nn.functional.normalize(emb.float(), dim=-1).numpy())
    return np.concatenate(out)


def vectors(texts: list[str], queries: list[str], cache: Path) -> dict[str, np.ndarray]:
    if cache.is_file():
        with np.load(cache) as z:
            return {"trunc": z["trunc"], "win": z["win"], "owner": z["owner"], "qv": z["qv"]}
    st, started = minilm(), time.perf_counter()
    seqs, owner = [], []
    for n, text in enumerate(texts):
        for w in windows_of(st.tokenizer, text):
            seqs.append(w)
            owner.append(n)
    out = {"trunc": st.encode(texts, batch_size=32, normalize_embeddings=True),
           "win": encode_ids(st, seqs), "owner": np.array(owner),
           "qv": st.encode(queries, batch_size=32, normalize_embeddings=True)}
    print(f"embedded {len(texts)} passages ({len(seqs)} windows) in {time.perf_counter() - started:.0f} s",
          file=sys.stderr)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **out)
    return out


def match_of(text: str, drop_stop_words: bool) -> str:
    words = list(dict.fromkeys(w.lower() for w in WORD.findall(text)))
    if drop_stop_words:
        words = [w for w in words if w not in STOP_WORDS] or words
    return " OR ".join(f'"{w}"' for w in words)


def top(scores: np.ndarray, k: int = DEPTH) -> Ranked:
    best = np.argsort(-scores, kind="stable")[:k]
    return [(int(i), float(scores[i])) for i in best]


def rrf(lists: Sequence[Ranked], k: int = 60, weights: Sequence[float] = (1.0, 1.0)) -> list[int]:
    scores: dict[int, float] = {}
    for w, ranked in zip(weights, lists, strict=True):
        for rank, (key, _) in enumerate(ranked, start=1):
            scores[key] = scores.get(key, 0.0) + w / (k + rank)
    return [key for key, _ in sorted(scores.items(), key=lambda kv: -kv[1])]


def scaled(scores: dict[int, float]) -> dict[int, float]:
    lo, hi = min(scores.values(), default=0.0), max(scores.values(), default=1.0)
    return {key: (s - lo) / (hi - lo) if hi > lo else 1.0 for key, s in scores.items()}


def convex(lexical: Ranked, dense: Ranked, alpha: float, min_max: bool) -> list[int]:
    bm, cos = dict(lexical), dict(dense)
    if min_max:
        bm, cos = scaled(bm), scaled(cos)
    else:
        best = max(bm.values(), default=1.0) or 1.0
        bm, cos = {k: v / best for k, v in bm.items()}, {k: max(0.0, v) for k, v in cos.items()}
    fused = {k: alpha * cos.get(k, 0.0) + (1 - alpha) * bm.get(k, 0.0) for k in set(bm) | set(cos)}
    return [key for key, _ in sorted(fused.items(), key=lambda kv: -kv[1])]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, default=Path("/tmp/fleetlm-retrieval-variants.npz"))
    args = p.parse_args(argv)
    passages, questions = load_corpus(), load_questions()
    ids, texts = [p.id for p in passages], [p.text for p in passages]
    v = vectors(texts, [q.question for q in questions], args.cache)
    mean = np.zeros_like(v["trunc"])
    np.add.at(mean, v["owner"], v["win"])
    mean /= np.linalg.norm(mean, axis=1, keepdims=True)

    db = apsw.Connection(":memory:")
    db.execute("CREATE VIRTUAL TABLE f USING fts5(text, tokenize='porter unicode61')")
    with db:
        for n, text in enumerate(texts):
            db.execute("INSERT INTO f(rowid, text) VALUES (?, ?)", (n, text))

    def bm25(text: str, drop: bool) -> Ranked:
        sql = "SELECT rowid, -bm25(f) FROM f WHERE f MATCH ? ORDER BY bm25(f) LIMIT ?"
        return [(r[0], r[1]) for r in db.execute(sql, (match_of(text, drop), DEPTH))]

    def window_max(q: np.ndarray) -> np.ndarray:
        best = np.full(len(texts), -1.0)
        np.maximum.at(best, v["owner"], v["win"] @ q)
        return best

    lexical = {name: [bm25(q.question, drop) for q in questions]
               for name, drop in (("bm25", False), ("bm25-stop", True))}
    dense = {"trunc": [top(v["trunc"] @ v["qv"][i]) for i in range(len(questions))],
             "mean": [top(mean @ v["qv"][i]) for i in range(len(questions))],
             "max": [top(window_max(v["qv"][i])) for i in range(len(questions))]}

    def report(name: str, ranked: list[list[int]]) -> None:
        runs = [([ids[i] for i in r[:10]], {q.passage_id}) for r, q in zip(ranked, questions, strict=True)]
        a = score_runs(runs)
        lx = score_runs(run for run, q in zip(runs, questions, strict=True) if q.lexical)
        pa = score_runs(run for run, q in zip(runs, questions, strict=True) if not q.lexical)
        print(f"{name:38} R@5 {a.recall_at_5:.3f} MRR@10 {a.mrr_at_10:.3f} nDCG@10 {a.ndcg_at_10:.3f} | "
              f"lexical R@5 {lx.recall_at_5:.3f} paraphrased R@5 {pa.recall_at_5:.3f}")

    for name, lists in (*lexical.items(), *dense.items()):
        report(name if name.startswith("bm25") else f"dense {name}", [[k for k, _ in r] for r in lists])
    for ln, lx in lexical.items():
        for dn, dl in dense.items():
            for k in (60, 20, 5):
                report(f"rrf k={k} {ln}+{dn}", [rrf(pair, k) for pair in zip(lx, dl, strict=True)])
            for w in (1.5, 2.0, 3.0):
                report(f"rrf w={w} {ln}+{dn}", [rrf(pair, 60, (1.0, w)) for pair in zip(lx, dl, strict=True)])
            for alpha in (0.7, 0.8, 0.9):
                for mm in (False, True):
                    report(f"convex {'min-max' if mm else 'best'} a={alpha} {ln}+{dn}",
                           [convex(a, b, alpha, mm) for a, b in zip(lx, dl, strict=True)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
