"""HAPLoss, ClusterLoss and HAPPIER: authors' reference values, a dense form, bounds, training."""

import pytest
import torch
import torch.nn.functional as F

from hapkit.losses import HAPPIER, ClusterLoss, HAPLoss
from hapkit.metrics import h_average_precision
from reference_values import reference_batch


def tree_labels(B, branching=(3, 2), seed=0):
    """(B, L) labels built top-down (a tree by construction), finest column first."""
    g = torch.Generator().manual_seed(seed)
    cols = [torch.randint(0, branching[0], (B,), generator=g)]
    for b in branching[1:]:
        cols.insert(0, cols[0] * b + torch.randint(0, b, (B,), generator=g))
    return torch.stack(cols, dim=1)


def unit(B, D, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(B, D, generator=g, dtype=dtype), dim=1)


def dense_step(d, tau=0.01, rho=100.0, delta=0.05, start=0.5, offset=1.44):
    sig = torch.sigmoid((d / tau).clamp(-50, 50))
    return torch.where(d <= 0, sig, torch.where(d <= delta, start + sig, rho * (d - delta) + offset))


def pop_relevance(V, L, alpha=1.0, keep=None):
    """w[V] / n_q(V), counts over the kept items of each row (docs/definitions.md, 'Graded relevance')."""
    keep = torch.ones_like(V, dtype=torch.bool) if keep is None else keep
    rel = torch.zeros(V.shape, dtype=torch.float64)
    for q in range(V.shape[0]):
        for k in range(V.shape[1]):
            v = int(V[q, k])
            if keep[q, k] and v > 0:
                rel[q, k] = v**alpha / int(((V[q] == v) & keep[q]).sum())
    return rel


def dense_hap_loss(emb, labels, ref_emb=None, ref_labels=None, exclude_self=False, per_query=False, **step):
    """The HAPPIER surrogate (docs/definitions.md, 'HAPPIER: H-AP lower bound') with (Q, M, M) tensors; ignored items (the excluded self) dropped."""
    same = ref_emb is None
    ref_emb = emb if same else ref_emb
    ref_labels = labels if same else ref_labels
    L = labels.shape[1]
    V = (labels[:, None, :] == ref_labels[None, :, :]).sum(-1)
    Q, M = V.shape
    keep = torch.ones(Q, M, dtype=torch.bool)
    if same and exclude_self:
        keep &= ~torch.eye(Q, dtype=torch.bool)
    rel = pop_relevance(V, L, keep=keep)
    S = emb @ ref_emb.T
    d = S[:, None, :] - S[:, :, None]  # [q, k, j]
    comp = keep[:, None, :] & ~torch.eye(M, dtype=torch.bool)[None]
    less = V[:, None, :] < V[:, :, None]
    steps = torch.where(less, dense_step(d, **step), (d >= 0).to(d.dtype)) * comp
    rank = 1.0 + steps.sum(-1)
    h_rank = rel + ((d >= 0) * comp * torch.minimum(rel[:, None, :], rel[:, :, None])).sum(-1)
    total = rel.sum(1)
    hap = (torch.where(rel > 0, h_rank / rank, 0.0)).sum(-1) / total.clamp(min=1e-30)
    if per_query:
        return hap, total
    return 1.0 - hap[total > 0].mean()


def check_against_dense(loss, emb, labels, ref=None, **dense_kwargs):
    x = emb.float().clone().requires_grad_(True)
    if ref is None:
        value = loss(x, labels)
    else:
        value = loss(x, labels, ref_emb=ref[0].float(), ref_labels=ref[1])
    (grad,) = torch.autograd.grad(value, x)
    xr = emb.clone().requires_grad_(True)
    if ref is None:
        expected = dense_hap_loss(xr, labels, **dense_kwargs)
    else:
        expected = dense_hap_loss(xr, labels, ref[0], ref[1], **dense_kwargs)
    (grad_ref,) = torch.autograd.grad(expected, xr)
    assert value.item() == pytest.approx(expected.item(), abs=1e-5)
    torch.testing.assert_close(grad.double(), grad_ref, atol=1e-4, rtol=1e-3)


# ---------------------------------------------------------------------------------------------


def test_reproduces_authors_reference_value_and_gradient():
    data, emb, labels = reference_batch("happier_loss_batch.json")
    x = emb.clone().requires_grad_(True)
    value = HAPLoss()(x, labels)  # SOP config: the defaults
    value.backward()
    assert value.item() == pytest.approx(data["loss"], abs=1e-6)
    torch.testing.assert_close(x.grad, torch.tensor(data["grad"]), atol=1e-5, rtol=0)


def test_dense_form_reproduces_reference_too():
    # the dense form used below is itself pinned to the authors' numbers
    data, emb, labels = reference_batch("happier_loss_batch.json")
    assert float(dense_hap_loss(emb.double(), labels)) == pytest.approx(data["loss"], abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("branching", [(3, 2), (2, 2, 3)])
def test_matches_dense_form(seed, branching):
    labels = tree_labels(22, branching, seed)
    check_against_dense(HAPLoss(), unit(22, 8, seed), labels)


def test_inaturalist_step_config_matches_dense_form():
    labels = tree_labels(20, (2, 3), 3)
    check_against_dense(HAPLoss(start=0.0, offset=1.0), unit(20, 8, 3), labels, start=0.0, offset=1.0)


def test_exclude_self_matches_dense_form():
    labels = tree_labels(20, (3, 2), 4)
    check_against_dense(HAPLoss(exclude_self=True), unit(20, 8, 4), labels, exclude_self=True)


def test_reference_set_matches_dense_form():
    # a memory bank: queries ranked against other embeddings, some queries without relevant items
    labels, bank_labels = tree_labels(10, (4, 2), 5), tree_labels(30, (4, 2), 6)
    ref = (unit(30, 8, 6), bank_labels)
    check_against_dense(HAPLoss(), unit(10, 8, 5), labels, ref=ref)


def test_map_relevance_differs_from_pop_and_is_scale_invariant():
    emb, labels = unit(24, 8, 7).float(), tree_labels(24, (3, 2), 7)
    a = HAPLoss(relevance="map", weights=[1.0, 2.0])(emb, labels)
    b = HAPLoss(relevance="map", weights=[10.0, 20.0])(emb, labels)
    assert a.item() == pytest.approx(b.item(), abs=1e-6)
    assert a.item() != pytest.approx(HAPLoss()(emb, labels).item(), abs=1e-4)


def exact_batch_hap(emb, labels):
    """Exact H-AP of every query ranking the whole batch (itself included), same relevance."""
    V = (labels[:, None, :] == labels[None, :, :]).sum(-1)
    rel = pop_relevance(V, labels.shape[1])
    return h_average_precision(emb.double() @ emb.double().T, rel, V)


@pytest.mark.parametrize("seed", range(4))
def test_surrogate_is_a_lower_bound_of_exact_hap(seed):
    emb, labels = unit(40, 16, seed).float(), tree_labels(40, (3, 3), seed)
    surrogate, total = HAPLoss().per_query(emb, labels)
    exact = exact_batch_hap(emb, labels)
    assert bool((total > 0).all())
    assert bool((surrogate.double() <= exact + 1e-6).all())
    assert float((exact - surrogate.double()).max()) > 1e-3  # not trivially equal


def test_optimising_embeddings_raises_exact_hap():
    labels = tree_labels(32, (3, 3), 11)
    param = torch.nn.Parameter(unit(32, 16, 11).float())
    opt = torch.optim.Adam([param], lr=0.05)
    before = float(exact_batch_hap(F.normalize(param.detach(), dim=1), labels).mean())
    loss_fn = HAPLoss()
    for _ in range(15):
        opt.zero_grad()
        loss_fn(F.normalize(param, dim=1), labels).backward()
        opt.step()
    after = float(exact_batch_hap(F.normalize(param.detach(), dim=1), labels).mean())
    assert after > before + 0.3, (before, after)


def test_per_query_shapes_and_one_level_labels():
    emb = unit(12, 4, 2).float()
    hap, total = HAPLoss().per_query(emb, torch.arange(12) % 3)  # 1-D labels: one level
    assert hap.shape == (12,) and total.shape == (12,)
    assert bool(((hap > 0) & (hap <= 1)).all())


# ---------------------------------------------------------------------------------------------
# ClusterLoss and HAPPIER


def test_cluster_loss_is_normalised_softmax_cross_entropy():
    torch.manual_seed(0)
    loss = ClusterLoss(num_classes=5, embedding_size=6)
    bound = 1 / 6**0.5
    assert loss.weight.shape == (5, 6) and loss.weight.abs().max().item() <= bound
    emb = unit(10, 6, 1).float().requires_grad_(True)
    labels = torch.stack([torch.arange(10) % 5, torch.arange(10) % 5 // 3], 1)
    value = loss(emb, labels)
    W = loss.weight.detach().double()
    logits = emb.detach().double() @ (W / W.norm(dim=1, keepdim=True)).T / 0.05
    expected = -(logits.log_softmax(1)[torch.arange(10), labels[:, 0]]).mean()
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    value.backward()
    assert emb.grad is not None and loss.weight.grad is not None


def test_cluster_loss_rejects_labels_beyond_num_classes():
    loss = ClusterLoss(num_classes=3, embedding_size=4)
    with pytest.raises(ValueError, match="num_classes=3"):
        loss(unit(4, 4, 0).float(), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="dims"):
        loss(unit(4, 5, 0).float(), torch.tensor([0, 1, 2, 2]))


def test_happier_combines_hap_and_cluster_terms():
    torch.manual_seed(0)
    emb, labels = unit(16, 8, 3).float(), tree_labels(16, (2, 2), 3)
    loss = HAPPIER(num_classes=int(labels[:, 0].max()) + 1, embedding_size=8, lambda_=0.3, start=0.0, offset=1.0)
    assert isinstance(loss.hap, HAPLoss) and isinstance(loss.cluster, ClusterLoss)
    assert loss.hap.step.start == 0.0 and loss.hap.step.offset == 1.0
    expected = 0.7 * loss.hap(emb, labels) + 0.3 * loss.cluster(emb, labels)
    assert loss(emb, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    assert [n for n, _ in loss.named_parameters()] == ["cluster.weight"]
    assert HAPPIER(4, 8).lambda_ == 0.1


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="lambda_"):
        HAPPIER(4, 8, lambda_=1.5)
    with pytest.raises(ValueError, match="weights"):
        HAPLoss(relevance="map")
    with pytest.raises(ValueError, match="relevance"):
        HAPLoss(relevance="decay")
    with pytest.raises(ValueError, match="2 weights"):
        HAPLoss(relevance="map", weights=[1.0, 2.0])(unit(6, 4, 0).float(), tree_labels(6, (2, 2, 2), 0))
