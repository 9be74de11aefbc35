"""Routing data: one JSONL row per prompt, and the importer for RouteLLM's recorded outcomes.

Row format (DESIGN.md): {"id": str, "prompt": str, "domain": str?, "responses": {model: str}?,
"scores": {model: float in [0, 1]}}.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from fleetlm.errors import FleetError
from fleetlm.jsonl import iter_jsonl


class RouteDataError(FleetError):
    """Routing data that is missing, malformed, or laid out differently than expected."""


@dataclass
class RouteRow:
    id: str
    prompt: str
    scores: dict[str, float] = field(default_factory=dict)
    domain: str | None = None
    responses: dict[str, str] | None = None

    def to_dict(self) -> dict:
        out: dict = {"id": self.id, "prompt": self.prompt}
        if self.domain is not None:
            out["domain"] = self.domain
        if self.responses:
            out["responses"] = self.responses
        out["scores"] = self.scores
        return out


def _row_from_dict(obj: object, where: str) -> RouteRow:
    if not isinstance(obj, dict):
        raise RouteDataError(f"{where}: a row must be a JSON object")
    if not isinstance(obj.get("prompt"), str):
        raise RouteDataError(f"{where}: 'prompt' must be a string")
    scores = obj.get("scores", {})
    if not isinstance(scores, dict):
        raise RouteDataError(f"{where}: 'scores' must be an object {{model: float}}")
    clean: dict[str, float] = {}
    for model, value in scores.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise RouteDataError(f"{where}: score of {model!r} must be a number in [0, 1], got {value!r}")
        clean[str(model)] = float(value)
    responses = obj.get("responses")
    if responses is not None and not (
        isinstance(responses, dict) and all(isinstance(v, str) for v in responses.values())
    ):
        raise RouteDataError(f"{where}: 'responses' must be an object {{model: str}}")
    domain = obj.get("domain")
    if domain is not None and not isinstance(domain, str):
        raise RouteDataError(f"{where}: 'domain' must be a string")
    row_id = obj.get("id")
    if row_id is None:
        row_id = prompt_id(obj["prompt"])
    return RouteRow(id=str(row_id), prompt=obj["prompt"], scores=clean, domain=domain, responses=responses)


def prompt_id(prompt: str, prefix: str = "p") -> str:
    return f"{prefix}-{hashlib.sha256(prompt.encode('utf-8')).hexdigest()[:16]}"


def load_rows(path: str | Path) -> list[RouteRow]:
    rows = [_row_from_dict(obj, where) for where, obj in iter_jsonl(path, RouteDataError, "routing data")]
    if not rows:
        raise RouteDataError(f"{path}: no rows")
    return rows


def save_rows(rows: list[RouteRow], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row.to_dict(), ensure_ascii=False) + "\n")


def model_names(rows: list[RouteRow]) -> list[str]:
    """Models scored in every row, in first-seen order (routers need a full score vector per row)."""
    names = list(rows[0].scores)
    common = set(names)
    for row in rows[1:]:
        common &= set(row.scores)
    out = [m for m in names if m in common]
    if not out:
        raise RouteDataError("no model is scored in every row")
    return out


def score_matrix(rows: list[RouteRow], models: list[str]):
    import numpy as np

    try:
        return np.array([[row.scores[m] for m in models] for row in rows], dtype=np.float32)
    except KeyError as exc:
        raise RouteDataError(f"row has no score for model {exc.args[0]!r}") from None


# ---- RouteLLM's folder layout ---------------------------------------------------------------------------

BENCHMARKS = ("mmlu", "gsm8k")
_RESPONSE_SUFFIX = "_response"


def _read_csv(path: Path) -> list[dict[str, str]]:
    csv.field_size_limit(1 << 30)  # GSM8K responses can be long
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _bool_score(value: str, where: str) -> float:
    v = value.strip().lower()
    if v in ("true", "1", "1.0"):
        return 1.0
    if v in ("false", "0", "0.0"):
        return 0.0
    raise RouteDataError(f"{where}: expected True/False, got {value!r}")


def _contaminated(folder: Path) -> set[str]:
    path = folder / "contaminated_prompts.jsonl"
    if not path.is_file():
        return set()
    out = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            out.add(str(json.loads(line).get("eval_prompt", "")).strip())
    return out


def _csv_rows(path: Path, benchmark: str, domain: str | None, drop: set[str]) -> list[RouteRow]:
    records = _read_csv(path)
    if not records:
        return []
    columns = list(records[0].keys())
    if "prompt" not in columns:
        raise RouteDataError(f"{path}: no 'prompt' column")
    models = [c for c in columns if c != "prompt" and not c.endswith(_RESPONSE_SUFFIX)]
    if not models:
        raise RouteDataError(f"{path}: no model columns besides 'prompt'")
    rows = []
    for i, rec in enumerate(records):
        prompt = rec["prompt"]
        if prompt is None or prompt.strip() in drop:
            continue
        where = f"{path}:{i + 2}"
        scores = {m: _bool_score(rec[m] or "", where) for m in models}
        responses = {
            m: rec[m + _RESPONSE_SUFFIX] for m in models if rec.get(m + _RESPONSE_SUFFIX) is not None
        }
        key = f"{domain or ''}\n{prompt}"
        rows.append(
            RouteRow(
                id=prompt_id(key, benchmark),
                prompt=prompt,
                scores=scores,
                domain=domain,
                responses=responses or None,
            )
        )
    return rows


def import_routellm(src: str | Path, benchmark: str) -> list[RouteRow]:
    """Read a folder laid out like RouteLLM's evals data; contaminated prompts are dropped."""
    src = Path(src)
    if benchmark not in BENCHMARKS:
        raise RouteDataError(f"unknown benchmark {benchmark!r}; choose one of {', '.join(BENCHMARKS)}")
    folder = src / benchmark
    if not folder.is_dir():
        raise RouteDataError(f"{src} has no {benchmark}/ folder (expected RouteLLM's layout)")
    drop = _contaminated(folder)
    rows: list[RouteRow] = []
    if benchmark == "mmlu":
        files = sorted(folder.glob("mmlu_*.csv"))
        if not files:
            raise RouteDataError(f"{folder} holds no mmlu_<subject>.csv file")
        for path in files:
            rows += _csv_rows(path, "mmlu", path.stem[len("mmlu_") :], drop)
    else:
        path = folder / "gsm8k_responses.csv"
        if not path.is_file():
            raise RouteDataError(f"{folder} has no gsm8k_responses.csv")
        rows = _csv_rows(path, "gsm8k", "gsm8k", drop)
    if not rows:
        raise RouteDataError(f"{folder}: no rows left after dropping contaminated prompts")
    return rows
