"""SupAP, CalibrationLoss and ROADMAP: authors' reference values, dense forms, bounds, training."""

import pytest
import torch
import torch.nn.functional as F

from hapkit.losses import ROADMAP, CalibrationLoss, SupAP
from hapkit.metrics import average_precision
from reference_values import reference_batch


def unit(B, D, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(B, D, generator=g, dtype=dtype), dim=1)


def two_level_labels(B, seed, classes=6):
    g = torch.Generator().manual_seed(seed)
    fine = torch.randint(0, classes, (B,), generator=g)
    return torch.stack([fine, fine // 2], dim=1)


def dense_step(d, tau=0.01, rho=100.0, delta=0.05, start=0.5, offset=1.44, paper_branch=False):
    sig = torch.sigmoid((d / tau).clamp(-50, 50))
    lin = rho * d + offset if paper_branch else rho * (d - delta) + offset
    return torch.where(d <= 0, sig, torch.where(d <= delta, start + sig, lin))


def dense_supap_loss(emb, labels, ref_emb=None, ref_labels=None, column=0, exclude_self=False, **step):
    """The SupAP (docs/definitions.md, 'ROADMAP: SupAP and the calibration loss') with (Q, M, M) tensors: upper step on negatives, exact step on positives."""
    same = ref_emb is None
    ref_emb = emb if same else ref_emb
    ref_labels = labels if same else ref_labels
    pos = labels[:, None, column] == ref_labels[None, :, column]
    Q, M = pos.shape
    keep = torch.ones(Q, M, dtype=torch.bool)
    if same and exclude_self:
        keep &= ~torch.eye(Q, dtype=torch.bool)
    pos &= keep
    S = emb @ ref_emb.T
    d = S[:, None, :] - S[:, :, None]  # [q, k, j]
    comp = keep[:, None, :] & ~torch.eye(M, dtype=torch.bool)[None]
    exact = (d >= 0).to(d.dtype)
    rank = 1.0 + (torch.where(pos[:, None, :], exact, dense_step(d, **step)) * comp).sum(-1)
    rank_pos = 1.0 + (exact * comp * pos[:, None, :]).sum(-1)
    n_pos = pos.sum(1)
    ap = (torch.where(pos, rank_pos / rank, 0.0)).sum(1) / n_pos.clamp(min=1)
    return 1.0 - ap[n_pos > 0].mean()


def dense_calibration(emb, labels, column=0, pos_margin=0.9, neg_margin=0.6):
    """Contrastive loss on dot products; each part averaged over its non-zero terms."""
    S = emb @ emb.T
    same = labels[:, None, column] == labels[None, :, column]
    off = ~torch.eye(len(labels), dtype=torch.bool)
    pos_terms = F.relu(pos_margin - S[same & off])
    neg_terms = F.relu(S[~same] - neg_margin)
    mean_nz = lambda t: t.sum() / (t > 0).sum().clamp(min=1)  # noqa: E731
    return mean_nz(pos_terms) + mean_nz(neg_terms)


def check(loss, dense, emb, labels, *ref, **dense_kwargs):
    x = emb.float().clone().requires_grad_(True)
    ref_emb, ref_labels = (ref[0].float(), ref[1]) if ref else (None, None)
    value = loss(x, labels, ref_emb=ref_emb, ref_labels=ref_labels)
    (grad,) = torch.autograd.grad(value, x)
    xr = emb.clone().requires_grad_(True)
    expected = dense(xr, labels, *ref, **dense_kwargs)
    (grad_ref,) = torch.autograd.grad(expected, xr)
    assert value.item() == pytest.approx(expected.item(), abs=1e-5)
    torch.testing.assert_close(grad.double(), grad_ref, atol=1e-4, rtol=1e-3)


# ---------------------------------------------------------------------------------------------


def test_reproduces_authors_reference_value_and_gradient():
    data, emb, labels = reference_batch("supap_loss_batch.json")
    x = emb.clone().requires_grad_(True)
    value = SupAP()(x, labels)
    value.backward()
    assert value.item() == pytest.approx(data["loss"], abs=1e-6)
    torch.testing.assert_close(x.grad, torch.tensor(data["grad"]), atol=1e-5, rtol=0)
    assert float(dense_supap_loss(emb.double(), labels)) == pytest.approx(data["loss"], abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("column", [0, 1])
def test_matches_dense_form(seed, column):
    check(SupAP(column=column), dense_supap_loss, unit(24, 8, seed), two_level_labels(24, seed), column=column)


def test_paper_branch_matches_dense_form_and_differs():
    emb, labels = unit(24, 8, 2), two_level_labels(24, 2)
    check(SupAP(paper_branch=True), dense_supap_loss, emb, labels, paper_branch=True)
    assert SupAP(paper_branch=True)(emb.float(), labels).item() > SupAP()(emb.float(), labels).item()


def test_exclude_self_and_reference_set_match_dense_form():
    emb, labels = unit(20, 8, 3), two_level_labels(20, 3)
    check(SupAP(exclude_self=True), dense_supap_loss, emb, labels, exclude_self=True)
    bank, bank_labels = unit(30, 8, 4), two_level_labels(30, 4, classes=9)
    check(SupAP(), dense_supap_loss, emb[:8], labels[:8], bank, bank_labels)


@pytest.mark.parametrize("seed", range(4))
def test_surrogate_loss_upper_bounds_exact_ap_loss(seed):
    emb, labels = unit(40, 16, seed).float(), two_level_labels(40, seed)
    ap, n_pos = SupAP().per_query(emb, labels)
    positives = labels[:, None, 0] == labels[None, :, 0]
    exact = average_precision(emb.double() @ emb.double().T, positives)
    assert bool((n_pos > 0).all())
    assert bool((1 - ap.double() >= 1 - exact - 1e-6).all())
    assert float((exact - ap.double()).max()) > 1e-3


def test_optimising_embeddings_raises_exact_ap():
    labels = two_level_labels(32, 5)
    positives = labels[:, None, 0] == labels[None, :, 0]
    param = torch.nn.Parameter(unit(32, 16, 5).float())
    opt = torch.optim.Adam([param], lr=0.05)

    def exact():
        e = F.normalize(param.detach(), dim=1).double()
        return float(average_precision(e @ e.T, positives).mean())

    before = exact()
    loss_fn = SupAP()
    for _ in range(15):
        opt.zero_grad()
        loss_fn(F.normalize(param, dim=1), labels).backward()
        opt.step()
    assert exact() > before + 0.3


# ---------------------------------------------------------------------------------------------
# calibration and ROADMAP


@pytest.mark.parametrize("column", [0, 1])
def test_calibration_matches_dense_form(column):
    emb, labels = unit(20, 6, 6), two_level_labels(20, 6)
    check(CalibrationLoss(column=column), dense_calibration, emb, labels, column=column)


def test_calibration_with_the_batch_as_reference_set_equals_same_batch():
    # the pair of an item with itself has s = 1 > 0.9: a zero term, outside the non-zero means
    emb, labels = unit(20, 6, 7).float(), two_level_labels(20, 7)
    loss = CalibrationLoss()
    assert loss(emb, labels, ref_emb=emb, ref_labels=labels).item() == pytest.approx(loss(emb, labels).item(), abs=1e-6)


def test_roadmap_is_weighted_sum():
    emb, labels = unit(24, 8, 8).float(), two_level_labels(24, 8)
    ap, cal = SupAP()(emb, labels), CalibrationLoss()(emb, labels)
    assert ROADMAP()(emb, labels).item() == pytest.approx((ap + cal).item(), rel=1e-6)
    suprank = ROADMAP(weights=(0.9, 0.1), column=1, paper_branch=True)
    assert suprank.supap.step.paper_branch and suprank.calibration.column == 1
    expected = 0.9 * SupAP(column=1, paper_branch=True)(emb, labels) + 0.1 * CalibrationLoss(column=1)(emb, labels)
    assert suprank(emb, labels).item() == pytest.approx(expected.item(), rel=1e-6)


def test_bad_arguments_are_rejected():
    emb, labels = unit(8, 4, 0).float(), two_level_labels(8, 0)
    with pytest.raises(ValueError, match="column=2"):
        SupAP(column=2)(emb, labels)
    with pytest.raises(ValueError, match="column=5"):
        CalibrationLoss(column=5)(emb, labels)
    with pytest.raises(ValueError, match="weights"):
        ROADMAP(weights=(1.0,))
