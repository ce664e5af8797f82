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


def test_suprecall_bounds_the_sigmoid_recall_of_the_exact_ranks_and_checks_name_the_pairs():
    df = vs.surrogate_vs_exact(num_batches=1, batch_size=16, dim=8, losses=["SupRecall", "SupNDCG"])
    assert set(zip(df.loss, df.metric)) == {("SupRecall", vs.RECALL), ("SupRecall", vs.SIGMOID_RECALL),
                                            ("SupNDCG", "NDCG")}
    checks = vs.bound_checks(vs.bound_summary(df))
    assert checks.to_dict() == {f"SupRecall <= {vs.SIGMOID_RECALL}": True, "SupNDCG <= NDCG": True}
    fig = vs.bounds_figure(df)
    assert [a.text for a in fig.layout.annotations] == [
        f"SupRecall ({vs.RECALL})", f"SupRecall ({vs.SIGMOID_RECALL})", "SupNDCG (NDCG)"]
    with pytest.raises(ValueError, match="unknown surrogate"):
        vs.surrogate_vs_exact(num_batches=1, batch_size=16, dim=8, losses=["SupMAP"])


def test_recall_at_ks_counts_positives_within_k_over_min_of_positives_and_k():
    import torch

    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6]])
    positives = torch.tensor([[False, True, False, True]])  # ranks 2 and 4
    # k=1: 0/1, k=2: 1/2, k=4: 2/2
    assert float(vs.recall_at_ks(scores, positives, ks=(1, 2, 4))) == pytest.approx((0 + 0.5 + 1) / 3)
    smooth = float(vs.recall_at_ks(scores, positives, ks=(1,), temp=1.0))
    assert smooth == pytest.approx(float(torch.sigmoid(torch.tensor(-1.0)) + torch.sigmoid(torch.tensor(-3.0))))
