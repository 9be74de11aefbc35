"""Training data: chat JSONL (loss on assistant tokens only), plain text with packing, deterministic batches.

A batch is a pair (input_ids, labels) of LongTensors [B, T]; labels hold -100 where no loss is taken, and the
label at position t is the token at t (the loss shifts by one), as in Hugging Face's causal LMs.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from fleetlm.errors import FleetError

IGNORE = -100


class DataError(FleetError):
    """A training data file that is missing, malformed, or does not fit the chat template."""


class TokenizerLike(Protocol):
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kw) -> str: ...


@dataclass
class Example:
    ids: list[int]
    labels: list[int]  # ids where the loss is taken, IGNORE elsewhere


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
    if not rows:
        raise DataError(f"data file is empty: {path}")
    return rows


def encode_chat(tok: TokenizerLike, messages: list[dict]) -> Example:
    """Tokenize a conversation turn by turn so that exactly the assistant turns (and their end) carry loss.

    Each prompt part is the template rendered up to the generation prompt, tokenized on its own: the same ids
    the engine feeds at inference, so training sees the boundaries it will see when generating.
    """
    if not any(m.get("role") == "assistant" for m in messages):
        raise DataError("a chat example has no assistant message to learn from")
    ids: list[int] = []
    labels: list[int] = []
    done = ""  # the rendered text already tokenized

    def add(text: str, learn: bool) -> None:
        part = tok.encode(text, add_special_tokens=False) if text else []
        ids.extend(part)
        labels.extend(part if learn else [IGNORE] * len(part))

    for i, msg in enumerate(messages):
        if msg.get("role") != "assistant":
            continue
        prompt = tok.apply_chat_template(messages[:i], add_generation_prompt=True)
        full = tok.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DataError("the chat template does not render conversations as growing prefixes; "
                            "cannot mask the loss to assistant turns")
        add(prompt[len(done):], learn=False)
        add(full[len(prompt):], learn=True)
        done = full
    rest = tok.apply_chat_template(messages, add_generation_prompt=False)
    add(rest[len(done):] if rest.startswith(done) else "", learn=False)
    return Example(ids, labels)


def load_chat(path: str | Path, tok: TokenizerLike, seq_len: int) -> list[Example]:
    """Chat JSONL ({"messages": [...]} per line) -> examples truncated to seq_len tokens."""
    out = []
    for n, row in enumerate(read_jsonl(path), 1):
        msgs = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m for m in msgs):
            raise DataError(f"{path}:{n}: expected {{\"messages\": [{{\"role\": ..., \"content\": ...}}]}}")
        ex = encode_chat(tok, msgs)
        ex = Example(ex.ids[:seq_len], ex.labels[:seq_len])
        if any(lab != IGNORE for lab in ex.labels[1:]):  # an example cut before its answer teaches nothing
            out.append(ex)
    if not out:
        raise DataError(f"{path}: no example keeps an assistant token within seq_len={seq_len}")
    return out


def read_texts(path: str | Path) -> list[str]:
    """Plain text: a .jsonl with a "text" (or chat "messages") field per line, or a text file of documents
    separated by blank lines."""
    path = Path(path)
    if path.suffix == ".jsonl":
        texts = []
        for row in read_jsonl(path):
            if "text" in row:
                texts.append(str(row["text"]))
            elif "messages" in row:
                texts.append("\n".join(str(m.get("content", "")) for m in row["messages"]))
        return texts
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    return [d.strip() for d in path.read_text().split("\n\n") if d.strip()]


def pack_texts(texts: list[str], tok: TokenizerLike, seq_len: int, eos_id: int) -> list[Example]:
    """Concatenate documents (each ended by eos) and cut the stream into full blocks of seq_len tokens."""
    stream: list[int] = []
    for text in texts:
        stream.extend(tok.encode(text, add_special_tokens=False))
        stream.append(eos_id)
    blocks = [stream[i : i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]
    if not blocks:
        raise DataError(f"the text holds {len(stream)} tokens, fewer than one block of seq_len={seq_len}")
    return [Example(b, list(b)) for b in blocks]


def collate(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest example; padding carries no loss (causal attention never looks ahead)."""
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, : len(e.ids)] = torch.tensor(e.ids)
        labels[row, : len(e.labels)] = torch.tensor(e.labels)
    return ids, labels


def sample_indices(n_examples: int, step: int, batch_size: int, seed: int) -> list[int]:
    """The example indices of optimizer step `step`: a stream of seeded per-epoch permutations.

    A pure function of (step, seed): a resumed run and a run on any number of processes see the same batches.
    """
    start, out = step * batch_size, []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n_examples)
        perm = list(range(n_examples))
        random.Random(seed * 1_000_003 + epoch).shuffle(perm)
        out.extend(perm[offset : offset + batch_size - len(out)])
    return out


def step_batches(examples: list[Example], step: int, batch_size: int, grad_accum: int, seed: int, pad_id: int,
                 rank: int = 0, world: int = 1) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
    """This process's micro-batches for one optimizer step, and the loss-token count of the whole global batch
    (every process divides by the same count, so the sum over processes equals the single-process loss)."""
    idx = sample_indices(len(examples), step, batch_size, seed)
    chosen = [examples[i] for i in idx]
    n_tokens = sum(sum(lab != IGNORE for lab in e.labels[1:]) for e in chosen)
    micro = batch_size // (grad_accum * world)
    mine = chosen[rank * micro * grad_accum : (rank + 1) * micro * grad_accum]
    return [collate(mine[m * micro : (m + 1) * micro], pad_id) for m in range(grad_accum)], max(n_tokens, 1)
