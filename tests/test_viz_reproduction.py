"""Reproduction figures: one bar per (method, metric) with the seeds' std as error bar, published
numbers as markers beside the measured ones."""

import pandas as pd
import pytest

from hapkit.results import published_table, summarize
from hapkit.viz.reproduction import metrics_figure, published_figure, summary_metrics


def runs():
    rows = []
    for s in range(3):
        rows.append({"method": "happier", "dataset": "generated", "seed": s, "recipe": "happier_generated", "epochs": 10,
                     "R@1": 0.80 + 0.01 * s, "AP@0": 0.5, "AP@1": 0.4, "H-AP": 0.6, "duration_s": 1.0,
                     "level_names": ["variant", "shape"], "reported": {}})
    rows.append({"method": "supap", "dataset": "generated", "seed": 0, "recipe": "supap_generated", "epochs": 10,
                 "R@1": 0.79, "AP@0": 0.55, "AP@1": 0.3, "H-AP": 0.5, "duration_s": 1.0,
                 "level_names": ["variant", "shape"], "reported": {}})
    rows.append({"method": "happier", "dataset": "sop", "seed": 0, "recipe": "happier_sop", "epochs": 100,
                 "R@1": 0.80, "AP@0": 0.5, "H-AP": 0.6, "duration_s": 1.0, "level_names": ["product", "category"],
                 "reported": {"test/R@1@0": 81.0}, "metric:test/R@1@0": 0.80})
    return pd.DataFrame(rows)


def test_metrics_figure_has_one_bar_per_method_and_dataset_with_seed_std():
    summary = summarize(runs())
    assert summary_metrics(summary) == ["R@1", "AP@0", "AP@1", "H-AP"]
    fig = metrics_figure(summary)
    bars = [t for t in fig.data if t.type == "bar"]
    assert [(t.name, t.xaxis) for t in bars] == [("happier", "x"), ("supap", "x"), ("happier", "x2")]
    happier = bars[0]
    assert list(happier.x) == ["R@1", "AP@variant", "AP@shape", "H-AP"]  # levels named
    assert happier.y[0] == pytest.approx(81.0) and happier.error_y.array[0] == pytest.approx(1.0)
    assert bars[1].error_y.array[0] == 0.0  # one seed: no spread to show
    assert list(bars[2].x) == ["R@1", "AP@product", "H-AP"]  # a metric no run of the dataset has is left out
    with pytest.raises(ValueError, match="no complete run"):
        metrics_figure(summary.iloc[:0])


def test_published_figure_puts_the_paper_beside_the_measure():
    published = published_table(runs())
    fig = published_figure(published)
    bar, marker = fig.data
    assert list(bar.x) == ["happier · test/R@1@0"] and bar.y[0] == pytest.approx(80.0)
    assert marker.mode == "markers" and marker.y[0] == 81.0
    with pytest.raises(ValueError, match="no published number"):
        published_figure(published.iloc[:0])
