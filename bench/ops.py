"""Operations at scale (issue 16's figures): budgets, rate limits, stream cost, failover, gateway overhead.

    nice -n 10 .venv/bin/python bench/ops.py [--quick]

Everything runs on loopback: a minimal OpenAI-compatible upstream (its own process, raw ASGI on uvicorn),
a throwaway redis-server, and one or two real `fleet serve` processes sharing that Redis and one SQLite
usage log. The load comes from httpx clients in this process; every loop is bounded in count and time.
Printed:
  budget race   200 concurrent requests over two replicas against a key whose budget allows 50 of them
                (each costs exactly the same): admitted, spend, overshoot (must be <= one request's cost);
  rpm race      200 concurrent requests over two replicas against a 60-requests-per-minute key: admitted;
  stream cost   100 streamed requests, 30 abandoned by the client after 3 pieces: tokens recorded in the
                usage log against the tokens the upstream sent and the client received;
  failover      100 streamed requests to a model whose upstream drops 30% of streams mid-answer, with a
                fallback: complete, uninterrupted answers (the exact expected text, no error event);
  scale         requests/s and tokens/s with one and two gateway replicas (clients spread over both);
  overhead      latency through one gateway minus latency calling the upstream directly, p50/p99, at 1,
                50 and 200 concurrent clients (interleaved rounds, non-streamed).
The machine is shared (2 cores for client, upstream, gateways and Redis together): read ratios and counts,
not absolute speeds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
ANSWER_WORDS = 16  # tokens per answer (the upstream counts a word as a token)
PRICE_IN, PRICE_OUT = 1.0, 2.0  # $ per 1M tokens of the bench's models


# ------------------------------------------------------------------ the upstream (separate process)

def upstream_app(token_delay: float):
    """Raw ASGI app: chat completions whose answer is w1..wN; continues an assistant-prefilled partial;
    model `drop30` aborts 30% of streams (chosen by the request's `user`) after half the answer; model
    `slow` waits 50 ms first. GET /sent tells how many pieces each `user` was sent."""
    sent: dict[str, int] = {}

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        if scope["method"] == "GET":
            body = json.dumps(sent).encode()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": body})
            return
        raw = b""
        while True:
            msg = await receive()
            raw += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        req = json.loads(raw)
        msgs = req["messages"]
        # the answer is always w1..w16; a continuation starts after the words it was given, and max_tokens
        # caps what this call adds
        done = len(msgs[-1]["content"].split()) if msgs[-1]["role"] == "assistant" else 0
        words = [f"w{i}" for i in range(1, ANSWER_WORDS + 1)][done:done + (req.get("max_tokens") or 10**6)]
        prompt = sum(len((m.get("content") or "").split()) for m in msgs)
        user = req.get("user") or ""
        if req["model"] == "slow":
            await asyncio.sleep(0.05)
        usage = {"prompt_tokens": prompt, "completion_tokens": len(words),
                 "total_tokens": prompt + len(words)}
        base = {"id": "up", "created": 0, "model": req["model"]}
        if not req.get("stream"):
            out = {**base, "object": "chat.completion", "usage": usage, "choices": [
                {"index": 0, "message": {"role": "assistant", "content": " ".join(words)},
                 "finish_reason": "stop"}]}
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": json.dumps(out).encode()})
            return
        drop = req["model"] == "drop30" and not done and zlib.crc32(user.encode()) % 10 < 3
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        sent[user] = 0
        for i, w in enumerate(words):
            if drop and i == len(words) // 2:
                raise RuntimeError("bench upstream: dropping this stream mid-answer")
            chunk = {**base, "object": "chat.completion.chunk",
                     "choices": [{"index": 0, "delta": {"content": w + " "}}]}
            await send({"type": "http.response.body", "body": f"data: {json.dumps(chunk)}\n\n".encode(),
                        "more_body": True})
            sent[user] += 1
            if token_delay:
                await asyncio.sleep(token_delay)
        tail = [{**base, "object": "chat.completion.chunk",
                 "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}]
        if (req.get("stream_options") or {}).get("include_usage"):
            tail.append({**base, "object": "chat.completion.chunk", "choices": [], "usage": usage})
        body = "".join(f"data: {json.dumps(c)}\n\n" for c in tail) + "data: [DONE]\n\n"
        await send({"type": "http.response.body", "body": body.encode()})

    return app


def serve_upstream(port: int, token_delay: float) -> None:
    import uvicorn

    uvicorn.run(upstream_app(token_delay), host="127.0.0.1", port=port, log_level="critical",
                access_log=False, lifespan="off")


# ------------------------------------------------------------------ processes

def wait_http(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"process for {url} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not come up in {timeout:.0f} s")


class Stack:
    """upstream + redis + N gateway replicas, all on loopback, torn down on exit."""

    def __init__(self, tmp: Path, token_delay: float):
        from fleetlm.ops.local import RedisServer, free_port

        self.tmp, self.procs = tmp, []
        self.redis = RedisServer().__enter__()
        self.up_port = free_port()
        self.upstream = f"http://127.0.0.1:{self.up_port}/v1"
        self._spawn([sys.executable, __file__, "--upstream", str(self.up_port), "--token-delay",
                     str(token_delay)], f"{self.upstream}/sent")
        self.db = f"sqlite:///{tmp / 'usage.db'}"
        model = {"remote": self.upstream, "price": {"input": PRICE_IN, "output": PRICE_OUT}, "retries": 0,
                 "timeout": 30}
        cfg = {"models": {"echo": model, "slow": model | {"remote_model": "slow"},
                          "drop30": model | {"remote_model": "drop30", "fallbacks": ["echo"]}},
               "storage": self.db, "counters": self.redis.url, "require_api_key": False}
        self.config = tmp / "fleet.yaml"
        self.config.write_text(json.dumps(cfg))  # JSON is YAML
        self.gateways: list[str] = []
        self.gateway_pids: list[int] = []

    def _spawn(self, cmd: list[str], ready: str) -> None:
        proc = subprocess.Popen(cmd, cwd=self.tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(proc)
        wait_http(ready, proc)

    def add_gateway(self) -> str:
        from fleetlm.ops.local import free_port

        port = free_port()
        fleet = str(Path(sys.executable).parent / "fleet")
        self._spawn([fleet, "serve", "--config", str(self.config), "--port", str(port)],
                    f"http://127.0.0.1:{port}/health")
        self.gateways.append(f"http://127.0.0.1:{port}/v1")
        self.gateway_pids.append(self.procs[-1].pid)
        return self.gateways[-1]

    def close(self) -> None:
        for p in reversed(self.procs):
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        self.redis.__exit__()


def chat_body(model: str, *, stream: bool = False, user: str | None = None, **kw) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": "say sixteen words please"}],
            "max_tokens": ANSWER_WORDS, **kw}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    if user:
        body["user"] = user
    return body


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used: with the machine shared, the gateway's CPU per
    request is the figure that does not depend on what else runs."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


# ------------------------------------------------------------------ figures

async def burst(client: httpx.AsyncClient, urls: list[str], n: int, body: dict, headers: dict) -> list[int]:
    async def one(i: int) -> int:
        try:
            r = await client.post(f"{urls[i % len(urls)]}/chat/completions", json=body, headers=headers)
        except httpx.HTTPError:
            return -1  # the connection failed: counted as "other"
        return r.status_code

    return await asyncio.gather(*(one(i) for i in range(n)))


async def budget_race(stack: Stack, client: httpx.AsyncClient) -> None:
    from fleetlm.serve.store import UsageStore

    store = UsageStore(stack.db)
    # one request: 4 prompt words + 16 answer words at $1/$2 per 1M
    cost = (4 * PRICE_IN + ANSWER_WORDS * PRICE_OUT) / 1e6
    key, secret = store.create_key("budget-race", budget_usd=50 * cost)
    codes = await burst(client, stack.gateways, 200, chat_body("slow"), {"authorization": f"Bearer {secret}"})
    spend = store.spend(key.key_id)
    print(f"budget race: 200 concurrent over {len(stack.gateways)} replicas, budget ${50 * cost:.6f} "
          f"(= 50 requests of ${cost:.8f}): {codes.count(200)} answered, {codes.count(429)} refused (429), "
          f"other {len(codes) - codes.count(200) - codes.count(429)}; spend ${spend:.8f} = "
          f"{spend / cost:.2f} requests; overshoot {max(0.0, spend - 50 * cost) / cost:.2f} requests "
          "(bound: 1)")
    # A second wave once the first has settled: the reservations are gone, the spend is exact.
    auth = {"authorization": f"Bearer {secret}"}
    codes2 = await burst(client, stack.gateways, 200, chat_body("slow"), auth)
    spend = store.spend(key.key_id)
    print(f"  + a second wave of 200: {codes2.count(200)} more answered; total spend {spend / cost:.2f} "
          f"requests' worth of a 50-request budget; overshoot {max(0.0, spend - 50 * cost) / cost:.2f}")
    key, secret = store.create_key("rpm-race", rpm=60)
    codes = await burst(client, stack.gateways, 200, chat_body("echo"), {"authorization": f"Bearer {secret}"})
    print(f"rpm race: 200 concurrent over {len(stack.gateways)} replicas, limit 60/min: {codes.count(200)} "
          f"answered, {codes.count(429)} refused (429)")


async def read_stream(client: httpx.AsyncClient, url: str, body: dict, stop_after: int | None = None) -> dict:
    try:
        return await _read_stream(client, url, body, stop_after)
    except httpx.HTTPError as exc:  # e.g. a pooled connection the server had closed: counted, not hidden
        return {"pieces": 0, "text": "", "usage": None, "error": f"transport: {exc!r}", "done": False,
                "fleet": None, "transport_error": True}


async def _read_stream(client: httpx.AsyncClient, url: str, body: dict, stop_after: int | None) -> dict:
    pieces, text, usage, error, done, fleet = 0, "", None, None, False, None
    async with client.stream("POST", f"{url}/chat/completions", json=body) as r:
        if r.status_code != 200:  # refused before the stream began: say why
            detail = (await r.aread()).decode(errors="replace")[:200]
            return {"pieces": 0, "text": "", "usage": None, "error": f"HTTP {r.status_code}: {detail}",
                    "done": False, "fleet": None}
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            ev = json.loads(line[6:])
            if "error" in ev:
                error = ev["error"]["message"]
                continue
            if ev.get("usage"):
                usage = ev["usage"]
            if ev.get("fleet"):
                fleet = ev["fleet"]
            for c in ev.get("choices") or []:
                if c["delta"].get("content"):
                    pieces += 1
                    text += c["delta"]["content"]
            if stop_after is not None and pieces >= stop_after:
                break
    return {"pieces": pieces, "text": text, "usage": usage, "error": error, "done": done, "fleet": fleet}


async def stream_cost(stack: Stack, client: httpx.AsyncClient) -> None:
    from fleetlm.serve.store import UsageStore

    url, users = stack.gateways[0], [f"cost-{i}" for i in range(100)]
    sem = asyncio.Semaphore(20)

    async def one(i: int) -> dict:
        async with sem:
            return await read_stream(client, url, chat_body("echo", stream=True, user=users[i]),
                                     stop_after=3 if i % 10 < 3 else None)

    got = await asyncio.gather(*(one(i) for i in range(100)))
    store = UsageStore(stack.db)
    deadline = time.monotonic() + 20  # an abandoned stream's record is written when the gateway notices
    while True:
        rows = {r["user"]: r for r in store.requests() if (r["user"] or "").startswith("cost-")}
        if len(rows) == 100 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    sent = (await client.get(f"{stack.upstream}/sent")).json()
    logged_rows = sum((r["user"] or "").startswith("cost-") for r in store.requests())
    full = [i for i in range(100) if i % 10 >= 3]
    cut = [i for i in range(100) if i % 10 < 3]
    exact_full = sum(rows[users[i]]["completion_tokens"] == got[i]["pieces"] == sent[users[i]]
                     and rows[users[i]]["prompt_tokens"] == 4 for i in full if users[i] in rows)
    cost_ok = sum(abs(rows[users[i]]["cost_usd"] - (4 * PRICE_IN + got[i]["pieces"] * PRICE_OUT) / 1e6)
                  < 1e-12 for i in full if users[i] in rows)
    cut_rows = [rows.get(users[i]) for i in cut]
    logged = [r for r in cut_rows if r is not None]
    vs_sent = sum(r["completion_tokens"] == sent.get(r["user"]) for r in logged)
    vs_client = sum(r["completion_tokens"] == got[i]["pieces"] for i, r in zip(cut, cut_rows, strict=True)
                    if r is not None)
    statuses = sorted({r["status"] for r in logged})
    zero = sum(r["cost_usd"] == 0 for r in logged)
    print(f"stream cost: {len(full)} complete streams: {exact_full} with tokens recorded = tokens the client "
          f"received = tokens the upstream sent (prompt 4), {cost_ok} with cost = recomputed cost to the "
          f"token; {len(cut)} abandoned after 3 pieces: {len(logged)} logged (status {statuses}), "
          f"{vs_sent} with completion tokens = what the upstream sent, {vs_client} = what the client read, "
          f"{zero} at $0; {logged_rows} usage rows for the 100 requests; "
          f"{sum(bool(g.get('transport_error')) for g in got)} client-side transport errors")
    if logged:
        diffs = [r["completion_tokens"] - 3 for r in logged]
        behind = [sent[r["user"]] - r["completion_tokens"] for r in logged if r["user"] in sent]
        print(f"  abandoned: recorded completion tokens minus the 3 the client read: min {min(diffs)}, "
              f"max {max(diffs)}; the upstream's sent count minus the recorded: min {min(behind)}, max "
              f"{max(behind)} (pieces still in the sockets when the gateway stopped reading); prompt "
              f"recorded {sorted({r['prompt_tokens'] for r in logged})} "
              f"(the upstream reports usage at the end only, so it is the byte bound)")


async def failover(stack: Stack, client: httpx.AsyncClient) -> None:
    from fleetlm.serve.store import UsageStore

    url, expected = stack.gateways[0], " ".join(f"w{i}" for i in range(1, ANSWER_WORDS + 1)) + " "
    sem = asyncio.Semaphore(20)

    async def one(i: int) -> dict:
        async with sem:
            return await read_stream(client, url, chat_body("drop30", stream=True, user=f"fo-{i}"))

    got = await asyncio.gather(*(one(i) for i in range(100)))
    dropped = sum(zlib.crc32(f"fo-{i}".encode()) % 10 < 3 for i in range(100))
    ok = sum(g["done"] and g["error"] is None and g["text"] == expected for g in got)
    switched = sum(bool(g["fleet"] and g["fleet"].get("failover")) for g in got)
    rows = [r for r in UsageStore(stack.db).requests() if (r["user"] or "").startswith("fo-")]
    logged = sum("failover drop30->echo" in (r["route_reason"] or "") for r in rows)
    print(f"failover: 100 streams, the upstream dropped {dropped} mid-answer: {ok}/100 complete and "
          f"uninterrupted (exact text, [DONE], no error event); {switched} carry the switch in their final "
          f"chunk, {logged} in the usage log; {sum(bool(g.get('transport_error')) for g in got)} client-side "
          "transport errors")


async def scale(stack: Stack, client: httpx.AsyncClient, replicas: int, n: int, conc: int) -> None:
    urls = stack.gateways[:replicas]
    sem = asyncio.Semaphore(conc)

    failures: list[str] = []

    async def one(i: int) -> int:
        async with sem:
            g = await read_stream(client, urls[i % len(urls)], chat_body("echo", stream=True))
            if not g["done"]:
                failures.append(g["error"] or f"ended without [DONE] after {g['pieces']} pieces")
            return g["pieces"] if g["done"] else 0

    cpu0 = sum(cpu_s(p) for p in stack.gateway_pids[:replicas])
    t0 = time.perf_counter()
    toks = await asyncio.gather(*(one(i) for i in range(n)))
    dt = time.perf_counter() - t0
    cpu = sum(cpu_s(p) for p in stack.gateway_pids[:replicas]) - cpu0
    print(f"scale: {replicas} replica(s), {conc} concurrent streaming clients, {n} requests: "
          f"{n / dt:.0f} req/s, {sum(toks) / dt:.0f} tokens/s, {sum(t == 0 for t in toks)} failed; "
          f"gateway CPU {cpu / n * 1000:.2f} ms per streamed request"
          + (f"; first failure: {failures[0]}" if failures else ""))


async def overhead(stack: Stack, client: httpx.AsyncClient, conc: int, rounds: int) -> None:
    body = chat_body("echo")

    async def timed(url: str) -> float:
        t0 = time.perf_counter()
        r = await client.post(f"{url}/chat/completions", json=body)
        r.raise_for_status()
        return (time.perf_counter() - t0) * 1000

    direct, via, cpu = [], [], 0.0
    for _ in range(rounds):  # interleaved: each round runs `conc` at once against one target, then the other
        direct += await asyncio.gather(*(timed(stack.upstream) for _ in range(conc)))
        cpu0 = cpu_s(stack.gateway_pids[0])
        via += await asyncio.gather(*(timed(stack.gateways[0]) for _ in range(conc)))
        cpu += cpu_s(stack.gateway_pids[0]) - cpu0
    print(f"overhead at {conc:>3} concurrent ({len(via)} requests each): direct p50 {pct(direct, .5):.2f} ms "
          f"p99 {pct(direct, .99):.2f} ms; gateway p50 {pct(via, .5):.2f} ms p99 {pct(via, .99):.2f} ms; "
          f"added p50 {pct(via, .5) - pct(direct, .5):.2f} ms, p99 {pct(via, .99) - pct(direct, .99):.2f} "
          f"ms; gateway CPU {cpu / len(via) * 1000:.2f} ms per request")


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="fleet-ops-") as tmp:
        stack = Stack(Path(tmp), args.token_delay)
        try:
            stack.add_gateway()
            stack.add_gateway()
            limits = httpx.Limits(max_connections=400, max_keepalive_connections=400)
            async with httpx.AsyncClient(timeout=60, limits=limits) as client:
                q, only = args.quick, set(args.only.split(","))
                if "overhead" in only:
                    for conc, rounds in ((1, 100 if q else 300), (50, 4 if q else 10), (200, 2 if q else 5)):
                        await overhead(stack, client, conc, rounds)
                if "scale" in only:
                    for replicas in (1, 2):
                        await scale(stack, client, replicas, 300 if q else 1000, 50)
                if "budget" in only:
                    await budget_race(stack, client)
                if "cost" in only:
                    await stream_cost(stack, client)
                if "failover" in only:
                    await failover(stack, client)
        finally:
            stack.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests per figure")
    ap.add_argument("--only", default="overhead,scale,budget,cost,failover", help="figures to measure")
    ap.add_argument("--token-delay", type=float, default=0.002, help="upstream seconds between pieces")
    ap.add_argument("--upstream", type=int, help=argparse.SUPPRESS)  # internal: run the upstream on PORT
    args = ap.parse_args()
    if args.upstream:
        serve_upstream(args.upstream, args.token_delay)
        return
    sys.path.insert(0, str(ROOT / "src"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
