"""Process launch for sharded runs: ``torchrun`` in production, ``spawn`` in tests.

``init(rank, world)`` joins the default process group (NCCL when a GPU is visible and asked for,
gloo otherwise); under ``torchrun`` the rank and world come from its environment variables.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(rank: int | None = None, world: int | None = None, backend: str | None = None) -> tuple[int, int]:
    rank = int(os.environ["RANK"]) if rank is None else rank
    world = int(os.environ["WORLD_SIZE"]) if world is None else world
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world)
    return rank, world


def _entry(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)  # ranks share the host's cores
    init(rank, world, "gloo")
    try:
        fn(rank, world, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn, world: int, *args, start_method: str = "fork") -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` gloo processes.

    ``fork`` (default) reuses the parent's imported torch: starting 4 ``spawn`` children costs
    ~15 s of imports on a 2-core host, a fork well under a second. Use ``spawn`` when the parent
    has CUDA initialised (CUDA does not survive a fork); ``fn`` must then be importable.
    """
    if world == 1:
        fn(0, 1, *args)
        return
    mp.start_processes(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True,
                       start_method=start_method)
