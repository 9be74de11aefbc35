"""The flywheel: one domain's logged traffic -> a small expert that joins the fleet, and the router's data.

`distill_from_usage` reads the domain's prompts and the teacher's answers from the gateway's usage log
(train/usage.py), fine-tunes the student on the train-split answers with the ordinary loop (full fine-tune of
our decoder, or LoRA when the TrainConfig has a lora: section), then lets the expert answer the dev-split
prompts of the log and scores it against the teacher's logged answers there. Those scores are the routing
data the router is refit on (`fleet route fit --data OUT/routing.jsonl`): the log itself says where the
expert can stand in for the teacher, with no gold answers needed. The expert is an HF-layout checkpoint
(weights, tokenizer, chat template) that `Engine.load` and a fleet.yaml `path:` entry serve; OUT/fleet.yaml
holds that entry.

A student given as a GGUF file or catalog name is dequantized into our decoder first (f32) and saved as the
checkpoint the loop starts from.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from fleetlm.errors import ConfigError
from fleetlm.train.config import TrainConfig
from fleetlm.train.loop import TrainResult, train
from fleetlm.train.usage import LoggedAnswer, chat_rows, usage_records

DATA_FILE = "usage_data.jsonl"  # the logged conversations the student trains on
ROUTING_FILE = "routing.jsonl"  # dev-split prompts scored for teacher and expert: `fleet route fit` data
FLEET_FILE = "fleet.yaml"  # the expert's fleet.yaml entry
REPORT_FILE = "flywheel.json"
INIT_DIR = "student-init"  # a GGUF student dequantized into a checkpoint the loop can start from


@dataclass
class FlywheelResult:
    expert_dir: Path
    train: TrainResult
    n_train: int
    n_dev: int
    teacher: str
    dev_agreement: float | None  # share of dev prompts where the expert's answer equals the teacher's
    seconds: dict[str, float] = field(default_factory=dict)


def student_checkpoint(student: str | Path, work_dir: Path) -> Path:
    """A checkpoint dir for the student: itself, or its GGUF (file or catalog name) dequantized to f32."""
    import torch

    from fleetlm.catalog.resolve import resolve_model
    from fleetlm.model.checkpoint import save_checkpoint
    from fleetlm.model.gguf import load_gguf

    ref = resolve_model(str(student))
    if ref.kind == "hf":
        return Path(ref.location)
    if ref.kind != "gguf":
        raise ConfigError(f"the student must be a local model (GGUF, catalog name or checkpoint dir), "
                          f"not {student}")
    out = work_dir / INIT_DIR
    stamp = out / "source.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("gguf") == ref.location:
        return out  # dequantized by an earlier run
    model, tok = load_gguf(ref.location, dtype=torch.float32)
    save_checkpoint(model, out, tok)
    stamp.write_text(json.dumps({"gguf": ref.location}) + "\n")
    return out


def teacher_of(answers: list[LoggedAnswer]) -> str:
    """The model that answered most of the logged rows (the one the expert learns from)."""
    counts: dict[str, int] = {}
    for a in answers:
        counts[a.model] = counts.get(a.model, 0) + 1
    return max(counts, key=lambda m: counts[m])


def answer_all(checkpoint: Path, conversations: list[list[dict]], max_tokens: int = 96) -> list[str]:
    """Greedy answers of a checkpoint to each conversation, with our engine (batched by the engine)."""
    from fleetlm.engine import Engine, GenerationRequest

    engine = Engine.load(str(checkpoint))
    reqs = [GenerationRequest(messages=c, max_tokens=max_tokens, temperature=0.0) for c in conversations]
    texts = [""] * len(reqs)
    for start in range(0, len(reqs), 16):
        for event in engine.generate(reqs[start : start + 16]):
            texts[start + event.request_index] += event.text
    return texts


def routing_rows(domain: ModuleType, dev: list[LoggedAnswer], expert_answers: list[str], teacher: str,
                 expert: str) -> list[dict[str, Any]]:
    """Routing data from the log: the teacher scores 1 where its logged answer is a valid domain answer, the
    expert where its answer equals the teacher's (the log's only reference)."""
    rows = []
    for a, mine in zip(dev, expert_answers, strict=True):
        prompt = next(m["content"] for m in reversed(a.messages) if m.get("role") == "user")
        rows.append({"id": a.request_id, "prompt": prompt, "domain": domain.DOMAIN,
                     "responses": {teacher: a.answer, expert: mine},
                     "scores": {teacher: float(domain.parse(a.answer) is not None),
                                expert: domain.score(mine, a.answer)}})
    return rows


def fleet_entry(expert: str, expert_dir: Path) -> str:
    import yaml

    entry = {"models": {expert: {"path": str(expert_dir.resolve()), "engine": "fleetlm", "dtype": "bf16"}}}
    head = "# the distilled expert; merge into fleet.yaml's models:\n"
    return head + yaml.safe_dump(entry, sort_keys=False)


def distill_from_usage(source: str | Path, domain: ModuleType, cfg: TrainConfig, *, student: str | Path,
                       expert: str, model: str | None = None, max_examples: int | None = None,
                       stop_after: int | None = None) -> FlywheelResult:
    """Train `student` on the domain's logged answers in `source`; cfg.out_dir becomes the expert."""
    t0 = time.perf_counter()
    answers, skipped = usage_records(source, domain, model)
    teacher = model or teacher_of(answers)
    answers = [a for a in answers if a.model == teacher]
    train_rows = [a for a in answers if a.split == "train"]
    dev = [a for a in answers if a.split == "dev"]
    if not train_rows:
        raise ConfigError(f"the log holds {len(answers)} {domain.DOMAIN} answers of {teacher}, none of them "
                          "in the domain's train split")
    random.Random(cfg.seed).shuffle(train_rows)
    if max_examples is not None:
        train_rows = train_rows[:max_examples]
    out = Path(cfg.out_dir)
    work = out.parent / f"{out.name}-work"
    work.mkdir(parents=True, exist_ok=True)
    cfg = cfg.model_copy(deep=True)
    cfg.model.init = student_checkpoint(student, work)
    data = work / DATA_FILE
    data.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(train_rows)))
    cfg.data.train, cfg.data.format = data, "chat"
    t_data = time.perf_counter()
    result = train(cfg, stop_after=stop_after)
    t_train = time.perf_counter()
    agreement = None
    if dev:
        mine = answer_all(out, [a.messages for a in dev])
        rows = routing_rows(domain, dev, mine, teacher, expert)
        (out / ROUTING_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
        agreement = sum(r["scores"][expert] for r in rows) / len(rows)
    (out / FLEET_FILE).write_text(fleet_entry(expert, out))
    seconds = {"data": t_data - t0, "train": t_train - t_data, "dev_eval": time.perf_counter() - t_train}
    report = {"source": str(source), "domain": domain.DOMAIN, "teacher": teacher, "expert": expert,
              "student": str(student), "train_examples": len(train_rows), "dev_prompts": len(dev),
              "skipped": dict(skipped), "dev_agreement": agreement, "step": result.step,
              "train_loss": result.train_loss, "eval_loss": result.eval_loss, "seconds": seconds}
    (out / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
    return FlywheelResult(out, result, len(train_rows), len(dev), teacher, agreement, seconds)
