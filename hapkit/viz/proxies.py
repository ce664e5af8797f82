"""Figures of a hierarchical proxy loss: where its proxies lie and how a learned hierarchy evolves.

- :func:`cluster_history_frame` reads the record of a learned hierarchy
  (:attr:`hapkit.losses.proxies.HierarchicalProxyLoss.cluster_history`): per clustering and coarse
  level, how many fine classes changed cluster since the clustering before (cluster ids are
  arbitrary, so the clusters are first matched one to one) and how well the clusters agree with
  the dataset's true labels (adjusted Rand index, ARI: 1 = the same partition, about 0 = chance);
  (and, optionally, with other partitions of the classes, such as their colour);
- :func:`cluster_history_figure` plots both against the training step;
- :func:`proxy_projection` projects the L2-normalised proxies to 2-D with a PCA fitted on the fine
  proxies, the coarse ones placed in the same plane;
- :func:`proxy_clusters_figure` draws the fine proxies coloured by their cluster beside the same
  proxies coloured by their true coarse label, the coarse proxies marked.

>>> history = cluster_history_frame(loss.cluster_history, class_labels, level_names)   # doctest: +SKIP
>>> cluster_history_figure(history)                                                      # doctest: +SKIP
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from hapkit.losses.proxies import ClusterRecord

__all__ = [
    "matched_cluster_ids",
    "changed_classes",
    "cluster_history_frame",
    "cluster_history_figure",
    "ProxyProjection",
    "proxy_projection",
    "proxy_clusters_figure",
]


def _array(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _contingency(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Counts of (a == i, b == j) over the items, ids renumbered 0..n-1 in each partition."""
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    table = np.zeros((ai.max() + 1, bi.max() + 1), dtype=np.int64)
    np.add.at(table, (ai, bi), 1)
    return table


def matched_cluster_ids(clusters, reference) -> np.ndarray:
    """``clusters`` renamed after ``reference``: each cluster takes the id of the reference class it
    shares most items with, one to one (Hungarian matching); clusters left without a partner get
    ids above every reference id. The partition itself is unchanged."""
    from scipy.optimize import linear_sum_assignment

    clusters, reference = _array(clusters).ravel(), _array(reference).ravel()
    if clusters.shape != reference.shape:
        raise ValueError(f"clusters and reference label the same items: {clusters.shape} vs {reference.shape}")
    cluster_ids, cluster_index = np.unique(clusters, return_inverse=True)
    reference_ids = np.unique(reference)
    rows, cols = linear_sum_assignment(-_contingency(clusters, reference))
    names = np.full(len(cluster_ids), -1, dtype=np.int64)
    names[rows] = reference_ids[cols]
    spare = names < 0
    names[spare] = int(reference_ids.max()) + 1 + np.arange(int(spare.sum()))
    return names[cluster_index]


def changed_classes(before, after) -> int:
    """Classes whose cluster changed between two partitions, clusters matched one to one: the
    fewest classes that must move to turn ``before`` into ``after`` (0 when only ids differ)."""
    from scipy.optimize import linear_sum_assignment

    before, after = _array(before).ravel(), _array(after).ravel()
    if before.shape != after.shape:
        raise ValueError(f"both partitions label the same classes: {before.shape} vs {after.shape}")
    table = _contingency(before, after)
    rows, cols = linear_sum_assignment(-table)
    return int(before.size - table[rows, cols].sum())


def cluster_history_frame(
    history: Sequence,
    class_labels,
    level_names: Sequence[str] | None = None,
    references: Mapping[str, Sequence] | None = None,
) -> pd.DataFrame:
    """One row per (clustering, coarse level): ``step``, ``level`` (its index, 1 = first coarse
    level), ``level_name``, ``changed`` (fine classes whose cluster changed since the clustering
    before; missing for the first) and ``ari`` (adjusted Rand index of the clusters of the fine
    classes against ``class_labels[:, level]``, missing when the true hierarchy has no such level).

    Args:
        history: :class:`hapkit.losses.proxies.ClusterRecord` s, or ``(step, assignments)`` pairs.
        class_labels: (C, L) true labels of the C fine classes, row c for fine class c.
        level_names: names of the true label columns (default ``level 0``, ``level 1``...).
        references: other partitions of the fine classes to compare every level with, by name
            (e.g. ``{"colour": colour_of_each_class}``): one more column ``ari <name>`` each.
    """
    from sklearn.metrics import adjusted_rand_score

    records = [r if isinstance(r, ClusterRecord) else ClusterRecord(int(r[0]), tuple(r[1])) for r in history]
    if not records:
        raise ValueError("the history is empty: train the loss with record_clusters=True")
    truth = _array(class_labels)
    truth = truth[:, None] if truth.ndim == 1 else truth
    fine = _array(records[0].assignments[0]).size
    if truth.shape[0] != fine:
        raise ValueError(f"class_labels has {truth.shape[0]} rows but the history clusters {fine} fine classes")
    names = list(level_names) if level_names is not None else [f"level {c}" for c in range(truth.shape[1])]
    others = {str(k): _array(v).ravel() for k, v in dict(references or {}).items()}
    wrong = {k: v.shape for k, v in others.items() if v.shape != (fine,)}
    if wrong:
        raise ValueError(f"references need one entry per fine class ({fine}): {wrong}")
    rows, previous = [], {}
    for record in records:
        for level in range(1, len(record.assignments) + 1):
            clusters = _array(record.fine_clusters(level))
            rows.append({
                "step": record.step,
                "level": level,
                "level_name": names[level] if level < len(names) else f"level {level}",
                "changed": changed_classes(previous[level], clusters) if level in previous else np.nan,
                "ari": adjusted_rand_score(truth[:, level], clusters) if level < truth.shape[1] else np.nan,
                **{f"ari {name}": adjusted_rand_score(other, clusters) for name, other in others.items()},
            })
            previous[level] = clusters
    frame = pd.DataFrame(rows)
    frame["changed"] = frame["changed"].astype("Int64")
    return frame


_LEVEL_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd")
_DASHES = ("dash", "dot", "dashdot", "longdash")


def cluster_history_figure(frame: pd.DataFrame, title: str | None = None) -> go.Figure:
    """Two panels over the training step, one trace per coarse level in each: bars of the fine
    classes that changed cluster at each re-clustering, lines of the ARI with the true labels
    (and dashed lines of the ARI with each reference partition of the frame, ``ari <name>``)."""
    from plotly.subplots import make_subplots

    missing = {"step", "level", "level_name", "changed", "ari"} - set(frame.columns)
    if missing:
        raise ValueError(f"frame lacks columns {sorted(missing)}: build it with cluster_history_frame")
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12, subplot_titles=(
        "fine classes that changed cluster", "agreement with the true labels (ARI)"))
    for i, (level, rows) in enumerate(frame.groupby("level", sort=True)):
        colour, name = _LEVEL_COLOURS[i % len(_LEVEL_COLOURS)], str(rows["level_name"].iloc[0])
        moved = rows.dropna(subset=["changed"])
        fig.add_trace(go.Bar(x=moved["step"].tolist(), y=moved["changed"].astype(int).tolist(), name=f"{name}: changed",
                             marker_color=colour, legendgroup=name), row=1, col=1)
        fig.add_trace(go.Scatter(x=rows["step"].tolist(), y=rows["ari"].tolist(), mode="lines+markers",
                                 name=f"{name}: ARI", line=dict(color=colour), legendgroup=name), row=1, col=2)
        for dash, other in zip(_DASHES, [c for c in frame.columns if c.startswith("ari ")]):
            fig.add_trace(go.Scatter(x=rows["step"].tolist(), y=rows[other].tolist(), mode="lines+markers",
                                     name=f"{name} clusters: ARI with {other[4:]}", legendgroup=name,
                                     line=dict(color=colour, dash=dash), marker=dict(symbol="circle-open")),
                          row=1, col=2)
    fig.update_xaxes(title="training step", showgrid=True, gridcolor="#eee")
    fig.update_yaxes(title="classes", row=1, col=1, showgrid=True, gridcolor="#eee")
    fig.update_yaxes(title="ARI", row=1, col=2, showgrid=True, gridcolor="#eee", zeroline=True, zerolinecolor="#bbb")
    fig.update_layout(title=title, barmode="group", plot_bgcolor="white", height=400,
                      margin=dict(l=10, r=10, t=80 if title else 50, b=40))
    return fig


class ProxyProjection(NamedTuple):
    """2-D coordinates of proxies: ``fine`` (C, 2), ``coarse`` (K, 2) or None, and the share of the
    fine proxies' variance each of the two axes explains."""

    fine: np.ndarray
    coarse: np.ndarray | None
    explained: tuple[float, float]


def _unit_rows(x) -> np.ndarray:
    x = _array(x).astype(np.float64)
    if x.ndim != 2:
        raise ValueError(f"proxies must be a 2-D (N, D) array, got shape {x.shape}")
    return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)


def proxy_projection(fine_proxies, coarse_proxies=None) -> ProxyProjection:
    """PCA of the L2-normalised fine proxies to 2-D (the losses compare directions only); coarse
    proxies, normalised, are placed with the same axes. Each axis's sign is fixed (its largest
    coefficient positive), so the projection is deterministic."""
    fine = _unit_rows(fine_proxies)
    if fine.shape[0] < 3:
        raise ValueError(f"a 2-D PCA needs at least 3 proxies, got {fine.shape[0]}")
    centre = fine.mean(axis=0)
    _, singular, axes = np.linalg.svd(fine - centre, full_matrices=False)
    axes = axes[:2] * np.sign(axes[:2][np.arange(2), np.abs(axes[:2]).argmax(axis=1)])[:, None]
    variance = singular**2
    explained = tuple(float(v) for v in variance[:2] / variance.sum())
    coarse = None
    if coarse_proxies is not None:
        coarse = _unit_rows(coarse_proxies)
        if coarse.shape[1] != fine.shape[1]:
            raise ValueError(f"coarse proxies have dimension {coarse.shape[1]}, fine ones {fine.shape[1]}")
        coarse = (coarse - centre) @ axes.T
    return ProxyProjection((fine - centre) @ axes.T, coarse, explained)


def _palette(n: int) -> list[str]:
    import plotly.express as px

    base = px.colors.qualitative.Dark24 if n > 10 else px.colors.qualitative.D3
    return [base[i % len(base)] for i in range(n)]


def proxy_clusters_figure(
    fine_proxies,
    clusters,
    true_labels,
    coarse_proxies=None,
    class_names: Sequence[str] | None = None,
    true_names: Sequence[str] | None = None,
    cluster_title: str = "k-means cluster",
    truth_title: str = "true label",
    title: str | None = None,
) -> go.Figure:
    """The fine proxies in the plane of :func:`proxy_projection`, twice: coloured by ``clusters``
    (left) and by ``true_labels`` (right), with ``coarse_proxies`` (one per cluster, in cluster-id
    order) as outlined diamonds in both panels.

    Clusters take the colour of the true class they match best (one to one, see
    :func:`matched_cluster_ids`), so a cluster that is exactly one true class has the same colour in
    both panels. Hovering shows each fine class's name, cluster and true label. The traces: fine
    proxies left, coarse proxies left (when given), fine proxies right, coarse proxies right.
    """
    from plotly.subplots import make_subplots

    clusters, truth = _array(clusters).ravel(), _array(true_labels).ravel()
    projection = proxy_projection(fine_proxies, coarse_proxies)
    n = projection.fine.shape[0]
    if clusters.shape != (n,) or truth.shape != (n,):
        raise ValueError(f"clusters and true_labels need one entry per fine proxy ({n}), got "
                         f"{clusters.shape} and {truth.shape}")
    names = [str(c) for c in range(n)] if class_names is None else [str(c) for c in class_names]
    truth_text = [str(t) if true_names is None else str(true_names[t]) for t in truth]
    matched = matched_cluster_ids(clusters, truth)
    colours = _palette(int(max(matched.max(), truth.max())) + 1)
    hover = [f"{names[c]}<br>{cluster_title} {clusters[c]}<br>{truth_title}: {truth_text[c]}" for c in range(n)]
    ex, ey = projection.explained
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.06, subplot_titles=(
        f"coloured by {cluster_title}", f"coloured by {truth_title}"))
    for col, colour_ids in ((1, matched), (2, truth)):
        fig.add_trace(go.Scatter(
            x=projection.fine[:, 0].tolist(), y=projection.fine[:, 1].tolist(), mode="markers",
            marker=dict(size=9, color=[colours[i] for i in colour_ids], line=dict(width=0)),
            text=hover, hoverinfo="text", name="fine proxies", showlegend=col == 1, legendgroup="fine",
        ), row=1, col=col)
        if projection.coarse is not None:
            k = projection.coarse.shape[0]
            # a coarse proxy's colour: its cluster's (left); hollow on the right, it has no true label
            cluster_colour = {int(c): colours[int(m)] for c, m in zip(clusters, matched)}
            fill = [cluster_colour.get(j, "white") for j in range(k)] if col == 1 else ["white"] * k
            fig.add_trace(go.Scatter(
                x=projection.coarse[:, 0].tolist(), y=projection.coarse[:, 1].tolist(), mode="markers",
                marker=dict(size=15, symbol="diamond", color=fill, line=dict(width=2, color="black")),
                text=[f"coarse proxy of {cluster_title} {j}" for j in range(k)], hoverinfo="text",
                name="coarse proxies", showlegend=col == 1, legendgroup="coarse",
            ), row=1, col=col)
    fig.update_xaxes(title=f"PC 1 ({100 * ex:.0f}% of the variance)", showgrid=False, zeroline=False)
    fig.update_yaxes(title=f"PC 2 ({100 * ey:.0f}%)", showgrid=False, zeroline=False)
    fig.update_yaxes(matches="y")
    fig.update_layout(title=title, plot_bgcolor="white", height=460,
                      legend=dict(orientation="h", y=-0.15), margin=dict(l=10, r=10, t=80 if title else 50, b=40))
    return fig
