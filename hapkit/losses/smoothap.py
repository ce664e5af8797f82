"""Smooth-AP: average precision with every ranking step replaced by a sigmoid.

Brown, Xie, Kalogeiton and Zisserman, "Smooth-AP: Smoothing the Path Towards Large-Scale Image
Retrieval", ECCV 2020 (arXiv 2007.12163).

For a query q with positives P (items sharing its label at ``level``) and ranking set G,

    rank(k)  = 1 + sum_{j in G, j != k} sigmoid_tau(s_qj - s_qk)
    rank+(k) = 1 + sum_{j in P, j != k} sigmoid_tau(s_qj - s_qk)
    AP~(q)   = (1 / |P|) sum_{k in P} rank+(k) / rank(k),      loss = 1 - mean_q AP~(q).

The module also holds the batch-ranking helpers shared by hapkit's other pairwise rank losses
(:mod:`hapkit.losses.listwise_ap`, :mod:`hapkit.losses.suprank`): the ranking-set and positive
masks and the "no positive in the batch" check.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from hapkit.losses.base import LossInputs, prepare_inputs, require_other_positive
from hapkit.losses.rank import float32_compute, sigmoid_step

__all__ = ["SmoothAP"]

# Largest (pairs x gallery) block built at once when ``chunk_size`` is None: 2**24 float32
# values = 64 MiB per intermediate tensor.
DEFAULT_MAX_CHUNK_ELEMENTS = 2**24


# --------------------------------------------------------------------------------------------
# Helpers shared by the pairwise rank losses
# --------------------------------------------------------------------------------------------


def check_level(level: int, num_levels: int, loss_name: str) -> None:
    if not isinstance(level, int) or not 0 <= level < num_levels:
        raise ValueError(
            f"{loss_name}: level={level!r} but the labels have {num_levels} level(s); "
            f"level selects the label column that defines positives (0 = finest)"
        )


def ranking_mask(inputs: LossInputs, exclude_self: bool) -> torch.Tensor:
    """(B, M) bool: which reference items take part in each query's ranking.

    In the same-set case the query is its own top-ranked positive by default (SPEC, "Batch
    surrogates"); ``exclude_self`` removes it, as in the evaluation protocol.
    """
    B, M = inputs.embeddings.shape[0], inputs.ref_emb.shape[0]
    mask = torch.ones(B, M, dtype=torch.bool, device=inputs.embeddings.device)
    if inputs.same_set and exclude_self:
        mask.fill_diagonal_(False)
    return mask


def binary_positives(
    inputs: LossInputs, level: int, ranking: torch.Tensor, loss_name: str
) -> torch.Tensor:
    """(B, M) bool: reference items in the ranking that share the query's label at ``level``."""
    check_level(level, inputs.num_levels, loss_name)
    pos = inputs.labels[:, level, None] == inputs.ref_labels[None, :, level]
    require_other_positive(pos, inputs, f"shares its label at level {level}", loss_name)
    return pos & ranking


def query_chunks(
    pairs_per_query: torch.Tensor, gallery_size: int, chunk_size: int | None
) -> Iterator[slice]:
    """Consecutive query slices whose (pairs x gallery) block stays within the memory budget.

    ``chunk_size`` fixes the number of queries per chunk; None picks chunks greedily so that
    each holds at most :data:`DEFAULT_MAX_CHUNK_ELEMENTS` values (at least one query).
    """
    B = pairs_per_query.shape[0]
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of queries, got {chunk_size}")
        for start in range(0, B, chunk_size):
            yield slice(start, min(start + chunk_size, B))
        return
    cost = (pairs_per_query.clamp(min=1) * max(gallery_size, 1)).tolist()
    start, acc = 0, 0
    for i, c in enumerate(cost):
        if i > start and acc + c > DEFAULT_MAX_CHUNK_ELEMENTS:
            yield slice(start, i)
            start, acc = i, 0
        acc += c
    if start < B:
        yield slice(start, B)


def run_chunked(fn: Callable[..., torch.Tensor], chunks: list[slice], *tensors, **static):
    """Concatenate ``fn(*(t[chunk] for t in tensors), **static)`` over query chunks.

    With several chunks and autograd on, each chunk is checkpointed so that only one chunk's
    (pairs x gallery) intermediates are alive at a time, in the backward pass as well.
    """
    outputs = []
    use_ckpt = len(chunks) > 1 and torch.is_grad_enabled()
    for sl in chunks:
        args = [t[sl] for t in tensors]
        if use_ckpt:
            outputs.append(checkpoint(lambda *a: fn(*a, **static), *args, use_reentrant=False))
        else:
            outputs.append(fn(*args, **static))
    return torch.cat(outputs) if outputs else tensors[0].new_zeros(0)


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


class SmoothAP(nn.Module):
    """Smooth-AP loss (Brown et al., ECCV 2020): 1 - mean smoothed AP over the batch queries.

    Every step of the rank, for positives and negatives alike, is ``sigmoid((s_j - s_k) / tau)``.
    Any label layout works: positives are found per query from the labels. (pytorch-metric-
    learning 2.9.0's ``SmoothAPLoss`` reshapes the batch into class blocks: it rejects unequal
    class counts and is silently wrong unless the batch is sorted by class *and* holds as many
    classes as samples per class.)

    Args:
        tau: sigmoid temperature (paper: 0.01).
        level: label column defining positives (0 = finest).
        exclude_self: drop the query from its own ranking (default False: in the same-set case
            the query is its own top-ranked positive, as in the reference implementations).
        chunk_size: queries processed together; None sizes chunks automatically so that the
            (pairs x gallery) block stays below 2**24 values. Memory is O(|P| * M) per query.

    Call: ``loss(embeddings, labels, ref_emb=None, ref_labels=None)`` with L2-normalised
    embeddings (B, D) and labels (B, L) or (B,); similarities are dot products. Queries without
    any positive in their ranking (possible with ``exclude_self`` or a reference set) are left
    out of the mean; a batch in which no query has a positive raises
    :class:`~hapkit.losses.base.NoPositiveError`.
    """

    def __init__(
        self,
        tau: float = 0.01,
        level: int = 0,
        exclude_self: bool = False,
        chunk_size: int | None = None,
    ):
        super().__init__()
        if tau <= 0:
            raise ValueError(f"SmoothAP: tau must be > 0, got {tau}")
        self.tau = float(tau)
        self.level = level
        self.exclude_self = exclude_self
        self.chunk_size = chunk_size

    def per_query(self, embeddings, labels, ref_emb=None, ref_labels=None):
        """(B,) smoothed AP of every query and (B,) number of positives (0: AP undefined)."""
        with float32_compute(embeddings.device):
            inp = prepare_inputs(embeddings, labels, ref_emb, ref_labels, "SmoothAP")
            ranking = ranking_mask(inp, self.exclude_self)
            pos = binary_positives(inp, self.level, ranking, "SmoothAP")
            scores = inp.embeddings @ inp.ref_emb.T
            n_pos = pos.sum(1)
            chunks = list(query_chunks(n_pos, scores.shape[1], self.chunk_size))
            ap = run_chunked(_smooth_ap_chunk, chunks, scores, pos, ranking, tau=self.tau)
            return ap, n_pos

    def forward(self, embeddings, labels, ref_emb=None, ref_labels=None):
        ap, n_pos = self.per_query(embeddings, labels, ref_emb, ref_labels)
        return 1.0 - ap[n_pos > 0].mean()

    def extra_repr(self) -> str:
        return f"tau={self.tau}, level={self.level}, exclude_self={self.exclude_self}"
