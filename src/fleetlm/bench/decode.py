"""Decode benchmark: our engine vs transformers vs llama.cpp, single stream, on the same weights.

Two sources: a random-weight Llama of a given shape (default), or a real GGUF model (`--model NAME|PATH`:
the catalog file, llama.cpp files of other widths made from it, transformers loading the same file, and
optionally the gateway itself, `--serve`). Each runner is timed the same way: a warm-up generation, then one
greedy generation of `new_tokens` after the same prompt; decode tokens/s counts the tokens after the first
(the first comes from prefill) over the time between the first and the last. Compiling our decode step
happens at load and is reported apart ("compile s"). Bytes read per token (all weights but the input
embedding table) times tokens/s over the measured read bandwidth gives the share of bandwidth used.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from fleetlm.bench.agreement import top1_agreement
from fleetlm.bench.bandwidth import read_bandwidth
from fleetlm.bench.real import DEFAULT_CHAT
from fleetlm.engine.packed import packed_bytes
from fleetlm.errors import FleetError

WIDTHS = ("bf16", "int8", "int4")
ENGINE_MODES = ("eager", "compiled")
LLAMA_CPP_TYPES = {"bf16": "bf16", "int8": "q8_0", "int4": "q4_0"}
DEFAULT_CACHE = Path(os.environ.get("FLEETLM_CACHE", Path.home() / ".cache" / "fleetlm")) / "bench-415m"


class BenchError(FleetError):
    """A benchmark that cannot run as asked (a bad option, a missing peer library)."""


@dataclass
class BenchShape:
    """The model shape; the default is the ~415M-parameter Llama of the issue."""

    hidden_size: int = 896
    num_layers: int = 24
    num_heads: int = 14
    num_kv_heads: int = 2
    intermediate_size: int = 4864
    vocab_size: int = 32000


TINY_SHAPE = BenchShape(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=256,
                        vocab_size=1024)


@dataclass
class BenchOptions:
    model_dir: Path = DEFAULT_CACHE
    shape: BenchShape = field(default_factory=BenchShape)
    prompt_tokens: int = 32
    new_tokens: int = 128
    warmup_tokens: int = 8
    widths: tuple[str, ...] = WIDTHS
    engine: bool = True
    transformers: bool = True
    llama_cpp: bool = True
    threads: int = 0  # 0: torch's default (all cores)
    bandwidth_mb: int = 1024
    agreement_tokens: int = 256  # 0 skips the top-1 agreement of int8/int4 with bf16
    profile: bool = False
    # "eager" and/or "compiled" (the decode step through torch.compile, compiled at load: "compile s")
    engine_modes: tuple[str, ...] = ENGINE_MODES
    model: str | None = None  # a real GGUF model (catalog name or .gguf path) instead of the random one
    chat: str = DEFAULT_CHAT  # the user message of a real model's prompt (through its chat template)
    serve: bool = False  # also time one streamed request through `fleet serve` per width (real model)
    serve_widths: tuple[str, ...] = ()  # the widths the gateway serves in that run (default: widths)


@dataclass
class BenchRow:
    runner: str  # "fleetlm", "transformers", "llama.cpp"
    width: str  # bf16 | int8 | int4
    tokens_per_second: float
    bytes_per_token: int
    decode_tokens: int
    vs_llama_cpp: float | None = None
    bandwidth_share: float | None = None
    top1_agreement: float | None = None
    detail: str = ""
    warmup_seconds: float = 0.0
    compile_seconds: float = 0.0  # compiling our decode step at load (never inside tokens_per_second)
    vs_catalog: float | None = None  # against llama.cpp on the catalog's own file (real models, int4)

    @property
    def ms_per_token(self) -> float:
        return 1000.0 / self.tokens_per_second if self.tokens_per_second else float("inf")


@dataclass
class BenchResult:
    bandwidth_gbs: float
    threads: int
    prompt_tokens: int
    new_tokens: int
    params: int
    rows: list[BenchRow]
    profiles: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
    model: str = ""  # the real model's file, or "" for the random model

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def build_checkpoint(out_dir: Path, shape: BenchShape, seed: int = 0) -> Path:
    """A random-weight Llama of `shape` in HF layout (bf16) with a small byte-level BPE tokenizer; cached."""
    from fleetlm.model import ModelConfig, Transformer, save_checkpoint
    from fleetlm.model.make_tiny import write_tokenizer

    if (out_dir / "config.json").is_file():
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    # a small tokenizer: the model's vocab (and the GGUF export's) is padded past its last id
    ids = write_tokenizer(out_dir, "llama3", vocab_size=512)
    cfg = ModelConfig(arch="llama", vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
                      intermediate_size=shape.intermediate_size, num_layers=shape.num_layers,
                      num_heads=shape.num_heads, num_kv_heads=shape.num_kv_heads, rms_norm_eps=1e-6,
                      rope_theta=10000.0, max_position_embeddings=2048, tie_word_embeddings=False,
                      bos_token_id=ids["bos_token_id"], eos_token_ids=ids["eos_token_ids"])
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0.0, 0.02)
    save_checkpoint(model.to(torch.bfloat16), out_dir)
    return out_dir


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: everything but the input embedding table (one row read)."""
    embed = model.embed_tokens.weight
    lm_head_weight = getattr(model.lm_head, "weight", None)
    seen: set[int] = set()
    total = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if "cache" in name or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        if t is embed and lm_head_weight is not embed:
            continue
        total += t.numel() * t.element_size()
    return total + packed_bytes(model)


def gguf_bytes_per_token(path: Path) -> int:
    """Tensor bytes of a GGUF file, less the token embedding table when an output matrix exists."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(path)).tensors}
    total = sum(tensors.values())
    if "output.weight" in tensors:
        total -= tensors.get("token_embd.weight", 0)
    return total


def _rate(times: list[float]) -> float:
    """Decode tokens/s from per-token timestamps: tokens after the first over the time they took."""
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0


def _prompt(n: int, vocab: int) -> list[int]:
    gen = torch.Generator().manual_seed(1234)
    return torch.randint(10, min(vocab, 500), (n,), generator=gen).tolist()


def profile_decode_step(model: nn.Module, decode: Callable | None = None,
                        top: int = 12) -> list[tuple[str, float]]:
    """Top ops by self CPU time (ms) over one decode step, through the engine's decode step (compiled or
    not: a compiled step shows its fused kernels as one "CompiledFxGraph" entry)."""
    from torch.profiler import ProfilerActivity, profile

    from fleetlm.engine.generate import decode_one_token, ensure_caches

    decode = decode or decode_one_token
    ensure_caches(model, 1, 64)  # the caches the engine already has: new ones would recompile a compiled step
    with torch.inference_mode():  # tensors made outside inference mode would recompile a compiled step
        token = torch.tensor([[11]])
        decode(model, token, torch.tensor([[5]]))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            decode(model, token, torch.tensor([[6]]))
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [(e.key, e.self_cpu_time_total / 1000.0) for e in events]


def run_engine(opts: BenchOptions, width: str, prompt: list[int], result: BenchResult,
               reference: list[int] | None, mode: str = "eager",
               source: Path | None = None) -> tuple[BenchRow, list[int] | None]:
    from fleetlm.engine import Engine
    from fleetlm.engine.generate import GenerationRequest

    # compile=True compiles at load (Engine.warm_up): reported apart as compile_seconds
    engine = Engine.load(source or opts.model_dir, dtype=width, compile=mode == "compiled")
    nbytes = weight_bytes_per_token(engine.model)

    def timed(n: int) -> tuple[list[int], list[float]]:
        req = GenerationRequest(prompt_ids=prompt, max_tokens=n, temperature=0.0, ignore_eos=True)
        tokens, times = [], []
        for event in engine.generate(req):
            times.append(time.perf_counter())
            tokens.append(event.token_id)
        return tokens, times

    start = time.perf_counter()
    timed(opts.warmup_tokens)
    warmup = time.perf_counter() - start
    # one bf16 run serves both: the first new_tokens are timed, all of them are the agreement reference
    extra = opts.agreement_tokens if width == "bf16" else 0
    tokens, times = timed(max(opts.new_tokens, extra))
    times = times[:opts.new_tokens]
    runner = "fleetlm" if mode == "eager" else f"fleetlm {mode}"
    row = BenchRow(runner, width, _rate(times), nbytes, len(times) - 1, warmup_seconds=warmup,
                   compile_seconds=engine.compile_seconds)
    if opts.agreement_tokens:
        if width == "bf16":
            reference = tokens[:opts.agreement_tokens]
        elif reference:
            row.top1_agreement = top1_agreement(engine.model, prompt, reference)
    if opts.profile:
        result.profiles[f"{runner} {width}"] = profile_decode_step(engine.model, engine._decode)
    return row, reference


def run_transformers(opts: BenchOptions, prompt: list[int], source: Path | None = None) -> BenchRow:
    try:
        from transformers import AutoModelForCausalLM
        from transformers.generation.streamers import BaseStreamer
    except ImportError as exc:
        raise BenchError("transformers is not installed (pip install transformers)") from exc

    class Stamps(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.first = True

        def put(self, value: torch.Tensor) -> None:
            if self.first:  # the prompt is pushed once before any new token
                self.first = False
                return
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    if source is not None and source.suffix == ".gguf":  # transformers dequantizes the GGUF file itself
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name,
                                                     torch_dtype=torch.bfloat16).eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(opts.model_dir, torch_dtype=torch.bfloat16).eval()
    embed = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight is embed
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())  # shared tensors count once
    nbytes -= 0 if tied else embed.numel() * embed.element_size()
    ids = torch.tensor([prompt])

    def timed(n: int) -> Stamps:
        s = Stamps()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, streamer=s, pad_token_id=0)
        return s

    timed(opts.warmup_tokens)
    s = timed(opts.new_tokens)
    return BenchRow("transformers", "bf16", _rate(s.times), nbytes, len(s.times) - 1,
                    detail="from GGUF" if source is not None else "")


def llama_cpp_files(opts: BenchOptions) -> dict[str, Path]:
    """GGUF exports of the checkpoint at each width (bf16 exported, Q8_0/Q4_0 by llama.cpp's quantizer)."""
    from fleetlm.compress.gguf import export_gguf, quantize_gguf

    base = opts.model_dir / "model-bf16.gguf"
    if not base.is_file():
        export_gguf(opts.model_dir, base, "bf16")
    files = {"bf16": base}
    for width in ("int8", "int4"):
        qtype = LLAMA_CPP_TYPES[width]
        path = opts.model_dir / f"model-{qtype}.gguf"
        if width in opts.widths and not path.is_file():
            quantize_gguf(base, path, qtype)
        files[width] = path
    return files


def run_llama_cpp(opts: BenchOptions, width: str, path: Path, prompt: list[int],
                  detail: str | None = None) -> BenchRow:
    try:
        from llama_cpp import Llama
    except ImportError as exc:
        raise BenchError("llama-cpp-python is not installed (pip install llama-cpp-python)") from exc
    threads = opts.threads or torch.get_num_threads()
    llm = Llama(model_path=str(path), n_ctx=len(prompt) + opts.new_tokens + 16, n_threads=threads,
                n_threads_batch=threads, n_batch=len(prompt), verbose=False, seed=0)

    def timed(n: int) -> list[float]:
        llm.reset()
        times = []
        for _ in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
            times.append(time.perf_counter())
            if len(times) >= n:
                break
        return times

    timed(opts.warmup_tokens)
    times = timed(opts.new_tokens)
    row = BenchRow("llama.cpp", width, _rate(times), gguf_bytes_per_token(path), len(times) - 1,
                   detail=detail or LLAMA_CPP_TYPES[width].upper())
    llm.close()
    return row


def _check(opts: BenchOptions) -> None:
    for w in (*opts.widths, *opts.serve_widths):
        if w not in WIDTHS:
            raise BenchError(f"unknown width {w!r}: choose from {', '.join(WIDTHS)}")
    for m in opts.engine_modes:
        if m not in ENGINE_MODES:
            raise BenchError(f"unknown engine mode {m!r}: choose from {', '.join(ENGINE_MODES)}")
    if opts.new_tokens < 2 or opts.prompt_tokens < 1:
        raise BenchError("need new_tokens >= 2 and prompt_tokens >= 1")
    if opts.serve and opts.model is None:
        raise BenchError("--serve times the gateway on a real model: give --model NAME|PATH")


def run_benchmark(opts: BenchOptions, progress: bool = True) -> BenchResult:
    """Measure bandwidth, then time every runner at every width: on the random checkpoint (built or reused),
    or on a real GGUF model (opts.model) with llama.cpp on its own file and on files made from it."""
    from tqdm import tqdm

    from fleetlm.model import Transformer

    _check(opts)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    threads = torch.get_num_threads()
    steps: list[tuple[str, Callable[[], None]]] = []
    result = BenchResult(0.0, threads, opts.prompt_tokens, opts.new_tokens, 0, [])
    state: dict[str, object] = {}

    source: Path | None = None
    if opts.model is not None:
        from fleetlm.bench.real import chat_prompt_ids, gguf_config, resolve_gguf

        source = resolve_gguf(opts.model)
        cfg = gguf_config(source)
        prompt = chat_prompt_ids(source, opts.chat)
        result.model, result.prompt_tokens = str(source), len(prompt)
    else:
        from fleetlm.model import read_config

        build_checkpoint(opts.model_dir, opts.shape)
        cfg = read_config(opts.model_dir)
        prompt = _prompt(opts.prompt_tokens, cfg.vocab_size)

    def bandwidth() -> None:
        result.bandwidth_gbs = read_bandwidth(opts.bandwidth_mb, threads=threads)

    steps.append(("memory bandwidth", bandwidth))
    if opts.engine:
        # bf16 first: its greedy tokens are the reference for int8/int4 agreement
        for mode in opts.engine_modes:
            for w in sorted(opts.widths, key=WIDTHS.index):
                def engine_step(w: str = w, mode: str = mode) -> None:
                    ref = state.get(f"reference {mode}")
                    row, ref = run_engine(opts, w, prompt, result, ref, mode, source)  # type: ignore[arg-type]
                    state[f"reference {mode}"] = ref
                    result.rows.append(row)
                steps.append((f"fleetlm {mode} {w}", engine_step))
    if opts.transformers and "bf16" in opts.widths:
        def transformers_step() -> None:
            result.rows.append(run_transformers(opts, prompt, source))
        steps.append(("transformers bf16", transformers_step))
    if opts.llama_cpp:
        steps += _llama_cpp_steps(opts, prompt, result, state, source)
    if opts.serve and source is not None:
        steps.append(("fleet serve", lambda: result.rows.extend(_serve_rows(opts, source, threads, result))))

    bar = tqdm(steps, desc="bench", disable=not progress, unit="step")
    for name, step in bar:
        bar.set_postfix_str(name)
        step()
    bar.close()

    with torch.device("meta"):
        result.params = sum(p.numel() for p in Transformer(cfg).parameters())
    _ratios(result)
    return result


def _llama_cpp_steps(opts: BenchOptions, prompt: list[int], result: BenchResult, state: dict,
                     source: Path | None) -> list[tuple[str, Callable[[], None]]]:
    """llama.cpp at each width: on GGUF exports of the random checkpoint, or on the real model's own file and
    on llama.cpp's requantizations of it (BF16, Q8_0, Q4_0: the same weights at our widths)."""
    steps: list[tuple[str, Callable[[], None]]] = []
    if source is None:
        def gguf_step() -> None:
            state["gguf"] = llama_cpp_files(opts)
        steps.append(("GGUF export", gguf_step))
    else:
        from fleetlm.bench.real import DERIVED_TYPES, derived_file, gguf_file_type

        def catalog_step() -> None:
            kind = gguf_file_type(source)
            result.rows.append(run_llama_cpp(opts, "catalog", source, prompt, detail=kind))
        steps.append(("llama.cpp catalog file", catalog_step))

        def derive_step() -> None:
            state["gguf"] = {w: derived_file(source, w) for w in opts.widths}
        steps.append((f"llama.cpp files {'/'.join(DERIVED_TYPES[w] for w in opts.widths)}", derive_step))
    for w in opts.widths:
        def llama_step(w: str = w) -> None:
            files: dict[str, Path] = state["gguf"]  # type: ignore[assignment]
            result.rows.append(run_llama_cpp(opts, w, files[w], prompt))
        steps.append((f"llama.cpp {w}", llama_step))
    return steps


def _serve_rows(opts: BenchOptions, source: Path, threads: int, result: BenchResult) -> list[BenchRow]:
    """One row per width: single-stream decode tokens/s through `fleet serve`, measured by the client."""
    from fleetlm.bench.real import serve_rates

    widths = tuple(sorted(opts.serve_widths or opts.widths, key=WIDTHS.index))
    rates = serve_rates(source, widths, opts.chat, opts.new_tokens, threads)
    ours = {r.width: r.bytes_per_token for r in result.rows if r.runner.startswith("fleetlm")}
    return [BenchRow("fleet serve", w, rate, ours.get(w, 0), tokens - 1, detail="gateway",
                     warmup_seconds=startup) for w, (rate, tokens, startup) in rates.items()]


def _ratios(result: BenchResult) -> None:
    """Each row against llama.cpp at the same width (and int4 against the catalog's own file), and its share
    of the measured read bandwidth."""
    ref = {r.width: r.tokens_per_second for r in result.rows if r.runner == "llama.cpp"}
    for r in result.rows:
        if r.runner != "llama.cpp" and ref.get(r.width):
            r.vs_llama_cpp = r.tokens_per_second / ref[r.width]
        if r.runner != "llama.cpp" and r.width == "int4" and ref.get("catalog"):
            r.vs_catalog = r.tokens_per_second / ref["catalog"]
        if result.bandwidth_gbs and r.bytes_per_token:
            r.bandwidth_share = r.bytes_per_token * r.tokens_per_second / (result.bandwidth_gbs * 1e9)


def format_table(result: BenchResult) -> str:
    """The human-readable report: one line per runner and width, then the profiles if any."""
    runner_width = max([14, *(len(r.runner) + 2 for r in result.rows)]) if result.rows else 14
    kind_width = max([13, *(len(r.width) + len(r.detail) + 4 for r in result.rows)])
    source = f"{Path(result.model).name}, " if result.model else ""
    lines = [f"decode benchmark: {source}{result.params / 1e6:.0f}M params, prompt {result.prompt_tokens} "
             f"tokens, {result.new_tokens} new tokens, single stream, {result.threads} threads",
             f"memory read bandwidth (read-only pass): {result.bandwidth_gbs:.1f} GB/s",
             f"{'runner':<{runner_width}}{'width':<{kind_width}}{'tok/s':>8}{'ms/tok':>8}{'vs llama.cpp':>14}"
             f"{'vs catalog':>12}{'MB/token':>10}{'of bandwidth':>14}{'top-1 agree':>13}{'compile s':>11}"]
    for r in result.rows:
        vs = f"{r.vs_llama_cpp:.2f}x" if r.vs_llama_cpp is not None else "-"
        vs_cat = f"{r.vs_catalog:.2f}x" if r.vs_catalog is not None else "-"
        share = f"{100 * r.bandwidth_share:.0f}%" if r.bandwidth_share is not None else "-"
        agree = f"{100 * r.top1_agreement:.1f}%" if r.top1_agreement is not None else "-"
        width = f"{r.width}" + (f" ({r.detail})" if r.detail else "")
        ms = f"{r.ms_per_token:.1f}" if r.tokens_per_second else "-"
        compiled = f"{r.compile_seconds:.1f}" if r.compile_seconds else "-"
        lines.append(f"{r.runner:<{runner_width}}{width:<{kind_width}}{r.tokens_per_second:>8.1f}{ms:>8}"
                     f"{vs:>14}{vs_cat:>12}{r.bytes_per_token / 1e6:>10.0f}{share:>14}{agree:>13}"
                     f"{compiled:>11}")
    hf = next((r.tokens_per_second for r in result.rows if r.runner == "transformers"), 0.0)
    for r in result.rows:
        if hf and r.runner.startswith("fleetlm") and r.width == "bf16":
            lines.append(f"{r.runner} bf16 vs transformers bf16: {r.tokens_per_second / hf:.2f}x")
    for r in result.rows:
        if r.runner == "fleet serve":
            lines.append(f"fleet serve {r.width}: the gateway was ready {r.warmup_seconds:.0f} s after start "
                         "(loading and compiling every width)")
    for name, ops in result.profiles.items():
        lines.append(f"profile of one decode step, {name} (self CPU ms):")
        lines.extend(f"  {ms:8.2f}  {op}" for op, ms in ops)
    return "\n".join(lines)
