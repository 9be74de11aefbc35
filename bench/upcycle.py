"""Sparse upcycling of SmolLM2-135M into a mixture of experts, against the dense model given the same extra
training, side by side: held-out perplexity before and after, decode tok/s at equal active parameters.

  flock /tmp/bench.lock nice .venv/bin/python bench/upcycle.py [--experts 4 --top-k 2 --top-layers 4
      --steps 40 --seq 256] [--json OUT]
  python bench/upcycle.py --quick      # a tiny random model built on the fly (seconds; what the test runs)

- dense: the shipped GGUF dequantized to float32; its top `--top-layers` MLPs trained, all else frozen;
- moe: the same model with those MLPs upcycled (fleetlm.model.upcycle: E exact copies, a new router with
  std 0.02), its experts and routers trained, all else frozen; loss = LM + 0.01 x load-balancing loss;
- both on the SAME token windows in the same order, same steps, learning rate and schedule
  (fleetlm.train.upcycle.continue_training); the frozen lower layers' output is computed once for both
  (and cached in the fleet home: a second run with the same data skips it);
- text: training windows from the Python 3.11 library reference (python3.11-doc), 9 of every 10 files;
  held-out in-domain: the 10th file of every 10 (documents never trained on); held-out other domain:
  /usr/share/common-licenses (forgetting shows there);
- decode: our engine (fused projections, f32, eager) on one prompt, the dense model, the MoE at its top-k, and
  the same MoE at top-1, whose active parameters equal the dense model's (plus the routers).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import time
from pathlib import Path

import torch

from fleetlm.model.upcycle import active_params, upcycle
from fleetlm.train.upcycle import continue_training, frozen_prefix, lm_eval, set_trainable

LIBRARY = Path("/usr/share/doc/python3.11/html/library")
OTHER = Path("/usr/share/common-licenses")
PROMPT = "The standard library's json module encodes Python objects as JSON text. For example,"


def load_texts() -> tuple[str, str, str]:
    """(train, held-out in-domain, held-out other-domain) text."""
    from fleetlm.compress.calib import read_texts

    files = sorted(f for f in LIBRARY.glob("*.html"))
    if len(files) < 20:
        raise SystemExit(f"{LIBRARY} is missing: apt-get install python3.11-doc")
    train = [f for i, f in enumerate(files) if i % 10]
    held = [f for i, f in enumerate(files) if i % 10 == 0]
    return read_texts(train), read_texts(held), read_texts([OTHER])


def windows(tok, text: str, count: int, length: int) -> torch.Tensor:  # noqa: ANN001
    """`count` windows of `length` tokens spread evenly over the text's tokens."""
    from fleetlm.compress.calib import token_windows

    return token_windows(tok.encode(text, add_special_tokens=False), count, length)


def cached_prefix(model, ids: torch.Tensor, upto: int, key: str) -> torch.Tensor:  # noqa: ANN001
    from fleetlm.catalog.store import fleet_home

    digest = hashlib.sha256(ids.numpy().tobytes() + f"{key}:{upto}".encode()).hexdigest()[:16]
    path = fleet_home() / "bench" / f"upcycle-prefix-{digest}.pt"
    if path.is_file():
        return torch.load(path)
    hidden = frozen_prefix(model, ids, upto)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(hidden, path)
    return hidden


def decode_speed(model, tokenizer, tokens: int, threads: int) -> float:  # noqa: ANN001
    """Decode tok/s of our engine on PROMPT (greedy, `tokens` new tokens, the best of two runs)."""
    from fleetlm.engine import Engine, GenerationRequest
    from fleetlm.engine.engine import prepare_weights

    model = prepare_weights(copy.deepcopy(model), "f32")
    engine = Engine(model, tokenizer, dtype="f32", num_threads=threads)
    req = GenerationRequest(prompt=PROMPT, max_tokens=tokens, temperature=0.0, ignore_eos=True)
    best = 0.0
    for _ in range(2):
        list(engine.generate([req]))
        best = max(best, engine.last_stats.decode_tokens_per_second)
    return best


def with_top_k(model, k: int):  # noqa: ANN001, ANN201
    """A copy of an MoE model that routes each token to k experts."""
    out = copy.deepcopy(model)
    for layer in out.layers:
        if hasattr(layer.mlp, "top_k"):
            layer.mlp.top_k = k
    return out


def decode_table(dense, tok, args, top: list[int]) -> None:  # noqa: ANN001
    """Decode tok/s of the dense model and of its upcycled copies (untrained: speed depends on the shapes)."""
    n = dense.config.num_layers
    models = {"dense": dense}
    for name, layers in ((f"top {len(top)} layers", top), (f"all {n} layers", None)):
        moe = upcycle(dense, args.experts, args.top_k, layers=layers)
        models[f"MoE {args.experts}x top-{args.top_k}, {name}"] = moe
        models[f"MoE {args.experts}x top-1, {name}"] = with_top_k(moe, 1)
    print(f"{'':34}{'total M':>9}{'active M':>10}{'decode tok/s':>14}{'vs dense':>10}")
    base = None
    for name, model in models.items():
        tok_s = decode_speed(model, tok, args.decode_tokens, args.threads)
        base = base or tok_s
        total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        active = active_params(model) / 1e6
        print(f"{name:34}{total / 1e6:9.1f}{active:10.1f}{tok_s:14.1f}{tok_s / base:10.2f}", flush=True)


def tiny_model() -> tuple[torch.nn.Module, object]:
    """A random 4-layer Llama with the shipped tiny tokenizer, for --quick."""
    from fleetlm.model import SHIPPED_TINY_MODEL, Tokenizer, load_checkpoint

    return load_checkpoint(SHIPPED_TINY_MODEL), Tokenizer.from_dir(SHIPPED_TINY_MODEL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="catalog name, .gguf or HF dir")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--top-layers", type=int, default=4, help="layers (from the top) upcycled and trained")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--train-windows", type=int, default=0, help="distinct training windows (0: = steps)")
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--decode-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for everything (1: on 2 shared cores a second OpenMP thread measured "
                         "several times slower, docs/EVALS.md)")
    ap.add_argument("--quick", action="store_true", help="tiny random model, a few steps")
    ap.add_argument("--decode-only", action="store_true",
                    help="only decode tok/s: dense, upcycled (top layers and all layers) at top-k and top-1, "
                         "untrained (speed depends on shapes, not on training)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    t_start = time.perf_counter()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    if args.quick:
        dense, tok = tiny_model()
        args.steps, args.seq, args.eval_windows, args.decode_tokens = 6, 32, 2, 8
        args.top_layers = min(args.top_layers, dense.config.num_layers)
        train_text, held_text, other_text = (PROMPT * 40, PROMPT[::-1] * 40, PROMPT.upper() * 40)
    else:
        from fleetlm.model.gguf import load_gguf

        path = Path(args.model)
        if not path.exists():
            from fleetlm.catalog import pull

            path = pull(args.model, progress=False)
        dense, tok = load_gguf(path, dtype=torch.float32)
        train_text, held_text, other_text = load_texts()
    n_layers = dense.config.num_layers
    top = list(range(n_layers - args.top_layers, n_layers))
    if args.decode_only:
        decode_table(dense, tok, args, top)
        return
    start = top[0]
    n_train = args.train_windows or args.steps
    train_ids = windows(tok, train_text, n_train, args.seq)
    held_ids = windows(tok, held_text, args.eval_windows, args.seq)
    other_ids = windows(tok, other_text, args.eval_windows, args.seq)
    name = args.model if not args.quick else "tiny random llama"
    print(f"model {name}: {n_layers} layers; upcycling layers "
          f"{start}..{n_layers - 1} into {args.experts} experts, top-{args.top_k}; {args.steps} steps of "
          f"{args.seq} tokens ({args.steps * args.seq} training tokens, {n_train} distinct windows) each; "
          f"{args.threads} thread(s)")

    t0 = time.perf_counter()
    key = f"{args.model}:{args.quick}"
    prefix = (lambda ids: frozen_prefix(dense, ids, start)) if args.quick else (
        lambda ids: cached_prefix(dense, ids, start, key))
    splits = {"train": train_ids, "held": held_ids, "other": other_ids}
    hidden = {name: prefix(ids) for name, ids in splits.items()}
    prefix_s = time.perf_counter() - t0
    print(f"frozen prefix (layers 0..{start - 1}) of {sum(h.shape[0] for h in hidden.values())} windows: "
          f"{prefix_s:.0f}s")

    def evaluate(model) -> dict[str, float]:  # noqa: ANN001
        return {"held_ppl": lm_eval(model, hidden["held"], held_ids, start),
                "other_ppl": lm_eval(model, hidden["other"], other_ids, start)}

    base = evaluate(dense)
    print(f"before training: held-out ppl {base['held_ppl']:.3f}, other {base['other_ppl']:.3f}")
    rows = {}
    moe = upcycle(dense, args.experts, args.top_k, layers=top)
    at_init = evaluate(moe)
    for name, model in (("dense", copy.deepcopy(dense)), ("moe", moe)):
        n_trainable = set_trainable(model, top if name == "dense" else None)
        print(f"training {name} ({n_trainable / 1e6:.1f}M trainable parameters)")
        stats = continue_training(model, hidden["train"], train_ids, start, args.steps, lr=args.lr,
                                  log=print)
        rows[name] = {"model": model, "trainable": n_trainable, "train_s": stats.seconds,
                      "last_loss": sum(stats.losses[-10:]) / len(stats.losses[-10:]),
                      "aux": stats.aux_losses[-1], **evaluate(model)}
        # printed as soon as known: a run cut short by the time limit still reports what it measured
        print(f"{name}: held-out ppl {rows[name]['held_ppl']:.3f}, other {rows[name]['other_ppl']:.3f}, "
              f"{stats.seconds:.0f}s training")
    top1 = with_top_k(rows["moe"]["model"], 1)
    rows["moe_top1"] = {"model": top1, "trainable": 0, "train_s": 0.0, "last_loss": float("nan"), "aux": 0.0,
                        **evaluate(top1)}
    for r in rows.values():
        r["active"] = active_params(r["model"])
        r["total"] = sum(p.numel() for p in {id(p): p for p in r["model"].parameters()}.values())
        r["tok_s"] = decode_speed(r["model"], tok, args.decode_tokens, args.threads)

    print(f"\nheld-out perplexity before any training: in-domain {base['held_ppl']:.3f}, other "
          f"{base['other_ppl']:.3f} (the upcycled model at init: {at_init['held_ppl']:.3f}, "
          f"{at_init['other_ppl']:.3f})")
    print(f"{'':22}{'total M':>9}{'active M':>10}{'train s':>9}{'loss(last10)':>14}{'held ppl':>10}"
          f"{'other ppl':>11}{'decode tok/s':>14}")
    labels = {"dense": "dense (same training)", "moe": f"MoE {args.experts}x top-{args.top_k}",
              "moe_top1": f"MoE {args.experts}x at top-1"}
    for name, r in rows.items():
        print(f"{labels[name]:22}{r['total'] / 1e6:9.1f}{r['active'] / 1e6:10.1f}{r['train_s']:9.0f}"
              f"{r['last_loss']:14.4f}{r['held_ppl']:10.3f}{r['other_ppl']:11.3f}{r['tok_s']:14.1f}")
    d, m = rows["dense"], rows["moe"]
    print(f"MoE / dense: held-out perplexity {m['held_ppl'] / d['held_ppl']:.4f}x, decode "
          f"{m['tok_s'] / d['tok_s']:.2f}x (top-1, equal active parameters: "
          f"{rows['moe_top1']['tok_s'] / d['tok_s']:.2f}x); wall {time.perf_counter() - t_start:.0f}s")
    if args.json:
        out = {"args": {k: str(v) for k, v in vars(args).items()}, "before": base, "moe_at_init": at_init,
               "prefix_s": prefix_s,
               "rows": {k: {kk: vv for kk, vv in r.items() if kk != "model"} for k, r in rows.items()}}
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
