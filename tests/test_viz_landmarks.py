"""Figures of the revisited protocol: what is drawn, hollow where the protocol removes an image."""

import math

import pytest
import torch

from hapkit.evaluate import evaluate_revisited, revisited_ranking_metrics
from hapkit.viz.landmarks import STATUS_COLORS, revisited_per_query_figure, revisited_ranking_figure

RANKING = ["junk", "easy", "hard", "negative", "easy"]


@pytest.mark.parametrize("protocol, removed", [("easy", {"junk", "hard"}), ("medium", {"junk"}), ("hard", {"junk", "easy"})])
def test_ranking_figure_marks_the_removed_images(protocol, removed):
    fig = revisited_ranking_figure({"a": RANKING}, protocol)
    drawn = {}
    for trace in fig.data:
        status = trace.name.split(" ")[0]
        assert trace.marker.color == STATUS_COLORS[status]
        assert (trace.marker.symbol == "square-open") == trace.name.endswith("(removed)")
        for x in trace.x:
            drawn[x] = (status, trace.name.endswith("(removed)"))
    assert drawn == {i + 1: (s, s in removed) for i, s in enumerate(RANKING)}
    ap = revisited_ranking_metrics(RANKING)[f"AP@{protocol}"]
    assert f"AP {ap:.3f}" in fig.data[0].y[0]
    assert revisited_ranking_figure({"top 5": RANKING}, protocol, show_ap=False).data[0].y[0] == "top 5"


def test_per_query_figure_has_one_bar_group_per_protocol():
    gallery = torch.tensor([[3.0], [2.0], [1.0]])
    gnd = [{"easy": [0], "hard": [], "junk": []}, {"easy": [1], "hard": [2], "junk": [0]}]
    res = evaluate_revisited(torch.ones(2, 1), gallery, gnd, progress=False)
    fig = revisited_per_query_figure(res)
    assert [t.name.split(" ")[0] for t in fig.data] == ["easy", "medium", "hard"]
    assert list(fig.data[0].y) == [1.0, 1.0] and math.isnan(fig.data[2].y[0])  # no hard image: no bar
    only_easy = evaluate_revisited(torch.ones(2, 1), gallery, gnd, protocols=["easy"], progress=False)
    with pytest.raises(ValueError, match="no column 'AP@medium'"):
        revisited_per_query_figure(only_easy)
    assert len(revisited_per_query_figure(only_easy, protocols=["easy"]).data) == 1
