"""hapkit: hierarchical and ranking-based image retrieval (H-AP, HAPPIER, ROADMAP, SupRank, listwise AP, HPL)."""

__version__ = "0.1.0"
