"""The recipe that trains a tiny toy fleet from a seed: data, tokenizer, generalists, expert, eval, router.

Every step uses the project's own code (task suite, BPE, training loop, distillation, evaluator, routers),
so `fleet fleet build` is an end-to-end check of that code (and the benches' training shapes come from it);
CI runs the `ci` recipe, a scaled-down copy of `full` that keeps every step. No fleet built by it ships with
the package: the real fleet is the catalog's models (fleet/default.py).

Layout of the output directory:
    data/{train,route,test}.jsonl   training records (gold answers), routing (dev split), test split
    tokenizer/                      the byte-level BPE every model shares (so token-level KD works)
    <model>/                        HF-layout checkpoints: the generalists and the domain expert
    routing.jsonl                   each model's replies and 0/1 outcomes on the routing records
    router/                         the router fitted on routing.jsonl
    eval.json                       accuracy per model, domain and level on the test split
    fleet.yaml                      the gateway config: models, prices, router
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from fleetlm.errors import ConfigError

# Dollars per million output tokens per million parameters: price follows compute per token (~2 x params
# FLOPs), the way hosted APIs price bigger models higher. Input tokens cost a third of output tokens.
PRICE_PER_M_PARAMS = 0.10
INPUT_PRICE_SHARE = 1 / 3


@dataclass(frozen=True)
class Size:
    """One model of the fleet: its shape and its training budget."""

    name: str
    hidden: int
    layers: int
    heads: int
    intermediate: int
    steps: int
    lr: float = 3e-3
    kv_heads: int | None = None


@dataclass(frozen=True)
class Expert:
    """A small model distilled from the largest generalist on one domain."""

    name: str
    domain: str
    size: Size
    method: str = "kl"  # token-level KD with forward KL (see fleetlm.train.distill)
    alpha: float = 0.5  # weight of the KD term against the plain LM loss
    # Whose answers the student reads: the teacher's (greedy), so both the LM and the KD term pull it
    # towards what the teacher does, the thing an expert must match; "gold" learns the task's answers.
    responses: str = "teacher"


@dataclass(frozen=True)
class Recipe:
    name: str
    generalists: tuple[Size, ...]
    experts: tuple[Expert, ...]
    seed: int = 0
    n_train: int = 4000  # training records per domain
    n_route: int = 200  # dev-split records per domain whose outcomes fit the router
    n_test: int = 200  # test-split records per domain, drawn with a seed training never saw
    vocab_size: int = 512
    batch_size: int = 32
    seq_len: int = 160
    router: str = "knn"
    quality_floor: float = 0.95
    jobs: int = 2  # models trained at once, one thread each
    domains: tuple[str, ...] = ()  # empty: every domain of the suite
    levels: tuple[int, ...] = ()  # empty: every level; else the levels the fleet is trained and tested on
    eval_max_tokens: int = 40
    # Training records per (domain, level) at least: smaller cells (1-digit sums, level-1 conversions) are
    # repeated up to it, so the few distinct easy questions are not lost among ~100k hard ones.
    min_per_cell: int = 0


RECIPES: dict[str, Recipe] = {
    "full": Recipe(
        name="full",
        generalists=(
            # ~0.14M, ~0.7M and ~1.9M parameters; the same steps and data, so only capacity differs. The
            # learning rate falls with width (muP's 1/width): at 3e-3 and 4e-3 the two bigger models sat on a
            # loss plateau for most of a 4000-step run and ended below the 0.14M model (recipe v2).
            Size("fleet-nano", hidden=64, layers=2, heads=4, intermediate=192, steps=5000, lr=5e-3),
            Size("fleet-small", hidden=128, layers=3, heads=4, intermediate=384, steps=5000, lr=2e-3),
            Size("fleet-base", hidden=192, layers=4, heads=6, kv_heads=3, intermediate=576, steps=5000,
                 lr=1e-3),
        ),
        experts=(
            Expert("fleet-convert", "conversion", Size("fleet-convert", hidden=128, layers=3, heads=4,
                                                       intermediate=384, steps=1500, lr=2e-3)),
            Expert("fleet-arith", "arithmetic", Size("fleet-arith", hidden=128, layers=3, heads=4,
                                                     intermediate=384, steps=1500, lr=2e-3)),
        ),
        batch_size=24,
        # ~95k distinct questions (levels 1-3), about one pass in 5000 x 24: with 12.5k (recipe v3, 10 passes)
        # the 1.9M model memorised its training answers (49% on train-split strings, 14% on test) and fell
        # behind the 0.7M one on the test split.
        n_train=40000,
        min_per_cell=3000,
        # Levels 4-6 (e.g. 5-digit products, 12-letter reversals) stayed at 0% for every size within a
        # 2-core budget, and their long answers drowned the learnable levels' gradient: the fleet is
        # trained and measured on levels 1-3 (see docs/FLEET.md).
        levels=(1, 2, 3),
    ),
    "ci": Recipe(
        name="ci",
        generalists=(
            Size("ci-nano", hidden=32, layers=1, heads=2, intermediate=64, steps=30, lr=5e-3),
            Size("ci-small", hidden=48, layers=2, heads=2, intermediate=128, steps=30, lr=5e-3),
        ),
        experts=(Expert("ci-arith", "arithmetic",
                        Size("ci-arith", hidden=32, layers=1, heads=2, intermediate=64, steps=15)),),
        n_train=60, n_route=12, n_test=12, vocab_size=320, batch_size=8, seq_len=128, jobs=1,
        domains=("arithmetic", "strings", "classification"), eval_max_tokens=16,
    ),
}


def params_of(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in model_dir.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            total += sum(math.prod(st.get_slice(key).get_shape()) for key in st.keys())
    return total


def price_of(n_params: int) -> dict[str, float]:
    output = round(n_params / 1e6 * PRICE_PER_M_PARAMS, 6)
    return {"input": round(output * INPUT_PRICE_SHARE, 6), "output": output}


# ---- steps -----------------------------------------------------------------------------------------------


def make_data(out: Path, recipe: Recipe) -> dict[str, Path]:
    """Training records with gold answers (train split), routing records (dev split), test records (test
    split, drawn with another seed); each split owns its questions by hash, so none leaks into another."""
    from fleetlm.tasks.suite import generate, write_jsonl

    domains = list(recipe.domains) or None
    levels = list(recipe.levels) or None
    data = out / "data"

    def draw(n: int, seed: int, split: str, answers: bool = False) -> list[dict]:
        return generate(domains, n, seed, levels=levels, split=split, answers=answers)

    train = upsample_cells(draw(recipe.n_train, recipe.seed, "train", answers=True), recipe.min_per_cell)
    return {
        "train": write_jsonl(train, data / "train.jsonl"),
        "route": write_jsonl(draw(recipe.n_route, recipe.seed + 1, "dev"), data / "route.jsonl"),
        "test": write_jsonl(draw(recipe.n_test, recipe.seed + 2, "test"), data / "test.jsonl"),
    }


def upsample_cells(records: list[dict], floor: int) -> list[dict]:
    """Repeat the records of each (domain, level) cell smaller than `floor` (cycling, in order) up to it."""
    cells: dict[tuple, list[dict]] = {}
    for r in records:
        cells.setdefault((r.get("domain"), r.get("level")), []).append(r)
    out = list(records)
    for rows in cells.values():
        out += [rows[i % len(rows)] for i in range(max(0, floor - len(rows)))]
    return out


def make_tokenizer(out: Path, train_path: Path, recipe: Recipe) -> Path:
    from fleetlm.tasks.suite import read_jsonl
    from fleetlm.train.bpe import train_bpe

    texts = [m["content"] for r in read_jsonl(train_path) for m in r["messages"]]
    return train_bpe(texts, recipe.vocab_size, out / "tokenizer", model_max_length=recipe.seq_len * 2,
                     individual_digits=True)


def train_config(size: Size, recipe: Recipe, train_path: Path, tok_dir: Path, out_dir: Path,
                 progress: bool = True):
    from fleetlm.train.config import parse_config

    model = {"shape": {
        "hidden_size": size.hidden, "intermediate_size": size.intermediate, "num_layers": size.layers,
        "num_heads": size.heads, "num_kv_heads": size.kv_heads,
        "max_position_embeddings": recipe.seq_len * 2}}
    return parse_config({
        "model": model,
        "tokenizer": {"path": str(tok_dir)},
        "data": {"train": str(train_path), "format": "chat", "seq_len": recipe.seq_len},
        "out_dir": str(out_dir), "steps": size.steps, "batch_size": recipe.batch_size, "lr": size.lr,
        "min_lr": size.lr / 10, "warmup_steps": max(1, size.steps // 20), "eval_interval": 0,
        "seed": recipe.seed, "progress": progress, "weight_decay": 0.0,
    })


def _train_one(args: tuple) -> dict[str, Any]:
    """Train one generalist in its own process with one thread (small models: one thread is fastest)."""
    import torch

    from fleetlm.train.loop import train

    size, recipe, train_path, tok_dir, out_dir = args
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    result = train(train_config(size, recipe, train_path, tok_dir, out_dir))
    return {"model": size.name, "steps": result.step, "train_loss": result.train_loss,
            "tokens_per_s": result.tokens_per_s, "seconds": time.perf_counter() - t0}


def run_jobs(fn: Callable[[tuple], dict[str, Any]], jobs: list[tuple], workers: int) -> list[dict[str, Any]]:
    """fn over jobs, `workers` processes at once (one thread each); in this process when workers is 1."""
    if workers <= 1 or len(jobs) <= 1:
        return [fn(j) for j in jobs]
    with ProcessPoolExecutor(min(workers, len(jobs))) as pool:
        return list(pool.map(fn, jobs))


def train_generalists(out: Path, recipe: Recipe, train_path: Path, tok_dir: Path,
                      log: Callable[[str], None]) -> list[dict[str, Any]]:
    jobs = [(s, recipe, train_path, tok_dir, out / s.name) for s in recipe.generalists]
    # Biggest first: it takes longest, so the small ones fill the other worker meanwhile.
    jobs.sort(key=lambda j: -j[0].hidden * j[0].layers)
    results = run_jobs(_train_one, jobs, recipe.jobs)
    for r in results:
        log(f"trained {r['model']}: loss {r['train_loss']:.3f}, {r['tokens_per_s']:,.0f} tok/s, "
            f"{r['seconds']:.0f} s")
    return results


def domain_data(train_path: Path, domain: str, out_path: Path) -> Path:
    from fleetlm.tasks.suite import read_jsonl, write_jsonl

    rows = [r for r in read_jsonl(train_path) if r.get("domain") == domain]
    if not rows:
        raise ConfigError(f"no training records for expert domain {domain!r}")
    return write_jsonl(rows, out_path)


def _distill_one(args: tuple) -> dict[str, Any]:
    """Distill one expert from the teacher (token-level KD on its domain's training records)."""
    import torch

    from fleetlm.train.distill import distill, parse_distill_config

    expert, recipe, data, tok_dir, teacher, out_dir = args
    torch.set_num_threads(1)
    cfg = train_config(expert.size, recipe, data, tok_dir, out_dir)
    dcfg = parse_distill_config({"teacher": str(teacher), "prompts": str(data), "method": expert.method,
                                 "alpha": expert.alpha, "responses": expert.responses,
                                 "max_new_tokens": recipe.eval_max_tokens})
    t0 = time.perf_counter()
    result = distill(cfg, dcfg)
    return {"model": expert.name, "teacher": teacher.name, "domain": expert.domain, "steps": result.step,
            "train_loss": result.train_loss, "tokens_per_s": result.tokens_per_s,
            "seconds": time.perf_counter() - t0}


def train_experts(out: Path, recipe: Recipe, teacher: Path, train_path: Path, tok_dir: Path,
                  log: Callable[[str], None]) -> list[dict[str, Any]]:
    jobs = [(e, recipe, domain_data(train_path, e.domain, out / "data" / f"{e.domain}.jsonl"), tok_dir,
             teacher, out / e.name) for e in recipe.experts]
    results = run_jobs(_distill_one, jobs, recipe.jobs)
    for r in results:
        log(f"distilled {r['model']} from {r['teacher']} on {r['domain']}: loss {r['train_loss']:.3f}, "
            f"{r['tokens_per_s']:,.0f} tok/s, {r['seconds']:.0f} s")
    return results


def evaluate_all(out: Path, models: list[str], records: list[dict], recipe: Recipe) -> tuple[dict, dict]:
    """({model: EvalReport}, {model: replies}) of every model's greedy replies to the records."""
    from fleetlm.tasks.evaluate import evaluate_model

    reports, predictions = {}, {}
    for name in models:
        reports[name], predictions[name] = evaluate_model(out / name, records, dtype="f32",
                                                          max_tokens=recipe.eval_max_tokens)
    return reports, predictions


def fit_router(out: Path, routing_path: Path, recipe: Recipe, folds: int = 5) -> Path:
    """Fit the router on every routing record, and calibrate its price weight on out-of-fold predictions
    (router/tradeoff.json: the gateway's traffic floor, see serve/routing.py)."""
    import hashlib

    import numpy as np

    from fleetlm.route.calibrate import calibrate_tradeoff
    from fleetlm.route.data import load_rows, model_names, score_matrix
    from fleetlm.route.routers import make_router

    rows = load_rows(routing_path)
    path = make_router(recipe.router).fit(rows).save(out / "router")
    models = model_names(rows)
    fold = [int(hashlib.sha256(r.id.encode()).hexdigest(), 16) % folds for r in rows]
    pred = np.zeros((len(rows), len(models)))
    for f in range(folds):
        held = [i for i, g in enumerate(fold) if g == f]
        if held and len(held) < len(rows):
            router = make_router(recipe.router).fit([r for r, g in zip(rows, fold, strict=True) if g != f])
            pred[held] = router.score([rows[i] for i in held])
    prices = np.array([price_of(params_of(out / m))["output"] for m in models])
    tradeoff = calibrate_tradeoff(pred, score_matrix(rows, models), prices / prices.max(), models,
                                  recipe.quality_floor)
    (path / "tradeoff.json").write_text(json.dumps(tradeoff.to_dict(), indent=2) + "\n")
    return path


def write_fleet_yaml(out: Path, models: list[str], recipe: Recipe) -> Path:
    config = {
        "models": {name: {"path": name, "dtype": "f32", "price": price_of(params_of(out / name))}
                   for name in models},
        "router": {"name": "auto", "kind": recipe.router, "path": "router",
                   "quality_floor": recipe.quality_floor, "floor_scope": "traffic"},
    }
    path = out / "fleet.yaml"
    path.write_text(f"# A toy fleet, built by `fleet fleet build --recipe {recipe.name} "
                    f"--seed {recipe.seed}`.\n" + yaml.safe_dump(config, sort_keys=False))
    return path


def _done(model_dir: Path) -> bool:
    return (model_dir / "config.json").is_file() and any(model_dir.glob("*.safetensors"))


def build_fleet(out: str | Path, recipe: Recipe, log: Callable[[str], None] = print,
                reuse: bool = False) -> dict[str, Any]:
    """Run the whole recipe into `out`; returns the build summary (also written to out/build.json).

    With `reuse`, the tokenizer and the models already built in `out` are kept (the data is regenerated,
    identically, from the seed), so an interrupted build continues and later steps can be redone alone.
    """
    from fleetlm.tasks.evaluate import format_table, write_routing_data
    from fleetlm.tasks.suite import read_jsonl

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    paths = make_data(out, recipe)
    log(f"data: {', '.join(f'{k} {len(p.read_text().splitlines())}' for k, p in paths.items())} records")
    tok_dir = out / "tokenizer"
    if not (reuse and (tok_dir / "tokenizer.json").is_file()):
        make_tokenizer(out, paths["train"], recipe)
    todo = replace(recipe, generalists=tuple(s for s in recipe.generalists
                                             if not (reuse and _done(out / s.name))))
    training = train_generalists(out, todo, paths["train"], tok_dir, log) if todo.generalists else []
    teacher = out / max(recipe.generalists, key=lambda s: s.hidden * s.layers).name
    experts = replace(recipe, experts=tuple(e for e in recipe.experts if not (reuse and _done(out / e.name))))
    if experts.experts:
        training += train_experts(out, experts, teacher, paths["train"], tok_dir, log)
    models = [s.name for s in recipe.generalists] + [e.name for e in recipe.experts]
    route_records = read_jsonl(paths["route"])
    _, route_preds = evaluate_all(out, models, route_records, recipe)
    routing_path = write_routing_data(out / "routing.jsonl", route_records, route_preds)
    fit_router(out, routing_path, recipe)
    test_reports, _ = evaluate_all(out, models, read_jsonl(paths["test"]), recipe)
    for name, report in test_reports.items():
        log(f"\n{name} on the test split:\n{format_table(report)}")
    eval_json = {name: report.to_dict() for name, report in test_reports.items()}
    (out / "eval.json").write_text(json.dumps(eval_json, indent=2) + "\n")
    write_fleet_yaml(out, models, recipe)
    summary = {"recipe": asdict(recipe), "training": training,
               "params": {m: params_of(out / m) for m in models}, "seconds": time.perf_counter() - t0}
    (out / "build.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
