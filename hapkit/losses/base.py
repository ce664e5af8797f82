"""Input handling shared by every loss: shapes, label trees, reference sets and float32 compute."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hapkit.hierarchy import as_label_tensor

__all__ = ["LossInputs", "prepare_inputs", "NoPositiveError", "require_other_positive"]


class NoPositiveError(ValueError):
    """A batch in which no query has a positive: the sampler must put several images per class."""


@dataclass
class LossInputs:
    embeddings: torch.Tensor  # (B, D) float32
    labels: torch.Tensor  # (B, L) int64
    ref_emb: torch.Tensor  # (M, D) float32; the batch itself when no reference set is given
    ref_labels: torch.Tensor  # (M, L) int64
    same_set: bool  # True when ref_emb is the batch itself (query i is ref item i)

    @property
    def num_levels(self) -> int:
        return self.labels.shape[1]


def prepare_inputs(
    embeddings: torch.Tensor,
    labels,
    ref_emb: torch.Tensor | None = None,
    ref_labels=None,
    loss_name: str = "loss",
) -> LossInputs:
    """Validate a loss call and return float32 embeddings and (B, L) int64 labels on one device.

    Losses compute in float32 even under ``torch.autocast``: callers wrap their body in
    ``torch.autocast(device_type, enabled=False)`` and call this first.
    """
    if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2:
        shape = tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings)
        raise ValueError(f"{loss_name}: embeddings must be a (B, D) tensor, got {shape}")
    device = embeddings.device
    labels = as_label_tensor(labels, name=f"{loss_name} labels").to(device)
    if labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"{loss_name}: {embeddings.shape[0]} embeddings but {labels.shape[0]} label rows"
        )
    if (ref_emb is None) != (ref_labels is None):
        raise ValueError(f"{loss_name}: give both ref_emb and ref_labels, or neither")
    emb = embeddings.float()
    if ref_emb is None:
        return LossInputs(emb, labels, emb, labels, True)
    if ref_emb.dim() != 2 or ref_emb.shape[1] != embeddings.shape[1]:
        raise ValueError(
            f"{loss_name}: ref_emb must be (M, {embeddings.shape[1]}), got {tuple(ref_emb.shape)}"
        )
    ref_labels = as_label_tensor(ref_labels, name=f"{loss_name} ref_labels").to(device)
    if ref_labels.shape[0] != ref_emb.shape[0]:
        raise ValueError(
            f"{loss_name}: {ref_emb.shape[0]} reference embeddings but {ref_labels.shape[0]} label rows"
        )
    if ref_labels.shape[1] != labels.shape[1]:
        raise ValueError(
            f"{loss_name}: labels have {labels.shape[1]} level(s), ref_labels {ref_labels.shape[1]}"
        )
    return LossInputs(emb, labels, ref_emb.to(device).float(), ref_labels, False)


def require_other_positive(related: torch.Tensor, inputs: LossInputs, what: str, loss_name: str) -> None:
    """Raise :class:`NoPositiveError` when no query has a related item other than itself.

    ``related`` is a (B, M) boolean mask of the reference items each query counts as positive;
    in the same-set protocol the query's own entry (the diagonal) does not count.
    """
    others = related.clone()
    if inputs.same_set:
        others.fill_diagonal_(False)
    if not bool(others.any()):
        raise NoPositiveError(
            f"{loss_name}: no query in this batch of {related.shape[0]} has another item that "
            f"{what}, so there is nothing to rank. The sampler must put at least two images of "
            f"some class in every batch (e.g. pytorch_metric_learning.samplers.MPerClassSampler "
            f"with m >= 2, or hapkit.data.samplers.HierarchicalBatchSampler)."
        )
