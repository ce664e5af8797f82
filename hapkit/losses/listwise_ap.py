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

from typing import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from hapkit.losses.base import HapkitLoss, binary_positives, prepare_inputs, ranking_mask, reduce_queries
from hapkit.losses.rank import float32_compute

__all__ = ["ListwiseAP", "multistage_backward", "LISTWISE_AP_PRESETS"]

# Revaud et al.: 25 bins over [0, 1]; ROADMAP / SupRank's baseline runs: 20 bins over [-1, 1].
LISTWISE_AP_PRESETS = {
    "revaud": {"num_bins": 25, "sim_range": (0.0, 1.0)},
    "suprank": {"num_bins": 20, "sim_range": (-1.0, 1.0)},
}

# Guards 0 / 0 in the precision of leading empty bins (the value the paper's code uses).
_EPS = 1e-16


class ListwiseAP(HapkitLoss):
    """Histogram-binned AP loss (Revaud et al., ICCV 2019): 1 - mean binned AP over the queries.

    Args:
        num_bins: Q, number of bins (paper: 25; ROADMAP/SupRank baselines: 20).
        sim_range: (lowest, highest) similarity the bins cover (paper: (0, 1); ROADMAP/SupRank:
            (-1, 1)). Similarities outside it fall entirely into the end bins.
        column: label column defining positives (0 = finest).
        exclude_self: drop the query from its own ranking (default False, see SPEC).

    ``ListwiseAP.from_preset("suprank")`` builds the ROADMAP/SupRank configuration.
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
    ):
        super().__init__()
        if not isinstance(num_bins, int) or num_bins < 2:
            raise ValueError(f"ListwiseAP: num_bins must be an integer >= 2, got {num_bins!r}")
        lo, hi = (float(v) for v in sim_range)
        if not hi > lo:
            raise ValueError(f"ListwiseAP: sim_range must be (lowest, highest), got {sim_range!r}")
        self.num_bins = num_bins
        self.sim_range = (lo, hi)
        self.column = column
        self.exclude_self = exclude_self

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ListwiseAP":
        """``"revaud"`` (25 bins on [0, 1]) or ``"suprank"`` (20 bins on [-1, 1])."""
        if name not in LISTWISE_AP_PRESETS:
            raise ValueError(
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
            member = self.memberships(scores) * ranking.unsqueeze(1)  # (B, Q, M)
            counts = member.sum(-1)  # c_q
            pos_counts = (member * pos.unsqueeze(1)).sum(-1)  # c+_q
            precision = pos_counts.cumsum(-1) / (_EPS + counts.cumsum(-1))
            n_pos = pos.sum(1)
            ap = (precision * pos_counts).sum(-1) / n_pos.clamp(min=1)
            return ap, n_pos

    def batch_loss(self, embeddings, labels, ref_emb=None, ref_labels=None):
        ap, n_pos = self.per_query(embeddings, labels, ref_emb, ref_labels)
        return reduce_queries(ap, n_pos)

    def extra_repr(self) -> str:
        return (
            f"num_bins={self.num_bins}, sim_range={self.sim_range}, column={self.column}, "
            f"exclude_self={self.exclude_self}"
        )


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
        progress: show progress bars over the sub-batches.
    """
    if sub_batch_size < 1:
        raise ValueError(f"multistage_backward: sub_batch_size must be >= 1, got {sub_batch_size}")
    if not isinstance(images, torch.Tensor) or images.dim() == 0 or images.shape[0] == 0:
        raise ValueError("multistage_backward: images must be a non-empty (B, ...) tensor")
    B = images.shape[0]
    slices = [slice(i, min(i + sub_batch_size, B)) for i in range(0, B, sub_batch_size)]
    device = images.device
    snapshot = _buffers_snapshot(model) if restore_buffers else None

    # stage 1: embeddings of the whole batch, no graph kept
    states, parts = [], []
    with torch.no_grad():
        for sl in tqdm(slices, desc="embed", disable=not progress, leave=False):
            if replay_rng:
                states.append(_rng_state(device))
            parts.append(model(images[sl]))
    if snapshot is not None:
        _restore_buffers(model, snapshot)
    after_pass1 = _rng_state(device) if replay_rng else None

    # stage 2: loss and its gradient w.r.t. the embeddings
    embeddings = torch.cat(parts).detach().requires_grad_(True)
    loss = loss_fn(embeddings, labels, **(loss_kwargs or {}))
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise ValueError("multistage_backward: loss_fn must return a scalar tensor")
    (scaler.scale(loss) if scaler is not None else loss).backward()
    grad = embeddings.grad
    if grad is None:
        raise RuntimeError("multistage_backward: the loss does not depend on the embeddings")

    # stage 3: recompute each sub-batch with a graph and push the stored gradient through it
    for i, sl in enumerate(tqdm(slices, desc="backprop", disable=not progress, leave=False)):
        if replay_rng:
            _set_rng_state(states[i], device)
        out = model(images[sl])
        out.backward(grad[sl].to(out.dtype))
    if replay_rng:
        _set_rng_state(after_pass1, device)
    return loss.detach()
