"""Figures of the hierarchical proxy loss: cluster history, proxy projection and clusters."""

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from hapkit.losses.proxies import ClusterRecord, HierarchicalProxyLoss
from hapkit.viz import proxies as P

# 12 fine classes in 4 groups of 3, in 2 groups of 2: true labels, row c for fine class c
FINE = np.arange(12)
TRUTH = np.stack([FINE, FINE // 3, FINE // 6], axis=1)


def test_matched_ids_and_changed_classes_ignore_cluster_names():
    renamed = np.array([2, 2, 2, 0, 0, 0, 3, 3, 3, 1, 1, 1])
    np.testing.assert_array_equal(P.matched_cluster_ids(renamed, TRUTH[:, 1]), TRUTH[:, 1])
    assert P.changed_classes(TRUTH[:, 1], renamed) == 0
    moved = renamed.copy()
    moved[[0, 4]] = [0, 3]  # two classes move
    assert P.changed_classes(TRUTH[:, 1], moved) == 2
    five = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 4])  # one cluster more than true classes
    ids = P.matched_cluster_ids(five, TRUTH[:, 1])
    assert ids[-1] == 4 and (ids[:11] == TRUTH[:11, 1]).all()
    with pytest.raises(ValueError, match="same"):
        P.changed_classes(FINE, FINE[:5])


def test_cluster_history_frame_counts_changes_and_agreement():
    exact = (torch.as_tensor(TRUTH[:, 1]), torch.tensor([0, 0, 1, 1]))  # the true shapes and families
    first = (torch.as_tensor(FINE % 4), torch.tensor([0, 1, 0, 1]))  # unrelated to the truth
    history = [ClusterRecord(0, first), (5, exact), ClusterRecord(10, exact)]
    frame = P.cluster_history_frame(history, TRUTH, ["variant", "shape", "family"])
    assert list(frame.columns) == ["step", "level", "level_name", "changed", "ari"]
    assert frame["step"].tolist() == [0, 0, 5, 5, 10, 10] and frame["level"].tolist() == [1, 2] * 3
    assert frame["level_name"].tolist()[:2] == ["shape", "family"]
    assert frame["changed"].isna().tolist() == [True, True, False, False, False, False]
    assert frame["changed"].tolist()[4:] == [0, 0]
    assert frame["ari"].tolist()[2:] == pytest.approx([1.0] * 4)
    assert frame["ari"][0] == pytest.approx(adjusted_rand_score(TRUTH[:, 1], FINE % 4))
    parity = FINE % 2
    with_reference = P.cluster_history_frame(history, TRUTH, references={"parity": parity})
    assert with_reference["ari parity"][0] == pytest.approx(adjusted_rand_score(parity, FINE % 4))
    assert with_reference["ari parity"][3] == pytest.approx(adjusted_rand_score(parity, TRUTH[:, 2]))
    fig = P.cluster_history_figure(with_reference)
    assert len(fig.data) == 6 and fig.data[2].line.dash == "dash" and "parity" in fig.data[2].name
    with pytest.raises(ValueError, match="one entry per fine class"):
        P.cluster_history_frame(history, TRUTH, references={"parity": parity[:5]})
    with pytest.raises(ValueError, match="rows"):
        P.cluster_history_frame(history, TRUTH[:6])
    with pytest.raises(ValueError, match="empty"):
        P.cluster_history_frame([], TRUTH)


def test_cluster_history_of_a_trained_loss_and_its_figure():
    g = torch.Generator().manual_seed(0)
    hpl = HierarchicalProxyLoss(12, embedding_size=8, num_coarse=[4, 2], recluster_every=2, record_clusters=True)
    x = torch.nn.functional.normalize(torch.randn(24, 8, generator=g), dim=1)
    labels = torch.as_tensor(TRUTH[np.arange(24) % 12])
    for _ in range(5):
        hpl(x, labels)
    frame = P.cluster_history_frame(hpl.cluster_history, TRUTH)
    assert frame["step"].unique().tolist() == [0, 2, 4] and frame["level_name"][0] == "level 1"
    assert frame["changed"].dropna().between(0, 12).all() and frame["ari"].between(-1, 1).all()
    fig = P.cluster_history_figure(frame, title="t")
    assert len(fig.data) == 4  # bars and line for each of the two coarse levels
    bars = [t for t in fig.data if t.type == "bar"]
    assert [len(t.x) for t in bars] == [2, 2] and all(len(t.x) == 3 for t in fig.data if t.type == "scatter")
    with pytest.raises(ValueError, match="columns"):
        P.cluster_history_figure(pd.DataFrame({"step": [0]}))


def test_proxy_projection_is_a_deterministic_pca_of_directions():
    rng = np.random.default_rng(0)
    fine = rng.normal(size=(12, 6))
    coarse = rng.normal(size=(4, 6))
    a = P.proxy_projection(fine, coarse)
    b = P.proxy_projection(5 * fine, torch.as_tensor(coarse))  # lengths do not matter
    assert a.fine.shape == (12, 2) and a.coarse.shape == (4, 2)
    np.testing.assert_allclose(a.fine, b.fine, atol=1e-10)
    np.testing.assert_allclose(a.coarse, b.coarse, atol=1e-10)
    assert a.explained[0] >= a.explained[1] > 0 and sum(a.explained) <= 1
    np.testing.assert_allclose(a.fine.mean(0), 0, atol=1e-10)
    assert P.proxy_projection(fine).coarse is None
    with pytest.raises(ValueError, match="at least 3"):
        P.proxy_projection(fine[:2])
    with pytest.raises(ValueError, match="dimension"):
        P.proxy_projection(fine, coarse[:, :3])


def test_proxy_clusters_figure_has_both_panels_and_the_coarse_proxies():
    rng = np.random.default_rng(1)
    fine, coarse = rng.normal(size=(12, 6)), rng.normal(size=(4, 6))
    clusters = np.array([1, 1, 1, 0, 0, 0, 2, 2, 2, 3, 3, 3])
    fig = P.proxy_clusters_figure(fine, clusters, TRUTH[:, 1], coarse, class_names=[f"c{i}" for i in range(12)],
                                  true_names=list("abcd"), truth_title="shape")
    assert [len(t.x) for t in fig.data] == [12, 4, 12, 4]
    left, right = fig.data[0], fig.data[2]
    assert list(left.marker.color) == list(right.marker.color)  # clusters = shapes, renamed: same colours
    assert "shape: a" in right.text[0] and "k-means cluster 1" in right.text[0]
    assert len(P.proxy_clusters_figure(fine, clusters, TRUTH[:, 1]).data) == 2
    with pytest.raises(ValueError, match="one entry per fine proxy"):
        P.proxy_clusters_figure(fine, clusters[:5], TRUTH[:, 1])
