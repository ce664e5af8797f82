"""Figures and the ranking explorer: plotly figures take arrays, results or embedding sets, never
train (this wing imports nothing of :mod:`hapkit.training`).

- :mod:`hapkit.viz.ranking`: rankings as rows of coloured squares, metric curves, H-AP vs AP;
- :mod:`hapkit.viz.surrogates`: step functions, surrogate bounds, the decomposability gap;
- :mod:`hapkit.viz.embedding`: UMAP projections, scatter plots by level, image mosaics;
- :mod:`hapkit.viz.images`: image -> RGB, image grids, dataset samples;
- :mod:`hapkit.viz.reproduction`: each method's metrics with error bars, measured vs published;
- :mod:`hapkit.viz.landmarks`: revisited-protocol rankings (easy / hard / junk) and per-query APs;
- :mod:`hapkit.viz.explorer` (ipywidgets) over :mod:`hapkit.viz.explorer_state` (plain data).
"""

from hapkit._lazy import require_extra

require_extra("notebooks", "plotly", "ipywidgets", what="hapkit.viz")

from hapkit.viz.landmarks import revisited_per_query_figure, revisited_ranking_figure
from hapkit.viz.ranking import agreement_figure, level_colors, level_label, metric_curve_figure, ranking_figure

__all__ = [
    "level_colors", "level_label", "ranking_figure", "metric_curve_figure", "agreement_figure",
    "revisited_ranking_figure", "revisited_per_query_figure",
]
