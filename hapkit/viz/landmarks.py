"""Plotly figures of the revisited Oxford / Paris protocol: rankings written as statuses (easy,
hard, junk, negative) and per-query APs of :func:`hapkit.evaluate.evaluate_revisited`."""

from __future__ import annotations

from typing import Mapping, Sequence

import plotly.graph_objects as go

__all__ = ["STATUS_COLORS", "revisited_ranking_figure", "revisited_per_query_figure"]

STATUS_COLORS = {"easy": "#2ca02c", "hard": "#ff7f0e", "junk": "#9467bd", "negative": "#c7c7c7"}
_POSITIVE = {"easy": {"easy"}, "medium": {"easy", "hard"}, "hard": {"hard"}}
_IGNORED = {"easy": {"junk", "hard"}, "medium": {"junk"}, "hard": {"junk", "easy"}}


def revisited_ranking_figure(rankings: Mapping[str, Sequence[str]] | Sequence[str], protocol: str = "medium",
                             title: str | None = None, show_ap: bool = True) -> go.Figure:
    """Rankings drawn as rows of squares (rank 1 on the left), coloured by status; the images the
    protocol removes are hollow. With ``show_ap`` each row's name shows its trapezoidal and
    standard AP under ``protocol`` (:func:`hapkit.evaluate.revisited_ranking_metrics`); turn it off
    for the top of a longer ranking, whose AP the drawn part does not give."""
    from hapkit.evaluate import revisited_ranking_metrics

    if protocol not in _POSITIVE:
        raise ValueError(f"unknown protocol {protocol!r}; choose among {list(_POSITIVE)}")
    if not isinstance(rankings, Mapping):
        rankings = {"ranking": list(rankings)}
    rows = []
    for name, ranking in rankings.items():
        if not show_ap:
            rows.append(name)
            continue
        trap = revisited_ranking_metrics(ranking, ks=(1,))[f"AP@{protocol}"]
        std = revisited_ranking_metrics(ranking, ks=(1,), ap="standard")[f"AP@{protocol}"]
        rows.append(f"{name}<br>AP {trap:.3f} (standard {std:.3f})")
    fig = go.Figure()
    for status, color in STATUS_COLORS.items():
        for removed in (False, True):
            xs, ys, text = [], [], []
            for (name, ranking), label in zip(rankings.items(), rows):
                for i, s in enumerate(ranking):
                    if s == status and (s in _IGNORED[protocol]) == removed:
                        xs.append(i + 1)
                        ys.append(label)
                        text.append(f"{name}<br>rank {i + 1}: {s}" + (f" (removed under {protocol})" if removed else ""))
            if not xs:
                continue
            fig.add_trace(go.Scatter(
                x=xs, y=ys, mode="markers", hovertext=text, hoverinfo="text",
                name=f"{status} (removed)" if removed else status,
                marker=dict(symbol="square-open" if removed else "square", size=26, color=color,
                            line=dict(width=2 if removed else 1, color=color if removed else "#444")),
            ))
    longest = max(len(r) for r in rankings.values())
    fig.update_xaxes(title="rank", tickmode="linear", dtick=1, range=[0.4, longest + 0.6], showgrid=False)
    fig.update_yaxes(autorange="reversed", categoryorder="array", categoryarray=rows, showgrid=False)
    fig.update_layout(
        title=title or f"{protocol} protocol: positives {' + '.join(sorted(_POSITIVE[protocol]))}, "
                       f"removed {' + '.join(sorted(_IGNORED[protocol]))}",
        height=140 + 70 * len(rankings), plot_bgcolor="white", legend=dict(title="status"),
        margin=dict(l=10, r=10, t=60, b=40),
    )
    return fig


def revisited_per_query_figure(results, protocols: Sequence[str] = ("easy", "medium", "hard"), title: str | None = None) -> go.Figure:
    """Grouped bars of each query's AP under each protocol (queries left out of a protocol have
    no bar), from a :class:`~hapkit.evaluate.RetrievalResults` of ``evaluate_revisited``."""
    frame = results.per_query
    fig = go.Figure()
    for p in protocols:
        col = f"AP@{p}"
        if col not in frame:
            raise ValueError(f"the results have no column {col!r} (protocols evaluated: {results.settings.get('protocols')})")
        fig.add_trace(go.Bar(x=[str(q) for q in frame.index], y=frame[col].tolist(),
                             name=f"{p} (mAP {results.summary[f'mAP@{p}']:.3f})"))
    fig.update_layout(barmode="group", title=title or "AP of each query under each protocol", xaxis_title="query",
                      yaxis=dict(title="AP", range=[0, 1.02]), plot_bgcolor="white", height=380,
                      margin=dict(l=10, r=10, t=60, b=40))
    return fig
