"""HierarchicalProxyLoss and CSLLoss against dense references, k-means pseudo-labels, errors."""

import pytest
import torch
import torch.nn.functional as F

from hapkit.hierarchy import LabelError, as_label_tensor
from hapkit.losses import CSLLoss, HierarchicalProxyLoss


def proxy_anchor_reference(x, labels, proxies, margin=0.1, alpha=32.0):
    """Proxy-Anchor (Kim et al., CVPR 2020) written proxy by proxy."""
    cos = F.normalize(x, dim=1) @ F.normalize(proxies, dim=1).T
    C = proxies.shape[0]
    pos_total, neg_total, with_pos = 0.0, 0.0, 0
    for c in range(C):
        pos = labels == c
        if pos.any():
            with_pos += 1
            pos_total = pos_total + torch.log1p(torch.exp(-alpha * (cos[pos, c] - margin)).sum())
        neg_total = neg_total + torch.log1p(torch.exp(alpha * (cos[~pos, c] + margin)).sum())
    return pos_total / with_pos + neg_total / C


def proxy_nca_reference(x, labels, proxies):
    """Proxy-NCA with squared distances between normalised vectors (PML's default)."""
    xn, pn = F.normalize(x, dim=1), F.normalize(proxies, dim=1)
    losses = []
    for i in range(x.shape[0]):
        d = ((xn[i] - pn) ** 2).sum(1)
        losses.append(-torch.log_softmax(-d, dim=0)[labels[i]])
    return torch.stack(losses).mean()


def batch(B=16, D=8, fine=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(B, D, generator=g), dim=1)
    f = torch.arange(B) % fine
    return x, torch.stack([f, f // 4], dim=1)


def test_given_hierarchy_is_weighted_sum_of_proxy_anchor_per_level():
    x, labels = batch()
    hpl = HierarchicalProxyLoss([8, 2], embedding_size=8, level_weights=[0.5, 2.0])
    xg = x.clone().requires_grad_(True)
    value = hpl(xg, labels)
    value.backward()
    xr = x.clone().requires_grad_(True)
    proxies = [hpl.proxies(lvl).detach().clone().requires_grad_(True) for lvl in range(2)]
    ref = 0.5 * proxy_anchor_reference(xr, labels[:, 0], proxies[0]) + 2.0 * proxy_anchor_reference(
        xr, labels[:, 1], proxies[1]
    )
    ref.backward()
    assert value.item() == pytest.approx(ref.item(), abs=1e-4)
    torch.testing.assert_close(xg.grad, xr.grad, atol=1e-4, rtol=1e-3)
    for lvl in range(2):
        torch.testing.assert_close(hpl.proxies(lvl).grad, proxies[lvl].grad, atol=1e-4, rtol=1e-3)


def test_level_weights_select_levels_and_proxy_nca_base():
    x, labels = batch(seed=1)
    fine_only = HierarchicalProxyLoss([8, 2], embedding_size=8, level_weights=[1.0, 0.0])
    expected = proxy_anchor_reference(x, labels[:, 0], fine_only.proxies(0).detach())
    assert fine_only(x, labels).item() == pytest.approx(expected.item(), abs=1e-4)

    nca = HierarchicalProxyLoss([8, 2], embedding_size=8, base="proxy_nca")
    expected = sum(proxy_nca_reference(x, labels[:, l], nca.proxies(l).detach()) for l in range(2))
    assert nca(x, labels).item() == pytest.approx(expected.item(), abs=1e-4)
    assert isinstance(nca.proxies(0), torch.nn.Parameter)
    assert len(list(nca.parameters())) == 2


def test_learned_hierarchy_pseudo_labels_form_a_tree():
    hpl = HierarchicalProxyLoss(12, embedding_size=8, num_coarse=[4, 2])
    a1, a2 = hpl.assignment(1), hpl.assignment(2)
    assert a1.shape == (12,) and a2.shape == (4,)
    assert sorted(a1.unique().tolist()) == [0, 1, 2, 3]  # no empty cluster
    assert sorted(a2.unique().tolist()) == [0, 1]
    pseudo = hpl.pseudo_labels(torch.arange(12))
    assert pseudo.tolist() == [[c, int(a1[c]), int(a2[a1[c]])] for c in range(12)]
    as_label_tensor(pseudo)  # every fine class in exactly one cluster per level: a tree
    # coarse proxies are the normalised means of their members
    fine = F.normalize(hpl.proxies(0).detach(), dim=1)
    for k in range(4):
        mean = F.normalize(fine[a1 == k].sum(0), dim=0)
        torch.testing.assert_close(hpl.proxies(1).detach()[k], mean, atol=1e-5, rtol=1e-5)


def test_kmeans_recovers_grouped_proxies():
    hpl = HierarchicalProxyLoss(9, embedding_size=8, num_coarse=3, recluster_every=None)
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=g) * 5
    groups = torch.tensor([2, 0, 1, 1, 2, 0, 0, 1, 2])
    with torch.no_grad():
        hpl.proxies(0).copy_(centres[groups] + 0.01 * torch.randn(9, 8, generator=g))
    hpl.recluster()
    a = hpl.assignment(1)
    same = a[:, None] == a[None, :]
    assert torch.equal(same, groups[:, None] == groups[None, :])
    assert a.tolist()[:3] == [0, 1, 2]  # renumbered by first member


def test_recluster_timing_counts_training_calls_only():
    x, labels = batch()
    hpl = HierarchicalProxyLoss(8, embedding_size=8, num_coarse=2, recluster_every=3)
    seen = []
    original = hpl.recluster

    def spy():
        seen.append(int(hpl.iteration))
        original()

    hpl.recluster = spy
    for _ in range(7):
        hpl(x, labels)
    assert seen == [3, 6] and int(hpl.iteration) == 7
    hpl.eval()
    for _ in range(5):
        hpl(x, labels)
    assert seen == [3, 6] and int(hpl.iteration) == 7


def test_learned_value_uses_pseudo_labels_and_state_round_trips():
    x, labels = batch(seed=2)
    hpl = HierarchicalProxyLoss(8, embedding_size=8, num_coarse=3, level_weights=[1.0, 0.3])
    pseudo = hpl.pseudo_labels(labels[:, 0])
    expected = proxy_anchor_reference(x, pseudo[:, 0], hpl.proxies(0).detach()) + 0.3 * (
        proxy_anchor_reference(x, pseudo[:, 1], hpl.proxies(1).detach())
    )
    assert hpl.eval()(x, labels).item() == pytest.approx(expected.item(), abs=1e-4)

    hpl.train()
    with torch.no_grad():
        hpl.proxies(0).add_(torch.randn(8, 8))
    hpl.iteration.fill_(100)
    hpl(x, labels)  # re-clusters at iteration 100
    other = HierarchicalProxyLoss(8, embedding_size=8, num_coarse=3, level_weights=[1.0, 0.3], seed=5)
    other.load_state_dict(hpl.state_dict())
    assert int(other.iteration) == 101
    assert torch.equal(other.assignment(1), hpl.assignment(1))
    assert other(x, labels).item() == pytest.approx(hpl(x, labels).item(), abs=1e-6)


def test_cluster_record_keeps_every_clustering_at_its_step():
    x, labels = batch()
    hpl = HierarchicalProxyLoss(8, embedding_size=8, num_coarse=[4, 2], recluster_every=3, record_clusters=True)
    expected = [(0, hpl.assignment(1).clone(), hpl.assignment(2).clone())]
    for _ in range(7):
        hpl(x, labels)
        if int(hpl.iteration) - 1 in (3, 6):  # this call re-clustered before counting itself
            expected.append((int(hpl.iteration) - 1, hpl.assignment(1).clone(), hpl.assignment(2).clone()))
    hpl.eval()
    hpl(x, labels)  # evaluation calls never re-cluster, hence never record
    history = hpl.cluster_history
    assert [r.step for r in history] == [0, 3, 6]
    for record, (step, a1, a2) in zip(history, expected):
        assert record.step == step
        assert torch.equal(record.assignments[0], a1) and torch.equal(record.assignments[1], a2)
        assert record.assignments[0].shape == (8,) and record.assignments[1].shape == (4,)
        assert sorted(record.assignments[0].unique().tolist()) == [0, 1, 2, 3]
        assert sorted(record.assignments[1].unique().tolist()) == [0, 1]
    last = history[-1]
    assert torch.equal(last.fine_clusters(1), hpl.pseudo_labels(torch.arange(8))[:, 1])
    assert torch.equal(last.fine_clusters(2), hpl.pseudo_labels(torch.arange(8))[:, 2])
    with pytest.raises(ValueError, match="level"):
        last.fine_clusters(3)


def test_cluster_record_is_off_by_default_and_travels_in_the_state_dict():
    x, labels = batch()
    plain = HierarchicalProxyLoss(8, embedding_size=8, num_coarse=2, recluster_every=2)
    for _ in range(5):
        plain(x, labels)
    assert plain.cluster_history == [] and "cluster_history" not in plain.state_dict()

    hpl = HierarchicalProxyLoss(8, embedding_size=8, num_coarse=[4, 2], recluster_every=2, record_clusters=True)
    for _ in range(5):
        hpl(x, labels)
    state = hpl.state_dict()
    assert state["cluster_history"].shape == (3, 1 + 8 + 4)  # steps 0, 2, 4
    other = HierarchicalProxyLoss(8, embedding_size=8, num_coarse=[4, 2], seed=4, record_clusters=True)
    other.load_state_dict(state)
    assert [r.step for r in other.cluster_history] == [0, 2, 4]
    for a, b in zip(other.cluster_history, hpl.cluster_history):
        assert all(torch.equal(u, v) for u, v in zip(a.assignments, b.assignments))
    with pytest.raises(RuntimeError, match="cluster_history"):  # a loss without the record refuses it
        HierarchicalProxyLoss(8, embedding_size=8, num_coarse=[4, 2]).load_state_dict(state)
    with pytest.raises(RuntimeError, match="cluster_history"):  # and a recording one needs it
        HierarchicalProxyLoss(8, embedding_size=8, num_coarse=[4, 2], record_clusters=True).load_state_dict(
            HierarchicalProxyLoss(8, embedding_size=8, num_coarse=[4, 2]).state_dict())
    with pytest.raises(RuntimeError, match="does not fit"):
        HierarchicalProxyLoss(9, embedding_size=8, num_coarse=[4, 2], record_clusters=True).load_state_dict(
            {**HierarchicalProxyLoss(9, embedding_size=8, num_coarse=[4, 2]).state_dict(),
             "cluster_history": state["cluster_history"]})
    with pytest.raises(ValueError, match="learned hierarchy"):
        HierarchicalProxyLoss([8, 2], embedding_size=8, record_clusters=True)


def test_construction_is_seeded_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a = HierarchicalProxyLoss(6, embedding_size=4, num_coarse=2, seed=3)
    b = HierarchicalProxyLoss(6, embedding_size=4, num_coarse=2, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.proxies(0), b.proxies(0)) and torch.equal(a.assignment(1), b.assignment(1))


def test_hpl_autocast_bfloat16_computes_in_float32():
    x, labels = batch()
    hpl = HierarchicalProxyLoss([8, 2], embedding_size=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = hpl(x, labels)
    assert got.dtype == torch.float32 and got.item() == hpl(x, labels).item()


def test_hpl_errors():
    x, labels = batch()
    with pytest.raises(ValueError, match="not both"):
        HierarchicalProxyLoss([8, 2], num_coarse=2)
    with pytest.raises(ValueError, match="decrease"):
        HierarchicalProxyLoss(8, embedding_size=8, num_coarse=[4, 6])
    with pytest.raises(ValueError, match="level weight"):
        HierarchicalProxyLoss([8, 2], level_weights=[1.0])
    with pytest.raises(ValueError, match="base"):
        HierarchicalProxyLoss(8, base="arcface")
    hpl = HierarchicalProxyLoss([8, 2], embedding_size=8)
    with pytest.raises(ValueError, match="reference set"):
        hpl(x, labels, ref_emb=x, ref_labels=labels)
    with pytest.raises(LabelError, match="level"):
        hpl(x, labels[:, :1])
    with pytest.raises(LabelError, match="re-indexed"):
        hpl(x, labels + torch.tensor([8, 0]))
    with pytest.raises(ValueError, match="learned"):
        hpl.recluster()


# ---------------------------------------------------------------------------------------------
# CSL
# ---------------------------------------------------------------------------------------------


def csl_reference(x, labels, tree, proxies, margins, scale=32.0):
    s = x @ F.normalize(proxies, dim=1).T
    total = 0.0
    for lvl, m in enumerate(margins):
        terms = []
        for i in range(x.shape[0]):
            neg = [p for p in range(tree.shape[0]) if tree[p, lvl] != labels[i, lvl]]
            if not neg:
                terms.append(torch.zeros(()))
                continue
            lse = torch.logsumexp(scale * s[i, neg], dim=0)
            terms.append(F.softplus(lse - scale * s[i, labels[i, 0]] + scale * m))
        total = total + torch.stack(terms).mean()
    return total


def three_levels(B=18, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(B, 8, generator=g), dim=1)
    f = torch.arange(B) % 9
    return x, torch.stack([f, f // 3, f // 6], dim=1)


def test_csl_matches_dense_reference_values_and_gradients():
    x, labels = three_levels()
    csl = CSLLoss(labels, embedding_size=8)
    assert csl.margins == [0.25, 0.35, 0.45]
    xg = x.clone().requires_grad_(True)
    value = csl(xg, labels)
    value.backward()
    xr = x.clone().requires_grad_(True)
    proxies = csl.proxies.detach().clone().requires_grad_(True)
    tree = torch.unique(labels, dim=0)
    ref = csl_reference(xr, labels, tree, proxies, [0.25, 0.35, 0.45])
    ref.backward()
    assert value.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-5)
    torch.testing.assert_close(xg.grad, xr.grad, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(csl.proxies.grad, proxies.grad, atol=1e-4, rtol=1e-3)
    mean = CSLLoss(labels, embedding_size=8, reduction="mean")(x, labels)
    assert mean.item() == pytest.approx(ref.item() / 3, rel=1e-5)


def test_csl_margins_by_level_count():
    x, labels = three_levels()
    assert CSLLoss(labels[:, :2], embedding_size=8).margins == [0.25, 0.45]
    assert CSLLoss(labels[:, :1], embedding_size=8).margins == [0.25]
    assert CSLLoss(labels, embedding_size=8, margins=[0.1, 0.2, 0.3]).margins == [0.1, 0.2, 0.3]
    with pytest.raises(ValueError, match="margin"):
        CSLLoss(labels, embedding_size=8, margins=[0.1, 0.2])


def test_csl_level_without_negatives_is_zero_with_finite_gradients():
    x, labels = three_levels()
    labels[:, 2] = 0  # a single root: no negative proxy at the coarsest level
    csl = CSLLoss(labels, embedding_size=8)
    xg = x.clone().requires_grad_(True)
    value = csl(xg, labels)
    value.backward()
    assert torch.isfinite(xg.grad).all() and torch.isfinite(csl.proxies.grad).all()
    tree = torch.unique(labels, dim=0)
    expected = csl_reference(x, labels, tree, csl.proxies.detach(), csl.margins)
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)


def test_csl_seeded_autocast_and_per_class_rows():
    x, labels = three_levels()
    per_class = torch.unique(labels, dim=0)
    a, b = CSLLoss(labels, embedding_size=8, seed=1), CSLLoss(per_class, embedding_size=8, seed=1)
    assert torch.equal(a.proxies, b.proxies)
    assert a.proxies.abs().max() <= 1 / 8**0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = a(x, labels)
    assert got.dtype == torch.float32 and got.item() == a(x, labels).item()


def test_csl_errors():
    x, labels = three_levels()
    with pytest.raises(LabelError, match="0..C-1"):
        CSLLoss(labels + torch.tensor([1, 0, 0]))
    with pytest.raises(LabelError, match="two parents"):
        CSLLoss(torch.tensor([[0, 0], [0, 1]]))
    csl = CSLLoss(labels, embedding_size=8)
    bad = labels.clone()
    bad[bad[:, 0] == 0] = torch.tensor([0, 2, 1])  # a tree, but not the one given at construction
    with pytest.raises(LabelError, match="places fine class 0"):
        csl(x, bad)
    with pytest.raises(LabelError, match="level"):
        csl(x, labels[:, :2])
    with pytest.raises(ValueError, match="reference set"):
        csl(x, labels, ref_emb=x, ref_labels=labels)
    with pytest.raises(ValueError, match="reduction"):
        CSLLoss(labels, reduction="max")
