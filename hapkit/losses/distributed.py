"""pytorch-metric-learning's ``DistributedLossWrapper`` for (B, L) labels in both of its modes.

PML's wrapper works with hapkit's losses as it is in its default mode (``efficient=False``): it
all-gathers the embeddings and the (B, L) labels and each process computes the loss of the
global batch, its own rows carrying the gradient. Its ``efficient=True`` mode (each process's
queries against the gathered batch) first builds PML's pair indices from the labels, which
assumes (B,) labels; hapkit's losses rank every pair and ignore those indices, so this subclass
skips them and passes the gathered batch as the reference set, with ``query_offset=0``: PML puts
each process's own rows first in the gathered batch, so a loss with ``exclude_self`` leaves each
query out of its own ranking as it does in one process. Everything else is PML's.
"""

from __future__ import annotations

from pytorch_metric_learning.utils import distributed as pml_distributed

from hapkit.losses.base import HapkitLoss

__all__ = ["DistributedLossWrapper"]


class DistributedLossWrapper(pml_distributed.DistributedLossWrapper):
    """PML's ``DistributedLossWrapper(loss, efficient=False)``, with ``efficient=True`` working for
    hapkit's (B, L) labels. The loss value is PML's: multiplied by the number of processes,
    because DDP averages the gradients that each process computed for its own rows."""

    def forward_regular_loss(self, emb, labels, indices_tuple, ref_emb, ref_labels, world_size):
        if not (self.efficient and isinstance(self.loss, HapkitLoss)) or world_size <= 1:
            return super().forward_regular_loss(emb, labels, indices_tuple, ref_emb, ref_labels, world_size)
        all_emb, all_labels, all_ref_emb, all_ref_labels, labels = pml_distributed.gather_emb_and_ref(
            emb, labels, ref_emb, ref_labels
        )
        if all_ref_emb is not None:  # a reference set of the caller's own: the queries are not in it
            return self.loss(emb, labels, indices_tuple, all_ref_emb, all_ref_labels) * world_size
        # PML's gather puts this process's rows first, then the other processes' rows
        return self.loss(emb, labels, indices_tuple, all_emb, all_labels, query_offset=0) * world_size
