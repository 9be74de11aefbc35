"""Calibration text and the block-by-block pipeline that quantizes a decoder with any method.

GPTQ and AWQ see the inputs each block really gets once the blocks before it are quantized: the calibration
activations enter block 0, each block is quantized with the inputs it receives, then run again (quantized)
to make the next block's inputs. Only one block's activations and Hessians are alive at a time.

Default texts (both install offline with Debian's python3.11-doc and base system, `make kb-corpus`):
- calibration: the Python library reference, /usr/share/doc/python3.11/html/library/*.html (text only);
- evaluation (bench/compress.py): /usr/share/common-licenses/* and the Debian changelogs under
  /usr/share/doc/*/changelog.Debian.gz: another domain, never seen by the quantizer.
"""

from __future__ import annotations

import gzip
import html.parser
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from fleetlm.compress.grid import CompressError, QuantizedWeight, check_bits, check_group, rtn

CALIB_DEFAULT = Path("/usr/share/doc/python3.11/html/library")
METHODS = ("rtn", "gptq", "awq", "hqq")
CHUNK = 8  # calibration sequences per forward: bounds the attention scores' memory
AWQ_TOKENS = 4096  # tokens kept per captured input for AWQ's scale search (mean |x| and the loss)
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
SHARED_INPUT = {"self_attn.k_proj": "self_attn.q_proj", "self_attn.v_proj": "self_attn.q_proj",
                "mlp.up_proj": "mlp.gate_proj"}  # linears that read the same x share one Hessian


class _TextOnly(html.parser.HTMLParser):
    """The visible text of an HTML page (no scripts, styles or navigation markup)."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in ("script", "style"):
            self._skip += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style") and self._skip:
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip and data.strip():
            self.parts.append(data.strip())


def _file_text(path: Path) -> str:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    text = raw.decode("utf-8", errors="replace")
    if path.name.removesuffix(".gz").endswith((".html", ".htm")):
        parser = _TextOnly()
        parser.feed(text)
        return "\n".join(parser.parts)
    return text


def read_texts(paths: Iterable[str | Path], max_chars: int | None = None) -> str:
    """The text of files and directories (recursively, sorted; .gz read through, HTML stripped to text),
    stopping once `max_chars` are read."""
    paths = list(paths)
    out: list[str] = []
    total = 0
    for p in map(Path, paths):
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file())
        elif p.is_file():
            files = [p]
        else:
            raise CompressError(f"calibration text {p} does not exist")
        for f in files:
            if max_chars is not None and total >= max_chars:
                break
            out.append(_file_text(f))
            total += len(out[-1])
    text = "\n\n".join(t for t in out if t.strip())
    if not text:
        raise CompressError(f"no text in {', '.join(map(str, paths))}")
    return text


def token_windows(ids: list[int], count: int, length: int) -> torch.Tensor:
    """`count` non-overlapping windows of `length` tokens spread evenly over a token stream, [count, length]
    (evenly, not the first ones: a directory's text is many documents, and the first few are one topic)."""
    if count < 1 or length < 2:
        raise CompressError("need at least one window of two tokens or more")
    if len(ids) < count * length:
        raise CompressError(f"the text has {len(ids)} tokens, fewer than {count} x {length}")
    t = torch.tensor(ids, dtype=torch.long)
    stride = len(ids) // count
    return torch.stack([t[i * stride : i * stride + length] for i in range(count)])


# --------------------------------------------------------------------------------------------- pipeline


def _chunks(x: torch.Tensor) -> Iterable[torch.Tensor]:
    return (x[i : i + CHUNK] for i in range(0, x.shape[0], CHUNK))


def _run_block(block: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # cos/sin [1, 1, T, D] broadcast over the chunk's rows; mask None with T > 1: causal attention
    return torch.cat([block(part, cos, sin, None, None) for part in _chunks(x)])


def _progress(items: list, desc: str, show: bool) -> Iterable:
    if not show:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="layer")


def _set_weight(linear: nn.Linear, qw: QuantizedWeight) -> None:
    linear.weight.data = qw.dequantize().to(linear.weight.dtype)


@torch.no_grad()
def compress_model(model: nn.Module, method: str, bits: int, group: int, calib: torch.Tensor | None = None,
                   *, sym: bool = False, act_order: bool = True, progress: bool = False,
                   quantize_one: Callable[..., QuantizedWeight] | None = None) -> dict[str, QuantizedWeight]:
    """Quantize every block linear of a float model in place (weights replaced by what the codes stand for);
    returns the codes by module name ("layers.3.mlp.down_proj"). Embeddings, norms and lm_head stay float.

    calib [n, T] token ids: needed by gptq and awq. progress: a tqdm bar over the layers."""
    if method not in METHODS:
        raise CompressError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    check_bits(bits)
    layers = list(model.layers)
    for name in LINEARS:
        lin = layers[0].get_submodule(name) if layers else None
        if not isinstance(lin, nn.Linear):
            raise CompressError(f"layer 0 has no plain linear {name} (a fused or MoE model?)")
        check_group(group, lin.in_features)
    if method in ("gptq", "awq") and (calib is None or calib.numel() == 0):
        raise CompressError(f"{method} needs calibration text (--calib)")
    codes: dict[str, QuantizedWeight] = {}
    if method in ("rtn", "hqq"):
        from fleetlm.compress.hqq import hqq

        for i, block in enumerate(_progress(layers, f"{method} {bits}-bit", progress)):
            for name in LINEARS:
                lin = block.get_submodule(name)
                qw = (rtn(lin.weight, bits, group, sym) if method == "rtn"
                      else hqq(lin.weight, bits, group, sym=sym))
                _set_weight(lin, qw)
                codes[f"layers.{i}.{name}"] = qw
        return codes

    assert calib is not None
    from fleetlm.model.decoder import rope_cos_sin

    dtype = model.embed_tokens.weight.dtype
    x = model.embed_tokens(calib).to(dtype)
    pos = torch.arange(calib.shape[1])[None]
    cos, sin = rope_cos_sin(model.inv_freq, pos, dtype)
    for i, block in enumerate(_progress(layers, f"{method} {bits}-bit", progress)):
        if method == "gptq":
            _gptq_block(block, x, cos, sin, bits, group, sym, act_order, i, codes)
        else:
            _awq_block(block, x, cos, sin, bits, group, sym, i, codes)
        x = _run_block(block, x, cos, sin)  # the next block's inputs come from this quantized block
    return codes


def _gptq_block(block: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bits: int,
                group: int, sym: bool, act_order: bool, index: int,
                codes: dict[str, QuantizedWeight]) -> None:
    from fleetlm.compress.gptq import Hessian, gptq

    readers = [n for n in LINEARS if n not in SHARED_INPUT]
    hessians = {n: Hessian(block.get_submodule(n).in_features) for n in readers}
    hooks = [block.get_submodule(n).register_forward_pre_hook(
        lambda _m, args, n=n: hessians[n].add(args[0])) for n in readers]
    try:
        _run_block(block, x, cos, sin)
    finally:
        for h in hooks:
            h.remove()
    for name in LINEARS:
        lin = block.get_submodule(name)
        h = hessians[SHARED_INPUT.get(name, name)].h
        qw = gptq(lin.weight, h, bits, group, sym=sym, act_order=act_order)
        _set_weight(lin, qw)
        codes[f"layers.{index}.{name}"] = qw
    hessians.clear()


def _awq_block(block: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bits: int,
               group: int, sym: bool, index: int, codes: dict[str, QuantizedWeight]) -> None:
    from fleetlm.compress.awq import apply_awq, scale_pairs

    stride = max(1, x.shape[0] * x.shape[1] // AWQ_TOKENS)
    captured: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for pair, _prev, _linears, reader in scale_pairs(block):
        captured[pair] = []
        hooks.append(reader.register_forward_pre_hook(
            lambda _m, args, p=pair: captured[p].append(args[0].reshape(-1, args[0].shape[-1])[::stride])))
    try:
        _run_block(block, x, cos, sin)
    finally:
        for h in hooks:
            h.remove()
    apply_awq(block, {p: torch.cat(v) for p, v in captured.items()}, bits, group, sym)
    for name in LINEARS:
        lin = block.get_submodule(name)
        qw = rtn(lin.weight, bits, group, sym)
        _set_weight(lin, qw)
        codes[f"layers.{index}.{name}"] = qw
