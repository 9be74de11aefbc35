"""Load and save Hugging Face checkpoint directories (config.json + safetensors), without transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fleetlm.errors import CheckpointError
from fleetlm.model.config import ModelConfig
from fleetlm.model.decoder import Transformer
from fleetlm.model.moe import hf_moe_tensors, is_moe_tensor, our_moe_name, stack_experts
from fleetlm.model.tokenizer import Tokenizer

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
DTYPES = {
    "float32": torch.float32,
    "f32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "f16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r} (one of {', '.join(DTYPES)})")
    return DTYPES[dtype]


def read_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a checkpoint dir; CheckpointError (one line) when it is not one we can run."""
    root = Path(path)
    if not root.exists():
        raise CheckpointError(f"checkpoint not found: {root}")
    if not root.is_dir():
        raise CheckpointError(f"not a checkpoint directory: {root}")
    cfg_file = root / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"not a checkpoint: {root} has no config.json")
    try:
        hf = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"unreadable config.json in {root}: {exc}") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"unreadable config.json in {root}: not a JSON object")
    try:
        return ModelConfig.from_hf(hf)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"config.json in {root} lacks or garbles field {exc}") from None


def weight_files(root: Path) -> list[Path]:
    if (root / INDEX).is_file():
        try:
            weight_map = json.loads((root / INDEX).read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"unreadable {INDEX} in {root}: {exc}") from None
        files = [root / name for name in dict.fromkeys(weight_map.values())]
    elif (root / WEIGHTS).is_file():
        files = [root / WEIGHTS]
    else:
        raise CheckpointError(f"not a checkpoint: {root} has no {WEIGHTS} or {INDEX}")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {root} lacks weight shard(s): {', '.join(missing)}")
    return files


def _our_name(hf_name: str) -> str:
    return hf_name.removeprefix("model.")


def _hf_name(name: str) -> str:
    return name if name.startswith("lm_head.") else f"model.{name}"


def load_checkpoint(path: str | Path, dtype: torch.dtype | str = torch.float32) -> Transformer:
    """Build a Transformer from an HF checkpoint dir (single or sharded safetensors), in eval mode."""
    root = Path(path)
    config = read_config(root)
    dtype = resolve_dtype(dtype)
    files = weight_files(root)
    # Build on the meta device: no time spent on a random init that the checkpoint overwrites.
    with torch.device("meta"):
        model = Transformer(config)
    expected = {k for k in model.state_dict() if not (config.tie_word_embeddings and k == "lm_head.weight")}
    state: dict[str, torch.Tensor] = {}
    experts: list[tuple[str, torch.Tensor]] = []  # per-expert HF tensors, stacked below
    try:
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open has keys(), not __iter__)
                    name = _our_name(key)
                    if config.num_experts and is_moe_tensor(key):
                        name = our_moe_name(key) or ""
                        if not name:
                            experts.append((key, f.get_tensor(key).to(dtype)))
                            continue
                    if name in expected:
                        state[name] = f.get_tensor(key).to(dtype)
                    elif not name.endswith("rotary_emb.inv_freq") and name != "lm_head.weight":
                        raise CheckpointError(f"checkpoint {root} has an unexpected tensor {key}")
    except (OSError, RuntimeError) as exc:  # safetensors reports a corrupt file as either
        raise CheckpointError(f"unreadable safetensors in {root}: {exc}") from None
    if experts:
        stacked, problems = stack_experts(experts, config.arch, config.num_experts)
        if problems:
            raise CheckpointError(f"checkpoint {root}: {problems[0]}")
        state.update(stacked)
    missing = sorted(expected - state.keys())
    if missing:
        raise CheckpointError(
            f"checkpoint {root} lacks {len(missing)} tensor(s), e.g. {_hf_name(missing[0])}"
        )
    try:
        model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1].strip()
        raise CheckpointError(f"checkpoint {root} does not match its config.json: {first}") from None
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval()


def save_checkpoint(
    model: Transformer,
    out_dir: str | Path,
    tokenizer_dir: str | Path | Tokenizer | None = None,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write config.json + safetensors (sharded above max_shard_bytes), loadable by transformers.

    tokenizer_dir: a dir whose tokenizer files are copied along, or a Tokenizer to save there.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config
    state = model.state_dict()
    with torch.device("meta"):
        expected = set(Transformer(config).state_dict())
    if set(state) != expected:
        odd = sorted(set(state) ^ expected)[0]
        raise CheckpointError(
            f"cannot save this model as an HF checkpoint (unexpected tensor {odd}); save before quantizing"
        )
    tensors: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if config.tie_word_embeddings and k == "lm_head.weight":
            continue
        v = v.detach().contiguous().cpu()
        if config.num_experts and ".mlp." in k and model.config.is_moe_layer(int(k.split(".")[1])):
            tensors.update(hf_moe_tensors(k, v, config.arch))
        else:
            tensors[_hf_name(k)] = v
    dtype = model.embed_tokens.weight.dtype
    hf = config.to_hf(torch_dtype=str(dtype).removeprefix("torch."))
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    for stale in [out / WEIGHTS, out / INDEX, *out.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    shards = _shard(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], str(out / WEIGHTS), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    if isinstance(tokenizer_dir, Tokenizer):
        tokenizer_dir.save(out)
    elif tokenizer_dir is not None:
        src = Path(tokenizer_dir)
        if src.resolve() != out.resolve():
            for name in TOKENIZER_FILES:
                if (src / name).is_file():
                    shutil.copyfile(src / name, out / name)
    if not (out / "generation_config.json").exists():
        gen = {"bos_token_id": config.bos_token_id, "eos_token_id": hf["eos_token_id"]}
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return out


def _shard(tensors: dict[str, torch.Tensor], max_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    # Greedy, in name order: a new shard starts when the next tensor would overflow the current one.
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors, key=_natural_key):
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        if max_bytes is not None and shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def _natural_key(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in name.split(".")]
