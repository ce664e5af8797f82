"""ROADMAP, robust and decomposable average precision (Ramzi et al., NeurIPS 2021).

"Robust and Decomposable Average Precision for Image Retrieval":

- :class:`SupAP`: 1 - mean surrogate AP at one label column. Negatives compete through the
  upper-bound step, positives through the exact step, so 1 - AP~ >= 1 - AP on the batch.
- :class:`CalibrationLoss`: a contrastive loss on dot-product similarities (positive margin 0.9,
  negative margin 0.6) that pins absolute similarity values, reducing the gap between the batch AP
  and the dataset AP (the "decomposability gap").
- :class:`ROADMAP`: weights[0] * SupAP + weights[1] * CalibrationLoss, 1:1 (SupRank configs 0.9/0.1).

SupAP is the one-level case of the smoothed-rank machinery of :mod:`hapkit.losses.rank`: binary
relevance, positives at shared level 1. Same-batch semantics follow the reference code: the query is its
own top-ranked positive (disable with ``exclude_self=True``).
"""

from __future__ import annotations

from typing import Sequence

import torch
from pytorch_metric_learning.distances import DotProductSimilarity
from pytorch_metric_learning.losses import ContrastiveLoss

from hapkit.errors import InputError
from hapkit.losses.base import HapkitLoss, LossInputs, check_column, fill_self_, prepare_inputs, reduce_queries
from hapkit.losses.rank import DEFAULT_STEP, UpperStep, check_has_positive, float32_compute, smooth_hap

__all__ = ["SupAP", "CalibrationLoss", "ROADMAP"]


def binary_shared(inputs: LossInputs, column: int, exclude_self: bool) -> torch.Tensor:
    """(Q, M) int64 shared levels of a one-level hierarchy: 1 where the ranked item shares the
    query's label in ``column``, else 0; -1 for the query itself when it is excluded (same-batch
    mode, or its row in a gathered reference set)."""
    shared = (inputs.labels[:, column, None] == inputs.ref_labels[None, :, column]).long()
    if exclude_self:
        fill_self_(shared, inputs, -1)
    return shared


class SupAP(HapkitLoss):
    """ROADMAP's SupAP loss: 1 - mean over queries of the surrogate AP (Ramzi et al., NeurIPS 2021).

    For a query q and a positive k (same label in label column ``column``):
      rank~(q, k) = 1 + sum_{j != k negative} upper_step(s_qj - s_qk) + sum_{j != k positive} H(...)
      AP~(q) = (1 / |P|) sum_{k in P} rank+(q, k) / rank~(q, k), rank+ counting positives (exact).

    Args:
        tau, rho, delta, start, offset: the upper-bound step (0.01, 100, 0.05, 0.5, 1.44).
        paper_branch: use rho * d + offset for d > delta, the branch the ROADMAP paper's numbers
            were trained with; the default is the corrected rho * (d - delta) + offset.
        column: label column defining positives (0 = finest).
        exclude_self: drop the query from its own ranking in same-batch mode.
        chunk_elements: pairs per chunk of the smoothed-rank computation (memory / speed knob).
    Raises :class:`NoPositiveError` when no query has a positive other than itself.
    """

    def __init__(
        self,
        tau: float = DEFAULT_STEP.tau,
        rho: float = DEFAULT_STEP.rho,
        delta: float = DEFAULT_STEP.delta,
        start: float = DEFAULT_STEP.start,
        offset: float = DEFAULT_STEP.offset,
        paper_branch: bool = False,
        column: int = 0,
        exclude_self: bool = False,
        chunk_elements: int | None = None,
    ):
        super().__init__()
        self.step = UpperStep(tau, rho, delta, start, offset, paper_branch)
        self.column = column
        self.exclude_self = exclude_self
        self.chunk_elements = chunk_elements

    def per_query(self, embeddings, labels, ref_emb=None, ref_labels=None):
        """(Q,) surrogate AP of every query and (Q,) number of positives (0: AP undefined)."""
        with float32_compute(embeddings.device):
            x = prepare_inputs(embeddings, labels, ref_emb, ref_labels, "SupAP")
            check_column(self.column, x.num_levels, "SupAP")
            shared = binary_shared(x, self.column, self.exclude_self)
            check_has_positive(shared, x, "SupAP", f"same label in column {self.column}")
            scores = x.embeddings @ x.ref_emb.T
            binary_relevance = scores.new_tensor([[0.0, 1.0]]).expand(scores.shape[0], 2)
            return smooth_hap(scores, shared, binary_relevance, self.step, self.chunk_elements)

    def batch_loss(self, embeddings, labels, ref_emb=None, ref_labels=None):
        ap, n_pos = self.per_query(embeddings, labels, ref_emb, ref_labels)
        return reduce_queries(ap, n_pos)

    def extra_repr(self) -> str:
        s = self.step
        return (
            f"tau={s.tau}, rho={s.rho}, delta={s.delta}, start={s.start}, offset={s.offset}, "
            f"paper_branch={s.paper_branch}, column={self.column}, exclude_self={self.exclude_self}"
        )


class CalibrationLoss(HapkitLoss):
    """ROADMAP's calibration loss: a contrastive loss on dot-product similarities.

    mean over non-zero terms of relu(pos_margin - s) over positive pairs, plus mean over non-zero
    terms of relu(s - neg_margin) over negative pairs, the pair of an item with itself excluded.
    This is pytorch-metric-learning's ``ContrastiveLoss`` with a raw dot-product similarity.

    Args:
        pos_margin: 0.9. neg_margin: 0.6. column: label column defining positives (0 = finest).
    With ``ref_emb``, pairs are (batch item, reference item); when the reference set contains the
    batch itself (distributed training), the item-with-itself pairs have s = 1 for L2-normalised
    embeddings, a zero term, and do not change the non-zero means.
    """

    def __init__(self, pos_margin: float = 0.9, neg_margin: float = 0.6, column: int = 0):
        super().__init__()
        self.pos_margin = pos_margin
        self.neg_margin = neg_margin
        self.column = column
        self.contrastive = ContrastiveLoss(
            pos_margin=pos_margin,
            neg_margin=neg_margin,
            distance=DotProductSimilarity(normalize_embeddings=False),
        )

    def batch_loss(self, embeddings, labels, ref_emb=None, ref_labels=None):
        with float32_compute(embeddings.device):
            x = prepare_inputs(embeddings, labels, ref_emb, ref_labels, "CalibrationLoss")
            check_column(self.column, x.num_levels, "CalibrationLoss")
            check_has_positive(
                binary_shared(x, self.column, False), x, "CalibrationLoss", f"same label in column {self.column}"
            )
            y = x.labels[:, self.column]
            if x.same_set:
                return self.contrastive(x.embeddings, y)
            return self.contrastive(x.embeddings, y, ref_emb=x.ref_emb, ref_labels=x.ref_labels[:, self.column])

    def extra_repr(self) -> str:
        return f"pos_margin={self.pos_margin}, neg_margin={self.neg_margin}, column={self.column}"


class ROADMAP(HapkitLoss):
    """ROADMAP loss = weights[0] * SupAP + weights[1] * CalibrationLoss (Ramzi et al., NeurIPS 2021).

    Args:
        weights: (1.0, 1.0) as in ROADMAP; SupRank configs use (0.9, 0.1).
        pos_margin, neg_margin: calibration margins (0.9, 0.6).
        **supap_kwargs: forwarded to :class:`SupAP` (tau, rho, ..., paper_branch, column, ...).
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
            raise InputError(f"ROADMAP: weights must be (w_supap, w_calibration), got {weights!r}")
        self.weights = tuple(float(w) for w in weights)
        self.supap = SupAP(**supap_kwargs)
        self.calibration = CalibrationLoss(pos_margin, neg_margin, column=self.supap.column)

    def batch_loss(self, embeddings, labels, ref_emb=None, ref_labels=None):
        w_ap, w_cal = self.weights
        ref = dict(ref_emb=ref_emb, ref_labels=ref_labels)
        return w_ap * self.supap(embeddings, labels, **ref) + w_cal * self.calibration(embeddings, labels, **ref)

    def extra_repr(self) -> str:
        return f"weights={self.weights}"
