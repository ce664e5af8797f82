"""Exact per-query ranking metrics: AP, mAP@R, R@k, P@k, H-AP, NDCG, ASI and AP#v.

Every function takes a chunk of queries at once: a (Q, G) score matrix (higher = more similar)
and per-(query, item) information (a positive mask, a relevance matrix or the shared-level matrix
V of :func:`hapkit.hierarchy.shared_levels`), and returns one float64 value per query. A query
with no positive (no relevant item) gets NaN; callers average with ``nanmean`` and report how many
queries they skipped (:func:`hapkit.evaluate.evaluate` does).

Definitions follow docs/definitions.md, 'Metrics', i.e. the evaluation code of HAPPIER (Ramzi et al.,
"Hierarchical Average Precision Training for Pertinent Image Retrieval", ECCV 2022):

- AP, mAP@R (Musgrave et al., "A Metric Learning Reality Check", ECCV 2020), R@k (recall rate: a
  positive among the top k), P@k;
- H-AP (HAPPIER): H-rank(k) = sum over relevant j ranked at or before k of min(rel(j), rel(k)),
  H-AP = sum_k H-rank(k) / rank(k) / sum_k rel(k); it equals AP for binary relevance;
- NDCG with gain 2**V - 1 over the whole ranking;
- ASI (average set intersection) over the first R positions, R = number of items with V > 0;
  binary ASI at a label column (HAPPIER's ``with_binary_asi``): the same with positives only;
- AP#v, the "exclusive" AP of one level: positives are the items with V == v, items with V > v are
  removed from the ranking.

Ties
----
Among items with equal scores, the item with the lower gallery index ranks first (a stable sort of
the gallery by decreasing score). Every metric here is exact under that order.

How the ranking is computed
---------------------------
Sorting every query's whole gallery costs O(G log G) per query, yet the metrics only need the
rank of the *relevant* items (V > 0): rank(k) = 1 + #{items scoring higher} + #{equal scores with a
lower index}. :func:`rank_relevant` buckets the gallery scores of each query into 2G uniform bins
(a monotone map, so an item in a higher bin always scores higher), counts the items per bin, and
only sorts the relevant items together with the few irrelevant items that share a bin with one of
them. The result, :class:`RankedRelevant`, holds the relevant items of every query in ranking
order with their exact ranks, and every metric is a few vectorised cumulative sums over it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from hapkit.errors import InputError
from hapkit.hierarchy import as_label_tensor
from hapkit.inputs import check_finite

__all__ = [
    "RankedRelevant",
    "Workspace",
    "rank_relevant",
    "rank_by_labels",
    "average_precision",
    "map_at_r",
    "recall_at_k",
    "precision_at_k",
    "h_average_precision",
    "ndcg",
    "asi",
    "binary_asi",
    "ap_exclusive",
    "ranking_metrics",
    "h_rank_table",
    "neighbour_agreement",
    "top1_failures",
]

_F64 = torch.float64


# ----------------------------------------------------------------------------------------------
# Input checks


def _as_scores(scores, name: str = "scores", check: bool = True) -> torch.Tensor:
    s = torch.as_tensor(scores)
    if s.dim() == 1:
        s = s.unsqueeze(0)
    if s.dim() != 2:
        raise InputError(f"{name} must be a (Q, G) matrix (one row per query), got shape {tuple(s.shape)}")
    if not s.dtype.is_floating_point:
        s = s.to(_F64)
    elif s.dtype in (torch.float16, torch.bfloat16):
        # Half-precision bins would be too coarse; the order of the values is kept exactly.
        s = s.float()
    if check:
        check_finite(s, name, undefined="rankings of NaN or infinite scores are undefined",
                     hint="Check the embeddings for NaN/inf (e.g. a diverged model).")
    # Metrics are not differentiable; the ranking writes into preallocated buffers, which autograd refuses.
    return s.detach()


def _as_like(x, scores: torch.Tensor, name: str, dtype=None) -> torch.Tensor:
    t = torch.as_tensor(x, device=scores.device)
    if t.dim() == 1 and scores.shape[0] == 1:
        t = t.unsqueeze(0)
    if tuple(t.shape) != tuple(scores.shape):
        raise InputError(
            f"{name} must have the shape of scores {tuple(scores.shape)} (one entry per query and "
            f"gallery item), got {tuple(t.shape)}"
        )
    return t if dtype is None else t.to(dtype)


def _as_shared(shared_levels, scores: torch.Tensor, name: str = "shared_levels") -> torch.Tensor:
    V = _as_like(shared_levels, scores, name)
    if V.dtype.is_floating_point or V.dtype.is_complex:
        raise InputError(f"{name} must be integer shared levels (hierarchy.shared_levels), got {V.dtype}")
    if V.dtype != torch.bool and V.numel() and int(V.min()) < 0:
        raise InputError(f"{name} must be >= 0 (0 = nothing shared), found {int(V.min())}")
    return V


# ----------------------------------------------------------------------------------------------
# The ranking of the relevant items


@dataclass(frozen=True)
class RankedRelevant:
    """The relevant items (shared level v > 0) of a chunk of queries, each query's in ranking order.

    Dense (Q, R) arrays, R = the largest number of relevant items of a query in the chunk; row q
    holds its ``count[q]`` relevant items first, sorted by rank, then padding:

    - ``shared``: the item's shared level v (> 0; 1 for every positive of a binary metric), 0 =
      padding;
    - ``rank``: its 1-based rank in the query's full ranking (ties: lower gallery index first),
      ``gallery_size + 1`` for padding;
    - ``item``: its gallery index, -1 for padding.

    ``gallery_size[q]`` is the number of items in query q's ranking and ``num_levels`` (L) the
    largest shared level. A binary metric at label column c takes as positives the entries with
    v >= L - c, the ``min_shared`` argument of the metric methods. Build it with :func:`rank_relevant`; the metric methods return one float64 value per
    query (NaN where the query has no positive for that metric).
    """

    shared: torch.Tensor
    rank: torch.Tensor
    item: torch.Tensor
    count: torch.Tensor
    gallery_size: torch.Tensor
    num_levels: int

    @property
    def num_queries(self) -> int:
        return self.shared.shape[0]

    # -- shared intermediate results (computed once per object) --------------------------------
    #
    # Every level is handled at once: (Q, L, R) float64 tensors hold, for v = 1..L, the indicator
    # of the level-v entries, its running count along the ranking, and the running count of the
    # entries at level >= v. On a CPU, operations on boolean masks (torch.where, bool x float
    # products, cumulative sums of booleans) run several times slower than float arithmetic:
    # masks become float64 0/1 indicators (exact for counts) through a uint8 view.

    def _memo(self, key, fn):
        memo = self.__dict__.setdefault("_memo_", {})  # frozen dataclass: no attribute assignment
        if key not in memo:
            memo[key] = fn()
        return memo[key]

    def _levels(self) -> torch.Tensor:
        """(Q, L, R): 1 where entry i is at shared level exactly v + 1."""

        def make():
            lv = torch.arange(1, self.num_levels + 1, device=self.shared.device)
            return _indicator(self.shared[:, None, :] == lv[None, :, None])

        return self._memo("levels", make)

    def _running(self) -> torch.Tensor:
        """(Q, L, R): entries at level exactly v + 1 among the first i + 1."""
        return self._memo("running", lambda: self._levels().cumsum(2))

    def _suffix_over_levels(self, x: torch.Tensor) -> torch.Tensor:
        """[:, m - 1] = sum of x[:, v - 1] over the levels v >= m."""
        out = x.clone()
        for v in range(self.num_levels - 2, -1, -1):
            out[:, v] += out[:, v + 1]
        return out

    def _positives(self) -> torch.Tensor:
        """(Q, L, R): 1 where entry i is at shared level >= m, for m = 1..L."""
        return self._memo("positives", lambda: self._suffix_over_levels(self._levels()))

    def _running_positives(self) -> torch.Tensor:
        """(Q, L, R): entries at level >= m among the first i + 1, for m = 1..L."""
        return self._memo("running_positives", lambda: self._suffix_over_levels(self._running()))

    def _column(self, stacked: torch.Tensor, m: int) -> torch.Tensor:
        """Level m of a stacked (Q, L, R) tensor (zeros outside 1..L)."""
        if not 1 <= m <= self.num_levels:
            return torch.zeros(self.shared.shape, dtype=_F64, device=self.shared.device)
        return stacked[:, m - 1]

    def at_level(self, v: int) -> torch.Tensor:
        """(Q, R) float64 indicator of the entries at shared level exactly ``v``."""
        return self._column(self._levels(), v)

    def at_least_level(self, m: int) -> torch.Tensor:
        """(Q, R) float64 indicator of the entries at shared level >= ``m`` (the positives of a
        binary metric; ``m`` <= 1: every relevant entry)."""
        return self._column(self._positives(), max(m, 1))

    def cumulative(self, v: int) -> torch.Tensor:
        """(Q, R) float64: entries at shared level exactly ``v`` among the first i + 1 entries."""
        return self._column(self._running(), v)

    def at_least(self, m: int) -> torch.Tensor:
        """(Q, R) float64: entries at shared level >= ``m`` among the first i + 1 entries."""
        return self._column(self._running_positives(), max(m, 1))

    def _level_totals(self) -> torch.Tensor:
        """(Q, L + 2) int64: entries at exactly each level v (columns 0 and L + 1 stay 0)."""

        def make():
            out = torch.zeros(self.num_queries, self.num_levels + 2, dtype=torch.int64, device=self.shared.device)
            out[:, 1 : self.num_levels + 1] = self._levels().sum(2).to(torch.int64)
            return out

        return self._memo("level_totals", make)

    def _all_totals(self) -> torch.Tensor:
        """(Q, L + 2) int64: [:, m] = entries at level >= m (m = 0 counts from level 1)."""

        def make():
            t = self._level_totals().flip(1).cumsum(1).flip(1)
            t[:, 0] = t[:, 1]
            return t

        return self._memo("all_totals", make)

    def totals(self, min_shared: int = 1) -> torch.Tensor:
        """(Q,) int64: number of entries with v >= min_shared of each query."""
        return self._all_totals()[:, min(max(min_shared, 0), self.num_levels + 1)]

    @property
    def rank_f(self) -> torch.Tensor:
        """``rank`` as float64."""
        return self._memo("rank_f", lambda: self.rank.to(_F64))

    @property
    def inv_rank(self) -> torch.Tensor:
        return self._memo("inv_rank", lambda: self.rank_f.reciprocal())

    def shared_counts(self) -> torch.Tensor:
        """(Q, num_levels + 1) int64: relevant items at exactly each shared level v (column 0 left at 0)."""
        return self._level_totals()[:, : self.num_levels + 1].clone()

    @staticmethod
    def _nan_where(values: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
        return torch.where(empty, torch.full_like(values, float("nan")), values)

    # -- binary metrics (positives: v >= min_shared) ----------------------------------------
    def _precisions(self) -> torch.Tensor:
        """(Q, L, R): #positives up to and including entry i / its rank where i is a positive (else
        0), positives = level >= m, for m = 1..L."""
        return self._memo("precisions", lambda: (self._running_positives() * self.inv_rank[:, None, :]).mul_(self._positives()))

    def _ap_sums(self) -> torch.Tensor:
        """(Q, L + 2) float64: [:, m] = sum of the precisions at the positives of level >= m."""

        def make():
            out = torch.zeros(self.num_queries, self.num_levels + 2, dtype=_F64, device=self.shared.device)
            out[:, 1 : self.num_levels + 1] = self._precisions().sum(2)
            return out

        return self._memo("ap_sums", make)

    def _level_index(self, min_shared: int) -> int:
        return min(max(min_shared, 1), self.num_levels + 1)

    def average_precision(self, min_shared: int = 1) -> torch.Tensor:
        """AP with positives = entries whose shared level v is >= ``min_shared``."""
        npos = self.totals(min_shared)
        ap = self._ap_sums()[:, self._level_index(min_shared)] / npos.clamp(min=1)
        return self._nan_where(ap, npos == 0)

    def map_at_r(self, min_shared: int = 1) -> torch.Tensor:
        """mAP@R: AP restricted to positives ranked within the first R = |P| positions, over R."""

        def make():
            # The entries ranked within the first R positions of a query are a prefix of its
            # entries (sorted by rank): sum the precisions over that prefix, for every level.
            L = self.num_levels
            out = torch.zeros(self.num_queries, L + 2, dtype=_F64, device=self.shared.device)
            if self.shared.shape[1] == 0:
                return out
            npos = self._all_totals()[:, 1 : L + 1]
            prefix = torch.searchsorted(self.rank, npos.contiguous(), right=True)  # (Q, L) entries
            running = self._precisions().cumsum(2)
            out[:, 1 : L + 1] = running.gather(2, (prefix - 1).clamp_(min=0)[:, :, None]).squeeze(2) * (prefix > 0)
            return out

        npos = self.totals(min_shared)
        m = self._memo("map_at_r", make)[:, self._level_index(min_shared)] / npos.clamp(min=1)
        return self._nan_where(m, npos == 0)

    def best_positive_rank(self, min_shared: int = 1) -> torch.Tensor:
        """Rank of the first positive of each query (int64; gallery_size + 1 where none)."""

        def make():
            # entries before a query's first positive: those with no positive up to them
            width = self.shared.shape[1]
            leading = width - self._running_positives().clamp(max=1.0).sum(2).to(torch.int64)
            best = self.rank.gather(1, leading.clamp_(max=max(width - 1, 0))) if width else leading
            out = torch.empty(self.num_queries, self.num_levels + 2, dtype=torch.int64, device=self.shared.device)
            out[:] = (self.gallery_size + 1)[:, None]
            has = self._all_totals()[:, 1 : self.num_levels + 1] > 0
            out[:, 1 : self.num_levels + 1] = torch.where(has, best, out[:, 1 : self.num_levels + 1])
            return out

        return self._memo("best", make)[:, self._level_index(min_shared)]

    def recall_at_k(self, ks: Iterable[int] = (1,), min_shared: int = 1) -> dict[int, torch.Tensor]:
        """R@k (recall rate): 1 if a positive is among the first k items, for each k."""
        empty = self.totals(min_shared) == 0
        best = self.best_positive_rank(min_shared)
        return {k: self._nan_where((best <= k).to(_F64), empty) for k in _check_ks(ks)}

    def precision_at_k(self, ks: Iterable[int] = (1,), min_shared: int = 1) -> dict[int, torch.Tensor]:
        """P@k: fraction of the first k items that are positives, for each k."""
        empty = self.totals(min_shared) == 0
        out = {}
        for k in _check_ks(ks):
            if k == 1:
                hits = (self.best_positive_rank(min_shared) == 1).to(_F64)
            else:
                hits = torch.mul(self.at_least_level(min_shared), _indicator(self.rank <= k)).sum(1)
            out[k] = self._nan_where(hits / k, empty)
        return out

    # -- graded metrics -------------------------------------------------------------------------
    def h_average_precision(self, relevance: torch.Tensor, check: bool = True) -> torch.Tensor:
        """H-AP with ``relevance`` (Q, R) (one value per entry, > 0; padding ignored).

        All entries of one query at one level must share one relevance value (true of every
        relevance built from shared levels). Levels are matched by id (docs/definitions.md, 'H-AP'), so each item is
        counted once even when two levels have equal relevance.
        """
        rel = relevance.to(_F64) * self.at_least_level(1)
        table = torch.zeros(self.num_queries, self.num_levels + 1, dtype=_F64, device=rel.device)
        table.scatter_reduce_(1, self.shared, rel, "amax", include_self=False)
        if check:
            low = torch.zeros_like(table).scatter_reduce_(1, self.shared, rel, "amin", include_self=False)
            if bool((low != table).any()):
                raise InputError(
                    "relevance differs between items of the same query at the same level; H-AP matches "
                    "levels by id, so relevance must be a function of the shared level (as every "
                    "hierarchy.relevance kind is)."
                )
        return self.h_average_precision_of_levels(table)

    def h_average_precision_of_levels(self, level_relevance: torch.Tensor) -> torch.Tensor:
        """H-AP with the relevance of each shared level, (Q, L + 1) (column 0 unused), e.g.
        :func:`hapkit.hierarchy.level_relevance` of :meth:`shared_counts`.

        H-rank(k) = sum over levels v of min(rel_v, rel(k)) * #(level-v items ranked at or before
        k), so sum_k H-rank(k) / rank(k) = sum over levels v, w of min(rel_v, rel_w) * T[v, w] with
        T[v, w] = sum over the level-w entries k of #(level-v items up to k) / rank(k): one batched
        product for every pair of levels.
        """
        L = self.num_levels
        rel = level_relevance.to(_F64)[:, 1 : L + 1]
        T = torch.bmm(self._running() * self.inv_rank[:, None, :], self._levels().transpose(1, 2))
        hsum = (torch.minimum(rel[:, :, None], rel[:, None, :]) * T).sum((1, 2))
        total = (rel * self._level_totals()[:, 1 : L + 1].to(_F64)).sum(1)
        hap = hsum / torch.where(total > 0, total, 1.0)
        return self._nan_where(hap, total <= 0)

    def ndcg(self) -> torch.Tensor:
        """NDCG with gain 2**v - 1 and discount 1 / log2(1 + rank), over the whole ranking."""
        dev = self.shared.device
        L = self.num_levels
        gains = torch.exp2(torch.arange(1, L + 1, dtype=_F64, device=dev)).sub_(1.0)
        discount = torch.log2(self.rank_f + 1.0).reciprocal_()
        dcg = torch.bmm(self._levels(), discount[:, :, None]).squeeze(2) @ gains
        # The ideal ranking puts the levels in decreasing order: level v fills the positions after
        # every item of a higher level, so its discounts are a difference of prefix sums.
        r = self.shared.shape[1]
        disc = torch.zeros(r + 1, dtype=_F64, device=dev)
        disc[1:] = (1.0 / torch.log2(torch.arange(2, r + 2, dtype=_F64, device=dev))).cumsum(0)
        idcg = torch.zeros(self.num_queries, dtype=_F64, device=dev)
        for v in range(L, 0, -1):
            above, upto = self.totals(v + 1), self.totals(v)
            idcg += (2.0**v - 1.0) * (disc[upto] - disc[above])
        out = dcg / torch.where(idcg > 0, idcg, 1.0)
        return self._nan_where(out, idcg <= 0)

    def asi(self) -> torch.Tensor:
        """Average set intersection over the first R positions (R = number of relevant items).

        SI(n) = (1/n) sum_v min(#level-v items in the top n, #level-v items in the ideal top n).
        Only ranks <= R matter, so each query needs R positions, not G.
        """
        Q, r = self.shared.shape
        L = self.num_levels
        dev = self.shared.device
        n = torch.arange(1, r + 1, dtype=_F64, device=dev)
        slot = (self.rank - 1).clamp_(max=r)[:, None, :].expand(Q, L, r)  # beyond R (and padding): dropped
        got = torch.zeros(Q, L, r + 1, dtype=_F64, device=dev).scatter_add_(2, slot, self._levels())
        got = got[:, :, :r].cumsum(2)  # level-v items in the top n
        totals = self._all_totals().to(_F64)
        above = totals[:, 2 : L + 2, None]  # items at a higher level: they come first ideally
        ideal = (n - above).clamp_(min=0)
        ideal = torch.minimum(ideal, totals[:, 1 : L + 1, None] - above, out=ideal)
        si = torch.minimum(got, ideal, out=ideal).sum(1)
        inside = _indicator(self.count[:, None] >= torch.arange(1, r + 1, device=dev))
        out = si.div_(n).mul_(inside).sum(1) / self.count.clamp(min=1)
        return self._nan_where(out, self.count == 0)

    def binary_asi(self, min_shared: int = 1) -> torch.Tensor:
        """ASI with binary relevance (positives: v >= ``min_shared``), HAPPIER's ``with_binary_asi``.

        ASI = (1/|P|) sum_{n=1..|P|} #(positives in the top n) / n. A positive at rank r <= |P| is
        in the top n for n = r..|P|, so it adds H(|P|) - H(r - 1) (H = harmonic numbers) and no
        position loop is needed.
        """
        npos = self.totals(min_shared)
        width = self.shared.shape[1]
        dev = self.shared.device
        harmonic = torch.zeros(width + 1, dtype=_F64, device=dev)
        harmonic[1:] = torch.arange(1, width + 1, dtype=_F64, device=dev).reciprocal_().cumsum_(0)
        inside = self.at_least_level(min_shared) * _indicator(self.rank <= npos[:, None])
        below = harmonic.index_select(0, (self.rank - 1).clamp_(0, width).flatten()).view_as(self.rank_f)
        per_item = (harmonic.index_select(0, npos)[:, None] - below).mul_(inside)
        out = per_item.sum(1) / npos.clamp(min=1)
        return self._nan_where(out, npos == 0)

    def _exclusive_sums(self) -> torch.Tensor:
        """(Q, L + 1) float64: [:, v] = sum over the level-v entries of #(level v up to them) /
        (rank - #(higher levels ahead)), the precision once the higher levels are removed."""

        def make():
            L = self.num_levels
            out = torch.zeros(self.num_queries, L + 1, dtype=_F64, device=self.shared.device)
            running, levels = self._running(), self._levels()
            # level L: nothing is removed, the precision is the AP's
            out[:, L] = torch.mul(running[:, L - 1], self.inv_rank).mul_(levels[:, L - 1]).sum(1)
            if L > 1:
                # >= 1 at level-v entries; elsewhere the quotient is masked out (clamped: no inf * 0)
                kept_rank = torch.sub(self.rank_f[:, None, :], self._running_positives()[:, 1:]).clamp_(min=1.0)
                out[:, 1:L] = kept_rank.reciprocal_().mul_(running[:, : L - 1]).mul_(levels[:, : L - 1]).sum(2)
            return out

        return self._memo("exclusive", make)

    def ap_exclusive(self, v: int) -> torch.Tensor:
        """AP#v: positives = entries with shared level v, entries sharing more removed from the ranking."""
        npert = self.totals(v) - self.totals(v + 1)
        if not 1 <= v <= self.num_levels:
            return torch.full((self.num_queries,), float("nan"), dtype=_F64, device=self.shared.device)
        ap = self._exclusive_sums()[:, v] / npert.clamp(min=1)
        return self._nan_where(ap, npert == 0)


def _indicator(mask: torch.Tensor) -> torch.Tensor:
    """A boolean mask as float64 0/1, through uint8 (much faster than converting booleans)."""
    return mask.view(torch.uint8).to(_F64)


def _check_ks(ks) -> list[int]:
    if isinstance(ks, int):
        ks = (ks,)
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise InputError(f"ks must be positive integers, got {ks}")
    return ks


class Workspace:
    """Scratch tensors reused from one call of :func:`rank_relevant` to the next.

    Chunked evaluation calls :func:`rank_relevant` many times with the same shapes. On CPU, every
    fresh multi-megabyte tensor costs page faults that can take longer than the computation on
    it; reusing the same storage avoids them (GPU allocators cache memory already).
    """

    def __init__(self):
        self._store: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape, dtype: torch.dtype, device) -> torch.Tensor:
        n = math.prod(shape)
        t = self._store.get(name)
        if t is None or t.numel() < n or t.dtype != dtype or t.device != torch.device(device):
            t = torch.empty(n, dtype=dtype, device=device)
            self._store[name] = t
        return t[:n].view(shape)


def _scratch(ws: Workspace | None, name: str, shape, dtype, device) -> torch.Tensor:
    if ws is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return ws.get(name, shape, dtype, device)


def _row_score_order(flat: torch.Tensor, values: torch.Tensor, G: int) -> torch.Tensor:
    """Permutation sorting entries by (row = flat // G, decreasing value, increasing flat index).

    ``flat`` must be increasing. float32 values are turned into order-preserving 32-bit integers
    and packed with the row into one non-negative int64 key (one stable sort); other dtypes take
    two stable sorts.
    """
    if values.dtype == torch.float32:
        bits = (values + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0
        ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # signed integers in the order of the floats
        key = (flat // G) << 32
        key.add_(2**31 - 1).sub_(ordered.to(torch.int64))  # decreasing value, in [0, 2**32) per row
        return torch.argsort(key, stable=True)
    order = torch.argsort(values, descending=True, stable=True)
    return order[torch.argsort(flat[order] // G, stable=True)]


# Scores turned into bins per block of at most this many elements (bounded float scratch).
_BIN_BLOCK_ELEMENTS = 2**22

# Bins per gallery item of the histogram path. More bins leave fewer irrelevant items sharing a
# bin with a relevant one (those are sorted) at the price of longer histograms.
_BINS_PER_ITEM = 2

# The radix path's 16-bit sort keys: scores take the keys -32767..32766 (ascending key =
# decreasing score), the item a query leaves out takes 32767, after everything.
_RADIX_TOP_KEY = 32766.0
_RADIX_SPAN = 65533.0
_RADIX_LEFT_OUT = 32767
# Items sharing a radix bin with a relevant item are compared one neighbour at a time; past this
# many (heavy ties, or one score far from the others) the histogram path takes over.
_RADIX_MAX_RUN = 48


def _check_exclude(exclude, Q: int, G: int, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(rows, items) of the queries that leave one gallery item out, or (None, None)."""
    if exclude is None:
        return None, None
    ex = torch.as_tensor(exclude, device=device).to(torch.int64).flatten()
    if ex.numel() != Q or bool(((ex < -1) | (ex >= G)).any()):
        raise InputError(f"exclude must hold one gallery index (or -1) per query, in [-1, {G})")
    rows = (ex >= 0).nonzero().flatten()
    if rows.numel() == 0:
        return None, None
    return rows, ex.index_select(0, rows)


def _uniform_bins(S: torch.Tensor, rows_x, ex, ws, fill):
    """``fill(block, shifted, scale)`` for blocks of rows: ``shifted`` = scores minus the row's
    lowest, the left-out item set to 0 so that it does not stretch the range, and ``scale`` the
    factor that maps the row's range onto the bins. Rounding is monotone at every step
    (subtract, multiply, truncate), so a higher bin always means a strictly higher score and
    equal scores share a bin: nothing more is needed for exactness."""
    Q, G = S.shape
    lo = S.amin(1, keepdim=True)
    step = max(1, _BIN_BLOCK_ELEMENTS // max(G, 1))  # rows per block: bounded float scratch
    for a in range(0, Q, step):
        b = min(a + step, Q)
        for dtype in (S.dtype, torch.float64):
            shifted = _scratch(ws, "shifted", (b - a, G), dtype, S.device)
            torch.sub(S[a:b].to(dtype), lo[a:b].to(dtype), out=shifted)
            if rows_x is not None:
                inside = (rows_x >= a) & (rows_x < b)
                shifted.view(-1).index_fill_(0, (rows_x[inside] - a) * G + ex[inside], 0.0)
            span = shifted.amax(1, keepdim=True)
            if bool(torch.isfinite(span).all()):
                break  # else the range overflows (scores near the float32 limit): redo in float64
        fill(slice(a, b), shifted, span)


def _radix_entries(S, relevant, rows_x, ex, ws):
    """Relevant items of each query with their exact ranks, by a radix sort of 16-bit bins (CPU).

    Every row is sorted by a 16-bit key, a uniform bin of its score (numpy's stable radix
    argsort, linear in G). An item's position p in that order counts every item of a higher bin
    plus the items of its own bin with a lower index; the items of its own bin, its neighbours
    in the order, are then compared with it one distance at a time to settle the bin exactly.

    Returns ``(row, item, rank, position)`` of the relevant items (item = gallery index,
    position = place in the row's ranking of relevant items), or None when a bin holds too many
    items to settle this way.
    """
    import numpy as np

    Q, G = S.shape
    keys = _scratch(ws, "radix_keys", (Q, G), torch.int16, S.device)

    def fill(rows, shifted, span):
        scale = (_RADIX_SPAN * (1 - 2**-20)) / span  # slightly under: rounding stays inside
        scale = torch.where(torch.isfinite(scale) & (scale > 0), scale, torch.zeros_like(scale))
        keys[rows].copy_(shifted.mul_(scale.neg_()).add_(_RADIX_TOP_KEY))  # truncation: monotone

    _uniform_bins(S, rows_x, ex, ws, fill)
    if rows_x is not None:
        keys.view(-1).index_fill_(0, rows_x * G + ex, _RADIX_LEFT_OUT)
    order = torch.from_numpy(np.argsort(keys.numpy(), axis=1, kind="stable"))
    # The keys in sorted order, each row between two guards that match no score's key, so that
    # walking along a bin stops at the end of the row.
    padded = _scratch(ws, "ranked_keys", (1 + Q * (G + 1),), torch.int16, S.device)
    rows_of_padded = padded[1:].view(Q, G + 1)
    rows_of_padded[:, G] = _RADIX_LEFT_OUT
    padded[0] = _RADIX_LEFT_OUT
    torch.gather(keys, 1, order, out=rows_of_padded[:, :G])
    ranked_relevant = _scratch(ws, "ranked_relevant", (Q, G), torch.bool, S.device)
    torch.gather(relevant, 1, order, out=ranked_relevant)
    order, ranked_relevant = order.view(-1), ranked_relevant.view(-1)
    at = ranked_relevant.nonzero().squeeze(1)  # row * G + position in the row's order
    row = at // G
    base = row * G
    p = at - base
    at_padded = at + row + 1
    key = padded.index_select(0, at_padded)
    item = order.index_select(0, at)
    flat = item + base
    flat_scores = S.reshape(-1)
    n = at.numel()
    before = torch.zeros(n, dtype=torch.int64, device=S.device)  # items of the same bin ahead in the order
    beats = torch.zeros(n, dtype=torch.int64, device=S.device)  # items of the same bin that rank before
    move = torch.zeros(n, dtype=torch.int64, device=S.device)  # change of place among the relevant items
    for side in (-1, 1):
        # the entries whose bin continues at distance d on this side (most items are alone)
        active = (padded.index_select(0, at_padded + side) == key).nonzero().squeeze(1)
        for d in range(1, _RADIX_MAX_RUN + 2):
            if d > 1:
                same = padded.index_select(0, at_padded.index_select(0, active).add_(side * d)) == key.index_select(0, active)
                active = active.index_select(0, same.nonzero().squeeze(1))
            if active.numel() == 0:
                break
            if d > _RADIX_MAX_RUN:
                return None
            where = at.index_select(0, active).add_(side * d)
            other = order.index_select(0, where).add_(base.index_select(0, active))
            mine = flat_scores.index_select(0, flat.index_select(0, active))
            theirs = flat_scores.index_select(0, other)
            # the stable order keeps a bin's items by increasing index: ties go to the left one
            wins = theirs >= mine if side < 0 else theirs > mine
            both = ranked_relevant.index_select(0, where)
            if side < 0:
                before.index_add_(0, active, torch.ones_like(active))
                move.index_add_(0, active, -(both & ~wins).to(torch.int64))
            else:
                move.index_add_(0, active, (both & wins).to(torch.int64))
            beats.index_add_(0, active, wins.to(torch.int64))
    count = torch.bincount(row, minlength=Q)
    first = torch.cumsum(count, 0) - count
    position = torch.arange(n, device=S.device).sub_(first.index_select(0, row)).add_(move)
    return row, item, p.sub_(before).add_(beats).add_(1), position


def _bin_entries(S, relevant, gsize, rows_x, ex, ws):
    """Relevant items of each query with their exact ranks, by a histogram of uniform bins.

    The scores of each query are bucketed into 2G uniform bins; a histogram and its cumulative
    sum give each relevant item the number of items in higher bins, which all score higher. Only
    the relevant items and the items sharing a bin with one of them are sorted (by query, then
    score): that settles the order inside each bin exactly and lists each query's relevant items
    in ranking order. Returns ``(row, item, rank)`` sorted by (row, rank).
    """
    Q, G = S.shape
    flat_r = relevant.view(-1).nonzero().squeeze(1)
    dev = S.device
    i64 = torch.int64
    B = max(_BINS_PER_ITEM * G, 16)
    at_x = None if rows_x is None else rows_x * G + ex
    # Flat bin keys (query * B + bin), in 32 bits when they fit: half the memory traffic.
    kdt = torch.int32 if Q * B < 2**31 else i64
    keys = _scratch(ws, "keys", (Q, G), kdt, dev)

    def fill(rows, shifted, span):
        # Slightly under (B - 1) / range so that rounding cannot push the maximum past bin B - 1.
        scale = ((B - 1) * (1 - 2**-20)) / span
        scale = torch.where(torch.isfinite(scale) & (scale > 0), scale, torch.zeros_like(scale))  # one bin
        keys[rows].copy_(shifted.mul_(scale))  # truncation of values >= 0

    # The left-out item (often the query itself, far above the rest) is put at the bottom, where
    # it is counted out again below.
    _uniform_bins(S, rows_x, ex, ws, fill)
    keys.add_(torch.arange(0, Q * B, B, dtype=kdt, device=dev)[:, None])
    flat_keys = keys.view(-1)

    cdt = torch.int32 if G < 2**31 else i64
    hist = _scratch(ws, "hist", (Q * B,), cdt, dev).zero_()
    hist.index_add_(0, flat_keys, torch.ones(1, dtype=cdt, device=dev).expand(Q * G))
    if at_x is not None:
        hist.index_add_(0, flat_keys.index_select(0, at_x), torch.full((at_x.numel(),), -1, dtype=cdt, device=dev))
    # Items in a bin at or below each bin: everything in a higher bin scores higher.
    at_or_below = hist.view(Q, B).cumsum_(1)

    # The items sharing a bin with a relevant item (the relevant items included) are the only
    # ones whose order must be settled by comparing scores.
    occupied = _scratch(ws, "occupied", (Q * B,), torch.bool, dev).zero_()
    occupied.index_fill_(0, flat_keys.index_select(0, flat_r).to(i64), True)
    near = _scratch(ws, "near", (Q * G,), torch.bool, dev)
    torch.index_select(occupied, 0, flat_keys, out=near)
    if at_x is not None:
        near.index_fill_(0, at_x, False)
    flat_u = near.nonzero().squeeze(1)  # increasing flat indices
    # Sort them by (query, decreasing score, increasing index): within a query the bins follow
    # the scores, so each bin becomes a contiguous group, and the relevant items come in
    # ranking order.
    flat_u = flat_u.index_select(0, _row_score_order(flat_u, S.reshape(-1).index_select(0, flat_u), G))
    group = flat_keys.index_select(0, flat_u)
    n = flat_u.numel()
    new_group = torch.ones(n, dtype=torch.bool, device=dev)
    torch.ne(group[1:], group[:-1], out=new_group[1:])
    # Items ahead of each one inside its bin: its index minus the index where its bin starts.
    ahead = torch.arange(n, device=dev)
    ahead -= new_group.nonzero().squeeze(1).index_select(0, new_group.cumsum(0).sub_(1))
    keep = relevant.view(-1).index_select(0, flat_u).nonzero().squeeze(1)
    flat_k = flat_u.index_select(0, keep)
    row_k = flat_k // G
    rank_k = at_or_below.view(-1).index_select(0, group.index_select(0, keep)).to(i64)
    rank_k = (gsize.index_select(0, row_k) + 1).sub_(rank_k).add_(ahead.index_select(0, keep))
    return row_k, flat_k - row_k * G, rank_k


def _ranked(S, relevant, shared_at, rows_x, ex, num_levels: int, ws) -> RankedRelevant:
    """The :class:`RankedRelevant` of ``relevant`` items (a (Q, G) boolean scratch mask, the left-out
    items already cleared); ``shared_at(row, item)`` gives their shared levels."""
    Q, G = S.shape
    dev = S.device
    i64 = torch.int64
    gsize = torch.full((Q,), G, dtype=i64, device=dev)
    if rows_x is not None:
        gsize[rows_x] -= 1
    count = relevant.sum(1)
    width = int(count.max()) if Q else 0
    out_shared = torch.zeros(Q, width, dtype=i64, device=dev)
    rank = (gsize + 1)[:, None].expand(Q, width).clone()
    item = torch.full((Q, width), -1, dtype=i64, device=dev)
    if width == 0:
        return RankedRelevant(out_shared, rank, item, count, gsize, num_levels)
    found = _radix_entries(S, relevant, rows_x, ex, ws) if dev.type == "cpu" else None
    if found is None:
        row_k, item_k, rank_k = _bin_entries(S, relevant, gsize, rows_x, ex, ws)
        # Relevant entries are grouped by query, in ranking order: position = entry - query's first.
        first = torch.cumsum(count, 0) - count
        position = torch.arange(row_k.numel(), device=dev).sub_(first.index_select(0, row_k))
    else:
        row_k, item_k, rank_k, position = found
    dst = position.add_(row_k * width)
    out_shared.view(-1).index_copy_(0, dst, shared_at(row_k, item_k))
    rank.view(-1).index_copy_(0, dst, rank_k)
    item.view(-1).index_copy_(0, dst, item_k)
    return RankedRelevant(out_shared, rank, item, count, gsize, num_levels)


def rank_relevant(
    scores,
    shared,
    exclude=None,
    num_levels: int | None = None,
    check: bool = True,
    workspace: Workspace | None = None,
) -> RankedRelevant:
    """Exact ranks of the relevant items (``shared > 0``) in each query's full ranking.

    Args:
        scores: (Q, G) similarities, higher first; ties go to the lower gallery index.
        shared: (Q, G) integer shared levels v (or a boolean positive mask); items with v = 0 are
            not relevant but still take part in the ranking.
        exclude: optional (Q,) gallery index to drop from each query's ranking (-1: none), e.g. the
            query itself in the same-set protocol.
        num_levels: largest shared level (default: the largest present).
        check: validate the inputs (finite scores, shared >= 0); callers that already did skip it.
        workspace: a :class:`Workspace` to reuse scratch memory over repeated calls.

    No gallery is fully sorted by score. On a CPU, each row is sorted by a 16-bit uniform bin of
    its scores with a linear-time radix sort, and only the items sharing a bin with a relevant
    item are compared by score. Elsewhere (GPU), a histogram of 2G uniform bins counts the items
    ahead of each relevant item and only the relevant items and their bin neighbours are sorted.
    Both give the same exact ranks. Memory is O(Q * G).
    """
    S = _as_scores(scores, check=check)
    lv = _as_shared(shared, S, "shared") if check else shared
    Q, G = S.shape
    ws = workspace
    relevant = _scratch(ws, "relevant", (Q, G), torch.bool, S.device)
    if lv.dtype == torch.bool:
        relevant.copy_(lv)
    else:
        torch.gt(lv, 0, out=relevant)
    rows_x, ex = _check_exclude(exclude, Q, G, S.device)
    if rows_x is not None:
        relevant.view(-1).index_fill_(0, rows_x * G + ex, False)
    if num_levels is None:
        num_levels = int(lv.max()) if (lv.numel() and lv.dtype != torch.bool) else 1
    if lv.dtype == torch.bool:
        shared_at = lambda row, item: torch.ones(row.numel(), dtype=torch.int64, device=S.device)  # noqa: E731
    else:
        shared_at = lambda row, item: lv.reshape(-1).index_select(0, row * G + item).to(torch.int64)  # noqa: E731
    return _ranked(S, relevant, shared_at, rows_x, ex, max(int(num_levels), 1), ws)


def rank_by_labels(
    scores,
    query_labels: torch.Tensor,
    gallery_labels: torch.Tensor,
    exclude=None,
    workspace: Workspace | None = None,
) -> RankedRelevant:
    """:func:`rank_relevant` with the shared levels of (Q, L) and (G, L) tree labels, finest first.

    For tree labels an item is relevant (V > 0) exactly when it shares the query's coarsest label,
    so the (Q, G) matrix V is never built: one comparison finds the relevant items and V is
    counted for them alone. Gallery rows of -1 (distractors) share nothing. ``scores`` must be
    finite (not checked).
    """
    S = _as_scores(scores, check=False)
    Q, G = S.shape
    dev = S.device
    q = torch.as_tensor(query_labels).to(dev)
    g = torch.as_tensor(gallery_labels).to(dev)
    L = int(q.shape[1])
    relevant = _scratch(workspace, "relevant", (Q, G), torch.bool, dev)
    torch.eq(q[:, L - 1, None], g[None, :, L - 1], out=relevant)
    rows_x, ex = _check_exclude(exclude, Q, G, dev)
    if rows_x is not None:
        relevant.view(-1).index_fill_(0, rows_x * G + ex, False)

    def shared_at(row, item):
        # the coarsest label is shared (that is what relevant means); count the finer ones
        shared = torch.ones(row.numel(), dtype=torch.int64, device=dev)
        for c in range(L - 1):
            shared += q[:, c].index_select(0, row) == g[:, c].index_select(0, item)
        return shared

    return _ranked(S, relevant, shared_at, rows_x, ex, L, workspace)


# ----------------------------------------------------------------------------------------------
# Functional metrics


def _rank_binary(scores, positive_mask) -> RankedRelevant:
    S = _as_scores(scores)
    P = _as_like(positive_mask, S, "positive_mask")
    if P.dtype != torch.bool:
        if P.dtype.is_floating_point and bool(((P != 0) & (P != 1)).any()):
            raise InputError("positive_mask must be boolean (or 0/1); use h_average_precision for graded relevance")
        P = P != 0
    return rank_relevant(S, P, num_levels=1)


def average_precision(scores, positive_mask) -> torch.Tensor:
    """Binary average precision of each query, (Q,) float64, NaN where a query has no positive.

    AP = (1/|P|) sum_{k in P} |{j in P : rank(j) <= rank(k)}| / rank(k); ties go to the lower
    gallery index. Equals scikit-learn's ``average_precision_score`` on tie-free scores.
    """
    return _rank_binary(scores, positive_mask).average_precision(1)


def map_at_r(scores, positive_mask) -> torch.Tensor:
    """mAP@R (Musgrave et al., ECCV 2020): AP over the first R = |P| positions, divided by R."""
    return _rank_binary(scores, positive_mask).map_at_r(1)


def recall_at_k(scores, positive_mask, ks: Sequence[int] = (1,)) -> dict[int, torch.Tensor]:
    """Recall rate R@k for each k: 1.0 if a positive is among the first k items, else 0.0."""
    return _rank_binary(scores, positive_mask).recall_at_k(ks)


def precision_at_k(scores, positive_mask, ks: Sequence[int] = (1,)) -> dict[int, torch.Tensor]:
    """P@k for each k: fraction of positives among the first k items (P@1 == R@1)."""
    return _rank_binary(scores, positive_mask).precision_at_k(ks)


def h_average_precision(scores, relevance, shared_levels=None) -> torch.Tensor:
    """Hierarchical average precision (HAPPIER, Ramzi et al., ECCV 2022), (Q,) float64.

    H-rank(k) = sum_{j : rel(j) > 0, rank(j) <= rank(k)} min(rel(j), rel(k)) and
    H-AP = sum_{k : rel(k) > 0} H-rank(k) / rank(k) / sum_k rel(k).

    Args:
        scores: (Q, G) similarities.
        relevance: (Q, G) non-negative relevance, e.g. :func:`hapkit.hierarchy.relevance`; a 0/1
            relevance gives the binary AP.
        shared_levels: optional (Q, G) V matrix. When given, items are grouped by level id
            (relevance must be a function of V for each query); otherwise by relevance value, at
            a cost that grows with the number of distinct values (few for graded relevance).
            Both follow the formula above exactly; the reference code's double counting of two
            levels with equal relevance values is not reproduced (docs/definitions.md, 'H-AP').
    """
    S = _as_scores(scores)
    rel = _as_like(relevance, S, "relevance", _F64)
    if rel.numel() and bool((rel < 0).any() | ~torch.isfinite(rel).all()):
        raise InputError("relevance must be finite and >= 0")
    positive = rel > 0
    if shared_levels is not None:
        V = _as_shared(shared_levels, S).to(torch.int64)
        if bool((positive & (V == 0)).any()):
            raise InputError("relevance is > 0 for an item with shared level 0; items sharing nothing must have relevance 0")
        groups = torch.where(positive, V, torch.zeros_like(V))
    else:
        # Group by distinct relevance value: within a group min(rel_j, rel_k) is a constant.
        values, inverse = torch.unique(rel[positive], return_inverse=True)
        groups = torch.zeros(S.shape, dtype=torch.int64, device=S.device)
        groups[positive] = inverse + 1
    rr = rank_relevant(S, groups)
    return rr.h_average_precision(rel.gather(1, rr.item.clamp(min=0)), check=shared_levels is not None)


def ndcg(scores, shared_levels) -> torch.Tensor:
    """NDCG over the whole ranking with gain 2**V - 1 (V = shared levels), discount 1/log2(1+rank).

    Normalised by the ideal (decreasing V) ordering. Equals scikit-learn's ``ndcg_score`` with
    those gains on tie-free scores (scikit-learn averages the gains of tied items instead).
    """
    S = _as_scores(scores)
    return rank_relevant(S, _as_shared(shared_levels, S)).ndcg()


def asi(scores, shared_levels, num_levels: int | None = None) -> torch.Tensor:
    """Average set intersection (ASI) over the first R positions, R = #items with V > 0.

    SI(n) = (1/n) sum_v min(#items of level v in the top n, #items of level v in the ideal top n)
    and ASI = (1/R) sum_{n=1..R} SI(n). ``num_levels`` (L) defaults to the largest V present.
    """
    S = _as_scores(scores)
    V = _as_shared(shared_levels, S)
    if num_levels is not None and V.numel() and int(V.max()) > num_levels:
        raise InputError(f"shared_levels has a value {int(V.max())} > num_levels={num_levels}")
    return rank_relevant(S, V, num_levels=num_levels).asi()


def binary_asi(scores, positive_mask) -> torch.Tensor:
    """ASI with binary relevance (HAPPIER's ``with_binary_asi``), (Q,) float64, NaN without positive.

    ASI = (1/|P|) sum_{n=1..|P|} #(positives among the first n items) / n.
    """
    return _rank_binary(scores, positive_mask).binary_asi(1)


def ap_exclusive(scores, shared_levels, v: int) -> torch.Tensor:
    """AP#v (HAPPIER): the AP of level v alone.

    Positives are the items with V == v; items with V > v are removed from the ranking, so the
    precision at a positive is #(V == v up to it) / #(V <= v up to it).
    """
    if int(v) < 1:
        raise InputError(f"AP#v needs a level v >= 1, got {v}")
    S = _as_scores(scores)
    return rank_relevant(S, _as_shared(shared_levels, S)).ap_exclusive(int(v))


# ----------------------------------------------------------------------------------------------
# One explicit ranking (tutorials, hand-worked examples)


def _ranking_inputs(ranked_shared, num_levels, relevance, alpha, weights, count_query):
    from hapkit.hierarchy import relevance as make_relevance

    V = torch.as_tensor(list(ranked_shared), dtype=torch.int64).view(1, -1)
    if V.numel() == 0:
        raise InputError("the ranking is empty")
    if num_levels is None:
        num_levels = max(int(V.max()), 1)
    if int(V.min()) < 0 or int(V.max()) > num_levels:
        raise InputError(f"shared levels must lie in 0..{num_levels}, got {V.flatten().tolist()}")
    scores = -torch.arange(V.shape[1], dtype=_F64).view(1, -1)  # position i has rank i + 1
    if isinstance(relevance, str):
        rel = make_relevance(V, num_levels, kind=relevance, alpha=alpha, weights=weights, count_query=count_query)
    else:
        rel = torch.as_tensor(list(relevance), dtype=_F64).view(1, -1)
    return V, scores, rel, num_levels


def ranking_metrics(
    ranked_shared: Sequence[int],
    num_levels: int | None = None,
    relevance: str | Sequence[float] = "pop",
    alpha: float = 1.0,
    weights: Sequence[float] | None = None,
    count_query: bool = False,
    ks: Sequence[int] = (1,),
) -> dict[str, float]:
    """Every metric of one explicit ranking, given as the shared level V of each item in rank order.

    ``ranked_shared=[2, 0, 1, 2]`` reads "rank 1 shares 2 levels with the query, rank 2 nothing...".
    Binary metrics use level c (0 = finest) with positives V >= num_levels - c; names as in
    :func:`hapkit.evaluate.evaluate` (``H-AP``, ``AP@0``, ``R@1@0``...). ``relevance`` is a
    :func:`hapkit.hierarchy.relevance` kind or one value per item.
    """
    V, S, rel, L = _ranking_inputs(ranked_shared, num_levels, relevance, alpha, weights, count_query)
    rr = rank_relevant(S, V, num_levels=L)
    out = {
        "H-AP": float(h_average_precision(S, rel, V if isinstance(relevance, str) else None)[0]),
        "ASI": float(rr.asi()[0]),
        "NDCG": float(rr.ndcg()[0]),
    }
    for c in range(L):
        m = L - c
        out[f"AP@{c}"] = float(rr.average_precision(m)[0])
        out[f"mAP@R@{c}"] = float(rr.map_at_r(m)[0])
        out[f"P@1@{c}"] = float(rr.precision_at_k((1,), m)[1][0])
        for k, r in rr.recall_at_k(ks, m).items():
            out[f"R@{k}@{c}"] = float(r[0])
    for v in range(1, L + 1):
        out[f"AP#{v}"] = float(rr.ap_exclusive(v)[0])
    return out


def h_rank_table(
    ranked_shared: Sequence[int],
    num_levels: int | None = None,
    relevance: str | Sequence[float] = "pop",
    alpha: float = 1.0,
    weights: Sequence[float] | None = None,
    count_query: bool = False,
):
    """H-AP step by step for one explicit ranking, as a pandas DataFrame (one row per position).

    Columns: ``rank``, ``V``, ``rel``, ``H-rank`` (sum of min(rel_j, rel_k) over j ranked at or
    before k), ``H-rank/rank``, ``positive rank`` and ``precision`` (binary, finest level). The
    H-AP is ``table["H-rank/rank"].sum() / table["rel"].sum()``.
    """
    import pandas as pd

    V, _, rel, L = _ranking_inputs(ranked_shared, num_levels, relevance, alpha, weights, count_query)
    v, r = V[0], rel[0]
    n = v.numel()
    ranks = torch.arange(1, n + 1, dtype=_F64)
    before = torch.ones(n, n, dtype=torch.bool).tril()  # [k, j]: j ranked at or before k
    hrank = (torch.minimum(r[None, :], r[:, None]) * (r[None, :] > 0) * before).sum(1)
    hrank = torch.where(r > 0, hrank, torch.zeros_like(hrank))
    fine = (v == L).to(_F64)
    pos_rank = fine.cumsum(0)
    return pd.DataFrame(
        {
            "rank": ranks.long().numpy(),
            "V": v.numpy(),
            "rel": r.numpy(),
            "H-rank": hrank.numpy(),
            "H-rank/rank": (hrank / ranks).numpy(),
            "positive rank": torch.where(fine > 0, pos_rank, torch.zeros_like(pos_rank)).long().numpy(),
            "precision": torch.where(fine > 0, pos_rank / ranks, torch.zeros_like(ranks)).numpy(),
        }
    )


# ----------------------------------------------------------------------------------------------
# Neighbourhoods


def _neighbour_inputs(labels, neighbours, gallery_labels):
    q = as_label_tensor(labels, "labels")
    g = q if gallery_labels is None else as_label_tensor(gallery_labels, "gallery_labels")
    if g.shape[1] != q.shape[1]:
        raise InputError(f"labels have {q.shape[1]} level(s) but gallery_labels have {g.shape[1]}")
    nb = torch.as_tensor(neighbours, dtype=torch.int64)
    if nb.dim() == 1:
        nb = nb.unsqueeze(1)
    if nb.dim() != 2 or nb.shape[0] != q.shape[0]:
        raise InputError(f"neighbours must be a ({q.shape[0]}, k) index matrix, one row per labelled item; "
                         f"got shape {tuple(nb.shape)}")
    if nb.numel() and (int(nb.max()) >= g.shape[0] or int(nb.min()) < -1):
        raise InputError(f"neighbour indices must lie in [0, {g.shape[0]}) (-1 = no neighbour)")
    return q, g, nb


def neighbour_agreement(labels, neighbours, gallery_labels=None) -> torch.Tensor:
    """(L,) float64: for each label column c, the fraction of the listed neighbours of each item
    that share its label at c, averaged over the items (the per-level organisation of an
    embedding space: same-variant, same-shape and same-family neighbours).

    ``neighbours`` is (N, k) indices into ``gallery_labels`` (default: ``labels`` themselves),
    e.g. from :func:`hapkit.evaluate.nearest_neighbours`; -1 entries (no neighbour) are ignored.
    """
    q, g, nb = _neighbour_inputs(labels, neighbours, gallery_labels)
    valid = nb >= 0
    counts = valid.sum(1).clamp(min=1).to(_F64)
    neighbour_labels = g[nb.clamp(min=0)]  # (N, k, L)
    same = (neighbour_labels == q[:, None, :]) & valid[:, :, None]
    per_item = same.sum(1).to(_F64) / counts[:, None]
    has = valid.any(1)
    return per_item[has].mean(0) if bool(has.any()) else torch.full((q.shape[1],), math.nan, dtype=_F64)


def top1_failures(labels, top1, gallery_labels=None) -> torch.Tensor:
    """(L,) int64 counts of the items whose nearest neighbour ``top1`` is not of their fine class,
    by the number of levels v = 0 .. L-1 that neighbour shares with them (v = 0: another coarsest
    label, the most severe mistake; v = L-1: a sibling fine class)."""
    q, g, nb = _neighbour_inputs(labels, top1, gallery_labels)
    first = nb[:, 0]
    valid = first >= 0
    V = (g[first[valid]] == q[valid]).sum(1)
    L = q.shape[1]
    return torch.bincount(V[V < L], minlength=L)[:L]
