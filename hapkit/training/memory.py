"""The cross-batch memory of a training run (``train.memory`` of a recipe).

One :class:`hapkit.losses.CrossBatchMemory` holds the last ``size`` embeddings of the *global*
batches with all their label levels: with several processes every one enqueues the gathered
batch in process order, so all hold the same memory, and each ranks its own queries against it.
The order of a step follows ROADMAP's and SupRank's training loops: the batch is enqueued
(detached) first, then, once the memory is active, the loss of the batch against the memory is
combined with the batch loss (see :class:`hapkit.training.config.MemoryConfig`).
"""

from __future__ import annotations

import torch

from hapkit.losses import CrossBatchMemory
from hapkit.losses.base import HapkitLoss
from hapkit.training.config import ConfigError, MemoryConfig

__all__ = ["TrainingMemory"]


class TrainingMemory:
    """``train.memory`` of a recipe: the memory bank and how its loss joins the batch loss."""

    def __init__(self, cfg: MemoryConfig, loss_fn: HapkitLoss, embedding_size: int, num_levels: int, batch_size: int):
        if not loss_fn.takes_reference_set:
            raise ConfigError(
                f"train.memory.size={cfg.size} but {type(loss_fn).__name__} compares embeddings with "
                f"learned proxies, not with a reference set: a memory serves rank losses only; set "
                f"train.memory.size=0"
            )
        if cfg.size < batch_size:
            raise ConfigError(f"train.memory.size={cfg.size} must hold at least one global batch ({batch_size})")
        if cfg.activate_after < 0 or cfg.weight < 0:
            raise ConfigError(
                f"train.memory.activate_after and weight must be >= 0, got {cfg.activate_after} and {cfg.weight}"
            )
        self.cfg = cfg
        self.bank = CrossBatchMemory(loss_fn, embedding_size, memory_size=cfg.size, num_levels=num_levels)

    @classmethod
    def from_recipe(cls, cfg: MemoryConfig, loss_fn, embedding_size, num_levels, batch_size, device):
        """The memory of ``train.memory``, or None when ``size`` is 0."""
        if cfg.size == 0:
            return None
        memory = cls(cfg, loss_fn, embedding_size, num_levels, batch_size)
        memory.bank.to(device)
        return memory

    def combine(self, batch_loss, embeddings, labels, global_emb, global_labels, epoch: int) -> torch.Tensor:
        """Enqueue the global batch, then the loss of the training step at 0-based ``epoch``:
        ``embeddings`` / ``labels`` are this process's queries."""
        self.bank.enqueue(global_emb.detach(), global_labels)
        if epoch < self.cfg.activate_after:
            return batch_loss
        memory_emb, memory_labels = self.bank.contents()
        memory_loss = self.bank.loss(embeddings, labels, ref_emb=memory_emb, ref_labels=memory_labels)
        total = batch_loss + self.cfg.weight * memory_loss
        return total if self.cfg.combine == "add" else total / (1.0 + self.cfg.weight)

    def state_dict(self) -> dict:
        return self.bank.memory_state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.bank.load_memory_state_dict(state)
