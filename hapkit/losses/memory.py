"""A cross-batch memory for hapkit's rank losses: pytorch-metric-learning's ``CrossBatchMemory``
with (B, L) labels.

Wang, Zhang, Huang and Scott, "Cross-Batch Memory for Embedding Learning" (XBM, CVPR 2020): the
embeddings of the last ``memory_size`` training images are kept, detached, and every batch is
ranked against them as well as against itself, which gives a rank loss far more negatives (and
positives) than one batch holds.

The semantics are those of ROADMAP's and SupRank's own memories (``roadmap/engine/memory.py``,
``suprank/losses/tools/xbm.py``) and of PML's class: the current batch is enqueued, detached,
*before* the loss is computed, so each query finds its own copy among the references (as in
same-batch training, where the query is its own top-ranked positive), and the loss is
``loss(batch as queries, memory as references)``. Gradients flow through the queries only.
PML's ``CrossBatchMemory`` keeps one label per item and accepts only the PML losses it lists;
this subclass keeps every label level and accepts every hapkit loss that ranks against a
reference set. It can be wrapped in PML's ``DistributedLossWrapper``: every process then enqueues
the gathered global batch, its own rows first, so all processes hold the same memory when
``memory_size`` is a multiple of the global batch size (otherwise the items cut at the end of the
ring differ from process to process). hapkit's training engine enqueues the gathered batch in
process order and needs no such care.
"""

from __future__ import annotations

import torch
from pytorch_metric_learning.losses import CrossBatchMemory as PMLCrossBatchMemory

from hapkit.errors import InputError
from hapkit.hierarchy import as_label_tensor
from hapkit.losses.base import HapkitLoss

__all__ = ["CrossBatchMemory"]


class CrossBatchMemory(PMLCrossBatchMemory):
    """A memory bank of the last ``memory_size`` embeddings and all their label levels.

    Args:
        loss: a hapkit loss that ranks against a reference set (``takes_reference_set``: HAPPIER,
            HAPLoss, ROADMAP, SupAP, CalibrationLoss, SmoothAP, ListwiseAP, SupRecall, SupNDCG).
            In a composite loss, the parts that ignore a reference set (HAPPIER's clustering term)
            see the batch alone.
        embedding_size: D.
        memory_size: embeddings kept (a ring buffer; the oldest are overwritten). It must hold at
            least one batch.
        num_levels: label levels L of the memory; None takes them from the first batch (or from a
            loaded state).

    ``memory(embeddings, labels, indices_tuple=None, enqueue_mask=None)`` enqueues the batch and
    returns ``loss(embeddings, labels, indices_tuple, memory embeddings, memory labels)``: equal
    to calling the loss with :meth:`contents` as ``ref_emb`` / ``ref_labels``. With
    ``enqueue_mask`` (PML's option), only the masked items are enqueued and only the others are
    queries. :meth:`enqueue` and :meth:`contents` are the two halves, for a training loop that
    enqueues other embeddings than its queries (the engine enqueues the gathered global batch and
    queries with its local slice). :meth:`memory_state_dict` holds the memory without the loss.
    """

    def __init__(self, loss, embedding_size: int, memory_size: int = 1024, miner=None, num_levels: int | None = None):
        if not (isinstance(loss, HapkitLoss) and loss.takes_reference_set):
            kind = type(loss).__name__
            raise TypeError(
                f"hapkit.losses.CrossBatchMemory needs a hapkit loss that ranks against a reference "
                f"set (HAPPIER, ROADMAP, SupAP, SmoothAP, ListwiseAP, SupRecall, SupNDCG, ...), got "
                f"{kind}. Proxy losses compare with learned proxies, not with a memory; for "
                f"pytorch-metric-learning's own losses use pytorch_metric_learning.losses.CrossBatchMemory."
            )
        if miner is not None:
            raise InputError(
                "hapkit.losses.CrossBatchMemory: hapkit's rank losses rank every (query, memory) pair "
                "and ignore mined pairs; leave miner=None"
            )
        if int(memory_size) < 1:
            raise InputError(f"CrossBatchMemory: memory_size must be >= 1, got {memory_size}")
        if num_levels is not None and int(num_levels) < 1:
            raise InputError(f"CrossBatchMemory: num_levels must be >= 1 (or None), got {num_levels}")
        self._num_levels = 0 if num_levels is None else int(num_levels)  # read by reset_queue
        super().__init__(loss, embedding_size, memory_size=int(memory_size))

    @classmethod
    def check_loss_support(cls, loss_name):
        # PML checks the class name against its list; the loss object itself is checked in __init__.
        return None

    def reset_queue(self):
        """Empty the memory (L label columns; 0 until the first batch says how many)."""
        self.register_buffer("embedding_memory", torch.zeros(self.memory_size, self.embedding_size))
        self.register_buffer("label_memory", torch.zeros(self.memory_size, self._num_levels, dtype=torch.long))
        self.has_been_filled = False
        self.queue_idx = 0

    # -- the memory ----------------------------------------------------------------------------

    @property
    def num_stored(self) -> int:
        return self.memory_size if self.has_been_filled else self.queue_idx

    def _checked(self, embeddings: torch.Tensor, labels) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            shape = tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__
            raise InputError(f"CrossBatchMemory: embeddings must be (B, {self.embedding_size}), got {shape}")
        labels = as_label_tensor(labels, name="CrossBatchMemory labels", check=False).to(embeddings.device)
        if labels.shape[0] != embeddings.shape[0]:
            raise InputError(f"CrossBatchMemory: {embeddings.shape[0]} embeddings but {labels.shape[0]} label rows")
        return embeddings, labels

    def enqueue(self, embeddings: torch.Tensor, labels) -> None:
        """Store ``embeddings`` (detached) and their (B, L) labels, overwriting the oldest."""
        embeddings, labels = self._checked(embeddings, labels)
        B, L = labels.shape
        if B > self.memory_size:
            raise InputError(
                f"CrossBatchMemory: a batch of {B} does not fit in a memory of {self.memory_size}; "
                f"memory_size must be at least the (global) batch size"
            )
        if self.label_memory.shape[1] != L:
            if self.num_stored:
                raise InputError(
                    f"CrossBatchMemory: labels have {L} level(s) but the memory holds "
                    f"{self.label_memory.shape[1]}"
                )
            self.label_memory = torch.zeros(self.memory_size, L, dtype=torch.long, device=self.label_memory.device)
        device = embeddings.device
        if self.embedding_memory.device != device:
            self.embedding_memory = self.embedding_memory.to(device)
            self.label_memory = self.label_memory.to(device)
        self.add_to_memory(embeddings.detach().to(self.embedding_memory.dtype), labels.detach(), B)

    def contents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, D) embeddings and (M, L) labels in the memory, M = :attr:`num_stored`."""
        n = self.num_stored
        return self.embedding_memory[:n], self.label_memory[:n]

    def forward(self, embeddings, labels, indices_tuple=None, enqueue_mask=None):
        if indices_tuple is not None and enqueue_mask is not None:
            raise InputError("CrossBatchMemory: indices_tuple and enqueue_mask are mutually exclusive")
        self.reset_stats()
        embeddings, labels = self._checked(embeddings, labels)
        queries, query_labels = embeddings, labels
        if enqueue_mask is not None:
            mask = torch.as_tensor(enqueue_mask, device=embeddings.device)
            if mask.dtype != torch.bool or mask.shape != (embeddings.shape[0],):
                raise InputError(f"CrossBatchMemory: enqueue_mask must be a ({embeddings.shape[0]},) boolean mask")
            self.enqueue(embeddings[mask], labels[mask])
            queries, query_labels = embeddings[~mask], labels[~mask]
        else:
            self.enqueue(embeddings, labels)
        ref_emb, ref_labels = self.contents()
        return self.loss(queries, query_labels, indices_tuple, ref_emb, ref_labels)

    # -- state ---------------------------------------------------------------------------------

    def get_extra_state(self):
        # The write position is plain Python state in PML's class: without it a resumed run
        # would overwrite other slots than the uninterrupted one.
        return {"queue_idx": int(self.queue_idx), "has_been_filled": bool(self.has_been_filled)}

    def set_extra_state(self, state):
        self.queue_idx = int(state["queue_idx"])
        self.has_been_filled = bool(state["has_been_filled"])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        stored = state_dict.get(prefix + "label_memory")
        if stored is not None and stored.shape != self.label_memory.shape:
            # a memory whose number of levels was left to the first batch adopts the stored one
            self.label_memory = torch.zeros_like(stored, device=self.label_memory.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    _MEMORY_KEYS = ("embedding_memory", "label_memory")

    def memory_state_dict(self) -> dict:
        """The memory alone (embeddings, labels, write position), without the wrapped loss."""
        return {**{k: getattr(self, k).detach().clone() for k in self._MEMORY_KEYS}, **self.get_extra_state()}

    def load_memory_state_dict(self, state: dict) -> None:
        """Restore what :meth:`memory_state_dict` returned."""
        for k in self._MEMORY_KEYS:
            setattr(self, k, state[k].to(getattr(self, k).device).clone())
        self.set_extra_state(state)

    def extra_repr(self) -> str:
        return f"embedding_size={self.embedding_size}, memory_size={self.memory_size}, stored={self.num_stored}"
