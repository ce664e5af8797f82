"""Ranking and hierarchical losses, with pytorch-metric-learning's call shape.

Every loss is called as ``loss(embeddings, labels, ref_emb=None, ref_labels=None)`` with labels of
shape (B, L), finest level first, and returns a scalar tensor. Every loss derives from
:class:`~hapkit.losses.base.HapkitLoss`, which declares what a training loop needs to know about
it. Submodules are imported on first use so that ``import hapkit.losses`` stays cheap.
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
}

__all__ = sorted(_WHERE)

__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
