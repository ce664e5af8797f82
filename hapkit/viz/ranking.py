"""Plotly figures of rankings and metrics.

Each function takes plain data (rankings as lists of shared levels, pandas DataFrames) and returns
a ``plotly.graph_objects.Figure``; nothing is computed here that :mod:`hapkit.metrics` does not
already provide.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import pandas as pd

import plotly.graph_objects as go

__all__ = ["level_colors", "level_label", "ranking_figure", "metric_curve_figure", "agreement_figure"]

# Unrelated items in grey, then from light to dark red as more levels are shared.
_GREY = "#c7c7c7"


def level_colors(num_levels: int) -> list[str]:
    """One colour per shared level V = 0..num_levels (grey for V = 0, darker = more shared)."""
    from plotly.colors import sample_colorscale, unlabel_rgb

    if num_levels < 1:
        raise ValueError(f"num_levels must be >= 1, got {num_levels}")
    where = [0.3 + 0.7 * i / max(num_levels - 1, 1) for i in range(num_levels)] if num_levels > 1 else [0.7]
    shades = ["#%02x%02x%02x" % tuple(round(c) for c in unlabel_rgb(x)) for x in sample_colorscale("OrRd", where)]
    return [_GREY, *shades]


def level_label(v: int, num_levels: int, level_names: Sequence[str] | None = None) -> str:
    """Readable name of shared level v: ``same <finest level name>`` for V = L, ``unrelated`` for 0.

    ``level_names`` names the label columns, finest first (e.g. ``["species", "genus", "family"]``).
    """
    if v == 0:
        return "V=0: unrelated"
    if level_names is not None:
        if len(level_names) != num_levels:
            raise ValueError(f"level_names has {len(level_names)} names for {num_levels} levels")
        return f"V={v}: same {level_names[num_levels - v]}"
    return f"V={v}: {v} shared level{'s' if v > 1 else ''}"


def ranking_figure(
    rankings: Mapping[str, Sequence[int]] | Sequence[int],
    num_levels: int | None = None,
    relevance: Mapping[str, Sequence[float]] | None = None,
    level_names: Sequence[str] | None = None,
    show_metrics: Sequence[str] = ("AP@0", "H-AP"),
    title: str | None = None,
):
    """Rankings drawn as rows of squares (rank 1 on the left), coloured by shared level V.

    Args:
        rankings: ``{name: [V at rank 1, V at rank 2, ...]}``, or one such list.
        num_levels: L (default: the largest V shown).
        relevance: optional ``{name: [relevance at rank 1, ...]}`` shown when hovering; it is also
            the relevance of the H-AP shown in the row title (default: ``pop`` relevance within
            the ranking, see :func:`hapkit.metrics.ranking_metrics`).
        level_names: names of the label columns, finest first, for the legend.
        show_metrics: metric names of :func:`hapkit.metrics.ranking_metrics` to print beside each
            row's name (empty: none).
        title: figure title.
    """
    from hapkit.metrics import ranking_metrics

    if not isinstance(rankings, Mapping):
        rankings = {"ranking": list(rankings)}
    if not rankings:
        raise ValueError("no ranking to draw")
    rankings = {name: [int(v) for v in r] for name, r in rankings.items()}
    L = num_levels if num_levels is not None else max(1, max(max(r, default=0) for r in rankings.values()))
    for name, r in rankings.items():
        if any(v < 0 or v > L for v in r):
            raise ValueError(f"ranking {name!r} has shared levels outside 0..{L}: {r}")
    colors = level_colors(L)

    rows = []
    for name, r in rankings.items():
        label = name
        if show_metrics:
            rel = relevance.get(name) if relevance is not None else None
            m = ranking_metrics(r, L, relevance=rel if rel is not None else "pop")
            label = f"{name}<br>" + ", ".join(f"{k} {m[k]:.3f}" for k in show_metrics)
        rows.append(label)

    fig = go.Figure()
    for v in range(L + 1):
        xs, ys, text = [], [], []
        for (name, r), label in zip(rankings.items(), rows):
            for i, vi in enumerate(r):
                if vi != v:
                    continue
                xs.append(i + 1)
                ys.append(label)
                hover = f"{name}<br>rank {i + 1}<br>{level_label(v, L, level_names)}"
                if relevance is not None and name in relevance:
                    hover += f"<br>relevance {float(relevance[name][i]):.3g}"
                text.append(hover)
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                mode="markers",
                marker=dict(symbol="square", size=26, color=colors[v], line=dict(width=1, color="#444")),
                name=level_label(v, L, level_names),
                hovertext=text,
                hoverinfo="text",
            )
        )
    longest = max(len(r) for r in rankings.values())
    fig.update_xaxes(title="rank", tickmode="linear", dtick=1, range=[0.4, longest + 0.6], showgrid=False)
    fig.update_yaxes(autorange="reversed", categoryorder="array", categoryarray=rows, showgrid=False)
    fig.update_layout(
        title=title,
        height=140 + 70 * len(rankings),
        plot_bgcolor="white",
        legend=dict(title="shared level"),
        margin=dict(l=10, r=10, t=60 if title else 20, b=40),
    )
    return fig


def metric_curve_figure(frame, x: str, y: Sequence[str] | str, title: str | None = None, percent: bool = False):
    """Line plot of one or more metric columns of ``frame`` (a pandas DataFrame) against ``x``."""
    ys = [y] if isinstance(y, str) else list(y)
    missing = [c for c in [x, *ys] if c not in frame.columns]
    if missing:
        raise ValueError(f"columns {missing} not in the frame (it has {list(frame.columns)})")
    scale = 100.0 if percent else 1.0
    fig = go.Figure()
    for col in ys:
        fig.add_trace(go.Scatter(x=frame[x].tolist(), y=(frame[col] * scale).tolist(), mode="lines+markers", name=col))
    fig.update_layout(
        title=title,
        xaxis_title=x,
        yaxis_title="metric (%)" if percent else "metric",
        plot_bgcolor="white",
        height=420,
        margin=dict(l=10, r=10, t=60 if title else 20, b=40),
    )
    fig.update_xaxes(showgrid=True, gridcolor="#eee")
    fig.update_yaxes(showgrid=True, gridcolor="#eee")
    return fig


def agreement_figure(
    per_query: pd.DataFrame,
    column: int = 0,
    level_names: Sequence[str] | None = None,
    highlight: Sequence[int] = (),
    title: str | None = None,
):
    """Scatter of every query's H-AP against its binary AP at label column ``column`` (from
    :attr:`hapkit.evaluate.RetrievalResults.per_query`); ``highlight`` marks some queries.

    Points far above the diagonal rank the fine class badly but keep the mistakes close in the
    hierarchy; points below it find the fine class yet bring unrelated items forward.
    """
    import plotly.graph_objects as go

    ap_col = f"AP@{column}"
    for col in ("H-AP", ap_col):
        if col not in per_query:
            raise ValueError(f"per_query has no column {col!r}")
    name = level_names[column] if level_names is not None else f"level {column}"
    frame = per_query[["H-AP", ap_col]].dropna()
    fig = go.Figure()
    fig.add_trace(go.Scatter(
        x=frame[ap_col], y=frame["H-AP"], mode="markers", name="queries",
        marker=dict(size=4, opacity=0.5, color="#4c78a8"), text=[f"query {q}" for q in frame.index],
        hovertemplate="%{text}<br>AP %{x:.3f}<br>H-AP %{y:.3f}<extra></extra>",
    ))
    marked = [int(q) for q in highlight if int(q) in frame.index]
    if marked:
        fig.add_trace(go.Scatter(
            x=frame.loc[marked, ap_col], y=frame.loc[marked, "H-AP"], mode="markers+text", name="highlighted",
            text=[str(q) for q in marked], textposition="top center",
            marker=dict(size=10, color="#d62728", symbol="diamond"),
        ))
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="H-AP = AP", line=dict(dash="dot", color="#888")))
    fig.update_layout(
        title=title or f"per query: H-AP against AP at the {name} level",
        xaxis=dict(title=f"AP@{name}", range=[-0.02, 1.02]),
        yaxis=dict(title="H-AP", range=[-0.02, 1.02], scaleanchor="x"),
        width=560, height=520, plot_bgcolor="white",
    )
    return fig
