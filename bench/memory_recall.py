"""Memory (issue 12): facts planted early in a conversation carried past 3x the model's context, then asked.

    flock /tmp/bench.lock nice .venv/bin/python bench/memory_recall.py [--model smollm2-135m-instruct]
        [--context 2048] [--facts 24] [--seed 0] [--limit N] [--max-seconds 600]
        [--out $FLEET_HOME/bench/memory_recall]

A gateway is built in-process (create_app over a TestClient, driven with the official `openai` client) with
the catalog model served twice on llama.cpp: `answer` with max_context --context (the model under test)
and `answer-full` with FULL_CONTEXT (only for the full-conversation arm); each arm has its own copy
(`answer-truncate`, `answer-none`: same file and context as `answer`), so that llama.cpp reuses each arm's
prompt prefix from one question to the next (the outputs are the same, the run is faster). The
conversation is seeded:
--facts facts (a name and one attribute each: locker code, city, colour, dog, job, birth month), one per
user turn at the start, answered "Noted.", then filler turns (tips on everyday topics, none naming a person)
until the conversation holds at least 3 x --context tokens by the model's own tokenizer and chat template.
Each fact is then asked as the conversation's next user turn, answered in each arm by chat completions
(temperature 0, max 24 tokens); an answer is right when it contains the fact's value (case-insensitive):

- memory: serve/conversation_memory.fit_conversation for `answer` (summary by the cheapest capable model,
  here the same model; archived turns recalled by the question), then /v1/chat/completions;
- truncate: fleetlm.memory.truncate_context at the same context and reserve (the newest turns that fit);
- full: the whole conversation to `answer-full`, when it fits FULL_CONTEXT;
- none: the question alone (how often a value is guessed).

The summary is written once (the arms share one conversation id, as one client re-asking would): its calls
and tokens are printed. Written to --out: results.json (every answer) and memory_recall.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fleetlm.catalog.store import fleet_home

FULL_CONTEXT = 8192
MAX_ANSWER_TOKENS = 24
NAMES = (
    "Ingrid Marek Soraya Tobias Wanjiru Esteban Priya Casimir Yuki Oluwaseun Henrike Dmitri Leilani "
    "Bartholomew Anouk Rashid Solveig Teodor Marisol Kwame Ottilie Fergus Zuzana Ignatius Hedda Lorcan "
    "Ximena Ambrose Signe Thaddeus"
).split()
CITIES = (
    "Tromso Valparaiso Ljubljana Windhoek Kraków Hobart Tbilisi Cusco Tartu Nagasaki Bergamo Halifax".split()
)
COLOURS = "turquoise maroon lavender ochre crimson teal saffron olive magenta indigo amber charcoal".split()
DOGS = "Biscotti Pepperoni Waffles Nimbus Gizmo Truffle Pickles Marzipan Noodle Juniper Paprika Mochi".split()
JOBS = (
    "beekeeper glassblower cartographer locksmith translator welder florist luthier surveyor "
    "archivist stonemason sommelier"
).split()
MONTHS = "January February March April May June July August September October November December".split()
TEMPLATES = (  # (statement, question, values); {v} is the value, {n} the name
    ("{n}'s locker code is {v}.", "What is {n}'s locker code?", None),
    ("{n} lives in {v}.", "In which city does {n} live?", CITIES),
    ("{n}'s favourite colour is {v}.", "What is {n}'s favourite colour?", COLOURS),
    ("{n} has a dog called {v}.", "What is the name of {n}'s dog?", DOGS),
    ("{n} works as a {v}.", "What does {n} work as?", JOBS),
    ("{n} was born in {v}.", "In which month was {n} born?", MONTHS),
)
TOPICS = (
    "baking bread",
    "watering houseplants",
    "packing for a long train trip",
    "stretching after a run",
    "keeping a bicycle chain clean",
    "brewing tea",
    "storing winter clothes",
    "planning a small garden",
    "cleaning a cast iron pan",
    "choosing hiking boots",
    "sleeping well",
    "learning to juggle",
)
TIPS = (
    "Start with the basics and keep it simple. Most problems come from rushing, so give each step the time "
    "it needs, check your progress often, and write down what worked so you can repeat it next time.",
    "A little preparation saves a lot of trouble later. Gather what you need before you begin, keep your "
    "space tidy while you work, and stop for a short break whenever you feel tired or impatient.",
    "Consistency matters more than intensity. Doing a small amount every day builds the habit, and the "
    "results add up over a few weeks far better than one long effort followed by a long pause.",
    "Pay attention to the conditions around you: temperature, light and moisture all change the outcome. "
    "Adjust one thing at a time so that you can tell which change made the difference.",
    "Good tools help, but they do not need to be expensive. Look after the ones you have, clean them after "
    "use, and replace only what is worn out or unsafe.",
    "When something goes wrong, look at what changed since the last time it went right. The answer is "
    "usually there, and fixing it is easier than starting again from the beginning.",
)


@dataclass(frozen=True)
class Fact:
    name: str
    statement: str
    question: str
    value: str


def plant(n: int, seed: int) -> list[Fact]:
    rng = random.Random(seed)
    names = rng.sample(NAMES, n)
    facts = []
    for i, name in enumerate(names):
        statement, question, values = TEMPLATES[i % len(TEMPLATES)]
        value = f"{rng.randrange(1000, 10000)}" if values is None else rng.choice(values)
        facts.append(Fact(name, statement.format(n=name, v=value), question.format(n=name), value))
    rng.shuffle(facts)
    return facts


def conversation(facts: list[Fact], seed: int, at_least: int, count) -> list[dict]:
    """System, one planted fact per turn, then filler turns until `count` says at least `at_least` tokens."""
    rng = random.Random(seed + 1)
    msgs = [{"role": "system", "content": "You are a helpful assistant. Answer briefly."}]
    for f in facts:
        msgs += [
            {"role": "user", "content": f"Please remember this: {f.statement}"},
            {"role": "assistant", "content": "Noted."},
        ]
    n = 0
    while count(msgs) < at_least:
        topic = rng.choice(TOPICS)
        tips = rng.sample(TIPS, 2)
        msgs += [
            {"role": "user", "content": f"Can you give me some advice on {topic}? (question {n + 1})"},
            {"role": "assistant", "content": f"Here is some advice on {topic}. {tips[0]} {tips[1]}"},
        ]
        n += 1
    return msgs


def question(f: Fact) -> dict:
    return {
        "role": "user",
        "content": f"{f.question} Answer with the {'code' if f.value.isdigit() else 'word'} only.",
    }


def start_gateway(work: Path, model: str, context: int):
    import openai
    from fastapi.testclient import TestClient

    from fleetlm.config import parse_config
    from fleetlm.serve.app import create_app
    from fleetlm.serve.backends import build_backends
    from fleetlm.serve.store import UsageStore

    served = {"catalog": model, "engine": "llama_cpp", "price": {"input": 0.0, "output": 0.0}}
    config = parse_config(
        {
            "models": {
                "answer": {**served, "max_context": context},
                "answer-truncate": {**served, "max_context": context},
                "answer-none": {**served, "max_context": context},
                "answer-full": {**served, "max_context": FULL_CONTEXT},
            },
            "knowledge": {"files_dir": str(work / "blobs"), "index_path": str(work / "knowledge.db")},
            "memory": {"summarizer": "answer"},
        }
    )
    app = create_app(config, UsageStore(f"sqlite:///{work / 'fleet.db'}"), build_backends(config))
    tc = TestClient(app)
    tc.__enter__()
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="bench", http_client=tc, max_retries=0)
    return tc, client, app.state.gateway


def ask(client, model: str, messages: list[dict]) -> tuple[str, int]:
    r = client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=MAX_ANSWER_TOKENS
    )
    return r.choices[0].message.content or "", r.usage.prompt_tokens


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar([r["arm"] for r in rows], [r["accuracy"] for r in rows], color=["#2a7", "#c63", "#36c", "#999"])
    for i, r in enumerate(rows):
        ax.text(i, r["accuracy"] + 0.02, f"{r['right']}/{r['n']}", ha="center")
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("facts recalled")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="catalog model that answers")
    p.add_argument("--context", type=int, default=2048, help="the answering model's context (max_context)")
    p.add_argument("--facts", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=0, help="ask only the first N facts (0: all)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument(
        "--max-seconds",
        type=float,
        default=600.0,
        help="no new question after this long (the figures say how many were asked)",
    )
    args = p.parse_args(argv)
    if not 20 <= args.facts <= len(NAMES):
        p.error(f"--facts must be between 20 and {len(NAMES)}")
    from fleetlm.memory import truncate_context
    from fleetlm.serve.conversation_memory import fit_conversation_report, token_counter

    out = args.out or fleet_home() / "bench" / "memory_recall"
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    for old in work.glob("*.db*"):  # a fresh archive: the summary is written by this run
        old.unlink()
    tc, client, gw = start_gateway(work, args.model, args.context)
    count = token_counter(gw, "answer")
    facts = plant(args.facts, args.seed)
    base = conversation(facts, args.seed, 3 * args.context, count)
    total = count(base)
    print(
        f"{len(facts)} facts, {len(base)} messages, {total} tokens ({total / args.context:.2f}x the "
        f"{args.context}-token context of {args.model})",
        file=sys.stderr,
    )
    asked = facts[: args.limit] if args.limit else facts
    arms = {"memory": [], "truncate": [], "full": [], "none": []}
    seconds = dict.fromkeys(arms, 0.0)
    prompt_tokens = dict.fromkeys(arms, 0)
    reports = []
    reserve = gw.config.memory.reserve_tokens
    began = time.perf_counter()
    for i, f in enumerate(asked):
        if time.perf_counter() - began > args.max_seconds:
            print(
                f"  stopped after {i} questions: --max-seconds {args.max_seconds:g} reached", file=sys.stderr
            )
            break
        msgs = base + [question(f)]
        variants = {}
        started = time.perf_counter()
        fitted, report = asyncio.run(fit_conversation_report(gw, "answer", msgs, f"bench-{args.seed}"))
        reports.append(report)
        variants["memory"] = ("answer", fitted)
        fit_seconds = time.perf_counter() - started
        variants["truncate"] = (
            "answer-truncate",
            truncate_context(msgs, context_tokens=args.context, count_tokens=count, reserve_tokens=reserve),
        )
        if count(msgs) + MAX_ANSWER_TOKENS <= FULL_CONTEXT:
            variants["full"] = ("answer-full", msgs)
        variants["none"] = ("answer-none", [msgs[0], msgs[-1]])
        for arm, (model, messages) in variants.items():
            t0 = time.perf_counter()
            text, used = ask(client, model, messages)
            seconds[arm] += time.perf_counter() - t0 + (fit_seconds if arm == "memory" else 0.0)
            prompt_tokens[arm] += used
            arms[arm].append(
                {
                    "fact": f.statement,
                    "value": f.value,
                    "answer": text,
                    "right": f.value.lower() in text.lower(),
                    "prompt_tokens": used,
                }
            )
        done = {a: sum(r["right"] for r in rs) for a, rs in arms.items() if rs}
        print(
            f"  {i + 1}/{len(asked)} {f.value!r}: " + ", ".join(f"{a} {n}" for a, n in done.items()),
            file=sys.stderr,
        )
    tc.__exit__(None, None, None)

    rows = []
    for arm, results in arms.items():
        if not results:
            continue
        right = sum(r["right"] for r in results)
        rows.append(
            {
                "arm": arm,
                "right": right,
                "n": len(results),
                "accuracy": right / len(results),
                "mean_prompt_tokens": prompt_tokens[arm] / len(results),
                "seconds": round(seconds[arm], 1),
            }
        )
    calls = sum(r.summary_calls for r in reports)
    summary_tokens = (sum(r.prompt_tokens for r in reports), sum(r.completion_tokens for r in reports))
    print(
        f"\nmemory recall: {args.model}, context {args.context}, conversation {total} tokens "
        f"({total / args.context:.2f}x), {len(arms['memory'])} of {len(asked)} questions asked, "
        f"seed {args.seed}"
    )
    print(f"{'arm':<10}{'right':>8}{'accuracy':>10}{'prompt tok':>12}{'seconds':>9}")
    for r in rows:
        print(
            f"{r['arm']:<10}{r['right']:>5}/{r['n']:<2}{r['accuracy']:>10.2f}{r['mean_prompt_tokens']:>12.0f}"
            f"{r['seconds']:>9.1f}"
        )
    print(
        f"summariser: {reports[0].summariser if reports else None}, {calls} calls, "
        f"{summary_tokens[0]} prompt + "
        f"{summary_tokens[1]} completion tokens (failures: {sum(len(r.errors) for r in reports)})"
    )
    (out / "results.json").write_text(
        json.dumps(
            {
                "model": args.model,
                "context": args.context,
                "conversation_tokens": total,
                "seed": args.seed,
                "rows": rows,
                "answers": arms,
                "summary_calls": calls,
                "summary_tokens": summary_tokens,
                "summary_errors": [e for r in reports for e in r.errors],
            },
            indent=1,
        )
    )
    plot(
        rows,
        out / "memory_recall.png",
        f"{args.model}: {len(arms['memory'])} facts asked, planted in a {total}-token conversation\n"
        f"({total / args.context:.1f}x "
        f"its {args.context}-token context)",
    )
    print(f"wrote {out / 'results.json'} and {out / 'memory_recall.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
