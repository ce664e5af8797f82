"""Smooth-AP: average precision with every ranking step replaced by a sigmoid.

Brown, Xie, Kalogeiton and Zisserman, "Smooth-AP: Smoothing the Path Towards Large-Scale Image
Retrieval", ECCV 2020 (arXiv 2007.12163).

For a query q with positives P (items sharing its label in label column ``column``) and ranking
set G,

    rank(k)  = 1 + sum_{j in G, j != k} sigmoid_tau(s_qj - s_qk)
    rank+(k) = 1 + sum_{j in P, j != k} sigmoid_tau(s_qj - s_qk)
    AP~(q)   = (1 / |P|) sum_{k in P} rank+(k) / rank(k),      loss = 1 - mean_q AP~(q).
"""

from __future__ import annotations

import torch

from hapkit.errors import InputError
from hapkit.losses.base import (
    HapkitLoss,
    binary_positives,
    chunk_elements_for,
    prepare_inputs,
    query_chunks,
    ranking_mask,
    reduce_queries,
    run_chunked,
)
from hapkit.losses.rank import float32_compute, sigmoid_step

__all__ = ["SmoothAP"]

# Largest (pairs x gallery) block of a chunk when ``chunk_elements`` is None: 2**24 float32
# values = 64 MiB per intermediate tensor, on any device (one chunk for a batch of 512 at 4 per
# class, so no recomputation in the backward pass).
CHUNK_ELEMENTS = 2**24


# --------------------------------------------------------------------------------------------
# Pairs
# --------------------------------------------------------------------------------------------


def pair_differences(scores: torch.Tensor, pairs: tuple[torch.Tensor, torch.Tensor]):
    """d[p, j] = s_{q_p j} - s_{q_p k_p} for every (query, item) pair p, shape (P, M)."""
    qi, ki = pairs
    rows = scores[qi]
    return rows - scores[qi, ki][:, None]


def not_self_pairs(mask_rows: torch.Tensor, ki: torch.Tensor) -> torch.Tensor:
    """``mask_rows`` (P, M) with each pair's own item k removed (j != k in every rank sum)."""
    out = mask_rows.clone()
    out[torch.arange(ki.shape[0], device=ki.device), ki] = False
    return out


# --------------------------------------------------------------------------------------------
# Smooth-AP
# --------------------------------------------------------------------------------------------


def _smooth_ap_chunk(scores, pos, ranking, tau: float):
    """Smooth-AP of a chunk of queries; returns (c,) per-query AP~ (0 where |P| = 0)."""
    qi, ki = pos.nonzero(as_tuple=True)
    d = pair_differences(scores, (qi, ki))
    sig = sigmoid_step(d, tau)
    competitors = not_self_pairs(ranking[qi], ki)
    zero = sig.new_zeros(())
    rank_all = 1.0 + torch.where(competitors, sig, zero).sum(1)
    rank_pos = 1.0 + torch.where(competitors & pos[qi], sig, zero).sum(1)
    ap = scores.new_zeros(scores.shape[0]).index_add(0, qi, rank_pos / rank_all)
    return ap / pos.sum(1).clamp(min=1)


class SmoothAP(HapkitLoss):
    """Smooth-AP loss (Brown et al., ECCV 2020): 1 - mean smoothed AP over the batch queries.

    Every step of the rank, for positives and negatives alike, is ``sigmoid((s_j - s_k) / tau)``.
    Any label layout works: positives are found per query from the labels. (pytorch-metric-
    learning 2.9.0's ``SmoothAPLoss`` reshapes the batch into class blocks: it rejects unequal
    class counts and is silently wrong unless the batch is sorted by class *and* holds as many
    classes as samples per class.)

    Args:
        tau: sigmoid temperature (paper: 0.01).
        column: label column defining positives (0 = finest).
        exclude_self: drop the query from its own ranking (default False: in the same-set case
            the query is its own top-ranked positive, as in the reference implementations).
        chunk_elements: largest (pairs x gallery) block computed at once (default 2**24 values);
            queries are grouped greedily under it. Memory is O(|P| * M) per query.

    Call: ``loss(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None)`` (PML's
    order; ``indices_tuple`` is ignored) with L2-normalised
    embeddings (B, D) and labels (B, L) or (B,); similarities are dot products. Queries without
    any positive in their ranking (possible with ``exclude_self`` or a reference set) are left
    out of the mean; a batch in which no query has a positive raises
    :class:`~hapkit.losses.base.NoPositiveError`.
    """

    def __init__(
        self,
        tau: float = 0.01,
        column: int = 0,
        exclude_self: bool = False,
        chunk_elements: int | None = None,
    ):
        super().__init__()
        if tau <= 0:
            raise InputError(f"SmoothAP: tau must be > 0, got {tau}")
        self.tau = float(tau)
        self.column = column
        self.exclude_self = exclude_self
        self.chunk_elements = chunk_elements

    def per_query(self, embeddings, labels, ref_emb=None, ref_labels=None):
        """(B,) smoothed AP of every query and (B,) number of positives (0: AP undefined)."""
        with float32_compute(embeddings.device):
            inp = prepare_inputs(embeddings, labels, ref_emb, ref_labels, "SmoothAP")
            ranking = ranking_mask(inp, self.exclude_self)
            pos = binary_positives(inp, self.column, ranking, "SmoothAP")
            scores = inp.embeddings @ inp.ref_emb.T
            n_pos = pos.sum(1)
            budget = chunk_elements_for(self.chunk_elements, scores.device, CHUNK_ELEMENTS, CHUNK_ELEMENTS)
            chunks = list(query_chunks(n_pos, scores.shape[1], budget))
            ap = run_chunked(_smooth_ap_chunk, chunks, scores, pos, ranking, tau=self.tau)
            return ap, n_pos

    def batch_loss(self, embeddings, labels, ref_emb=None, ref_labels=None):
        ap, n_pos = self.per_query(embeddings, labels, ref_emb, ref_labels)
        return reduce_queries(ap, n_pos)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, column={self.column}, exclude_self={self.exclude_self}"
