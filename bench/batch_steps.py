"""The gateway's batched decode step on a real model, timed per batch size (what bounds tok/s at N streams).

    .venv/bin/python bench/batch_steps.py [--model qwen2.5-coder-0.5b-instruct] [--batches 1,2,4,8,16]
        [--steps 16] [--dtype bf16] [--eager]

In process, the model is loaded as `fleet serve` loads it for `engine: fleetlm` (compiled decode step for
models >= 200 MB, warmed for batches 1 and 2) and driven through the same Batcher. For each batch size B:
B requests with the same chat prompt are admitted together (one prefill of B rows and a first step, timed
as "admit s"), then --steps decode steps of all B rows are timed: ms per step and B / step = the decode
tokens/s the engine can give B streams, before HTTP, streaming and scheduling. Pure engine figures: compare
them with bench/serve_real.py's.
"""

from __future__ import annotations

import argparse
import time

import torch

from fleetlm.engine import Engine, GenerationRequest
from fleetlm.engine.batcher import Batcher
from fleetlm.serve.local import SERVE_CACHE_LENGTH, wants_compile

PROMPT = "Write a Python class for a least-recently-used cache with get, put and delete, with tests"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--batches", default="1,2,4,8,16")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--eager", action="store_true", help="the eager step (no compile)")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    from fleetlm.catalog import installed_path

    path = installed_path(args.model) if not args.model.endswith(".gguf") else args.model
    if path is None:
        raise SystemExit(f"{args.model} is not installed: fleet models pull {args.model}")
    compile = not args.eager and wants_compile(path)
    t0 = time.perf_counter()
    engine = Engine.load(path, dtype=args.dtype, compile=compile, warm=False)
    batcher = Batcher(engine.model, engine.tokenizer, max_batch=max(batches),
                      decode_fn=engine._decode if compile else None,
                      initial_length=SERVE_CACHE_LENGTH if compile else None)
    if engine.num_threads:
        torch.set_num_threads(engine.num_threads)
    warm = batcher.warm_up((1, 2))
    print(f"loaded in {time.perf_counter() - t0 - warm:.0f} s, compiled in {warm:.0f} s "
          f"({'compiled' if compile else 'eager'}, {args.dtype}, {torch.get_num_threads()} threads, "
          f"dynamic batch: {getattr(engine._decode, 'dynamic_batch', None)})", flush=True)
    print(f"{'batch':>5} {'admit s':>9} {'ms/step':>8} {'tok/s':>7} {'ms/step/row':>11}")
    for b in batches:
        for _ in range(b):
            batcher.add(GenerationRequest(messages=[{"role": "user", "content": PROMPT}],
                                          max_tokens=args.steps + 3, temperature=0, ignore_eos=True))
        t = time.perf_counter()
        batcher.step()  # admit: one prefill of b rows, and the first decode step
        prefill = time.perf_counter() - t
        batcher.step()  # a first step at this batch size (a new bucket compiles here, not in the timing)
        t = time.perf_counter()
        for _ in range(args.steps):
            batcher.step()
        step = (time.perf_counter() - t) / args.steps
        while batcher.busy:
            batcher.step()
        print(f"{b:5d} {prefill:9.2f} {step * 1000:8.1f} {b / step:7.1f} {step * 1000 / b:11.1f}", flush=True)


if __name__ == "__main__":
    main()
