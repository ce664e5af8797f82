"""Ranking figures (hapkit.viz): what is drawn matches the rankings and the metrics."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import pytest

from hapkit import metrics, viz


def test_ranking_figure_draws_every_item_at_its_rank_and_level():
    rankings = {"a": [2, 1, 0, 2], "b": [2, 0, 1, 2, 0]}
    fig = viz.ranking_figure(rankings, num_levels=2, level_names=["product", "category"])
    assert isinstance(fig, go.Figure)
    assert [t.name for t in fig.data] == ["V=0: unrelated", "V=1: same category", "V=2: same product"]
    drawn = {}
    for v, trace in enumerate(fig.data):
        for x, y in zip(trace.x, trace.y):
            drawn[(y.split("<br>")[0], x)] = v
    expected = {(name, i + 1): v for name, r in rankings.items() for i, v in enumerate(r)}
    assert drawn == expected
    # the row titles carry the metrics of each ranking
    row_a = next(y for y in fig.data[2].y if y.startswith("a<br>"))
    m = metrics.ranking_metrics(rankings["a"], 2)
    assert f"AP@0 {m['AP@0']:.3f}" in row_a and f"H-AP {m['H-AP']:.3f}" in row_a


def test_ranking_figure_options_and_errors():
    fig = viz.ranking_figure([1, 0, 1], show_metrics=(), relevance={"ranking": [1.0, 0.0, 1.0]})
    assert fig.data[1].y == ("ranking", "ranking")
    assert "relevance 1" in fig.data[1].hovertext[0]
    with pytest.raises(ValueError, match="outside 0..1"):
        viz.ranking_figure({"x": [0, 2]}, num_levels=1)
    with pytest.raises(ValueError, match="level_names"):
        viz.ranking_figure([1, 2], num_levels=2, level_names=["only one"])
    with pytest.raises(ValueError, match="no ranking"):
        viz.ranking_figure({})


def test_level_colors_are_distinct():
    for L in range(1, 8):
        colors = viz.level_colors(L)
        assert len(colors) == L + 1 and colors[0] == "#c7c7c7"
        assert len(set(colors)) == L + 1


def test_metric_curve_figure():
    frame = pd.DataFrame({"severity": [1, 2, 3], "AP@0": [0.8, 0.8, 0.8], "H-AP": [0.9, 0.8, 0.7]})
    fig = viz.metric_curve_figure(frame, "severity", ["AP@0", "H-AP"], percent=True)
    assert [t.name for t in fig.data] == ["AP@0", "H-AP"]
    assert list(fig.data[1].y) == pytest.approx([90, 80, 70])
    with pytest.raises(ValueError, match="not in the frame"):
        viz.metric_curve_figure(frame, "severity", "NDCG")
