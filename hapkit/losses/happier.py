"""HAPPIER, hierarchical average precision training (Ramzi et al., ECCV 2022).

"Hierarchical Average Precision Training for Pertinent Image Retrieval":

- :class:`HAPLoss`: 1 - mean surrogate H-AP over the batch. The rank of a relevant item k uses the
  upper-bound step for competitors less relevant than k and the exact step for the others, so the
  surrogate H-AP is a lower bound of the exact H-AP on the batch (docs/definitions.md, 'HAPPIER: H-AP lower bound').
- :class:`ClusterLoss`: normalised-softmax cross-entropy on the finest labels, which keeps the
  fine classes apart while the H-AP term organises the levels.
- :class:`HAPPIER`: (1 - lambda) * HAPLoss + lambda * ClusterLoss, lambda = 0.1.

Reference semantics for same-batch training (kept as the default): the query is part of its own
ranking, as its own top-ranked positive (V = L, s_qq = 1), and relevance is counted over the batch
(the query included). With ``ref_emb`` (a memory bank, or every device's embeddings), the query is
ranked against the reference set instead; when that set holds every device's batch, the mean over
devices equals the loss of one big batch.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from hapkit.errors import InputError
from hapkit.hierarchy import LabelError, relevance, shared_levels
from hapkit.losses.base import (
    HapkitLoss,
    LossInputs,
    check_column,
    fill_self_,
    labels_checked_here,
    prepare_inputs,
    reduce_queries,
)
from hapkit.losses.rank import DEFAULT_STEP, UpperStep, check_has_positive, float32_compute, smooth_hap

__all__ = ["HAPLoss", "ClusterLoss", "HAPPIER", "batch_relevance"]


def batch_relevance(
    inputs: LossInputs,
    kind: str = "pop",
    alpha: float = 1.0,
    weights: Sequence[float] | None = None,
    exclude_self: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared levels and their relevance over the ranked set, for :func:`rank.smooth_hap`.

    Returns ``shared`` (Q, M) int64 = V(q, k), -1 for the query itself when it is excluded, and
    ``shared_relevance`` (Q, L + 1) float32: the relevance of each shared level v for each query,
    counted over the ranked set (the query included unless excluded), as in the reference
    training code.
    """
    V = shared_levels(inputs.labels, inputs.ref_labels)
    L = inputs.num_levels
    drop_self = exclude_self and inputs.self_offset is not None
    if drop_self:
        Q, M = V.shape
        # the columns of each row but the query's own, as indices: a boolean mask would select
        # the same entries at the cost of a host synchronisation
        keep = torch.arange(M - 1, device=V.device)[None, :]
        others = keep + (keep >= inputs.self_offset + torch.arange(Q, device=V.device)[:, None]).long()
        rel_others = relevance(V.gather(1, others), L, kind, alpha, weights, dtype=torch.float32)
        rel = torch.zeros(V.shape, dtype=torch.float32, device=V.device)
        rel.scatter_(1, others, rel_others)
    else:
        rel = relevance(V, L, kind, alpha, weights, dtype=torch.float32)
    shared = V.long()
    # relevance depends on (query, shared level) only: read one value per level back
    shared_rel = torch.zeros(V.shape[0], L + 1, dtype=torch.float32, device=V.device)
    shared_rel.scatter_reduce_(1, shared, rel, reduce="amax")
    if drop_self:
        fill_self_(shared, inputs, -1)
    return shared, shared_rel


class HAPLoss(HapkitLoss):
    """HAPPIER's H-AP loss: 1 - mean over queries of the surrogate H-AP (Ramzi et al., ECCV 2022).

    For a query q and a relevant item k (V(q, k) >= 1):
      rank~(q, k) = 1 + sum_{j != k} [upper_step(s_qj - s_qk) if V(q, j) < V(q, k) else H(...)]
      H-rank(q, k) = rel(q, k) + sum_{j != k} H(s_qj - s_qk) min(rel(q, k), rel(q, j))
      H-AP~(q) = sum_k H-rank(q, k) / rank~(q, k) / sum_k rel(q, k)
    H-AP~ <= exact H-AP on the batch (for start >= 0.5). Peak memory is O(B * M) and the pair
    work is B x (relevant items) x (less relevant items), see :mod:`hapkit.losses.rank`.

    Args:
        tau, rho, delta, start, offset: the upper-bound step; defaults are the SOP config
            (0.01, 100, 0.05, 0.5, 1.44); the iNaturalist config uses start=0.0, offset=1.0.
        relevance: ``"pop"`` (default, w[v] = v ** alpha / n_q(v)) or ``"map"`` (needs ``weights``).
        alpha: exponent of the ``pop`` weights (1.0 in every official config).
        weights: per-level weights 1..L for ``"map"``.
        exclude_self: drop the query from its own ranking in same-batch mode (the reference keeps
            it as its own top positive; so does the default).
        chunk_elements: pairs per chunk of the smoothed-rank computation (memory / speed knob).

    Call as ``loss(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None)`` (PML's
    order; ``indices_tuple`` is ignored) with L2-normalised (B, D)
    embeddings and (B, L) tree labels, finest level first. Computes in float32 under autocast.
    Raises :class:`NoPositiveError` when no query has a relevant item other than itself.
    """

    def __init__(
        self,
        tau: float = DEFAULT_STEP.tau,
        rho: float = DEFAULT_STEP.rho,
        delta: float = DEFAULT_STEP.delta,
        start: float = DEFAULT_STEP.start,
        offset: float = DEFAULT_STEP.offset,
        relevance: str = "pop",
        alpha: float = 1.0,
        weights: Sequence[float] | None = None,
        exclude_self: bool = False,
        chunk_elements: int | None = None,
    ):
        super().__init__()
        self.step = UpperStep(tau=tau, rho=rho, delta=delta, start=start, offset=offset)
        if relevance not in ("pop", "map"):
            raise InputError(f"HAPLoss: relevance must be 'pop' or 'map', got {relevance!r}")
        if relevance == "map" and weights is None:
            raise InputError("HAPLoss: relevance='map' needs weights, one per level 1..L")
        self.relevance = relevance
        self.alpha = alpha
        self.weights = None if weights is None else tuple(float(w) for w in weights)
        self.exclude_self = exclude_self
        self.chunk_elements = chunk_elements

    def per_query(self, embeddings, labels, ref_emb=None, ref_labels=None):
        """(Q,) surrogate H-AP of every query and (Q,) total relevance (0: no relevant item)."""
        with float32_compute(embeddings.device):
            x = prepare_inputs(embeddings, labels, ref_emb, ref_labels, "HAPLoss")
            if self.relevance == "map" and len(self.weights) != x.num_levels:
                raise InputError(
                    f"HAPLoss: {len(self.weights)} weights for 'map' relevance but the labels "
                    f"have {x.num_levels} level(s)"
                )
            shared, shared_rel = batch_relevance(
                x, self.relevance, self.alpha, self.weights, self.exclude_self
            )
            check_has_positive(shared, x, "HAPLoss", "an item sharing at least its coarsest label")
            scores = x.embeddings @ x.ref_emb.T
            return smooth_hap(scores, shared, shared_rel, self.step, self.chunk_elements)

    def batch_loss(self, embeddings, labels, ref_emb=None, ref_labels=None):
        hap, total = self.per_query(embeddings, labels, ref_emb, ref_labels)
        return reduce_queries(hap, total)

    def extra_repr(self) -> str:
        s = self.step
        return (
            f"tau={s.tau}, rho={s.rho}, delta={s.delta}, start={s.start}, offset={s.offset}, "
            f"relevance={self.relevance!r}, alpha={self.alpha}, exclude_self={self.exclude_self}"
        )


class ClusterLoss(HapkitLoss):
    """Normalised-softmax cross-entropy on one label column (HAPPIER's clustering term).

    logits = E @ normalize(W)^T / temperature, with W (num_classes, D) an ``nn.Parameter``
    initialised like ``nn.Linear``. HAPPIER trains W with its own optimizer (Adam, lr 10 on SOP,
    cosine decay to 0.1): give ``loss.weight`` (or ``HAPPIER.cluster.parameters()``) to it.

    Args:
        num_classes: number of training classes in label column ``column``.
        embedding_size: D.
        temperature: T = 0.05.
        column: label column used as class (0 = finest).
    ``ref_emb``/``ref_labels`` are accepted for a uniform call shape and ignored (per-sample loss).
    """

    has_parameters = True
    takes_reference_set = False

    def __init__(self, num_classes: int, embedding_size: int, temperature: float = 0.05, column: int = 0):
        super().__init__()
        if num_classes < 1 or embedding_size < 1:
            raise InputError(
                f"ClusterLoss: num_classes and embedding_size must be >= 1, got {num_classes}, {embedding_size}"
            )
        if not temperature > 0:
            raise InputError(f"ClusterLoss: temperature must be > 0, got {temperature}")
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        self.temperature = temperature
        self.column = column
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        bound = 1.0 / math.sqrt(embedding_size)
        nn.init.uniform_(self.weight, -bound, bound)

    def batch_loss(self, embeddings, labels, ref_emb=None, ref_labels=None):
        with float32_compute(embeddings.device):
            x = prepare_inputs(embeddings, labels, loss_name="ClusterLoss")
            if x.embeddings.shape[1] != self.embedding_size:
                raise InputError(
                    f"ClusterLoss: embeddings have {x.embeddings.shape[1]} dims, the class weights "
                    f"{self.embedding_size}"
                )
            check_column(self.column, x.num_levels, "ClusterLoss")
            target = x.labels[:, self.column]
            top = int(target.max()) if labels_checked_here() else -1
            if top >= self.num_classes:
                raise LabelError(
                    f"ClusterLoss: label {top} in column {self.column} but num_classes={self.num_classes}; "
                    f"labels must be re-indexed to 0..num_classes-1 over the training set"
                )
            logits = x.embeddings @ F.normalize(self.weight.float(), dim=1).T
            return F.cross_entropy(logits / self.temperature, target)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
            f"temperature={self.temperature}, column={self.column}"
        )


class HAPPIER(HapkitLoss):
    """HAPPIER loss = (1 - lambda_) * HAPLoss + lambda_ * ClusterLoss (Ramzi et al., ECCV 2022).

    Args:
        num_classes: number of finest training classes (ClusterLoss).
        embedding_size: D.
        lambda_: weight of the clustering term, 0.1 (DyML-Animal: 0.5).
        temperature: ClusterLoss temperature, 0.05.
        **hap_kwargs: forwarded to :class:`HAPLoss` (tau, rho, delta, start, offset, ...).
    The parts are the submodules ``.hap`` and ``.cluster`` (whose weight has its own optimizer).
    """

    has_parameters = True

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        lambda_: float = 0.1,
        temperature: float = 0.05,
        **hap_kwargs,
    ):
        super().__init__()
        if not 0.0 <= lambda_ <= 1.0:
            raise InputError(f"HAPPIER: lambda_ must be in [0, 1], got {lambda_}")
        self.lambda_ = lambda_
        self.hap = HAPLoss(**hap_kwargs)
        self.cluster = ClusterLoss(num_classes, embedding_size, temperature=temperature)

    def batch_loss(self, embeddings, labels, ref_emb=None, ref_labels=None):
        hap = self.hap(embeddings, labels, ref_emb=ref_emb, ref_labels=ref_labels)
        return (1.0 - self.lambda_) * hap + self.lambda_ * self.cluster(embeddings, labels)

    def extra_repr(self) -> str:
        return f"lambda_={self.lambda_}"
