"""Figures of an embedding space: UMAP projections, scatter plots by level, image mosaics.

:func:`umap_projection` maps embeddings to 2-D with UMAP (McInnes et al., 2018) on cosine
distances, deterministic with ``random_state``; :func:`projection_frame` joins the coordinates with
readable labels (of an :class:`hapkit.data.EmbeddingSet` or of plain label arrays);
:func:`embedding_figure` draws a plotly scatter coloured by a level of the hierarchy with every
label in the hover text; :func:`projection_mosaic` lays thumbnails out on a grid over the
projection. :func:`organisation_figure` and :func:`failure_figure` draw the tables of
:func:`hapkit.results.organisation_table` and :func:`hapkit.results.failure_table` (models side
by side).

>>> frame = projection_frame(umap_projection(items.embeddings), items)   # doctest: +SKIP
>>> embedding_figure(frame, color="shape")                                 # doctest: +SKIP
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import torch

from hapkit._lazy import require_extra
from hapkit.data.embeddings import EmbeddingSet, label_frame
from hapkit.viz.images import blank_tile, image_grid

__all__ = ["umap_projection", "projection_frame", "embedding_figure", "projection_mosaic", "mosaic_figure",
           "organisation_figure", "failure_figure"]


def umap_projection(
    embeddings,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    metric: str = "cosine",
    n_epochs: int | None = 200,
    random_state: int | None = 0,
    **kwargs,
) -> np.ndarray:
    """2-D UMAP projection (McInnes, Healy & Melville, 2018) of (N, D) embeddings; (N, 2) float32.

    Defaults: 15 neighbours, min_dist 0.1, cosine distance (the retrieval similarity), 200
    optimisation epochs, ``random_state=0``, which makes the result deterministic (UMAP then runs
    single-threaded; ``n_jobs=1`` is passed so that it does not warn about it). The first call in
    a process compiles numba code (about 15 s); a few thousand points then take seconds.
    """
    x = embeddings.detach().cpu().numpy() if isinstance(embeddings, torch.Tensor) else np.asarray(embeddings)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D (N, D) array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("embeddings contain NaN or infinite values; UMAP cannot project them")
    n = x.shape[0]
    if n < 4:
        raise ValueError(f"UMAP needs at least 4 points, got {n}")
    if n_neighbors >= n:
        # UMAP's spectral initialisation needs n_neighbors < n
        n_neighbors = max(2, n - 1)
    require_extra("notebooks", "umap", what="hapkit.viz.embedding")
    with warnings.catch_warnings():
        # ParametricUMAP's optional TensorFlow dependency is announced at import
        warnings.filterwarnings("ignore", message=".*Tensorflow not installed.*")
        import umap

    kwargs.setdefault("n_jobs", 1 if random_state is not None else -1)
    reducer = umap.UMAP(
        n_components=2,
        n_neighbors=int(n_neighbors),
        min_dist=float(min_dist),
        metric=metric,
        n_epochs=n_epochs,
        random_state=random_state,
        **kwargs,
    )
    return reducer.fit_transform(x.astype(np.float32, copy=False)).astype(np.float32)


def projection_frame(coords, items: EmbeddingSet | None = None, labels=None, level_names=None, class_names=None) -> pd.DataFrame:
    """Coordinates with readable labels: columns ``x``, ``y``, ``item`` (row of the dataset) and one
    column per level (class names). Pass an :class:`EmbeddingSet` or ``labels`` and names."""
    coords = np.asarray(coords)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"coords must have shape (N, 2), got {coords.shape}")
    if items is not None:
        labels, level_names, class_names = items.labels, items.level_names, items.class_names
        index = items.indices
    else:
        if labels is None:
            raise ValueError("give an EmbeddingSet or the labels of the projected items")
        index = np.arange(len(coords))
    labels = np.asarray(labels)
    if len(labels) != len(coords):
        raise ValueError(f"{len(coords)} projected points but {len(labels)} label rows")
    frame = pd.DataFrame({"x": coords[:, 0], "y": coords[:, 1], "item": np.asarray(index)})
    return pd.concat([frame, label_frame(labels, level_names, class_names)], axis=1)


def embedding_figure(
    frame: pd.DataFrame,
    color: str,
    facet: str | None = None,
    title: str | None = None,
    legend_max: int = 20,
    marker_size: int = 5,
):
    """Plotly scatter of :func:`projection_frame` coloured by the level column ``color``.

    Every level's class name shows when hovering. ``facet`` names a column (e.g. ``"model"`` after
    concatenating two frames) drawn as side-by-side panels with their own axes (UMAP coordinates of
    different models are not comparable) and a shared colour per class. The legend is hidden when
    the level has more than ``legend_max`` classes.
    """
    import plotly.express as px

    for col in ("x", "y", color) + ((facet,) if facet else ()):
        if col not in frame:
            raise ValueError(f"frame has no column {col!r}; its columns are {list(frame.columns)}")
    levels = [c for c in frame.columns if c not in ("x", "y", "item", facet)]
    order = sorted(frame[color].astype(str).unique())
    palette = px.colors.qualitative.Dark24 if len(order) > 10 else px.colors.qualitative.D3
    fig = px.scatter(
        frame.assign(**{color: frame[color].astype(str)}),
        x="x",
        y="y",
        color=color,
        facet_col=facet,
        hover_data={"x": False, "y": False, "item": True, **{c: True for c in levels}},
        category_orders={color: order},
        color_discrete_sequence=palette,
        title=title,
        render_mode="svg",
    )
    fig.update_traces(marker=dict(size=marker_size, opacity=0.8, line=dict(width=0)))
    fig.update_xaxes(matches=None, showticklabels=False, title=None, showgrid=False, zeroline=False)
    fig.update_yaxes(matches=None, showticklabels=False, title=None, showgrid=False, zeroline=False)
    if facet:
        fig.for_each_annotation(lambda a: a.update(text=a.text.split("=", 1)[-1]))
    fig.update_layout(
        showlegend=len(order) <= legend_max,
        legend=dict(title=color, itemsizing="constant"),
        height=480,
        width=None if facet else 640,
        plot_bgcolor="white",
        margin=dict(l=10, r=10, t=60, b=10),
    )
    return fig


def projection_mosaic(coords, images, grid: int = 16, pad: int = 1) -> np.ndarray:
    """Thumbnails on a ``grid`` x ``grid`` lattice over the 2-D projection: each cell holds the
    image of the point nearest its centre (blank when no point falls in it). Returns uint8
    (grid*(H+pad)+pad, grid*(W+pad)+pad, 3), y growing downwards as in an image."""
    coords = np.asarray(coords, dtype=np.float64)
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be a uint8 (N, H, W, 3) array, got {images.dtype} {images.shape}")
    if len(images) != len(coords):
        raise ValueError(f"{len(coords)} points but {len(images)} images")
    if grid < 1:
        raise ValueError(f"grid must be at least 1, got {grid}")
    h, w = images.shape[1:3]
    lo, hi = coords.min(0), coords.max(0)
    span = np.where(hi > lo, hi - lo, 1.0)
    cell = np.minimum(((coords - lo) / span * grid).astype(np.int64), grid - 1)  # (N, 2): col, row from bottom
    centre = lo + (cell + 0.5) * span / grid
    dist = ((coords - centre) ** 2).sum(1)
    # nearest point of each cell: sort by distance, keep the first occurrence of each cell
    order = np.lexsort((dist, cell[:, 1], cell[:, 0]))
    first = np.ones(len(order), dtype=bool)
    first[1:] = (np.diff(cell[order, 0]) != 0) | (np.diff(cell[order, 1]) != 0)
    tiles = [blank_tile(h, w)] * (grid * grid)
    for i in order[first]:
        cx, cy = cell[i]
        tiles[(grid - 1 - cy) * grid + cx] = images[i]  # image rows grow downwards, projection y upwards
    return image_grid(tiles, grid, pad)


def mosaic_figure(coords, images, grid: int = 16, title: str | None = None, scale: float = 1.5):
    """A plotly figure of :func:`projection_mosaic` (image embedded as PNG, compact in notebooks)."""
    import plotly.express as px

    mosaic = projection_mosaic(coords, images, grid)
    fig = px.imshow(mosaic, binary_string=True, title=title)
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False)
    fig.update_layout(
        width=int(mosaic.shape[1] * scale) + 40,
        height=int(mosaic.shape[0] * scale) + 80,
        margin=dict(l=10, r=10, t=50, b=10),
    )
    return fig


def _grouped_bars(table: pd.DataFrame, columns: dict, title: str, yaxis: str):
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, column in columns.items():
        fig.add_trace(go.Bar(x=list(table.index), y=table[column].tolist(), name=name,
                             hovertemplate="%{x}: %{y:.1f}%<extra>" + name + "</extra>"))
    fig.update_layout(barmode="group", title=title, yaxis_title=yaxis, legend_title_text="model")
    return fig


def organisation_figure(table: pd.DataFrame, title: str | None = None):
    """Bars per level and model of the ``kNN@k <model>`` columns of
    :func:`hapkit.results.organisation_table`: how often an image's nearest neighbours share its
    label at each level."""
    columns = {c.split(" ", 1)[1]: c for c in table.columns if c.startswith("kNN@")}
    if not columns:
        raise ValueError("the table has no kNN@k column: build it with hapkit.results.organisation_table")
    k = next(iter(columns.values())).split(" ", 1)[0][4:]
    return _grouped_bars(table, columns, title or f"neighbours sharing the label, among the {k} nearest",
                         f"% of the {k} nearest neighbours")


def failure_figure(table: pd.DataFrame, title: str | None = None):
    """Bars per severity and model of :func:`hapkit.results.failure_table` (its total row left
    out): the wrong top-1 results by the number of levels they share with the query."""
    rows = table.drop(index=[i for i in table.index if i.startswith("top-1 wrong")])
    return _grouped_bars(rows, {c: c for c in table.columns}, title or "wrong top-1 results, by the levels they share",
                         "% of the queries")
