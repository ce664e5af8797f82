"""Ranking and hierarchical losses: pytorch-metric-learning losses for (B, L) labels.

Every loss derives from :class:`~hapkit.losses.base.HapkitLoss`, a subclass of PML's
``BaseMetricLossFunction``: it is called as ``loss(embeddings, labels, indices_tuple=None,
ref_emb=None, ref_labels=None)`` (PML's order; ``indices_tuple`` is accepted and ignored) with
labels of shape (B, L), finest level first, returns a scalar tensor, and works inside PML's
``DistributedLossWrapper`` (:class:`DistributedLossWrapper` adds its ``efficient=True`` mode for
(B, L) labels). :class:`CrossBatchMemory` is PML's memory bank for hapkit's rank losses and (B, L)
labels. Submodules are imported on first use so that ``import hapkit.losses`` stays cheap.
"""

from hapkit._lazy import lazy_exports

_WHERE = {
    "HapkitLoss": "base",
    "NoPositiveError": "base",
    "UpperStep": "rank",
    "HAPLoss": "happier",
    "ClusterLoss": "happier",
    "HAPPIER": "happier",
    "SupAP": "roadmap",
    "CalibrationLoss": "roadmap",
    "ROADMAP": "roadmap",
    "SmoothAP": "smoothap",
    "ListwiseAP": "listwise_ap",
    "TieAwareListwiseAP": "listwise_ap",
    "multistage_backward": "listwise_ap",
    "SupRecall": "suprank",
    "SupNDCG": "suprank",
    "HierarchicalProxyLoss": "proxies",
    "CSLLoss": "proxies",
    "CrossBatchMemory": "memory",
    "DistributedLossWrapper": "distributed",
}

__all__ = sorted(_WHERE)

__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
