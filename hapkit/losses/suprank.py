"""SupRank surrogates of recall@k and NDCG.

Ramzi, Audebert, Rambour, Araujo, Bitot and Thome, "Optimization of Rank Losses for Image
Retrieval" (SupRank, arXiv 2309.08250), extending ROADMAP (NeurIPS 2021).

Both use the SupRank smoothed rank of an item k for query q: the upper-bound step
(:func:`hapkit.losses.rank.upper_step`) on the items that must rank *below* k, and the exact
Heaviside step, without gradient, on the others,

    rank~(k) = 1 + sum_{j less relevant than k} upper_step(s_qj - s_qk)
                 + sum_{j != k, j at least as relevant} H(s_qj - s_qk),

so that rank~(k) >= rank(k) for every item. Ties count as ahead (H(0) = 1).
"""

from __future__ import annotations

from typing import Sequence

import torch

from hapkit.errors import InputError
from hapkit.hierarchy import shared_levels
from hapkit.losses.base import (
    HapkitLoss,
    binary_positives,
    prepare_inputs,
    ranking_mask,
    reduce_queries,
    require_other_positive,
)
from hapkit.losses.rank import DEFAULT_STEP, UpperStep, exact_shared_counts, float32_compute, sigmoid_step, upper_rank_sum

__all__ = ["SupRecall", "SupNDCG"]


def suprank_ranks(scores, shared, num_levels: int, step: UpperStep, chunk_elements=None):
    """(Q, M) SupRank rank~ of every item with ``shared`` >= 1 (other entries are meaningless).

    ``shared[q, j]``: shared level (relevance grade) of item j for query q (0 = irrelevant, -1 =
    not in the ranking). Less relevant items compete through the upper step (with gradient,
    summed by :func:`hapkit.losses.rank.upper_rank_sum` in O(Q * M) memory); items at least as
    relevant through the exact step, counted by sorting (ties count as ahead).
    """
    smooth = upper_rank_sum(scores, shared, step, chunk_elements, levels=num_levels)
    counts = exact_shared_counts(scores.detach(), shared, num_levels)  # (Q, M, L + 1), k included
    at_least = counts.flip(2).cumsum(2).flip(2)  # items sharing >= v levels scored >= s_qk
    exact = at_least.gather(2, shared.clamp(min=0).unsqueeze(2)).squeeze(2) - 1
    return 1.0 + exact.to(scores.dtype) + smooth


class _SupRankLoss(HapkitLoss):
    """Holds the upper step (SupRank/HAPPIER defaults, docs/definitions.md, 'Step functions') and the ranking options."""

    def __init__(self, tau, rho, delta, start, offset, paper_branch, exclude_self, chunk_elements):
        super().__init__()
        self.step = UpperStep(tau, rho, delta, start, offset, paper_branch)
        self.exclude_self = exclude_self
        self.chunk_elements = chunk_elements

    def extra_repr(self) -> str:
        s = self.step
        return (
            f"tau={s.tau}, rho={s.rho}, delta={s.delta}, start={s.start}, offset={s.offset}, "
            f"paper_branch={s.paper_branch}, exclude_self={self.exclude_self}"
        )


class SupRecall(_SupRankLoss):
    """SupRank recall@k surrogate: 1 - mean over k of the smoothed recall rate at k.

    For query q with positives P (same label in label column ``column``, query included by
    default),

        R@k~(q) = sum_{j in P} sigmoid((k - rank~(j)) / temp) / min(|P|, k),

    averaged over ``ks``; rank~ as in the module docstring (the negatives are the less relevant
    items). Defaults are the SupRank config: ks = (1, 2, 4, 8, 16), temp = 1, tau = 0.01,
    rho = 100, delta = 0.05, start = 0.5, offset = 1.44. The exponent of the outer sigmoid is
    clamped to [-50, 50] like every step, so a positive with rank~ > k + 50 * temp gives no
    gradient for that k: the loss suits fine-tuning (pretrained or partly trained embeddings)
    more than random starts. ``chunk_elements`` bounds the pairs evaluated at once.
    """

    def __init__(
        self,
        ks: Sequence[int] = (1, 2, 4, 8, 16),
        temp: float = 1.0,
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
        super().__init__(tau, rho, delta, start, offset, paper_branch, exclude_self, chunk_elements)
        ks = tuple(int(k) for k in ks)
        if not ks or min(ks) < 1:
            raise InputError(f"SupRecall: ks must be positive ranks, got {ks!r}")
        if not temp > 0:
            raise InputError(f"SupRecall: temp must be > 0, got {temp}")
        self.ks, self.temp, self.column = ks, float(temp), column

    def per_query(self, embeddings, labels, ref_emb=None, ref_labels=None):
        """(B,) smoothed recall of every query and (B,) number of positives (0: undefined)."""
        with float32_compute(embeddings.device):
            inp = prepare_inputs(embeddings, labels, ref_emb, ref_labels, "SupRecall")
            ranking = ranking_mask(inp, self.exclude_self)
            pos = binary_positives(inp, self.column, ranking, "SupRecall")
            scores = inp.embeddings @ inp.ref_emb.T
            shared = pos.long().masked_fill(~ranking, -1)
            rank = suprank_ranks(scores, shared, 1, self.step, self.chunk_elements)
            n_pos = pos.sum(1)
            recall = scores.new_zeros(scores.shape[0])
            for k in self.ks:
                hits = torch.where(pos, sigmoid_step(k - rank, self.temp), 0.0).sum(1)
                recall = recall + hits / n_pos.clamp(max=k).clamp(min=1)
            return recall / len(self.ks), n_pos

    def batch_loss(self, embeddings, labels, ref_emb=None, ref_labels=None):
        recall, n_pos = self.per_query(embeddings, labels, ref_emb, ref_labels)
        return reduce_queries(recall, n_pos)

    def extra_repr(self) -> str:
        return f"ks={self.ks}, temp={self.temp}, column={self.column}, " + super().extra_repr()


class SupNDCG(_SupRankLoss):
    """SupRank NDCG surrogate over all label levels: 1 - mean smoothed NDCG.

    Gains are 2**V - 1 with V the number of shared levels (docs/definitions.md, 'SupRank recall@k and NDCG'), discounts 1 / log2(1 + rank~),
    rank~ as in the module docstring with "less relevant" meaning smaller V. The ideal DCG is
    exact. Since rank~ >= rank, the smoothed NDCG is a lower bound of the exact NDCG of the batch
    (ties broken in any order). Defaults: tau = 0.01, rho = 100, delta = 0.05, start = 0.5,
    offset = 1.44 (SupRank config). ``chunk_elements`` bounds the pairs evaluated at once.
    """

    def __init__(
        self,
        tau: float = DEFAULT_STEP.tau,
        rho: float = DEFAULT_STEP.rho,
        delta: float = DEFAULT_STEP.delta,
        start: float = DEFAULT_STEP.start,
        offset: float = DEFAULT_STEP.offset,
        paper_branch: bool = False,
        exclude_self: bool = False,
        chunk_elements: int | None = None,
    ):
        super().__init__(tau, rho, delta, start, offset, paper_branch, exclude_self, chunk_elements)

    def per_query(self, embeddings, labels, ref_emb=None, ref_labels=None):
        """(B,) smoothed NDCG of every query and (B,) ideal DCG (0: no relevant item)."""
        with float32_compute(embeddings.device):
            inp = prepare_inputs(embeddings, labels, ref_emb, ref_labels, "SupNDCG")
            ranking = ranking_mask(inp, self.exclude_self)
            V = shared_levels(inp.labels, inp.ref_labels).long()
            require_other_positive(V > 0, inp, "shares at least its coarsest label", "SupNDCG")
            shared = V.masked_fill(~ranking, -1)
            scores = inp.embeddings @ inp.ref_emb.T
            rank = suprank_ranks(scores, shared, inp.num_levels, self.step, self.chunk_elements)
            gains = 2.0 ** shared.clamp(min=0).to(scores.dtype) - 1.0
            dcg = torch.where(shared > 0, gains / torch.log2(1.0 + rank), 0.0).sum(1)
            ideal_gains = gains.sort(dim=1, descending=True).values
            positions = torch.arange(1, V.shape[1] + 1, device=V.device, dtype=scores.dtype)
            ideal = (ideal_gains / torch.log2(1.0 + positions)).sum(1)
            return dcg / ideal.clamp(min=1e-12), ideal

    def batch_loss(self, embeddings, labels, ref_emb=None, ref_labels=None):
        ndcg, ideal = self.per_query(embeddings, labels, ref_emb, ref_labels)
        return reduce_queries(ndcg, ideal)
