"""Figures of the reproduction results: each method's metrics with error bars over seeds, per
dataset, and the measured numbers beside the published ones.

Both take the tables of :mod:`hapkit.results` (:func:`~hapkit.results.summarize`,
:func:`~hapkit.results.published_table`), values in %.
"""

from __future__ import annotations

from typing import Sequence

import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots


__all__ = ["metrics_figure", "published_figure", "summary_metrics"]

DEFAULT_METRICS = ("R@1", "AP@*", "H-AP", "ASI", "NDCG")
PALETTE = qualitative.Plotly


def summary_metrics(summary: pd.DataFrame, metrics: Sequence[str] = DEFAULT_METRICS) -> list[str]:
    """The metric columns of ``summary`` in ``metrics`` order, ``AP@*`` expanded to every label
    column's AP."""
    out = []
    for name in metrics:
        if name == "AP@*":
            out += sorted((c for c in summary.columns if c.startswith("AP@") and c[3:].isdigit()), key=lambda c: int(c[3:]))
        elif name in summary.columns:
            out.append(name)
    return out


def _level_label(metric: str, levels: str) -> str:
    """``AP@1`` -> ``AP@shape`` with the dataset's level names (finest first)."""
    names = [n.strip() for n in levels.split("/")] if isinstance(levels, str) and levels else []
    if metric.startswith("AP@") and metric[3:].isdigit() and int(metric[3:]) < len(names):
        return f"AP@{names[int(metric[3:])]}"
    return metric


def _colours(methods) -> dict[str, str]:
    return {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(dict.fromkeys(methods))}


def metrics_figure(summary: pd.DataFrame, metrics: Sequence[str] = DEFAULT_METRICS, title: str | None = None) -> go.Figure:
    """Grouped bars of each method's mean metric (%) with the std over seeds as error bars, one
    panel per dataset (a single seed has no error bar)."""
    if summary.empty:
        raise ValueError("no complete run to plot: the summary table is empty (run `hapkit reproduce` first)")
    datasets = list(dict.fromkeys(summary["dataset"]))
    fig = make_subplots(rows=len(datasets), cols=1, subplot_titles=datasets)
    colours = _colours(summary["method"])
    for row, dataset in enumerate(datasets, start=1):
        part = summary[summary["dataset"] == dataset]
        shown = [m for m in summary_metrics(part, metrics) if part[m].notna().any()]
        levels = part["levels"].iloc[0] if "levels" in part else ""
        x = [_level_label(m, levels) for m in shown]
        for _, r in part.iterrows():
            std = [r.get(f"{m} std") for m in shown]
            fig.add_trace(go.Bar(
                x=x, y=[r[m] for m in shown], name=r["method"], legendgroup=r["method"], showlegend=row == 1,
                marker_color=colours[r["method"]],
                error_y=dict(type="data", array=[0.0 if pd.isna(v) else v for v in std], visible=True),
                customdata=[[r["seeds"], r.get("command", "")]] * len(shown),
                hovertemplate="%{x}: %{y:.2f}% (%{customdata[0]} seed(s))<br>%{customdata[1]}<extra>" + r["method"] + "</extra>",
            ), row=row, col=1)
        fig.update_yaxes(title_text="%", row=row, col=1)
    fig.update_layout(barmode="group", height=330 * len(datasets) + 60,
                      title=title or "Metrics per method (mean ± std over seeds)", legend_title_text="method")
    return fig


def published_figure(published: pd.DataFrame, title: str | None = None) -> go.Figure:
    """Each published number (marker) beside the measured mean with its std over seeds (bar),
    per (method, metric), one panel per dataset."""
    if published.empty:
        raise ValueError("no published number among these runs: the generated dataset has none; "
                         "run a recipe on a real dataset (e.g. `hapkit reproduce --methods happier --datasets sop "
                         "--data-root data`) to compare with the papers")
    datasets = list(dict.fromkeys(published["dataset"]))
    fig = make_subplots(rows=len(datasets), cols=1, subplot_titles=datasets)
    for row, dataset in enumerate(datasets, start=1):
        part = published[published["dataset"] == dataset]
        x = [f"{m} · {k}" for m, k in zip(part["method"], part["metric"])]
        fig.add_trace(go.Bar(
            x=x, y=part["measured"], name="measured", legendgroup="measured", showlegend=row == 1,
            marker_color=PALETTE[0],
            error_y=dict(type="data", array=part["std"].fillna(0.0).tolist(), visible=True),
        ), row=row, col=1)
        fig.add_trace(go.Scatter(
            x=x, y=part["paper"], mode="markers", name="published", legendgroup="published", showlegend=row == 1,
            marker=dict(symbol="x", size=12, color="black"),
        ), row=row, col=1)
        fig.update_yaxes(title_text="%", row=row, col=1)
    fig.update_layout(height=330 * len(datasets) + 60, title=title or "Measured (mean ± std) and published numbers")
    return fig
