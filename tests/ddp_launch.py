"""Launching test processes as torchrun would (gloo on CPU): shared by the distributed tests.

:func:`spawn` starts ``world`` processes that see torchrun's environment variables and an
initialised gloo group with a short timeout, so that a collective one process misses fails the
test within seconds instead of hanging it (the engine reuses a group that exists).
"""

import os
import socket
from datetime import timedelta

import torch
import torch.multiprocessing as mp

TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, fn, world, port, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=TIMEOUT_S))
    try:
        fn(rank, world, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn, *args, world: int = 2) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` processes of one gloo group (``fn`` must be a
    module-level function); raises if any process raises."""
    mp.spawn(_entry, args=(fn, world, free_port(), args), nprocs=world, join=True)
