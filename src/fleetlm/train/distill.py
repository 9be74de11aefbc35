"""Distillation: a small student learns a domain from a big teacher, with the ordinary training loop.

- `seq`: the teacher answers the prompts (greedy or sampled), the answers become chat JSONL, and the student
  is fine-tuned on them with the plain LM loss. The teacher may be a checkpoint dir or any OpenAI-compatible
  endpoint (text is all it needs).
- `kl` / `rkl` / `gkd`: token-level. On each assistant token the student matches the teacher's next-token
  distribution (forward KL, reverse KL, generalized JSD with beta), mixed with the plain LM loss:
  `alpha * T^2 * divergence + (1 - alpha) * cross-entropy`. The teacher must be a local checkpoint sharing the
  student's tokenizer. The answers trained on are the records' gold answers, or the teacher's where a record
  has none (`responses`).
- on-policy (GKD): a set fraction of optimizer steps replace their batches by the student's own answers to the
  same prompts, sampled from the current weights; there only the divergence counts (no gold to imitate).
  `method="onpolicy"` is `gkd` with `on_policy_fraction` 0.5 unless given.

`distill(train_cfg, distill_cfg)` runs it in-process and returns the loop's TrainResult; `fleet distill` is
its command.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

from fleetlm.errors import CheckpointError, ConfigError, FleetError
from fleetlm.train.config import TrainConfig, parse_config
from fleetlm.train.data import IGNORE, DataError, Example, collate, read_jsonl
from fleetlm.train.loop import Batch, TrainResult, init_distributed, lm_loss, train
from fleetlm.train.losses import divergence

METHODS = ("seq", "kl", "rkl", "gkd", "onpolicy")
TOKEN_LEVEL = ("kl", "rkl", "gkd", "onpolicy")
DATA_FILE = "distill_data.jsonl"  # the chat JSONL the student trains on, written into the run dir
REPORT_FILE = "distill.json"
RETRY_STATUSES = {408, 409, 429, 500, 502, 503, 504}


class DistillError(FleetError):
    """A teacher that cannot be used: unreachable, failing, or with a vocabulary the student lacks."""


class DistillConfig(BaseModel):
    """What to distill from and how; the training settings (student, steps, lr, out_dir) are a TrainConfig."""

    model_config = ConfigDict(extra="forbid")

    teacher: str  # a checkpoint dir, or the base URL of an OpenAI-compatible endpoint (http://.../v1)
    prompts: Path  # chat JSONL ({"messages", "answer"?}) as `fleet tasks generate` writes, or {"prompt"}
    method: str = "kl"
    alpha: float = Field(0.5, ge=0.0, le=1.0)  # weight of the divergence; 1 - alpha goes to the LM loss
    beta: float = Field(0.5, gt=0.0, lt=1.0)  # gkd only
    temperature: float = Field(1.0, gt=0.0)  # softmax temperature of both distributions in the divergence
    on_policy_fraction: float | None = Field(None, ge=0.0, le=1.0)
    responses: Literal["auto", "gold", "teacher"] = "auto"  # token-level: whose answers the data holds
    teacher_model: str | None = None  # remote: the model name sent to the endpoint
    api_key_env: str = "OPENAI_API_KEY"  # remote: the env var holding the key (unset: no auth header)
    teacher_dtype: Literal["f32", "bf16"] = "f32"
    max_new_tokens: int = Field(64, gt=0)  # teacher answers and on-policy samples
    teacher_temperature: float = Field(0.0, ge=0.0)  # 0: greedy teacher answers
    samples_per_prompt: int = Field(1, gt=0)  # teacher answers per prompt (differ when temperature > 0)
    sample_temperature: float = Field(1.0, ge=0.0)  # on-policy student samples
    concurrency: int = Field(4, gt=0)  # remote requests in flight
    timeout: float = Field(120.0, gt=0.0)  # remote, seconds per request
    retries: int = Field(2, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> DistillConfig:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.on_policy_fraction and self.method == "seq":
            raise ValueError("on_policy_fraction needs a token-level method (kl, rkl, gkd, onpolicy)")
        return self

    @property
    def divergence(self) -> str:
        return "gkd" if self.method == "onpolicy" else self.method

    @property
    def fraction(self) -> float:
        if self.on_policy_fraction is not None:
            return self.on_policy_fraction
        return 0.5 if self.method == "onpolicy" else 0.0

    @property
    def remote(self) -> bool:
        return self.teacher.startswith(("http://", "https://"))


def parse_distill_config(data: dict[str, Any]) -> DistillConfig:
    try:
        return DistillConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "distill"
        msg = str(first["msg"]).removeprefix("Value error, ")
        raise ConfigError(f"distill: {where}: {msg}") from None


# ---------------------------------------------------------------- prompts


@dataclass
class PromptRecord:
    messages: list[dict[str, Any]]  # the conversation up to the answer (any trailing assistant turn removed)
    answer: str | None  # the gold answer: "answer", else the trailing assistant turn, else None
    meta: dict[str, Any] = field(default_factory=dict)  # id, domain, level... carried into the data file


def read_prompts(path: str | Path) -> list[PromptRecord]:
    out = []
    for n, row in enumerate(read_jsonl(path), 1):
        if not isinstance(row, dict):
            raise DataError(f"{path}:{n}: expected an object with \"messages\" or \"prompt\"")
        if isinstance(row.get("messages"), list):
            msgs = list(row["messages"])
            if not all(isinstance(m, dict) and "role" in m for m in msgs):
                raise DataError(f"{path}:{n}: every message needs a \"role\"")
        elif isinstance(row.get("prompt"), str):
            msgs = [{"role": "user", "content": row["prompt"]}]
        else:
            raise DataError(f"{path}:{n}: expected {{\"messages\": [...]}} or {{\"prompt\": str}}")
        answer = row.get("answer")
        while msgs and msgs[-1].get("role") == "assistant":
            last = msgs.pop()
            answer = answer if answer is not None else last.get("content")
        if not msgs:
            raise DataError(f"{path}:{n}: no prompt before the answer")
        meta = {k: v for k, v in row.items() if k not in ("messages", "prompt", "answer")}
        out.append(PromptRecord(msgs, None if answer is None else str(answer), meta))
    return out


# ---------------------------------------------------------------- teachers


class LocalTeacher:
    """One of our checkpoints: answers prompts with the engine and gives next-token logits for KD."""

    def __init__(self, path: str | Path, dtype: str = "f32") -> None:
        from fleetlm.model.checkpoint import load_checkpoint
        from fleetlm.model.tokenizer import Tokenizer

        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise CheckpointError(f"teacher is not a checkpoint dir (no config.json): {self.path}")
        self.model = load_checkpoint(self.path, dtype={"f32": torch.float32, "bf16": torch.bfloat16}[dtype])
        self.model.eval().requires_grad_(False)
        self.tokenizer = Tokenizer.from_dir(self.path)

    def answer(self, conversations: list[list[dict]], max_tokens: int, temperature: float,
               seeds: list[int]) -> list[str]:
        from fleetlm.engine import Engine, GenerationRequest

        engine = Engine(self.model, self.tokenizer, name=self.path.name)
        limit = self.model.config.max_position_embeddings
        lengths = [len(self.tokenizer.encode(self.tokenizer.apply_chat_template(c), add_special_tokens=False))
                   for c in conversations]
        order = sorted(range(len(conversations)), key=lambda i: lengths[i])  # similar lengths share a batch
        out = [""] * len(conversations)
        for start in range(0, len(order), 32):
            chunk = order[start : start + 32]
            room = limit - max(lengths[i] for i in chunk)
            if room < 1:
                raise DistillError(f"a prompt of {max(lengths[i] for i in chunk)} tokens leaves the teacher "
                                   f"(context {limit}) no room to answer")
            reqs = [GenerationRequest(messages=conversations[i], max_tokens=min(max_tokens, room),
                                      temperature=temperature, seed=seeds[i]) for i in chunk]
            texts = [""] * len(reqs)
            for event in engine.generate(reqs):
                texts[event.request_index] += event.text
            for i, text in zip(chunk, texts, strict=True):
                out[i] = text
        self.model.remove_caches()  # the KD forward runs without a cache
        return out

    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids)


class RemoteTeacher:
    """An OpenAI-compatible endpoint: /chat/completions, text only (no logits, so sequence-level only)."""

    def __init__(self, base_url: str, model: str | None, api_key_env: str, concurrency: int = 4,
                 timeout: float = 120.0, retries: int = 2) -> None:
        if not model:
            raise ConfigError("a remote teacher needs its model name (--teacher-model NAME)")
        self.base_url, self.model = base_url.rstrip("/"), model
        key = os.environ.get(api_key_env)
        self.headers = {"authorization": f"Bearer {key}"} if key else {}
        self.concurrency, self.timeout, self.retries = concurrency, timeout, retries

    def answer(self, conversations: list[list[dict]], max_tokens: int, temperature: float,
               seeds: list[int]) -> list[str]:
        import httpx

        with httpx.Client(base_url=self.base_url, headers=self.headers, timeout=self.timeout) as client:
            def one(i: int) -> str:
                body = {"model": self.model, "messages": conversations[i], "max_tokens": max_tokens,
                        "temperature": temperature, "seed": seeds[i]}
                return self._post(client, body)

            with ThreadPoolExecutor(self.concurrency) as pool:
                return list(pool.map(one, range(len(conversations))))

    def _post(self, client, body: dict) -> str:
        import httpx

        where = f"teacher {self.base_url} ({self.model})"
        for attempt in range(self.retries + 1):
            try:
                resp = client.post("/chat/completions", json=body)
            except httpx.HTTPError as exc:
                if attempt == self.retries:
                    raise DistillError(f"{where} unreachable: {exc}") from None
            else:
                if resp.status_code < 400:
                    try:
                        return resp.json()["choices"][0]["message"]["content"] or ""
                    except (ValueError, KeyError, IndexError, TypeError):
                        raise DistillError(f"{where} sent a reply that is not a chat completion") from None
                if resp.status_code not in RETRY_STATUSES or attempt == self.retries:
                    raise DistillError(f"{where} answered {resp.status_code}: {_error_message(resp)}")
            time.sleep(0.2 * 2**attempt)
        raise AssertionError("unreachable")


def _error_message(resp) -> str:
    try:
        return str(resp.json()["error"]["message"])
    except Exception:  # any body: the status line is message enough
        return resp.text[:200]


def load_teacher(dcfg: DistillConfig) -> LocalTeacher | RemoteTeacher:
    if dcfg.remote:
        return RemoteTeacher(dcfg.teacher, dcfg.teacher_model, dcfg.api_key_env, dcfg.concurrency,
                             dcfg.timeout, dcfg.retries)
    if not Path(dcfg.teacher).exists():
        raise CheckpointError(f"teacher not found: {dcfg.teacher} (a checkpoint dir or an http(s) base URL)")
    return LocalTeacher(dcfg.teacher, dcfg.teacher_dtype)


def teacher_records(teacher: LocalTeacher | RemoteTeacher, records: Sequence[PromptRecord],
                    dcfg: DistillConfig, seed: int = 0) -> list[dict[str, Any]]:
    """Chat records whose assistant turn is the teacher's answer (samples_per_prompt per prompt)."""
    convs = [r.messages for r in records for _ in range(dcfg.samples_per_prompt)]
    seeds = [seed * 1_000_003 + i for i in range(len(convs))]
    texts = teacher.answer(convs, dcfg.max_new_tokens, dcfg.teacher_temperature, seeds)
    owners = [r for r in records for _ in range(dcfg.samples_per_prompt)]
    return [{**r.meta, "messages": [*r.messages, {"role": "assistant", "content": t}], "source": "teacher"}
            for r, t in zip(owners, texts, strict=True)]


def build_data(teacher: LocalTeacher | RemoteTeacher, records: Sequence[PromptRecord], dcfg: DistillConfig,
               seed: int = 0) -> list[dict[str, Any]]:
    """The training conversations: teacher answers for seq, else gold answers where the records have them."""
    use_gold = dcfg.method != "seq" and dcfg.responses != "teacher"
    gold = [r for r in records if use_gold and r.answer is not None]
    missing = [r for r in records if not (use_gold and r.answer is not None)]
    if missing and dcfg.responses == "gold" and dcfg.method != "seq":
        raise DataError(f"responses=gold but {len(missing)} of {len(records)} prompts have no answer")
    rows = [{**r.meta, "messages": [*r.messages, {"role": "assistant", "content": r.answer}],
             "source": "gold"} for r in gold]
    return rows + (teacher_records(teacher, missing, dcfg, seed) if missing else [])


# ---------------------------------------------------------------- token-level loss and on-policy batches


def shared_vocab_size(teacher_dir: Path, student_tok_dir: Path) -> int:
    """The size of the vocabulary teacher and student share; a clear error when their tokenizers differ."""
    from tokenizers import Tokenizer as RawTokenizer

    vocabs = []
    for who, d in (("teacher", teacher_dir), ("student", student_tok_dir)):
        if not (Path(d) / "tokenizer.json").is_file():
            raise CheckpointError(f"no tokenizer.json in the {who}'s dir {d}")
        raw = RawTokenizer.from_file(str(Path(d) / "tokenizer.json"))
        vocabs.append(raw.get_vocab(with_added_tokens=True))
    t, s = vocabs
    if t != s:
        differ = len(set(t.items()) ^ set(s.items()))
        raise DistillError(f"token-level distillation needs one tokenizer: the teacher's ({len(t)} tokens) "
                           f"and the student's ({len(s)} tokens) differ in {differ} entries; use method seq")
    return len(t)


@dataclass
class DistillLoss:
    """loss_fn for the loop: alpha * T^2 * divergence + (1 - alpha) * LM loss, summed over loss tokens."""

    teacher: LocalTeacher
    method: str  # kl | rkl | gkd
    vocab_size: int  # ids both tokenizers share; logit columns beyond are embedding padding
    alpha: float = 0.5
    beta: float = 0.5
    temperature: float = 1.0

    def __call__(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        mask = batch.labels[:, 1:] != IGNORE  # the loss at t predicts token t + 1, as in lm_loss
        teacher_logits = self.teacher.logits(batch.input_ids)
        width = min(logits.shape[-1], teacher_logits.shape[-1])
        if width < self.vocab_size:
            raise DistillError(f"a model gives {width} logits, fewer than the {self.vocab_size} token ids")
        s = logits[:, :-1][mask][:, : self.vocab_size]
        t = teacher_logits[:, :-1][mask][:, : self.vocab_size]
        kd = divergence(self.method, s, t, self.beta, self.temperature).sum() * self.temperature**2
        if batch.on_policy or self.alpha == 1.0:
            return kd  # the student's own samples are scored, not imitated
        return self.alpha * kd + (1.0 - self.alpha) * lm_loss(logits, batch)


def is_on_policy_step(step: int, fraction: float) -> bool:
    """Spread evenly: after n steps exactly floor(n * fraction) of them were on-policy."""
    return math.floor((step + 1) * fraction + 1e-9) > math.floor(step * fraction + 1e-9)


@dataclass
class OnPolicy:
    """batch_fn for the loop: on the chosen steps each row's answer becomes the student's own sample."""

    fraction: float
    tokenizer: Any  # the student's (fleetlm.model.tokenizer.Tokenizer)
    pad_id: int
    seq_len: int
    max_new_tokens: int = 64
    temperature: float = 1.0
    seed: int = 0
    steps: list[int] = field(default_factory=list)  # the steps that were on-policy

    def __call__(self, step: int, model: nn.Module, micro: list[Batch]) -> list[Batch]:
        if not is_on_policy_step(step, self.fraction):
            return micro
        self.steps.append(step)
        return [self.resample(model, b, seed=(self.seed * 1_000_003 + step) * 1009 + m)
                for m, b in enumerate(micro)]

    def resample(self, model: nn.Module, batch: Batch, seed: int) -> Batch:
        prompts = []
        for ids, labels in zip(batch.input_ids.tolist(), batch.labels.tolist(), strict=True):
            first = next((t for t, lab in enumerate(labels) if lab != IGNORE), len(labels))
            prompts.append(ids[:first])
        room = min(self.max_new_tokens, self.seq_len - max(len(p) for p in prompts))
        if room < 1 or not all(prompts):
            return batch  # no room for an answer within seq_len: keep the row as it is
        samples = sample_answers(model, self.tokenizer, prompts, room, self.temperature, seed)
        examples = [Example(p + s, [IGNORE] * len(p) + s) for p, s in zip(prompts, samples, strict=True)]
        ids, labels = collate(examples, self.pad_id)
        return Batch(ids, labels, on_policy=True)


def sample_answers(model: nn.Module, tokenizer: Any, prompts: list[list[int]], max_tokens: int,
                   temperature: float, seed: int) -> list[list[int]]:
    """The model's continuations of each prompt (ending with its end-of-turn token when it stopped)."""
    from fleetlm.model.decoder import Transformer

    was_training = model.training
    model.eval()
    try:
        if isinstance(model, Transformer):
            from fleetlm.engine import GenerationRequest, generate

            reqs = [GenerationRequest(prompt_ids=p, max_tokens=max_tokens, temperature=temperature,
                                      seed=seed + i) for i, p in enumerate(prompts)]
            out: list[list[int]] = [[] for _ in prompts]
            for event in generate(model, tokenizer, reqs):
                out[event.request_index].append(event.token_id)
            model.remove_caches()  # a cache left behind would ride along in the training forward
            return out
        return _hf_sample(model, tokenizer, prompts, max_tokens, temperature, seed)
    finally:
        model.train(was_training)


@torch.no_grad()
def _hf_sample(model: nn.Module, tokenizer: Any, prompts: list[list[int]], max_tokens: int,
               temperature: float, seed: int) -> list[list[int]]:
    """transformers / peft models: their own generate, one row at a time (no padding to get right)."""
    eos = list(tokenizer.eos_token_ids)
    out = []
    with torch.random.fork_rng():  # sampling must not move the training run's RNG stream
        torch.manual_seed(seed)
        for p in prompts:
            kw = dict(temperature=temperature, top_k=0) if temperature > 0 else {}
            ids = torch.tensor([p])
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=max_tokens, eos_token_id=eos,
                                 pad_token_id=tokenizer.pad_token_id, do_sample=temperature > 0, **kw)
            new = gen[0, len(p):].tolist()
            stop = next((i for i, t in enumerate(new) if t in eos), None)
            out.append(new if stop is None else new[: stop + 1])
    return out


# ---------------------------------------------------------------- the run


def student_tokenizer_dir(cfg: TrainConfig) -> Path:
    if cfg.tokenizer.path is not None:
        return Path(cfg.tokenizer.path)
    if cfg.model.init is not None:
        return Path(cfg.model.init)
    raise ConfigError("token-level distillation of a student from scratch needs tokenizer.path "
                      "(the teacher's tokenizer dir)")


def distill(cfg: TrainConfig, dcfg: DistillConfig, stop_after: int | None = None) -> TrainResult:
    """Distill dcfg.teacher into the student of `cfg` (model.init, or model.shape from scratch).

    The student trains on cfg's settings (steps, batch, lr, seq_len, eval, out_dir); cfg.data.train is
    replaced by the distillation data written to out_dir/distill_data.jsonl. Returns the loop's TrainResult.
    """
    rank, world = init_distributed()
    cfg = cfg.model_copy(deep=True)
    token_level = dcfg.method in TOKEN_LEVEL
    if token_level and dcfg.remote:
        raise ConfigError(f"method {dcfg.method} needs the teacher's logits: give a checkpoint dir, not an "
                          f"endpoint (a remote teacher works with --method seq)")
    if cfg.model.init is not None and not (Path(cfg.model.init) / "config.json").is_file():
        raise CheckpointError(f"student is not a checkpoint dir (no config.json): {cfg.model.init}")
    records = read_prompts(dcfg.prompts)
    teacher = load_teacher(dcfg)
    vocab = shared_vocab_size(Path(dcfg.teacher), student_tokenizer_dir(cfg)) if token_level else 0
    data_file = cfg.out_dir / DATA_FILE
    if rank == 0:  # one process asks the teacher; the others read what it wrote
        rows = build_data(teacher, records, dcfg, seed=cfg.seed)
        random.Random(cfg.seed).shuffle(rows)  # gold and teacher rows interleave in the eval split too
        data_file.parent.mkdir(parents=True, exist_ok=True)
        data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    if world > 1:
        dist.barrier()
    cfg.data.train, cfg.data.format = data_file, "chat"

    loss_fn, batch_fn = lm_loss, None
    if token_level:
        loss_fn = DistillLoss(teacher, dcfg.divergence, vocab, dcfg.alpha, dcfg.beta, dcfg.temperature)
        if dcfg.fraction > 0:
            from fleetlm.model.tokenizer import Tokenizer

            tok = Tokenizer.from_dir(student_tokenizer_dir(cfg))
            batch_fn = OnPolicy(dcfg.fraction, tok, tok.pad_token_id, cfg.data.seq_len, dcfg.max_new_tokens,
                                dcfg.sample_temperature, cfg.seed)
    else:
        del teacher  # sequence-level is done with the teacher once its answers are written
    result = train(cfg, loss_fn=loss_fn, stop_after=stop_after, batch_fn=batch_fn)
    if rank == 0:
        report = {"config": dcfg.model_dump(mode="json"), "data": str(data_file), "examples": len(records),
                  "on_policy_steps": batch_fn.steps if batch_fn is not None else [],
                  "step": result.step, "train_loss": result.train_loss, "eval_loss": result.eval_loss}
        (cfg.out_dir / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
    return result


def train_config(config: str | Path | None = None, student: str | Path | None = None,
                 prompts: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """The student's TrainConfig: a train.yaml (data.train may be left out) and/or a student checkpoint.

    `student` replaces model.init; overrides (steps, batch_size, lr, out_dir, ...) are top-level keys, except
    seq_len which goes to data. Relative paths in the yaml are taken relative to its folder.
    """
    import yaml

    raw: dict[str, Any] = {}
    base_dir = None
    if config is not None:
        path = Path(config)
        if not path.is_file():
            raise ConfigError(f"train config not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"train config {path} is not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"train config {path} must be a mapping of sections")
        base_dir = path.parent.resolve()
    if student is not None:
        model = {k: v for k, v in (raw.get("model") or {}).items() if k != "shape"}
        raw["model"] = {**model, "init": str(Path(student).resolve())}
    if "model" not in raw:
        raise ConfigError("give the student: --student DIR, or --config train.yaml with model.init/shape")
    data = dict(raw.get("data") or {})
    data.setdefault("train", str(Path(prompts).resolve()) if prompts is not None else DATA_FILE)
    if overrides.get("seq_len") is not None:
        data["seq_len"] = overrides["seq_len"]
    raw["data"] = data
    raw.setdefault("out_dir", "runs/distill")
    for key, value in overrides.items():
        if value is not None and key != "seq_len":
            raw[key] = str(Path(value).resolve()) if key == "out_dir" else value
    return parse_config(raw, base_dir=base_dir)
