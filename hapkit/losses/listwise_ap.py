"""Listwise AP by histogram binning ("SoftBin"), and multi-stage backpropagation.

Revaud, Almazan, Rezende and de Souza, "Learning with Average Precision: Training Image Retrieval
with a Listwise Loss", ICCV 2019 (arXiv 1906.07589).

Similarities are soft-assigned to Q bins whose centres b_1 > ... > b_Q are evenly spaced from the
highest to the lowest possible similarity, spacing Delta = (max - min) / (Q - 1), with triangular
membership max(0, 1 - |s - b_q| / Delta); the first and last bins saturate (a similarity above
the range counts fully in the top bin, one below it in the bottom bin). From the per-bin counts
of positives c+_q and of all items c_q,

    precision_q = sum_{i <= q} c+_i / sum_{i <= q} c_i,     AP = sum_q precision_q * c+_q / |P|.

Memory is O(B * Q * M): no pairwise (B, M, M) tensor, which is what lets the paper train with
batches of thousands of images, together with :func:`multistage_backward`.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

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
from hapkit.losses.rank import float32_compute

__all__ = ["ListwiseAP", "TieAwareListwiseAP", "multistage_backward", "LISTWISE_AP_PRESETS"]

# Revaud et al. (naver/deep-image-retrieval dirtorch/loss.py APLoss, as their training uses it):
# 25 bins over [0, 1], each query's list without the query itself; ROADMAP / SupRank's baseline
# runs: 20 bins over [-1, 1].
LISTWISE_AP_PRESETS = {
    "revaud": {"num_bins": 25, "sim_range": (0.0, 1.0), "exclude_self": True},
    "suprank": {"num_bins": 20, "sim_range": (-1.0, 1.0)},
}

# Guards 0 / 0 in the precision of leading empty bins (the value the paper's code uses).
_EPS = 1e-16
# Largest (queries x bins x list) block of a chunk when ``chunk_elements`` is None: 2**24 float32
# values (64 MiB per intermediate); a batch of 4,096 then takes 26 chunks of 163 queries.
CHUNK_ELEMENTS = 2**24


class ListwiseAP(HapkitLoss):
    """Histogram-binned AP loss (Revaud et al., ICCV 2019): 1 - mean binned AP over the queries.

    Args:
        num_bins: Q, number of bins (paper: 25; ROADMAP/SupRank baselines: 20).
        sim_range: (lowest, highest) similarity the bins cover (paper: (0, 1); ROADMAP/SupRank:
            (-1, 1)). Similarities outside it fall entirely into the end bins.
        column: label column defining positives (0 = finest).
        exclude_self: drop the query from its own ranking (default False, see docs/definitions.md, 'Batch surrogates').
        chunk_elements: largest (queries x bins x list) block computed at once (default 2**24
            values); chunks are recomputed in the backward pass, so memory stays bounded by one
            chunk whatever the batch size.

    ``ListwiseAP.from_preset("revaud")`` is naver's ``APLoss`` as Revaud et al. train with it
    (the query left out of its own list); ``from_preset("suprank")`` the ROADMAP/SupRank one.
    Call: ``loss(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None)`` (PML's
    order; ``indices_tuple`` is ignored) with L2-normalised
    embeddings; similarities are dot products.
    """

    def __init__(
        self,
        num_bins: int = 25,
        sim_range: Sequence[float] = (0.0, 1.0),
        column: int = 0,
        exclude_self: bool = False,
        chunk_elements: int | None = None,
    ):
        super().__init__()
        if not isinstance(num_bins, int) or num_bins < 2:
            raise InputError(f"ListwiseAP: num_bins must be an integer >= 2, got {num_bins!r}")
        lo, hi = (float(v) for v in sim_range)
        if not hi > lo:
            raise InputError(f"ListwiseAP: sim_range must be (lowest, highest), got {sim_range!r}")
        self.num_bins = num_bins
        self.sim_range = (lo, hi)
        self.column = column
        self.exclude_self = exclude_self
        self.chunk_elements = chunk_elements

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ListwiseAP":
        """``"revaud"`` (25 bins on [0, 1], query excluded) or ``"suprank"`` (20 bins on [-1, 1])."""
        if name not in LISTWISE_AP_PRESETS:
            raise InputError(
                f"unknown ListwiseAP preset {name!r}; choose one of {sorted(LISTWISE_AP_PRESETS)}"
            )
        return cls(**{**LISTWISE_AP_PRESETS[name], **overrides})

    def bin_centres(self, device=None) -> torch.Tensor:
        lo, hi = self.sim_range
        return torch.linspace(hi, lo, self.num_bins, device=device, dtype=torch.float32)

    def memberships(self, scores: torch.Tensor) -> torch.Tensor:
        """(..., Q, M) triangular soft assignment of (..., M) similarities to the bins."""
        lo, hi = self.sim_range
        delta = (hi - lo) / (self.num_bins - 1)
        # clamping into the range makes the end bins saturate (membership 1, no gradient)
        s = scores.clamp(lo, hi).unsqueeze(-2)
        centres = self.bin_centres(scores.device).view(-1, 1)
        return (1.0 - (s - centres).abs() / delta).clamp(min=0.0)

    def per_query(self, embeddings, labels, ref_emb=None, ref_labels=None):
        """(B,) binned AP of every query and (B,) number of positives (0: AP undefined)."""
        with float32_compute(embeddings.device):
            inp = prepare_inputs(embeddings, labels, ref_emb, ref_labels, "ListwiseAP")
            ranking = ranking_mask(inp, self.exclude_self)
            pos = binary_positives(inp, self.column, ranking, "ListwiseAP")
            scores = inp.embeddings @ inp.ref_emb.T
            return self.ap_from_scores(scores, pos, ranking), pos.sum(1)

    def ap_from_scores(self, scores: torch.Tensor, positive: torch.Tensor, ranking: torch.Tensor | None = None):
        """(Q,) binned AP of each row of ``scores`` (Q, M) with boolean ``positive`` (Q, M); only
        the entries of ``ranking`` (default all) are in a row's list. 0 where a row has no positive.
        Computed over chunks of rows (see ``chunk_elements``)."""
        if ranking is None:
            ranking = torch.ones_like(positive)
        budget = chunk_elements_for(self.chunk_elements, scores.device, CHUNK_ELEMENTS, CHUNK_ELEMENTS)
        cost = torch.full((scores.shape[0],), self.num_bins)
        chunks = list(query_chunks(cost, scores.shape[1], budget))
        return run_chunked(self._chunk_ap, chunks, scores, positive, ranking)

    def _chunk_ap(self, scores, positive, ranking):
        member = self.memberships(scores) * ranking.unsqueeze(1)  # (c, bins, M)
        counts = member.sum(-1)  # c_q
        pos_counts = (member * positive.unsqueeze(1)).sum(-1)  # c+_q
        n_pos = positive.sum(1)
        return self._binned_ap(counts, pos_counts, n_pos.to(counts.dtype)) / n_pos.clamp(min=1)

    @staticmethod
    def _binned_ap(counts, pos_counts, n_pos):
        """sum over bins of precision x recall increment, times |P| (the caller divides)."""
        precision = pos_counts.cumsum(-1) / (_EPS + counts.cumsum(-1))
        return (precision * pos_counts).sum(-1)

    def batch_loss(self, embeddings, labels, ref_emb=None, ref_labels=None):
        ap, n_pos = self.per_query(embeddings, labels, ref_emb, ref_labels)
        return reduce_queries(ap, n_pos)

    def extra_repr(self) -> str:
        return (
            f"num_bins={self.num_bins}, sim_range={self.sim_range}, column={self.column}, "
            f"exclude_self={self.exclude_self}"
        )


class TieAwareListwiseAP(ListwiseAP):
    """Tie-aware listwise AP (Revaud et al., ICCV 2019, naver's ``TAPLoss``): the AP expected
    over the random orders of the items that share a bin, instead of counting a bin's items as
    ranked all at once.

    With c_k / c+_k the soft counts of all items / positives in bin k (highest similarity first),
    C_k / C+_k their cumulative sums and C_{k-1} / C+_{k-1} the exclusive ones:

    - ``simplified``: AP = sum_k c+_k (C+_{k-1} + C+_k + 1) / (C_{k-1} + C_k + 1) / |P|;
    - otherwise, with r_k = max(c+_k - 1, 0) / max(c_k - 1, 0):
      AP = sum_k c+_k [c_k r_k + (C+_{k-1} + 1 - r_k (C_{k-1} + 1)) log((C_k + 1) / (C_{k-1} + 1))] / c_k / |P|.

    Other arguments as :class:`ListwiseAP` (defaults: 25 bins on [0, 1], the query in its list;
    ``from_preset("revaud")`` excludes it).
    """

    def __init__(self, num_bins: int = 25, sim_range: Sequence[float] = (0.0, 1.0), column: int = 0,
                 exclude_self: bool = False, chunk_elements: int | None = None, simplified: bool = False):
        super().__init__(num_bins, sim_range, column, exclude_self, chunk_elements)
        self.simplified = bool(simplified)

    def _binned_ap(self, counts, pos_counts, n_pos):
        c, cp = counts, pos_counts
        C, Cp = c.cumsum(-1), cp.cumsum(-1)
        C_before = torch.nn.functional.pad(C[..., :-1], (1, 0))
        Cp_before = torch.nn.functional.pad(Cp[..., :-1], (1, 0))
        if self.simplified:
            return (cp * (Cp_before + Cp + 1) / (C_before + C + 1)).sum(-1)
        eps = 1e-8  # naver's: a bin holding at most one item
        ratio = (cp - 1).clamp(min=0) / ((c - 1).clamp(min=0) + eps)
        terms = cp * (c * ratio + (Cp_before + 1 - ratio * (C_before + 1)) * torch.log((C + 1) / (C_before + 1)))
        return (terms / (c + eps)).sum(-1)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", simplified={self.simplified}"


# --------------------------------------------------------------------------------------------
# Multi-stage backpropagation
# --------------------------------------------------------------------------------------------


def _rng_state(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state, device: torch.device) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def _buffers_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: buf.detach().clone() for name, buf in model.named_buffers()}


def _restore_buffers(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name in snapshot:
                buf.copy_(snapshot[name])


def multistage_backward(
    model: nn.Module,
    images: torch.Tensor,
    labels,
    loss_fn: Callable[..., torch.Tensor],
    sub_batch_size: int,
    *,
    loss_kwargs: dict | None = None,
    scaler=None,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    replay_rng: bool = True,
    restore_buffers: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """Backpropagate a batch-level loss through ``model`` with memory bounded by a sub-batch.

    The three stages of Revaud et al. (ICCV 2019, Sec. 3.3):

    1. embed the whole batch, one sub-batch at a time, without building a graph;
    2. compute ``loss_fn(embeddings, labels, **loss_kwargs)`` on the detached embeddings and its
       gradient with respect to them (parameters of ``loss_fn`` itself, e.g. proxies, get their
       gradients here too);
    3. re-run the network on each sub-batch, with autograd, and backpropagate the stored gradient
       of that sub-batch's embeddings.

    Parameter gradients are accumulated into ``.grad`` (call ``optimizer.zero_grad()`` before and
    ``optimizer.step()`` after, as for a plain ``loss.backward()``); the loss value is returned
    detached. The same ``images`` tensor is fed to both passes, so augmentations must be applied
    before the call.

    The result equals plain full-batch backpropagation whenever the network treats samples
    independently (no batch-norm in train mode). Otherwise:

    - dropout and other random layers: with ``replay_rng`` the CPU (and CUDA) random state in
      force before each sub-batch of pass 1 is restored before the same sub-batch of pass 2, so
      both passes draw the same masks;
    - batch-norm in train mode normalises with the statistics of each *sub-batch* (as "ghost
      batch-norm" would), identically in both passes; with ``restore_buffers`` the buffers
      (running mean / variance, batch counters) are reset after pass 1 so they are updated once
      per sub-batch, not twice. Freezing batch-norm (eval mode), as the HAPPIER/ROADMAP recipes
      do, gives exact full-batch gradients.

    Args:
        model: maps an image sub-batch to its (sub_batch, D) embeddings.
        images: (B, ...) tensor on the model's device.
        labels: (B, L) labels passed to ``loss_fn``.
        loss_fn: a batch loss such as :class:`ListwiseAP`.
        sub_batch_size: images per forward/backward pass of the network.
        loss_kwargs: extra keyword arguments for ``loss_fn`` (e.g. ``ref_emb``, ``ref_labels``).
        scaler: an optional ``torch.amp.GradScaler``; the loss is scaled before stage 2.
        forward: how to embed a sub-batch (default ``model``), e.g. ``model`` under autocast.
        progress: show progress bars over the sub-batches.

    A DistributedDataParallel ``model`` synchronises its gradients once, on the last sub-batch
    (``no_sync`` on the others); the loss may gather the embeddings of every process.
    """
    if sub_batch_size < 1:
        raise InputError(f"multistage_backward: sub_batch_size must be >= 1, got {sub_batch_size}")
    if not isinstance(images, torch.Tensor) or images.dim() == 0 or images.shape[0] == 0:
        raise InputError("multistage_backward: images must be a non-empty (B, ...) tensor")
    B = images.shape[0]
    slices = [slice(i, min(i + sub_batch_size, B)) for i in range(0, B, sub_batch_size)]
    device = images.device
    embed = model if forward is None else forward
    snapshot = _buffers_snapshot(model) if restore_buffers else None

    # stage 1: embeddings of the whole batch, no graph kept
    states, parts = [], []
    with torch.no_grad():
        for sl in tqdm(slices, desc="embed", disable=not progress, leave=False):
            if replay_rng:
                states.append(_rng_state(device))
            parts.append(embed(images[sl]))
    if snapshot is not None:
        _restore_buffers(model, snapshot)
    after_pass1 = _rng_state(device) if replay_rng else None

    # stage 2: loss and its gradient w.r.t. the embeddings
    embeddings = torch.cat(parts).detach().requires_grad_(True)
    loss = loss_fn(embeddings, labels, **(loss_kwargs or {}))
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise InputError("multistage_backward: loss_fn must return a scalar tensor")
    (scaler.scale(loss) if scaler is not None else loss).backward()
    grad = embeddings.grad
    if grad is None:
        raise RuntimeError("multistage_backward: the loss does not depend on the embeddings")

    # stage 3: recompute each sub-batch with a graph and push the stored gradient through it
    no_sync = getattr(model, "no_sync", None)
    for i, sl in enumerate(tqdm(slices, desc="backprop", disable=not progress, leave=False)):
        if replay_rng:
            _set_rng_state(states[i], device)
        last = i == len(slices) - 1
        with no_sync() if (no_sync is not None and not last) else contextlib.nullcontext():
            out = embed(images[sl])
            out.backward(grad[sl].to(out.dtype))
    if replay_rng:
        _set_rng_state(after_pass1, device)
    return loss.detach()
