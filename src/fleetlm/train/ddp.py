"""Data parallel on one machine without torchrun: spawn N processes that join a gloo group on 127.0.0.1.

`torchrun --nproc-per-node N -m fleetlm.train --config ...` does the same through the environment; both end
in loop.init_distributed, which reads RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT.
"""

from __future__ import annotations

import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fleetlm.train.config import TrainConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg_json: dict, resume: str | None, threads: int) -> None:
    from fleetlm.train.config import parse_config
    from fleetlm.train.loop import train

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(threads)  # share the cores instead of every process claiming all of them
    try:
        train(parse_config(cfg_json), resume=resume)  # ends on a barrier: every rank's work is done here
    except BaseException:
        if dist.is_initialized():
            dist.destroy_process_group()
        raise  # mp.spawn reports it to the parent
    # gloo's worker threads can abort the process at interpreter teardown ("terminate called without an
    # active exception", seen in CI); the checkpoint is written, so leave without running C++ destructors
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def launch(cfg: TrainConfig, nprocs: int = 2, resume: str | None = None) -> None:
    """Train `cfg` on `nprocs` local processes (gloo); the checkpoint lands in cfg.out_dir as usual."""
    threads = max(1, (os.cpu_count() or 1) // nprocs)
    mp.spawn(_worker, args=(nprocs, free_port(), cfg.model_dump(mode="json"), resume, threads), nprocs=nprocs,
             join=True)
