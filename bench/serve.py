"""Serving benchmark (issue 5's figures), in one run on one random-weight GGUF model it builds itself.

    .venv/bin/python bench/serve.py [--hidden 384 --layers 8 --gguf-type q8_0 --streams 16 --max-tokens 128]

Three real processes on loopback ports: our gateway (`fleet serve`, the GGUF model on our engine with
continuous batching, plus a remote model pointing at a minimal upstream), llama-cpp-python's own server on the
same GGUF file, and that upstream. The load comes from httpx streaming clients in this process. Printed:
  (a) 64 concurrent streaming requests through the gateway: how many failed;
  (b) aggregate tokens/s at 16 concurrent streams: the gateway vs llama-cpp-python's server (which decodes
      one request at a time) vs the gateway fed the same requests one after another; and the ratios;
  (c) gateway overhead: median latency through the gateway minus median latency calling the upstream
      directly (sequential, interleaved requests).
Greedy decoding; the model's end-of-sequence logits are zeroed, so every request runs to max_tokens on every
server and all three decode the same number of tokens. llama-cpp-python's server runs with
--interrupt_requests False (its default cuts a running request short when the next one arrives). Each engine
gets --threads CPU threads (default 1: on a shared 2-core machine a second OpenMP thread mostly waits).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

PROMPTS = [
    "The fleet is a set of language models, each with a price",
    "A router sends every request to the cheapest model",
    "The usage log tells us which model answered",
    "When the big model answers the same kind of question",
    "User: What is the capital of France?",
    "Write a haiku about the sea and the wind",
    "def add(a: int, b: int) -> int: return",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100",
    "A quick brown fox jumps over the lazy dog",
    "Large language models predict the next token",
    "The key and value cache keeps what the model",
    "Quantization stores weights in eight or four bits",
    "Questions, answers, summaries, translations",
    "Bonjour, ça va? Grüße aus München!",
    "for i in range(10): print(i, i * i)",
    "Pack my box with five dozen liquor jugs",
]


# ---------------------------------------------------------------------------------------------- setup


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_model(out: Path, hidden: int, layers: int, intermediate: int, gguf_type: str) -> tuple[Path, float]:
    """A random-weight Llama (make_tiny's tokenizer) whose EOS logits are 0, exported to GGUF."""
    import torch

    from fleetlm.compress.gguf import export_gguf
    from fleetlm.model import ModelConfig, Transformer, save_checkpoint
    from fleetlm.model.make_tiny import write_tokenizer

    ids = write_tokenizer(out, "llama3", vocab_size=512)
    heads = max(1, hidden // 64)
    cfg = ModelConfig(arch="llama", vocab_size=ids["vocab_size"], hidden_size=hidden,
                      intermediate_size=intermediate, num_layers=layers, num_heads=heads,
                      num_kv_heads=max(1, heads // 2), rms_norm_eps=1e-5, rope_theta=500000.0,
                      max_position_embeddings=2048, tie_word_embeddings=False,
                      bos_token_id=ids["bos_token_id"], eos_token_ids=ids["eos_token_ids"])
    gen = torch.Generator().manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            norm = name.endswith("norm.weight")
            p.copy_((1.0 if norm else 0.0) + 0.1 * torch.randn(p.shape, generator=gen))
        # Logit 0 for EOS never beats the largest of ~500 random logits: requests run to max_tokens.
        model.lm_head.weight[cfg.eos_token_ids] = 0.0
    save_checkpoint(model, out)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return export_gguf(out, out / f"model-{gguf_type}.gguf", gguf_type), params


def start(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, **(env or {})}
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text()[-2000:]
            raise SystemExit(f"{url}: the server exited ({proc.returncode}); see {log}:\n{tail}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"{url}: not ready after {timeout:.0f} s; see {log}")


def upstream_app():
    """A minimal OpenAI-compatible upstream: a fixed chat answer, as fast as FastAPI can say it."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> JSONResponse:
        body = await request.json()
        return JSONResponse({
            "id": "chatcmpl-up", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", "echo"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "pong"},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        })

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": "echo", "object": "model", "owned_by": "bench"}]}

    return app


# ---------------------------------------------------------------------------------------------- load


@dataclass
class Result:
    tokens: int = 0
    seconds: float = 0.0
    error: str | None = None


async def stream_one(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> Result:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "repeat_penalty": 1.0}  # llama.cpp's default is 1.1
    t0 = time.perf_counter()
    usage = chunks = 0
    finish, done = None, False
    try:
        async with client.stream("POST", url + "/completions", json=body) as r:
            if r.status_code != 200:
                return Result(error=f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    return Result(error=f"error event: {event['error']}")
                if event.get("usage"):
                    usage = int(event["usage"]["completion_tokens"])
                for c in event.get("choices") or []:
                    chunks += 1
                    finish = c.get("finish_reason") or finish
    except httpx.HTTPError as exc:
        return Result(error=f"{type(exc).__name__}: {exc}")
    seconds = time.perf_counter() - t0
    if not done or finish is None:
        return Result(error=f"stream ended early (done={done}, finish_reason={finish})")
    # A server that sends no usage: every request runs to max_tokens here (EOS is never sampled).
    tokens = usage or (max_tokens if finish == "length" else chunks)
    return Result(tokens, seconds)


async def concurrent(url: str, model: str, prompts: list[str], max_tokens: int) -> tuple[list[Result], float]:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=256)) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*[stream_one(client, url, model, p, max_tokens) for p in prompts])
        return list(results), time.perf_counter() - t0


async def sequential(url: str, model: str, prompts: list[str], max_tokens: int) -> tuple[list[Result], float]:
    async with httpx.AsyncClient(timeout=600) as client:
        t0 = time.perf_counter()
        results = [await stream_one(client, url, model, p, max_tokens) for p in prompts]
        return results, time.perf_counter() - t0


async def overhead(gateway: str, upstream: str, n: int) -> tuple[list[float], list[float]]:
    """Latency (ms) of the same small chat request, direct and through the gateway, interleaved."""
    body = {"model": "echo", "messages": [{"role": "user", "content": "ping"}], "max_tokens": 8}
    direct, through = [], []
    async with httpx.AsyncClient(timeout=60) as client:
        for i in range(n + 20):
            for url, out in ((upstream, direct), (gateway, through)):
                t0 = time.perf_counter()
                r = await client.post(url + "/chat/completions", json=body)
                ms = (time.perf_counter() - t0) * 1000
                if r.status_code != 200:
                    raise SystemExit(f"{url}: HTTP {r.status_code}: {r.text[:300]}")
                if i >= 20:  # the first requests warm connections and caches
                    out.append(ms)
    return direct, through


def tokens_per_s(results: list[Result], seconds: float) -> float:
    return sum(r.tokens for r in results) / seconds


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--gguf-type", default="q8_0", choices=["f32", "f16", "bf16", "q8_0"])
    ap.add_argument("--dtype", default="bf16",
                    help="our engine's width for the GGUF weights: bf16 (oneDNN-packed where the CPU has "
                         "native bf16; 5.1x llama.cpp's server here) or f32 (exact; 3.3x)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for each engine (ours and llama.cpp)")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--burst", type=int, default=64, help="concurrent streams of figure (a)")
    ap.add_argument("--burst-tokens", type=int, default=32)
    ap.add_argument("--overhead-requests", type=int, default=300)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--upstream", type=int, default=None, help=argparse.SUPPRESS)  # internal: serve upstream
    args = ap.parse_args()

    if args.upstream is not None:
        import uvicorn

        uvicorn.run(upstream_app(), host="127.0.0.1", port=args.upstream, log_level="warning",
                    access_log=False)
        return

    work = args.workdir or Path(tempfile.mkdtemp(prefix="fleet-bench-serve-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    print(f"building the model in {work} ...", flush=True)
    gguf, params = build_model(work, args.hidden, args.layers, args.intermediate, args.gguf_type)

    up_port, gw_port, ll_port = free_port(), free_port(), free_port()
    config = {
        "models": {
            "gguf": {"gguf": str(gguf), "engine": "fleetlm", "dtype": args.dtype},
            "echo": {"remote": f"http://127.0.0.1:{up_port}/v1", "retries": 0},
        },
        "storage": f"sqlite:///{work / 'usage.db'}",
    }
    (work / "fleet.yaml").write_text(json.dumps(config, indent=2))  # JSON is YAML
    threads = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    procs = []
    try:
        procs.append(start([sys.executable, __file__, "--upstream", str(up_port)], work / "upstream.log"))
        procs.append(start([sys.executable, "-c", "from fleetlm.cli import main; main()", "serve", "--config",
                            str(work / "fleet.yaml"), "--port", str(gw_port)], work / "gateway.log", threads))
        procs.append(start([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf),
                            "--host", "127.0.0.1", "--port", str(ll_port), "--n_ctx", "2048",
                            "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
                            "--interrupt_requests", "False"],
                           work / "llama_server.log", threads))
        gw, ll, up = (f"http://127.0.0.1:{p}/v1" for p in (gw_port, ll_port, up_port))
        for url, proc, log in ((up, procs[0], work / "upstream.log"), (gw, procs[1], work / "gateway.log"),
                               (ll, procs[2], work / "llama_server.log")):
            wait_ready(url + "/models", proc, log)
        print("servers ready; warming up ...", flush=True)
        prompts = [PROMPTS[i % len(PROMPTS)] + f" ({i})" for i in range(max(args.streams, args.burst))]
        n = args.max_tokens
        asyncio.run(concurrent(gw, "gguf", prompts[:4], 8))
        asyncio.run(concurrent(ll, "gguf", prompts[:2], 8))

        print(f"(a) {args.burst} concurrent streams through the gateway ...", flush=True)
        burst, burst_s = asyncio.run(concurrent(gw, "gguf", prompts[:args.burst], args.burst_tokens))
        errors = [r.error for r in burst if r.error]

        s = args.streams
        print(f"(b) {s} concurrent streams x {n} tokens: gateway ...", flush=True)
        ours, ours_s = asyncio.run(concurrent(gw, "gguf", prompts[:s], n))
        print("    llama-cpp-python server ...", flush=True)
        peer, peer_s = asyncio.run(concurrent(ll, "gguf", prompts[:s], n))
        print("    gateway, one request after another ...", flush=True)
        seq, seq_s = asyncio.run(sequential(gw, "gguf", prompts[:s], n))
        bad = [r.error for r in ours + peer + seq if r.error]
        if bad:
            raise SystemExit(f"(b) had failed requests: {bad[:3]}")

        print(f"(c) gateway overhead, {args.overhead_requests} sequential requests each way ...", flush=True)
        direct, through = asyncio.run(overhead(gw, up, args.overhead_requests))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()

    tps_ours, tps_peer = tokens_per_s(ours, ours_s), tokens_per_s(peer, peer_s)
    tps_seq = tokens_per_s(seq, seq_s)
    med_d, med_t = statistics.median(direct), statistics.median(through)
    added = med_t - med_d
    q = statistics.quantiles
    rows = [
        ("model", f"random Llama {params:.1f}M params (hidden {args.hidden}, {args.layers} layers), "
                  f"GGUF {args.gguf_type}; our engine {args.dtype}, {args.threads} thread(s) per engine", ""),
        ("(a) concurrent streams via gateway", f"{args.burst} x {args.burst_tokens} tokens: "
                                               f"{len(errors)} errors, {burst_s:.1f} s", "0 errors"),
        (f"(b) tok/s, {s} streams x {n} tokens", "", ""),
        ("    gateway, continuous batching", f"{tps_ours:8.1f} tok/s  ({sum(r.tokens for r in ours)} tokens, "
                                            f"{ours_s:.2f} s)", ""),
        ("    llama-cpp-python server", f"{tps_peer:8.1f} tok/s  ({sum(r.tokens for r in peer)} tokens, "
                                       f"{peer_s:.2f} s)", ""),
        ("    gateway, one after another", f"{tps_seq:8.1f} tok/s  ({sum(r.tokens for r in seq)} tokens, "
                                          f"{seq_s:.2f} s)", ""),
        ("    batching / llama.cpp server", f"{tps_ours / tps_peer:8.2f}x", ">= 4x"),
        ("    batching / one after another", f"{tps_ours / tps_seq:8.2f}x", ">= 3x"),
        ("(c) latency direct (median, p90)", f"{med_d:8.2f} ms  {q(direct, n=10)[-1]:.2f} ms", ""),
        ("    latency via gateway (median, p90)", f"{med_t:8.2f} ms  {q(through, n=10)[-1]:.2f} ms", ""),
        ("    gateway overhead (median)", f"{added:8.2f} ms", "<= 5 ms"),
    ]
    print()
    width = max(len(r[0]) for r in rows)
    for name, value, target in rows:
        print(f"{name:<{width}}  {value:<58} {target}")
    print(f"\n(total {time.perf_counter() - t_start:.0f} s; logs and model in {work})")
    if errors:
        print("first errors of (a):", *errors[:3], sep="\n  ")


if __name__ == "__main__":
    main()
