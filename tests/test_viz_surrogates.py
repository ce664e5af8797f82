"""Figures and small experiments of the surrogate chapter (hapkit.viz_surrogates), at tiny sizes."""

import numpy as np
import plotly.graph_objects as go
import pytest

from hapkit.viz import surrogates as vs


def test_step_curves_upper_step_bounds_heaviside_and_sigmoid_does_not():
    df = vs.step_curves(d_max=0.3, num=301)
    assert (df.upper >= df.heaviside).all()
    assert (df.sigmoid < df.heaviside).any() and (df.sigmoid > df.heaviside).any()
    low = vs.step_curves(start=0.0, offset=1.0)  # iNaturalist config: the middle branch dips below 1
    assert (low.upper < low.heaviside).any()
    fig = vs.step_figure(tau=0.02)
    assert isinstance(fig, go.Figure) and len(fig.data) == 3 and "tau=0.02" in fig.layout.title.text


def test_step_explorer_sliders_redraw(monkeypatch):
    box = vs.step_explorer()
    before = np.array(box.figure.data[1].y)
    box.sliders["tau"].value = 0.05
    assert not np.allclose(np.array(box.figure.data[1].y), before)
    assert "tau=0.05" in box.figure.layout.title.text

    def no_widget(*args, **kwargs):
        raise ImportError("anywidget missing")

    monkeypatch.setattr(vs.go, "FigureWidget", no_widget)
    box = vs.step_explorer()
    box.sliders["rho"].value = 10.0  # the Output fallback re-draws without error
    assert box.figure.__class__.__name__ == "Output"


def test_ap_along_score_exact_is_flat_and_surrogates_are_not():
    df = vs.ap_along_score(values=[-0.6, 0.2, 0.4, 0.9])
    exact = df[df.method == "exact AP"].set_index("t").value
    # t = 0.9 puts the moving positive first: positives at ranks 1, 3, 5, 8
    assert exact[0.9] == pytest.approx((1 + 2 / 3 + 3 / 5 + 4 / 8) / 4)
    assert (df[df.method == "exact AP"].derivative == 0).all()
    assert (df[df.method != "exact AP"].derivative != 0).all()
    supap = df[df.method == "SupAP"].set_index("t").value
    assert (supap <= exact + 1e-6).all()
    assert isinstance(vs.ap_along_score_figure(df), go.Figure)


def test_surrogate_vs_exact_bounds_hold_and_summary_counts():
    df = vs.surrogate_vs_exact(num_batches=1, batch_size=16, dim=8)
    assert set(df.batch_kind) == {"random", "clustered"}
    assert set(df.loss) == {"HAPPIER", "SupAP", "SupNDCG", "Smooth-AP", "ListwiseAP"}
    summary = vs.bound_summary(df)
    bounded = summary[summary.loss.isin(["HAPPIER", "SupAP", "SupNDCG"])]
    assert (bounded.queries_above == 0).all() and (bounded.max_excess <= 1e-6).all()
    assert (summary.queries == 16).all()
    assert isinstance(vs.bounds_figure(df), go.Figure)


def test_clustered_batches_rank_better_than_random_ones():
    df = vs.surrogate_vs_exact(num_batches=1, batch_size=32, dim=8)
    ap = df[df.loss == "SupAP"].groupby("batch_kind").exact.mean()
    assert ap["clustered"] > ap["random"] + 0.2


def test_decomposability_experiment_table():
    df = vs.decomposability_experiment(num_classes=8, classes_per_batch=4, epochs=2, eval_every=1)
    assert set(df.loss) == {"SupAP", "ROADMAP"} and set(df.batching) == {"fixed", "random"}
    assert sorted(df.epoch.unique()) == [0, 1, 2]
    np.testing.assert_allclose(df.gap, df.batch_ap - df.dataset_ap)
    start = df[df.epoch == 0]
    assert start.dataset_ap.nunique() == 1  # same initial embeddings for every run
    assert isinstance(vs.decomposability_figure(df), go.Figure)
    with pytest.raises(ValueError, match="multiple"):
        vs.decomposability_experiment(num_classes=9, classes_per_batch=4, epochs=1)
    with pytest.raises(ValueError, match="batching"):
        vs.decomposability_experiment(num_classes=8, classes_per_batch=4, epochs=1, batchings=("mixed",))
