"""A compressed checkpoint on disk, and loading it exactly into our int8/int4 kernels.

Layout of the output directory (`fleet compress ... --out DIR`):
- config.json, tokenizer files, model.safetensors: a plain HF checkpoint whose block linears hold what the
  codes stand for, in float16 (any loader works, `fleet export gguf` too; float16 rounds the grid values by
  at most 2^-11 relative, so it is close to, not bit-equal with, the codes);
- quantized.safetensors: per linear `<hf name>.q` (int8 codes at 8 bits; at 4 and 3, uint8 with two codes a
  byte, column 2j in the low nibble), `.d` and `.m`
  (float16, one per group), exactly what the method chose;
- quantization.json: method, bits, group size, symmetric or not, calibration, and the list of linears; a mix
  of widths (compress/mixed.py) has bits "mixed" and `tensor_bits` {linear: bits}; linears absent from the
  list stay float16 (a mix may also hold embed_tokens and lm_head).
`load_compressed` reads the codes into our kernels' packed layout without rounding them again (engine
`Engine.load` on this directory would round the float copy with RTN: not what was optimised).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fleetlm.compress.grid import CompressError, QuantizedWeight

CODES = "quantized.safetensors"
META = "quantization.json"


def hf_name(module: str) -> str:
    """The HF tensor name of one of our linears' weight ("layers.0.mlp.up_proj" -> "model.layers...")."""
    return "lm_head.weight" if module == "lm_head" else f"model.{module}.weight"


def save_compressed(model: nn.Module, codes: dict[str, QuantizedWeight], src: str | Path, out: str | Path,
                    meta: dict[str, Any]) -> Path:
    """Write `model` (its linears already replaced by the codes' values) and the codes into `out`."""
    from safetensors.torch import save_file

    from fleetlm.model.checkpoint import save_checkpoint

    out = Path(out)
    save_checkpoint(copy.deepcopy(model).half(), out, tokenizer_dir=src)
    tensors: dict[str, torch.Tensor] = {}
    for name, qw in codes.items():
        key = hf_name(name)
        if qw.bits == 8:
            tensors[f"{key}.q"] = qw.q.to(torch.int8).contiguous()
        else:  # two 4-bit (or 3-bit) codes a byte: column 2j in the low nibble, 2j + 1 in the high one
            q = qw.q.to(torch.uint8)
            tensors[f"{key}.q"] = (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()
        tensors[f"{key}.d"] = qw.d.to(torch.float16).contiguous()
        tensors[f"{key}.m"] = qw.m.to(torch.float16).contiguous()
    save_file(tensors, str(out / CODES), metadata={"format": "fleetlm-codes"})
    first = next(iter(codes.values()))
    widths = {qw.bits for qw in codes.values()}
    info = {**meta, "bits": first.bits if len(widths) == 1 else "mixed", "group_size": first.group,
            "sym": first.sym, "linears": sorted(codes), "format": "w = q * d + m per group of input columns"}
    if len(widths) > 1:
        info["tensor_bits"] = {name: qw.bits for name, qw in sorted(codes.items())}
    (out / META).write_text(json.dumps(info, indent=2) + "\n")
    return out


def read_codes(path: str | Path) -> tuple[dict[str, QuantizedWeight], dict[str, Any]]:
    """The codes and metadata of a compressed directory, by module name."""
    from safetensors import safe_open

    root = Path(path)
    if not (root / META).is_file() or not (root / CODES).is_file():
        raise CompressError(f"{root} is not a compressed checkpoint (no {META} / {CODES})")
    meta = json.loads((root / META).read_text())
    codes: dict[str, QuantizedWeight] = {}
    widths = meta.get("tensor_bits", {})
    with safe_open(str(root / CODES), framework="pt") as f:
        for name in meta["linears"]:
            key = hf_name(name)
            bits = widths.get(name, meta["bits"])
            q = f.get_tensor(f"{key}.q")
            if bits != 8:
                q = torch.stack([q & 0x0F, q >> 4], dim=-1).reshape(q.shape[0], -1)
            q = q.to(torch.int16)
            d, m = f.get_tensor(f"{key}.d").float(), f.get_tensor(f"{key}.m").float()
            codes[name] = QuantizedWeight(q, d, m, bits, meta["group_size"], meta["sym"])
    return codes, meta


def _fused(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Codes of linears stacked by rows (q/k/v, gate/up): grids are per row, so they stack as they are."""
    first = parts[0]
    return QuantizedWeight(torch.cat([p.q for p in parts]), torch.cat([p.d for p in parts]),
                           torch.cat([p.m for p in parts]), first.bits, first.group, first.sym)


@torch.no_grad()
def load_compressed(path: str | Path, kernels: bool = True) -> nn.Module:
    """The compressed model of directory `path`, ready to generate.

    kernels: q/k/v and gate/up fused and every block linear on our int8/int4 kernels, built from the stored
    codes (lm_head in int8, as the engine's int4 path does); else a float32 model whose block linears are
    exactly the codes' values (for perplexity)."""
    from fleetlm.model.checkpoint import load_checkpoint

    codes, _meta = read_codes(path)
    model = load_checkpoint(path, dtype=torch.float32)
    for name, qw in codes.items():
        lin = model.get_submodule(name)
        lin.weight.data = qw.dequantize()
    if not kernels:
        return model
    from fleetlm.engine.quant import KernelInt8Linear, kernel_linear_from_codes

    groups = {"self_attn.qkv_proj": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
              "mlp.gate_up_proj": ["mlp.gate_proj", "mlp.up_proj"]}
    for i, layer in enumerate(model.layers):
        p = f"layers.{i}"
        targets: dict[str, list[str]] = {}
        for target, parts in groups.items():
            widths = {codes[f"{p}.{n}"].bits if f"{p}.{n}" in codes else None for n in parts}
            if len(widths) == 1 and None not in widths:  # one width: fused, one kernel call
                layer.get_submodule(target.rsplit(".", 1)[0]).fuse()
                targets[target] = parts
            else:  # a mix inside the group (or a float16 part): each linear on its own
                targets.update({n: [n] for n in parts})
        targets.update({"self_attn.o_proj": ["self_attn.o_proj"], "mlp.down_proj": ["mlp.down_proj"]})
        for target, parts in targets.items():
            if any(f"{p}.{n}" not in codes for n in parts):
                continue  # kept in float (a mix's "f16" choice)
            qw = _fused([codes[f"{p}.{n}"] for n in parts])
            parent_name, child = target.rsplit(".", 1)
            parent = layer.get_submodule(parent_name)
            old = getattr(parent, child)
            setattr(parent, child, kernel_linear_from_codes(qw.q, qw.d, qw.m, qw.bits, qw.group, old.bias))
    head = codes.get("lm_head") or (codes.get("embed_tokens") if model.config.tie_word_embeddings else None)
    if head is not None:  # the stored codes of the output layer, on their kernel
        model.lm_head = kernel_linear_from_codes(head.q, head.d, head.m, head.bits, head.group)
    else:
        model.lm_head = KernelInt8Linear(model.lm_head)
    return model
