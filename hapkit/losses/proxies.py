"""Proxy-based hierarchical losses: the hierarchical proxy loss (HPL) and CSL.

- HPL: Yang, Bastan, Zhu, Gray and Samaras, "Hierarchical Proxy-based Loss for Deep Metric
  Learning", WACV 2022 (arXiv 2103.13538). No public code: this is hapkit's reading of the paper,
  built on pytorch-metric-learning's Proxy-Anchor and Proxy-NCA.
- CSL: the multi-level proxy baseline of HAPPIER's tables (Ramzi et al., ECCV 2022), one proxy per
  fine class with a margin that grows with the level at which a negative proxy differs.

Proxies are ``nn.Parameter`` s of the loss module: give them their own optimizer (the training
engine does), as for any proxy loss.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hapkit.errors import InputError
from hapkit.hierarchy import LabelError, as_label_tensor
from hapkit.losses.base import HapkitLoss, labels_checked_here, prepare_inputs
from hapkit.losses.rank import float32_compute

__all__ = ["HierarchicalProxyLoss", "ClusterRecord", "CSLLoss", "PROXY_BASES"]

PROXY_BASES = ("proxy_anchor", "proxy_nca")


def _no_reference(name: str, ref_emb, ref_labels) -> None:
    if ref_emb is not None or ref_labels is not None:
        raise InputError(
            f"{name} compares embeddings with learned proxies, not with a reference set: "
            f"call it without ref_emb / ref_labels"
        )


def _check_label_range(labels: torch.Tensor, sizes: Sequence[int], name: str) -> None:
    if not labels_checked_here():
        return
    for column, n in enumerate(sizes):
        top = int(labels[:, column].max()) if labels.numel() else -1
        if top >= n:
            raise LabelError(
                f"{name}: label {top} in column {column} but only {n} classes were declared for "
                f"that level; labels must be re-indexed to 0..n-1 per level"
            )


def _make_base(base: str, num_classes: int, embedding_size: int, kwargs: dict) -> nn.Module:
    from pytorch_metric_learning import losses as pml_losses

    if base == "proxy_anchor":
        return pml_losses.ProxyAnchorLoss(num_classes, embedding_size, **kwargs)
    if base == "proxy_nca":
        return pml_losses.ProxyNCALoss(num_classes, embedding_size, **kwargs)
    raise InputError(f"unknown base proxy loss {base!r}; choose one of {PROXY_BASES}")


def _kmeans(points: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k-means cluster ids, renumbered by first appearance so that an unchanged partition keeps
    its ids (and its coarse proxies' optimizer state stays attached to the same cluster)."""
    from sklearn.cluster import KMeans

    ids = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(points).labels_
    _, first = np.unique(ids, return_index=True)
    order = np.argsort(first)  # cluster ids sorted by the first class they contain
    renumber = np.empty(k, dtype=np.int64)
    renumber[np.unique(ids)[order]] = np.arange(len(order))
    return renumber[ids]


class ClusterRecord(NamedTuple):
    """One clustering of a learned hierarchy: ``step`` training calls had been made before it
    (0: the clustering at construction); ``assignments[l - 1]`` holds the cluster of every class
    of level l - 1 at coarse level l."""

    step: int
    assignments: tuple[torch.Tensor, ...]

    def fine_clusters(self, level: int) -> torch.Tensor:
        """Cluster at coarse ``level`` (1 = first coarse level) of every fine class."""
        if not 1 <= level <= len(self.assignments):
            raise InputError(f"level must be between 1 and {len(self.assignments)}, got {level}")
        ids = self.assignments[0]
        for below in self.assignments[1:level]:
            ids = below[ids]
        return ids


class HierarchicalProxyLoss(HapkitLoss):
    """Hierarchical proxy loss (HPL, Yang et al., WACV 2022): a weighted sum of proxy losses.

    ``sum_l level_weights[l] * base_loss_l(embeddings, labels_l)``, one proxy set per level, with
    a pytorch-metric-learning Proxy-Anchor (default; margin 0.1, alpha 32) or Proxy-NCA loss at
    each level.

    Two modes:

    - **given hierarchy**: ``num_classes`` is a list with one class count per label column,
      finest first; labels (B, L) supply every level.
    - **learned hierarchy** (the paper's setting): ``num_classes`` is the number of fine classes
      and ``num_coarse`` the number of coarse proxies (an int, or a list for several coarser
      levels, e.g. ``[64, 8]``). Coarse proxies come from k-means (scikit-learn) over the
      L2-normalised proxies of the level below; every class takes its cluster as coarse
      pseudo-label, so each fine class lies in exactly one cluster at every level (a tree). The
      clustering is done at construction and again every ``recluster_every`` training calls
      (modules in ``train()`` mode); each coarse proxy is then reset to the normalised mean of
      its members (between re-clusterings it is learned like the others, and the optimizer's
      running moments for it are left as they are). Only label column 0 is used.

    With ``record_clusters`` the loss keeps every clustering (the one at construction and each
    re-clustering) in :attr:`cluster_history`, a list of :class:`ClusterRecord`, to follow how the
    learned hierarchy evolves. The record is a few integers per clustering and goes into the state
    dict (key ``cluster_history``), so that a checkpoint keeps it.

    Defaults not fixed by the paper (which tunes them per dataset) are hapkit's choices: equal
    level weights and ``recluster_every=100``. Proxies are initialised from ``seed`` without
    touching the global random state; k-means is seeded by ``seed`` and the iteration count.

    Args:
        num_classes: fine class count (learned hierarchy) or one count per level.
        embedding_size: D.
        base: ``"proxy_anchor"`` or ``"proxy_nca"``.
        level_weights: one weight per level, finest first (default 1 each).
        num_coarse: coarse proxy counts for the learned hierarchy, decreasing.
        recluster_every: training calls between re-clusterings (None: only at construction).
        record_clusters: keep :attr:`cluster_history` (learned hierarchy only).
        base_kwargs: passed to the pytorch-metric-learning loss (e.g. ``margin``, ``alpha``).
    """

    has_parameters = True
    takes_reference_set = False

    @classmethod
    def training_kwargs(cls, kwargs, train_labels, embedding_size, seed):
        """As :meth:`HapkitLoss.training_kwargs`, with one class count per level of the training
        labels when the hierarchy is given (no ``num_coarse``)."""
        labels = np.asarray(train_labels)
        labels = labels[:, None] if labels.ndim == 1 else labels
        if "num_classes" not in kwargs and kwargs.get("num_coarse") is None:
            kwargs = {**kwargs, "num_classes": [int(labels[:, c].max()) + 1 for c in range(labels.shape[1])]}
        return super().training_kwargs(kwargs, labels, embedding_size, seed)

    def __init__(
        self,
        num_classes: int | Sequence[int],
        embedding_size: int = 512,
        base: str = "proxy_anchor",
        level_weights: Sequence[float] | None = None,
        num_coarse: int | Sequence[int] | None = None,
        recluster_every: int | None = 100,
        seed: int = 0,
        base_kwargs: dict | None = None,
        record_clusters: bool = False,
    ):
        super().__init__()
        if base not in PROXY_BASES:
            raise InputError(f"unknown base proxy loss {base!r}; choose one of {PROXY_BASES}")
        given = not isinstance(num_classes, int)
        sizes = [int(n) for n in num_classes] if given else [int(num_classes)]
        if given and num_coarse is not None:
            raise InputError(
                "HierarchicalProxyLoss: give either one class count per level (hierarchy from the "
                "labels) or num_coarse (hierarchy learned by k-means), not both"
            )
        if num_coarse is not None:
            sizes += [int(num_coarse)] if isinstance(num_coarse, int) else [int(n) for n in num_coarse]
        if not sizes or min(sizes) < 1:
            raise InputError(f"HierarchicalProxyLoss: class counts must be >= 1, got {sizes}")
        self.learned = num_coarse is not None
        if self.learned:
            for lvl in range(1, len(sizes)):
                if not 2 <= sizes[lvl] < sizes[lvl - 1]:
                    raise InputError(
                        f"HierarchicalProxyLoss: num_coarse must decrease level by level and stay "
                        f">= 2 (it clusters the proxies below), got counts {sizes}"
                    )
            if recluster_every is not None and recluster_every < 1:
                raise InputError(f"recluster_every must be >= 1 or None, got {recluster_every}")
        elif record_clusters:
            raise InputError(
                "HierarchicalProxyLoss: record_clusters needs the learned hierarchy (num_coarse): "
                "with a given hierarchy nothing is clustered"
            )
        weights = [1.0] * len(sizes) if level_weights is None else [float(w) for w in level_weights]
        if len(weights) != len(sizes):
            raise InputError(
                f"HierarchicalProxyLoss: {len(weights)} level weight(s) for {len(sizes)} level(s)"
            )
        self.sizes = sizes
        self.level_weights = weights
        self.base = base
        self.embedding_size = embedding_size
        self.recluster_every = recluster_every
        self.seed = seed
        self.record_clusters = bool(record_clusters)
        self.cluster_history: list[ClusterRecord] = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.level_losses = nn.ModuleList(
                _make_base(base, n, embedding_size, dict(base_kwargs or {})) for n in sizes
            )
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))
        for lvl in range(1, len(sizes) if self.learned else 1):
            self.register_buffer(f"assignment_{lvl}", torch.zeros(sizes[lvl - 1], dtype=torch.long))
        if self.learned:
            self.recluster()

    @property
    def num_levels(self) -> int:
        return len(self.sizes)

    def proxies(self, column: int) -> nn.Parameter:
        """The (num_classes_in_column, D) proxies of one label column (0 = finest)."""
        return self.level_losses[column].proxies

    def assignment(self, column: int) -> torch.Tensor:
        """Learned hierarchy: cluster (0..sizes[column]-1) of every class of column - 1."""
        if not self.learned or not 1 <= column < self.num_levels:
            raise InputError("assignments exist only for the coarse levels of a learned hierarchy")
        return getattr(self, f"assignment_{column}")

    @torch.no_grad()
    def recluster(self) -> None:
        """Re-run k-means level by level and reset the coarse proxies to their cluster means."""
        if not self.learned:
            raise InputError("recluster() needs the learned-hierarchy mode (num_coarse)")
        seed = self.seed + int(self.iteration)
        for lvl in range(1, self.num_levels):
            below = F.normalize(self.proxies(lvl - 1).detach().float(), dim=1)
            ids = _kmeans(below.cpu().numpy().astype(np.float64), self.sizes[lvl], seed + lvl)
            ids = torch.as_tensor(ids, dtype=torch.long, device=below.device)
            sums = torch.zeros(self.sizes[lvl], below.shape[1], device=below.device)
            sums.index_add_(0, ids, below)
            target = self.proxies(lvl)
            target.data.copy_(F.normalize(sums, dim=1).to(target.dtype))
            self.assignment(lvl).copy_(ids.to(self.assignment(lvl).device))
        if self.record_clusters:
            assignments = tuple(self.assignment(lvl).cpu().clone() for lvl in range(1, self.num_levels))
            self.cluster_history.append(ClusterRecord(int(self.iteration), assignments))

    # The record travels in the state dict as one (clusterings, 1 + classes below each coarse
    # level) integer tensor: the step, then the assignments level by level.
    _HISTORY_KEY = "cluster_history"

    def _history_tensor(self) -> torch.Tensor:
        width = 1 + sum(self.sizes[:-1])
        rows = [torch.cat([torch.tensor([r.step]), *r.assignments]) for r in self.cluster_history]
        return torch.stack(rows) if rows else torch.zeros(0, width, dtype=torch.long)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.record_clusters:
            destination[prefix + self._HISTORY_KEY] = self._history_tensor()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + self._HISTORY_KEY
        if self.record_clusters:
            if key in state_dict:
                table = state_dict.pop(key)
                if table.dim() != 2 or table.shape[1] != 1 + sum(self.sizes[:-1]):
                    error_msgs.append(
                        f"{key}: shape {tuple(table.shape)} does not fit class counts {self.sizes}"
                    )
                else:
                    bounds = np.cumsum([1, *self.sizes[:-1]]).tolist()
                    self.cluster_history = [
                        ClusterRecord(int(row[0]), tuple(row[a:b].clone() for a, b in zip(bounds[:-1], bounds[1:])))
                        for row in table.long()
                    ]
            elif strict:
                missing_keys.append(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def pseudo_labels(self, fine_labels: torch.Tensor) -> torch.Tensor:
        """(B, num_levels) labels of the learned hierarchy for fine labels (B,)."""
        cols = [fine_labels]
        for lvl in range(1, self.num_levels):
            cols.append(self.assignment(lvl).to(fine_labels.device)[cols[-1]])
        return torch.stack(cols, dim=1)

    def batch_loss(self, embeddings, labels, ref_emb=None, ref_labels=None):
        _no_reference("HierarchicalProxyLoss", ref_emb, ref_labels)
        with float32_compute(embeddings.device):
            inp = prepare_inputs(embeddings, labels, loss_name="HierarchicalProxyLoss")
            if self.learned:
                _check_label_range(inp.labels[:, :1], self.sizes[:1], "HierarchicalProxyLoss")
                if self.training:
                    step = int(self.iteration)
                    if self.recluster_every and step > 0 and step % self.recluster_every == 0:
                        self.recluster()
                    self.iteration += 1
                level_labels = self.pseudo_labels(inp.labels[:, 0])
            else:
                if inp.num_levels != self.num_levels:
                    raise LabelError(
                        f"HierarchicalProxyLoss: labels have {inp.num_levels} level(s) but "
                        f"num_classes declares {self.num_levels} ({self.sizes})"
                    )
                _check_label_range(inp.labels, self.sizes, "HierarchicalProxyLoss")
                level_labels = inp.labels
            total = inp.embeddings.new_zeros(())
            for lvl, (w, loss) in enumerate(zip(self.level_weights, self.level_losses)):
                if w:
                    total = total + w * loss(inp.embeddings, level_labels[:, lvl])
            return total

    def extra_repr(self) -> str:
        mode = "learned" if self.learned else "given"
        recorded = ", record_clusters=True" if self.record_clusters else ""
        return (
            f"sizes={self.sizes}, hierarchy={mode}, level_weights={self.level_weights}, "
            f"recluster_every={self.recluster_every if self.learned else None}{recorded}"
        )


def default_csl_margins(num_levels: int) -> list[float]:
    """Evenly spaced from 0.25 (finest) to 0.45 (coarsest): [0.25, 0.45], [0.25, 0.35, 0.45]."""
    if num_levels == 1:
        return [0.25]
    return [round(0.25 + 0.2 * i / (num_levels - 1), 10) for i in range(num_levels)]


class CSLLoss(HapkitLoss):
    """CSL, the multi-level proxy baseline of HAPPIER (ECCV 2022), one proxy per fine class.

    With s the dot products of the embeddings with the L2-normalised proxies, for each level l

        loss_l = mean_i softplus( LSE_{p : label_l(p) != label_l(i)} (scale * s_ip)
                                  + LSE_{p = fine class of i} (-scale * s_ip) + scale * m_l ),

    and the loss is the sum over levels. Reading of the definition: the positive set is the
    single proxy of the sample's fine class at every level (so its LSE is just -scale * s_pos);
    the negatives at level l are the proxies whose level-l label differs from the sample's, so a
    proxy from another super-class is a negative at every level and must sit further away
    (margin m_l grows with l) than a sibling fine class, which is a negative at level 0 only.
    A level with no negative proxy contributes 0.

    Args:
        hierarchy: (N, L) tree labels covering every fine class (the training labels, or one row
            per class), fine labels 0..C-1; column 0 finest.
        embedding_size: D.
        margins: one per level, finest first (default [0.25, 0.35, 0.45] for 3 levels,
            [0.25, 0.45] for 2; in general evenly spaced from 0.25 to 0.45).
        scale: 32.
        reduction: ``"sum"`` over levels (reference) or ``"mean"``.
        seed: proxies are initialised like ``nn.Linear`` weights, U(-1/sqrt(D), 1/sqrt(D)), from
            this seed without touching the global random state.
    """

    has_parameters = True
    takes_reference_set = False

    def __init__(
        self,
        hierarchy,
        embedding_size: int = 512,
        margins: Sequence[float] | None = None,
        scale: float = 32.0,
        reduction: str = "sum",
        seed: int = 0,
    ):
        super().__init__()
        tree = as_label_tensor(hierarchy, name="CSLLoss hierarchy")
        class_labels = torch.unique(tree, dim=0)  # sorted by fine label: one row per fine class
        fine = class_labels[:, 0]
        C = int(fine.numel())
        if not torch.equal(fine, torch.arange(C)):
            raise LabelError(
                f"CSLLoss: fine labels of the hierarchy must be exactly 0..C-1 (re-index them); "
                f"got {C} distinct values from {int(fine.min())} to {int(fine.max())}"
            )
        L = class_labels.shape[1]
        margins = default_csl_margins(L) if margins is None else [float(m) for m in margins]
        if len(margins) != L:
            raise InputError(f"CSLLoss: {len(margins)} margin(s) for {L} label level(s)")
        if reduction not in ("sum", "mean"):
            raise InputError(f"CSLLoss: reduction must be 'sum' or 'mean', got {reduction!r}")
        self.margins, self.scale, self.reduction = margins, float(scale), reduction
        self.num_classes, self.embedding_size = C, embedding_size
        self.register_buffer("class_labels", class_labels)
        bound = 1.0 / math.sqrt(embedding_size)
        gen = torch.Generator().manual_seed(seed)
        init = torch.rand(C, embedding_size, generator=gen) * 2 * bound - bound
        self.proxies = nn.Parameter(init)

    def batch_loss(self, embeddings, labels, ref_emb=None, ref_labels=None):
        _no_reference("CSLLoss", ref_emb, ref_labels)
        with float32_compute(embeddings.device):
            inp = prepare_inputs(embeddings, labels, loss_name="CSLLoss")
            tree = self.class_labels.to(inp.labels.device)
            if inp.num_levels != tree.shape[1]:
                raise LabelError(
                    f"CSLLoss: labels have {inp.num_levels} level(s), the hierarchy {tree.shape[1]}"
                )
            _check_label_range(inp.labels[:, :1], [self.num_classes], "CSLLoss")
            fine = inp.labels[:, 0]
            if labels_checked_here() and not torch.equal(tree[fine], inp.labels):
                bad = int((tree[fine] != inp.labels).any(1).nonzero()[0, 0])
                raise LabelError(
                    f"CSLLoss: row {bad} has labels {inp.labels[bad].tolist()} but the hierarchy "
                    f"given at construction places fine class {int(fine[bad])} under "
                    f"{tree[fine[bad]].tolist()}"
                )
            logits = self.scale * (inp.embeddings @ F.normalize(self.proxies.float(), dim=1).T)
            pos_term = -logits.gather(1, fine[:, None]).squeeze(1)
            per_level = []
            for lvl, margin in enumerate(self.margins):
                negative = inp.labels[:, lvl, None] != tree[None, :, lvl]
                has_neg = negative.any(1)
                # rows without negatives get dummy zeros so logsumexp's backward stays finite
                masked = torch.where(negative, logits, float("-inf"))
                masked = torch.where(has_neg[:, None], masked, 0.0)
                lse = torch.where(has_neg, torch.logsumexp(masked, dim=1), float("-inf"))
                per_level.append(F.softplus(lse + pos_term + self.scale * margin).mean())
            total = torch.stack(per_level).sum()
            return total if self.reduction == "sum" else total / len(per_level)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
            f"margins={self.margins}, scale={self.scale}, reduction={self.reduction!r}"
        )
