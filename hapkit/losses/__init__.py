"""Ranking and hierarchical losses, with pytorch-metric-learning's call shape.

Every loss is called as ``loss(embeddings, labels, ref_emb=None, ref_labels=None)`` with labels of
shape (B, L), finest level first, and returns a scalar tensor. Submodules are imported on first
use so that ``import hapkit.losses`` stays cheap.
"""

from importlib import import_module

_WHERE = {
    "HAPLoss": "happier",
    "ClusterLoss": "happier",
    "HAPPIER": "happier",
    "SupAP": "roadmap",
    "CalibrationLoss": "roadmap",
    "ROADMAP": "roadmap",
    "SmoothAP": "smoothap",
    "ListwiseAP": "listwise_ap",
    "multistage_backward": "listwise_ap",
    "SupRecall": "suprank",
    "SupNDCG": "suprank",
    "HierarchicalProxyLoss": "proxies",
    "CSLLoss": "proxies",
}

__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        value = getattr(import_module(f"{__name__}.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
