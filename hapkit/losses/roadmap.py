"""ROADMAP, robust and decomposable average precision (Ramzi et al., NeurIPS 2021).

"Robust and Decomposable Average Precision for Image Retrieval":

- :class:`SupAP`: 1 - mean surrogate AP on one label level. Negatives compete through the
  upper-bound step, positives through the exact step, so 1 - AP~ >= 1 - AP on the batch.
- :class:`CalibrationLoss`: a contrastive loss on dot-product similarities (positive margin 0.9,
  negative margin 0.6) that pins absolute similarity values, reducing the gap between the batch AP
  and the dataset AP (the "decomposability gap").
- :class:`ROADMAP`: weights[0] * SupAP + weights[1] * CalibrationLoss, 1:1 (SupRank configs 0.9/0.1).

SupAP is the one-level case of the smoothed-rank machinery of :mod:`hapkit.losses.rank`: binary
relevance, positives at level 1. Same-batch semantics follow the reference code: the query is its
own top-ranked positive (disable with ``exclude_self=True``).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from pytorch_metric_learning.distances import DotProductSimilarity
from pytorch_metric_learning.losses import ContrastiveLoss

from hapkit.losses.base import LossInputs, prepare_inputs
from hapkit.losses.rank import UpperStep, check_has_positive, float32_compute, reduce_queries, smooth_hap

__all__ = ["SupAP", "CalibrationLoss", "ROADMAP"]


def _check_level(level: int, inputs: LossInputs, loss_name: str) -> None:
    if not 0 <= level < inputs.num_levels:
        raise ValueError(
            f"{loss_name}: level={level} but the labels have {inputs.num_levels} level(s) "
            f"(0 = finest ... {inputs.num_levels - 1} = coarsest)"
        )


def binary_levels(inputs: LossInputs, level: int, exclude_self: bool) -> torch.Tensor:
    """(Q, M) int64: 1 where the ranked item shares the query's label at ``level``, else 0;
    -1 for the query itself when it is excluded in same-batch mode."""
    levels = (inputs.labels[:, level, None] == inputs.ref_labels[None, :, level]).long()
    if inputs.same_set and exclude_self:
        levels.fill_diagonal_(-1)
    return levels


class SupAP(nn.Module):
    """ROADMAP's SupAP loss: 1 - mean over queries of the surrogate AP (Ramzi et al., NeurIPS 2021).

    For a query q and a positive k (same label at ``level``):
      rank~(q, k) = 1 + sum_{j != k negative} upper_step(s_qj - s_qk) + sum_{j != k positive} H(...)
      AP~(q) = (1 / |P|) sum_{k in P} rank+(q, k) / rank~(q, k), rank+ counting positives (exact).

    Args:
        tau, rho, delta, start, offset: the upper-bound step (0.01, 100, 0.05, 0.5, 1.44).
        paper_branch: use rho * d + offset for d > delta, the branch the ROADMAP paper's numbers
            were trained with; the default is the corrected rho * (d - delta) + offset.
        level: label column defining positives (0 = finest).
        exclude_self: drop the query from its own ranking in same-batch mode.
        chunk_elements: pairs per chunk of the smoothed-rank computation.
    Raises :class:`NoPositiveError` when no query has a positive other than itself.
    """

    def __init__(
        self,
        tau: float = 0.01,
        rho: float = 100.0,
        delta: float = 0.05,
        start: float = 0.5,
        offset: float = 1.44,
        paper_branch: bool = False,
        level: int = 0,
        exclude_self: bool = False,
        chunk_elements: int | None = None,
    ):
        super().__init__()
        self.step = UpperStep(tau, rho, delta, start, offset, paper_branch)
        self.level = level
        self.exclude_self = exclude_self
        self.chunk_elements = chunk_elements

    def per_query(self, embeddings, labels, ref_emb=None, ref_labels=None):
        """(Q,) surrogate AP of every query and (Q,) number of positives (0: AP undefined)."""
        with float32_compute(embeddings.device):
            x = prepare_inputs(embeddings, labels, ref_emb, ref_labels, "SupAP")
            _check_level(self.level, x, "SupAP")
            levels = binary_levels(x, self.level, self.exclude_self)
            check_has_positive(levels, x, "SupAP", f"same label at level {self.level}")
            scores = x.embeddings @ x.ref_emb.T
            level_rel = scores.new_tensor([[0.0, 1.0]]).expand(scores.shape[0], 2)
            return smooth_hap(scores, levels, level_rel, self.step, self.chunk_elements)

    def forward(self, embeddings, labels, ref_emb=None, ref_labels=None):
        ap, n_pos = self.per_query(embeddings, labels, ref_emb, ref_labels)
        return reduce_queries(ap, n_pos)

    def extra_repr(self) -> str:
        s = self.step
        return (
            f"tau={s.tau}, rho={s.rho}, delta={s.delta}, start={s.start}, offset={s.offset}, "
            f"paper_branch={s.paper_branch}, level={self.level}, exclude_self={self.exclude_self}"
        )


class CalibrationLoss(nn.Module):
    """ROADMAP's calibration loss: a contrastive loss on dot-product similarities.

    mean over non-zero terms of relu(pos_margin - s) over positive pairs, plus mean over non-zero
    terms of relu(s - neg_margin) over negative pairs, the pair of an item with itself excluded.
    This is pytorch-metric-learning's ``ContrastiveLoss`` with a raw dot-product similarity.

    Args:
        pos_margin: 0.9. neg_margin: 0.6. level: label column defining positives (0 = finest).
    With ``ref_emb``, pairs are (batch item, reference item); when the reference set contains the
    batch itself (distributed training), the item-with-itself pairs have s = 1 for L2-normalised
    embeddings, a zero term, and do not change the non-zero means.
    """

    def __init__(self, pos_margin: float = 0.9, neg_margin: float = 0.6, level: int = 0):
        super().__init__()
        self.pos_margin = pos_margin
        self.neg_margin = neg_margin
        self.level = level
        self.contrastive = ContrastiveLoss(
            pos_margin=pos_margin,
            neg_margin=neg_margin,
            distance=DotProductSimilarity(normalize_embeddings=False),
        )

    def forward(self, embeddings, labels, ref_emb=None, ref_labels=None):
        with float32_compute(embeddings.device):
            x = prepare_inputs(embeddings, labels, ref_emb, ref_labels, "CalibrationLoss")
            _check_level(self.level, x, "CalibrationLoss")
            check_has_positive(
                binary_levels(x, self.level, False), x, "CalibrationLoss", f"same label at level {self.level}"
            )
            y = x.labels[:, self.level]
            if x.same_set:
                return self.contrastive(x.embeddings, y)
            return self.contrastive(x.embeddings, y, ref_emb=x.ref_emb, ref_labels=x.ref_labels[:, self.level])

    def extra_repr(self) -> str:
        return f"pos_margin={self.pos_margin}, neg_margin={self.neg_margin}, level={self.level}"


class ROADMAP(nn.Module):
    """ROADMAP loss = weights[0] * SupAP + weights[1] * CalibrationLoss (Ramzi et al., NeurIPS 2021).

    Args:
        weights: (1.0, 1.0) as in ROADMAP; SupRank configs use (0.9, 0.1).
        pos_margin, neg_margin: calibration margins (0.9, 0.6).
        **supap_kwargs: forwarded to :class:`SupAP` (tau, rho, ..., paper_branch, level, ...).
    The parts are the submodules ``.supap`` and ``.calibration``.
    """

    def __init__(
        self,
        weights: Sequence[float] = (1.0, 1.0),
        pos_margin: float = 0.9,
        neg_margin: float = 0.6,
        **supap_kwargs,
    ):
        super().__init__()
        if len(weights) != 2:
            raise ValueError(f"ROADMAP: weights must be (w_supap, w_calibration), got {weights!r}")
        self.weights = tuple(float(w) for w in weights)
        self.supap = SupAP(**supap_kwargs)
        self.calibration = CalibrationLoss(pos_margin, neg_margin, level=self.supap.level)

    def forward(self, embeddings, labels, ref_emb=None, ref_labels=None):
        w_ap, w_cal = self.weights
        return w_ap * self.supap(embeddings, labels, ref_emb, ref_labels) + w_cal * self.calibration(
            embeddings, labels, ref_emb, ref_labels
        )

    def extra_repr(self) -> str:
        return f"weights={self.weights}"
