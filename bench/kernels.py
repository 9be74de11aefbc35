"""Micro-benchmark: our CPU kernels (fleetlm_kernels) against PyTorch's on the linears of real Qwen2.5 models.

For each linear of one decoder layer (fused qkv, o, fused gate/up, down) and the vocabulary projection, at
M activation rows, prints the time per call and the GB/s of weights read, ours next to torch's
(oneDNN prepacked bf16, `_weight_int4pack_mm_for_cpu` int4, fbgemm dynamic int8), and the machine's read
bandwidth (a sum over a 1 GB buffer). Each op cycles through copies of its weights that together exceed the
last-level cache, so weights come from memory as they do in a decode step.

    nice -n 5 .venv/bin/python bench/kernels.py --model 0.5b --threads 2 [--m 1 4 16] [--seconds 0.3]
    nice -n 5 .venv/bin/python bench/kernels.py --decode qwen2.5-coder-0.5b-instruct --threads 1
"""

from __future__ import annotations

import fleetlm  # noqa: F401  (first: it sets OMP_WAIT_POLICY before torch loads OpenMP)

# isort: split

import argparse
import time

import torch
from torch import nn

from fleetlm.bench.bandwidth import read_bandwidth
from fleetlm.engine import kernels
from fleetlm.engine.packed import PackedLinear, bf16_packing_available
from fleetlm.engine.quant import DynamicInt8Linear, Int4Linear, dynamic_int8_available

SHAPES = {  # name: (hidden, intermediate, heads, kv heads, head_dim, vocab)
    "0.5b": (896, 4864, 14, 2, 64, 151936),
    "1.5b": (1536, 8960, 12, 2, 128, 151936),
}
STREAM_BYTES = 64 << 20  # weights cycled per op: twice the 32 MB last-level cache here


def linears(model: str) -> dict[str, tuple[int, int]]:
    hidden, inter, heads, kv, head_dim, vocab = SHAPES[model]
    return {"qkv": (hidden, (heads + 2 * kv) * head_dim), "o": (heads * head_dim, hidden),
            "gate_up": (hidden, 2 * inter), "down": (inter, hidden), "lm_head": (hidden, vocab)}


def timed(calls: list, x: torch.Tensor, seconds: float) -> float:
    """Seconds per call, cycling through `calls` (each on its own copy of the weights); best of 3 rounds."""
    for f in calls:  # first calls of a weight can pay one-off costs (oneDNN primitives, fbgemm packing)
        f(x)
    best = float("inf")
    for _ in range(3):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 3 or n < len(calls):
            calls[n % len(calls)](x)
            n += 1
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def make(kind: str, k: int, n: int, copies: int) -> tuple[list, int]:
    """`copies` callables y = f(x) of one implementation, and the weight bytes each reads."""
    calls, nbytes = [], 0
    for _ in range(copies):
        lin = nn.Linear(k, n, bias=False)
        nn.init.normal_(lin.weight, std=0.02)
        if kind == "ours bf16":
            w = kernels.pack_bf16(lin.weight)
            calls.append(lambda x, w=w: torch.ops.fleetlm_kernels.linear_bf16(x, w, None, n))
            nbytes = w.numel() * 2
        elif kind == "ours int8":
            w, s = kernels.pack_int8(lin.weight)
            calls.append(lambda x, w=w, s=s: torch.ops.fleetlm_kernels.linear_int8(x, w, s, None, n))
            nbytes = w.numel() + s.numel() * 2
        elif kind == "ours int4":
            w, s = kernels.pack_int4(lin.weight, 64)
            calls.append(lambda x, w=w, s=s: torch.ops.fleetlm_kernels.linear_int4(x, w, s, None, n, 64))
            nbytes = w.numel() + s.numel() * 2
        elif kind == "torch bf16":
            m = PackedLinear(lin.to(torch.bfloat16))
            calls.append(m)
            nbytes = m.nbytes
        elif kind == "torch int8":
            m = DynamicInt8Linear(lin)
            calls.append(m)
            nbytes = m.nbytes
        elif kind == "torch int4":
            m = Int4Linear.from_linear(lin.to(torch.bfloat16), 64)
            calls.append(m)
            nbytes = m.weight.numel() + m.scales_and_zeros.numel() * 2
    return calls, nbytes


def decode(model: str, widths: list[str], threads: int, tokens: int) -> None:
    """Eager decode tok/s through Engine.load, our kernels (FLEET_KERNELS=1) next to PyTorch's (=0)."""
    import os

    from fleetlm.catalog import installed_path
    from fleetlm.engine import Engine, GenerationRequest

    path = installed_path(model) or model
    question = [{"role": "user", "content": "Write a Python function that checks whether a number is prime."}]
    request = GenerationRequest(messages=question, max_tokens=tokens, temperature=0.0, ignore_eos=True)
    for width in widths:
        for flag in ("1", "0"):
            os.environ["FLEET_KERNELS"] = flag
            engine = Engine.load(path, dtype=width)
            engine.num_threads = threads
            list(engine.generate(GenerationRequest(prompt="hi", max_tokens=4)))  # warm-up
            text = engine.tokenizer.decode([e.token_id for e in engine.generate(request)])
            print(f"{width:5} FLEET_KERNELS={flag}: {engine.last_stats.decode_tokens_per_second:6.2f} tok/s "
                  f"({threads} threads)  {text[:50]!r}", flush=True)
            del engine
    os.environ.pop("FLEET_KERNELS")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(SHAPES), default="0.5b")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--m", type=int, nargs="+", default=[1], help="activation rows (decode batch)")
    p.add_argument("--seconds", type=float, default=0.3, help="timing per op and implementation")
    p.add_argument("--widths", nargs="+", default=["bf16", "int8", "int4"])
    p.add_argument("--ops", nargs="+", default=None, help="subset of qkv o gate_up down lm_head")
    p.add_argument("--decode", metavar="MODEL", help="instead: eager decode tok/s of a catalog model or GGUF")
    p.add_argument("--tokens", type=int, default=32)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.decode:
        return decode(args.decode, args.widths, args.threads, args.tokens)
    if not kernels.available():
        raise SystemExit("our kernels are not available here (see the warning above)")
    bw = read_bandwidth(threads=args.threads)
    print(f"model {args.model}, {args.threads} threads, ISA {kernels.isa()}, read bandwidth {bw:.1f} GB/s "
          f"(torch.sum over 1 GB)")
    have_torch = {"bf16": bf16_packing_available(), "int8": dynamic_int8_available(), "int4": True}
    print(f"{'op':8} {'K x N':>13} {'M':>3} {'width':5} | {'ours us':>9} {'GB/s':>6} | {'torch us':>9} "
          f"{'GB/s':>6} | ours/torch speed")
    shapes = linears(args.model)
    for name in args.ops or list(shapes):
        k, n = shapes[name]
        for width in args.widths:
            ours, ours_bytes = make(f"ours {width}", k, n, 1)
            copies = max(1, min(16, STREAM_BYTES // max(ours_bytes, 1)))
            ours, _ = make(f"ours {width}", k, n, copies)
            theirs, their_bytes = (make(f"torch {width}", k, n, max(1, min(16, STREAM_BYTES // ours_bytes)))
                                   if have_torch[width] else ([], 0))
            for m in args.m:
                x = torch.randn(m, k)
                xt = x.to(torch.bfloat16) if width in ("bf16", "int4") else x
                with torch.inference_mode():
                    t_ours = timed(ours, x, args.seconds)
                    t_torch = timed(theirs, xt, args.seconds) if theirs else float("nan")
                print(f"{name:8} {f'{k}x{n}':>13} {m:>3} {width:5} | {t_ours * 1e6:9.1f} "
                      f"{ours_bytes / t_ours / 1e9:6.1f} | {t_torch * 1e6:9.1f} "
                      f"{their_bytes / t_torch / 1e9:6.1f} | {t_torch / t_ours:5.2f}x")
            del ours, theirs


if __name__ == "__main__":
    main()
