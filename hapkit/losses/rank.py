"""Smoothed step functions and smoothed ranks shared by the rank losses.

The rank of item k for query q is 1 + sum_j step(s_qj - s_qk). Replacing the step by a smooth
function gives a differentiable rank; which smooth function decides whether the surrogate bounds
the true metric (docs/definitions.md, 'Step functions').

The HAPPIER (H-AP) and ROADMAP (SupAP) surrogates share one structure, implemented here once:
every item j that is *less* relevant than k competes through the upper-bound step, every other
item through the exact step. With graded relevance given per level (binary AP is the one-level
case) the surrogate is

    rank~(q, k)   = 1 + sum_{j != k, lev_j <  lev_k} upper_step(s_qj - s_qk)
                      + sum_{j != k, lev_j >= lev_k} H(s_qj - s_qk)
    H-rank(q, k)  = sum_{j, s_qj >= s_qk} min(rel_k, rel_j)          (j = k included)
    H-AP~(q)      = sum_k H-rank(q, k) / rank~(q, k) / sum_k rel_k

Written as in the reference code this needs (Q, M, M) tensors, gigabytes at a batch of 512. Here
the exact parts are counts obtained by sorting (the exact step carries no gradient), and only the
upper-step sums touch pairs, in chunks that fit in cache, through an autograd Function whose
backward recomputes the pairs instead of storing them. Peak memory is O(Q * M) and the pair work
is restricted to (k relevant, j less relevant), which is what H-AP needs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from hapkit.errors import InputError
from hapkit.losses.base import LossInputs, chunk_elements_for, require_other_positive

__all__ = [
    "sigmoid_step",
    "upper_step",
    "upper_step_derivative",
    "heaviside_step",
    "UpperStep",
    "DEFAULT_STEP",
    "upper_rank_sum",
    "exact_shared_counts",
    "smooth_hap",
    "float32_compute",
    "check_has_positive",
]

# Elements per pair tensor in a chunk: 2**18 float32 = 1 MiB, small enough to stay in cache on a
# CPU (several times faster than streaming big tensors through memory) and large enough to keep
# per-chunk Python overhead negligible; a GPU gets a larger default.
CPU_CHUNK_ELEMENTS = 2**18
GPU_CHUNK_ELEMENTS = 2**24


def sigmoid_step(d: torch.Tensor, tau: float) -> torch.Tensor:
    """sigmoid(d / tau) with the exponent clamped to [-50, 50] (Smooth-AP's relaxation)."""
    return torch.sigmoid((d / tau).clamp(-50.0, 50.0))


def heaviside_step(d: torch.Tensor) -> torch.Tensor:
    """Exact step H(d) = 1 for d >= 0, else 0, carrying no gradient (as in the reference code)."""
    return (d >= 0).to(d.dtype)


@dataclass(frozen=True)
class UpperStep:
    """Parameters of :func:`upper_step`; defaults are HAPPIER's SOP config and ROADMAP's.

    iNaturalist configs of HAPPIER use ``start=0.0, offset=1.0`` (then the step is not an upper
    bound of the Heaviside step on (0, delta], nor the surrogate a bound of the metric).
    """

    tau: float = 0.01
    rho: float = 100.0
    delta: float = 0.05
    start: float = 0.5
    offset: float = 1.44
    paper_branch: bool = False

    def __post_init__(self):
        if not self.tau > 0:
            raise InputError(f"upper step: tau must be > 0, got {self.tau}")
        if not self.delta >= 0:
            raise InputError(f"upper step: delta must be >= 0, got {self.delta}")
        if not self.rho >= 0:
            raise InputError(f"upper step: rho must be >= 0 (the step must not decrease), got {self.rho}")

    def __call__(self, d: torch.Tensor) -> torch.Tensor:
        return upper_step(d, self.tau, self.rho, self.delta, self.start, self.offset, self.paper_branch)

    def derivative(self, d: torch.Tensor) -> torch.Tensor:
        return upper_step_derivative(d, self.tau, self.rho, self.delta)

    # The two hot loops below compute the branches with 0/1 float indicators (sign of a relu)
    # instead of boolean masks and torch.where: on CPU, masked kernels are several times slower
    # than plain arithmetic. The indicators are exact: for float32, fl(a - b) > 0 iff a > b.

    def _pair_sum(self, d: torch.Tensor) -> torch.Tensor:
        """sum over the last dim of upper_step(d), the hot loop of the forward pass."""
        u = torch.div(d, self.tau).clamp_(-50.0, 50.0).sigmoid_()
        u.add_(d.clamp(min=0.0).sign_(), alpha=self.start)  # start + sigmoid on 0 < d
        above = torch.sub(d, self.delta).relu_()  # d - delta on the linear branch, else 0
        on_line = torch.sign(above)
        u.mul_(torch.rsub(on_line, 1.0))  # the sigmoid branches stop at delta
        # linear branch: rho * (d - delta) + offset, or rho * d + offset (paper branch)
        offset = self.offset + (self.rho * self.delta if self.paper_branch else 0.0)
        return u.sum(-1) + self.rho * above.sum(-1) + offset * on_line.sum(-1)

    def _pair_slope(self, d: torch.Tensor) -> torch.Tensor:
        """:meth:`derivative`, the hot loop of the backward pass.

        Below the clamp (d / tau < -50) the slope is sigmoid(-50) / tau ~ 2e-20 instead of 0.
        """
        u = torch.div(d, self.tau).clamp_(-50.0, 50.0).sigmoid_()
        slope = torch.rsub(u, 1.0).mul_(u).mul_(1.0 / self.tau)
        on_line = torch.sub(d, self.delta).relu_().sign_()
        slope.mul_(torch.rsub(on_line, 1.0))
        return slope.add_(on_line, alpha=self.rho)


# The upper step of HAPPIER's SOP config and of ROADMAP/SupRank: the defaults of every loss and
# figure that uses one (their signatures read them from here).
DEFAULT_STEP = UpperStep()


def upper_step(
    d: torch.Tensor,
    tau: float = DEFAULT_STEP.tau,
    rho: float = DEFAULT_STEP.rho,
    delta: float = DEFAULT_STEP.delta,
    start: float = DEFAULT_STEP.start,
    offset: float = DEFAULT_STEP.offset,
    paper_branch: bool = False,
) -> torch.Tensor:
    """SupRank/ROADMAP step: >= the Heaviside step, so smoothed ranks bound true ranks.

    d <= 0: sigmoid_tau(d); 0 < d <= delta: start + sigmoid_tau(d); d > delta: linear with slope
    rho, rho * (d - delta) + offset (``paper_branch=True``: rho * d + offset, the branch the
    ROADMAP paper's numbers were trained with). The bound needs start >= 0.5 (defaults); HAPPIER's
    iNaturalist config (start = 0, offset = 1) dips below 1 on (0, delta].
    """
    sig = sigmoid_step(d, tau)
    lin = rho * (d if paper_branch else d - delta) + offset
    return torch.where(d <= 0, sig, torch.where(d <= delta, start + sig, lin))


def upper_step_derivative(
    d: torch.Tensor, tau: float = DEFAULT_STEP.tau, rho: float = DEFAULT_STEP.rho, delta: float = DEFAULT_STEP.delta
) -> torch.Tensor:
    """d upper_step / d d: rho on the linear branch, the clamped sigmoid's slope elsewhere.

    Matches autograd through :func:`upper_step` (the clamp stops the gradient where |d / tau| > 50;
    ``start``, ``offset`` and the branch choice do not change the slope).
    """
    z = d / tau
    sig = torch.sigmoid(z.clamp(-50.0, 50.0))
    slope = (sig * (1.0 - sig) / tau).masked_fill_(z.abs() > 50.0, 0.0)
    return torch.where(d > delta, torch.full_like(d, rho), slope)


@dataclass
class _SharedBlock:
    """For one shared level u: per query, the items at u (k) and the less relevant items (j)."""

    items_k: torch.Tensor  # (Q, max_k) column indices, M where padded
    items_j: torch.Tensor  # (Q, max_j) column indices, M where padded
    chunk: int  # queries per chunk


def _plan(shared: torch.Tensor, chunk_elements: int, levels: int | None = None) -> list[_SharedBlock]:
    """Gather indices that group, for every query, items by shared level (one sort for all).

    Items with a negative value are ignored (neither k nor j). Sorting each row by decreasing
    shared level puts level u in a contiguous range and all levels 0..u-1 right after it.
    ``levels`` bounds the shared levels (the number of label levels); without it the largest is
    read from ``shared``.
    """
    Q, M = shared.shape
    device = shared.device
    order = torch.argsort(shared, dim=1, descending=True, stable=True)
    if levels is None:
        levels = int(shared.max()) if shared.numel() else 0
    if levels < 1 or Q == 0 or M == 0:
        return []
    start_k, n_k, n_j = [], [], []
    for u in range(1, levels + 1):
        start_k.append((shared > u).sum(1))
        n_k.append((shared == u).sum(1))
        n_j.append(((shared >= 0) & (shared < u)).sum(1))
    # the block widths size the index tensors: read every level's on the host at once (one
    # synchronisation per call on a GPU instead of two per level)
    widths = torch.stack([torch.stack(n_k).amax(1), torch.stack(n_j).amax(1)], dim=1).tolist()
    blocks = []
    for u, (max_k, max_j) in zip(range(1, levels + 1), widths):
        if max_k == 0 or max_j == 0:
            continue

        def gather(start, count, width):
            pos = start[:, None] + torch.arange(width, device=device)
            idx = order.gather(1, pos.clamp_(max=M - 1))
            return idx.masked_fill_(torch.arange(width, device=device) >= count[:, None], M)

        blocks.append(
            _SharedBlock(
                items_k=gather(start_k[u - 1], n_k[u - 1], max_k),
                items_j=gather(start_k[u - 1] + n_k[u - 1], n_j[u - 1], max_j),
                chunk=max(1, chunk_elements // (max_k * max_j)),
            )
        )
    return blocks


def _padded(scores: torch.Tensor, value: float) -> torch.Tensor:
    return torch.nn.functional.pad(scores, (0, 1), value=value)


class _UpperRankSum(torch.autograd.Function):
    """out[q, k] = sum_{j : 0 <= v_qj < v_qk} upper_step(s_qj - s_qk), backward by recompute."""

    @staticmethod
    def forward(ctx, scores, blocks, step):
        Q, M = scores.shape
        # padded j get -inf: the clamped sigmoid maps them to ~2e-22, invisible next to rank >= 1,
        # with zero slope; padded k write to the extra column, which is dropped
        s_j_all = _padded(scores, float("-inf"))
        s_k_all = _padded(scores, 0.0)
        out = scores.new_zeros(Q, M + 1)
        for b in blocks:
            for q0 in range(0, Q, b.chunk):
                ik, ij = b.items_k[q0 : q0 + b.chunk], b.items_j[q0 : q0 + b.chunk]
                s_k = s_k_all[q0 : q0 + b.chunk].gather(1, ik)
                s_j = s_j_all[q0 : q0 + b.chunk].gather(1, ij)
                sums = step._pair_sum(s_j[:, None, :] - s_k[:, :, None])
                out[q0 : q0 + b.chunk].scatter_(1, ik, sums)
        ctx.save_for_backward(scores)
        ctx.blocks, ctx.step = blocks, step
        return out[:, :M]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        (scores,) = ctx.saved_tensors
        step = ctx.step
        Q, M = scores.shape
        s_j_all = _padded(scores, float("-inf"))
        s_k_all = _padded(scores, 0.0)
        g_all = _padded(grad_out.to(scores.dtype), 0.0)
        grad = scores.new_zeros(Q, M + 1)
        for b in ctx.blocks:
            for q0 in range(0, Q, b.chunk):
                sl = slice(q0, q0 + b.chunk)
                ik, ij = b.items_k[sl], b.items_j[sl]
                s_k = s_k_all[sl].gather(1, ik)
                s_j = s_j_all[sl].gather(1, ij)
                g_k = g_all[sl].gather(1, ik)  # zero where padded
                w = step._pair_slope(s_j[:, None, :] - s_k[:, :, None])  # (c, K, J)
                grad[sl].scatter_add_(1, ij, torch.bmm(g_k[:, None, :], w)[:, 0])
                grad[sl].scatter_add_(1, ik, -g_k * w.sum(-1))
        return grad[:, :M], None, None


def upper_rank_sum(
    scores: torch.Tensor,
    shared: torch.Tensor,
    step: UpperStep = DEFAULT_STEP,
    chunk_elements: int | None = None,
    levels: int | None = None,
) -> torch.Tensor:
    """For each query q and item k: sum over items j with 0 <= shared[q, j] < shared[q, k] of
    ``step(scores[q, j] - scores[q, k])``, differentiable in ``scores``.

    ``scores`` (Q, M) float, ``shared`` (Q, M) integer shared levels, i.e. relevance grades
    (negative = ignore the item). Memory is O(Q * M) plus one chunk of ``chunk_elements`` pairs
    (default 2**18 on CPU, 2**24 on GPU); the backward pass recomputes the pairs with the step's
    analytic derivative instead of storing them. ``levels``: the largest value ``shared`` can
    hold (the number of label levels), which saves reading it from ``shared`` on the host.
    """
    if scores.shape != shared.shape or scores.dim() != 2:
        raise InputError(
            f"scores and shared must both be (Q, M), got {tuple(scores.shape)} and {tuple(shared.shape)}"
        )
    chunk = chunk_elements_for(chunk_elements, scores.device, CPU_CHUNK_ELEMENTS, GPU_CHUNK_ELEMENTS)
    blocks = _plan(shared.long(), chunk, levels)
    return _UpperRankSum.apply(scores, blocks, step)


def _count_scored_at_least(scores: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """c[q, k] = #{j : member[q, j] and scores[q, j] >= scores[q, k]}, exact for ties (H(0) = 1).

    Sorting the members' scores and a binary search: O(Q M log M), no (Q, M, M) comparison.
    """
    M = scores.shape[1]
    # non-members sit at -inf, below every finite score, so they are never counted
    member_scores = scores.masked_fill(~member, float("-inf")).sort(dim=1).values
    return M - torch.searchsorted(member_scores, scores.contiguous(), side="left")


@torch.no_grad()
def exact_shared_counts(scores: torch.Tensor, shared: torch.Tensor, num_levels: int) -> torch.Tensor:
    """n[q, k, v] = #{j : shared[q, j] == v and scores[q, j] >= scores[q, k]} for v in 0..num_levels.

    Item k counts itself. Exact for ties (H(0) = 1), O(Q M log M) per level. Returns int64
    (Q, M, num_levels + 1); no gradient.
    """
    return torch.stack(
        [_count_scored_at_least(scores, shared == v) for v in range(num_levels + 1)], dim=2
    )


def smooth_hap(
    scores: torch.Tensor,
    shared: torch.Tensor,
    shared_relevance: torch.Tensor,
    step: UpperStep = DEFAULT_STEP,
    chunk_elements: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query surrogate H-AP (HAPPIER) with the upper-bound step on less relevant competitors.

    Args:
        scores: (Q, M) similarities of each query to the ranked set.
        shared: (Q, M) integer shared level v of each item for each query, 0 = irrelevant,
            negative = ignored (e.g. the query itself when it is excluded).
        shared_relevance: (Q, L + 1) relevance of each shared level for each query, column 0 = 0.
            Binary AP (ROADMAP's SupAP) is the case L = 1 with relevance [0, 1].
        step: the upper-bound step applied to less relevant competitors.
        chunk_elements: pairs per chunk (default: 2**18 on CPU, 2**24 on GPU).
    Returns:
        (hap, total_relevance): (Q,) surrogate H-AP, a lower bound of the exact H-AP on the same
        scores, and (Q,) sum of relevances (queries where it is 0 have no relevant item and a
        meaningless hap of 0).
    """
    num_levels = shared_relevance.shape[1] - 1
    lev = shared.long()
    rel_levels = shared_relevance.to(scores.dtype)
    rel = rel_levels.gather(1, lev.clamp(min=0)).masked_fill_(lev < 0, 0.0)

    # exact parts, one level at a time to stay O(Q * M): competitors j != k at least as relevant
    # as k, and H-rank = sum over j scored >= s_qk of min(rel_k, rel_j), k itself included
    with torch.no_grad():
        s = scores.detach()
        exact_rank = torch.full_like(s, -1.0)  # k itself is always counted once below
        h_rank = torch.zeros_like(s)
        for v in range(num_levels + 1):
            n_v = _count_scored_at_least(s, lev == v).to(s.dtype)
            exact_rank += n_v * (lev <= v)
            h_rank += torch.minimum(rel, rel_levels[:, v : v + 1]) * n_v
        exact_rank.masked_fill_(lev < 0, 0.0)  # ignored k: h_rank is 0, keep rank >= 1

    rank = 1.0 + exact_rank + upper_rank_sum(scores, lev, step, chunk_elements, levels=num_levels)
    total = rel.sum(1)
    hap = (h_rank / rank).sum(1) / total.clamp(min=torch.finfo(scores.dtype).tiny)
    return hap, total


def float32_compute(device: torch.device):
    """Context in which a loss computes in float32: autocast disabled for ``device``'s type.

    Rank surrogates compare similarities a few 1e-3 apart (tau = 0.01); half precision would
    round many of them to ties.
    """
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a device type without autocast support: nothing to disable
        return contextlib.nullcontext()


def check_has_positive(shared: torch.Tensor, inputs: LossInputs, loss_name: str, what: str) -> None:
    """Raise :class:`NoPositiveError` when no query has a positive (``shared >= 1``) other than itself."""
    require_other_positive(shared >= 1, inputs, f"has a positive ({what})", loss_name)
