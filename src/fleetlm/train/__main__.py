"""`torchrun --nproc-per-node 2 -m fleetlm.train --config train.yaml` (or `--resume DIR`), one per process."""

from __future__ import annotations

import argparse
import os
import sys

from fleetlm.errors import FleetError
from fleetlm.train.config import load_config
from fleetlm.train.loop import train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fleetlm.train")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--config", help="train.yaml")
    group.add_argument("--resume", help="a checkpoint dir written by fleet train")
    args = parser.parse_args(argv)
    try:
        result = train(load_config(args.config) if args.config else None, resume=args.resume)
    except FleetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":  # one summary line, not one per process
        print(f"step {result.step}  loss {result.train_loss:.4f}  tokens/s {result.tokens_per_s:,.0f}  "
              f"-> {result.out_dir}")
    return 0


if __name__ == "__main__":
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # gloo's threads can abort the interpreter's teardown (see ddp._worker): leave without it
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
