"""Multi-process training helpers (torchrun + DistributedDataParallel).

Rank losses compare every query with every item of the batch, so with several GPUs each process
must see the *global* batch: each process embeds its slice, the slices are all-gathered, and the
loss ranks the local queries against the gathered embeddings (``ref_emb`` / ``ref_labels``).

:func:`gather_with_grad` keeps the computation exact. Its forward pass all-gathers and puts the
local tensor itself in its slot; its backward pass sums, over processes, the gradients that every
process computed for each slice and hands each process the gradient of its own slice. With a loss
averaged over the local queries and DDP averaging parameter gradients, the update equals the one a
single process would compute on the global batch (tested with gloo on CPU).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from hapkit.errors import DeviceUnavailableError

__all__ = [
    "DistContext",
    "init_distributed",
    "shutdown_distributed",
    "gather_with_grad",
    "all_gather_nograd",
    "all_reduce_mean",
    "barrier",
    "contiguous_share",
    "gather_shares",
]


@dataclass
class DistContext:
    """Where this process stands: rank, number of processes and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _pick_device(spec: str, local_rank: int) -> torch.device:
    if spec == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        # torch's own error (from set_device or the first tensor moved) speaks of its build or driver
        raise DeviceUnavailableError(
            f"train.device={spec} but torch sees no CUDA GPU on this machine: use --set train.device=cpu "
            f"(or auto); for hapkit evaluate, --device cpu"
        )
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group that torchrun describes in the environment (if any).

    Without ``WORLD_SIZE`` > 1 this is a single-process context. The backend is NCCL on CUDA and
    gloo on CPU. Calling it again in a process whose group is already initialised reuses the group.
    A CUDA ``device`` on a machine where torch sees no GPU is a :class:`DeviceUnavailableError`.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    dev = _pick_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        # generous timeout: the processes wait for each other at barriers (checkpoints, the end of a
        # long evaluation on unevenly loaded GPUs)
        dist.init_process_group(backend=backend, timeout=timedelta(hours=2))
    elif dev.type == "cuda":
        torch.cuda.set_device(dev)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        parts[rank] = x  # the local slot is the input itself (same values, same graph position)
        ctx.rank, ctx.n = rank, x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # every process computed a gradient for every slice; each slice's owner needs their sum
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather (B, ...) slices of equal size from every process into (world * B, ...).

    Differentiable: gradients flow back to the local slice from the losses of *all* processes.
    Identity when not distributed.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def all_gather_nograd(x: torch.Tensor) -> torch.Tensor:
    """All-gather equal-size slices (labels, indices) without gradient."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over processes (a copy; identity when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y / dist.get_world_size()


def contiguous_share(dataset, rank: int, world: int) -> tuple[torch.utils.data.Dataset, bool]:
    """This process's contiguous share of ``dataset`` (the shares of processes 0, 1, ...
    concatenate to it in order) and whether that share is empty.

    An empty share (a set smaller than the number of processes) comes back as the set's first
    item: the process embeds it for the embedding size, then contributes no row
    (``rows[:0]``), so that it still joins the others' collectives instead of raising alone.
    """
    if world == 1:
        return dataset, False
    n = len(dataset)
    lo, hi = n * rank // world, n * (rank + 1) // world
    empty = lo == hi and n > 0
    return torch.utils.data.Subset(dataset, range(lo, hi) if not empty else range(1)), empty


def gather_shares(rows: torch.Tensor) -> torch.Tensor:
    """Every process's (n_r, ...) rows concatenated in process order on every process, on the CPU
    (n_r may differ, and may be 0); the rows themselves on the CPU without a process group."""
    from hapkit.evaluate import _gather_rows

    if not (dist.is_available() and dist.is_initialized()):
        return rows.cpu()
    return _gather_rows(rows)
