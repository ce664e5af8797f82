"""ListwiseAP (histogram-binned AP) against a loop reference, and multi-stage backpropagation."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hapkit.losses import ListwiseAP, TieAwareListwiseAP, multistage_backward
from hapkit.metrics import average_precision
from hapkit.losses.base import NoPositiveError


def membership(s, i, centres, delta):
    """Triangular membership of similarity s in bin i, end bins saturating (Revaud et al.)."""
    if i == 0 and s >= centres[0]:
        return torch.ones((), dtype=s.dtype)
    if i == len(centres) - 1 and s <= centres[-1]:
        return torch.ones((), dtype=s.dtype)
    return torch.clamp(1 - (s - centres[i]).abs() / delta, min=0)


def listwise_reference(emb, labels, num_bins=25, lo=0.0, hi=1.0, exclude_self=False,
                       ref_emb=None, ref_labels=None):
    same = ref_emb is None
    ref_emb = emb if same else ref_emb
    ref_labels = labels if same else ref_labels
    delta = (hi - lo) / (num_bins - 1)
    centres = [hi - i * delta for i in range(num_bins)]
    aps = []
    for q in range(emb.shape[0]):
        gallery = [j for j in range(ref_emb.shape[0]) if not (same and exclude_self and j == q)]
        pos = [j for j in gallery if ref_labels[j] == labels[q]]
        if not pos:
            continue
        s = {j: emb[q] @ ref_emb[j] for j in gallery}
        counts = [sum(membership(s[j], i, centres, delta) for j in gallery) for i in range(num_bins)]
        pos_counts = [sum(membership(s[j], i, centres, delta) for j in pos) for i in range(num_bins)]
        ap, cum, cum_pos = 0.0, 0.0, 0.0
        for i in range(num_bins):
            cum = cum + counts[i]
            cum_pos = cum_pos + pos_counts[i]
            ap = ap + cum_pos / (1e-16 + cum) * pos_counts[i] / len(pos)
        aps.append(ap)
    return 1 - torch.stack(aps).mean()


def off_diagonal(m):
    """(B, B) -> (B, B - 1): each query's row without the query itself."""
    B = m.shape[0]
    return m[~torch.eye(B, dtype=torch.bool)].view(B, B - 1)


def raw_batch(B=12, D=6, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=g, dtype=torch.float64), torch.arange(B) % classes


@pytest.mark.parametrize(
    "kwargs, ref_kwargs",
    [
        ({}, {}),
        ({"num_bins": 20, "sim_range": (-1.0, 1.0)}, {"num_bins": 20, "lo": -1.0, "hi": 1.0}),
        ({"num_bins": 7, "sim_range": (-0.5, 0.8), "exclude_self": True},
         {"num_bins": 7, "lo": -0.5, "hi": 0.8, "exclude_self": True}),
    ],
)
def test_matches_loop_reference(kwargs, ref_kwargs):
    raw, labels = raw_batch()
    labels[:3] = 9
    # normalising inside the graph makes s_qq = 1 flat, as in training
    x = raw.float().requires_grad_(True)
    value = ListwiseAP(**kwargs)(F.normalize(x, dim=1), labels)
    (grad,) = torch.autograd.grad(value, x)
    xr = raw.clone().requires_grad_(True)
    ref = listwise_reference(F.normalize(xr, dim=1), labels, **ref_kwargs)
    (grad_ref,) = torch.autograd.grad(ref, xr)
    assert value.item() == pytest.approx(ref.item(), abs=1e-5)
    torch.testing.assert_close(grad.double(), grad_ref, atol=1e-4, rtol=1e-3)


def test_reference_set_and_level():
    raw, fine = raw_batch(B=6, seed=1)
    ref_raw, ref_fine = raw_batch(B=10, seed=2)
    labels = torch.stack([fine, fine % 2], dim=1)
    ref_labels = torch.stack([ref_fine, ref_fine % 2], dim=1)
    e, r = F.normalize(raw, dim=1), F.normalize(ref_raw, dim=1)
    got = ListwiseAP(column=1)(e.float(), labels, ref_emb=r.float(), ref_labels=ref_labels)
    expected = listwise_reference(e, fine % 2, ref_emb=r, ref_labels=ref_fine % 2)
    assert got.item() == pytest.approx(expected.item(), abs=1e-5)


def test_presets():
    assert ListwiseAP().num_bins == 25 and ListwiseAP().sim_range == (0.0, 1.0)
    sup = ListwiseAP.from_preset("suprank", column=1)
    assert (sup.num_bins, sup.sim_range, sup.column) == (20, (-1.0, 1.0), 1)
    torch.testing.assert_close(sup.bin_centres()[[0, -1]], torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="preset"):
        ListwiseAP.from_preset("nope")


def test_memberships_partition_unity_and_saturate():
    loss = ListwiseAP(num_bins=5, sim_range=(0.0, 1.0))
    s = torch.tensor([-0.7, 0.0, 0.1, 0.55, 1.0, 1.3])
    m = loss.memberships(s)  # (Q, M)
    torch.testing.assert_close(m.sum(0), torch.ones(6))
    assert m[-1, 0] == 1 and m[0, -1] == 1  # below / above the range: end bins
    torch.testing.assert_close(m[:, 3], torch.tensor([0.0, 0.2, 0.8, 0.0, 0.0]))


def test_exact_when_similarities_sit_on_bin_centres():
    """Each item then falls in a single bin, and binned AP is the exact AP."""
    sims = torch.tensor([0.9, 0.7, 0.6, 0.3, 0.0, -0.2, -0.5, -0.9], dtype=torch.float64)
    ref = torch.stack([sims, (1 - sims**2).sqrt()], dim=1)
    query = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    ref_labels = torch.tensor([1, 0, 1, 0, 0, 1, 0, 1])
    loss = ListwiseAP(num_bins=21, sim_range=(-1, 1))(
        query.float(), torch.tensor([1]), ref_emb=ref.float(), ref_labels=ref_labels
    )
    expected = average_precision(sims[None], ref_labels[None] == 1).item()
    assert expected == pytest.approx((1 + 2 / 3 + 3 / 6 + 4 / 8) / 4)
    assert 1 - loss.item() == pytest.approx(expected, abs=1e-5)


def test_optimising_embeddings_raises_exact_ap():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(24, 8, generator=g).requires_grad_(True)
    labels = torch.arange(24) % 6
    positives = off_diagonal(labels[:, None] == labels[None, :])

    def ap_now():  # exact mAP without the query in its own ranking
        with torch.no_grad():
            e = F.normalize(x, dim=1)
            return average_precision(off_diagonal(e @ e.T), positives).mean().item()

    before = ap_now()
    loss_fn = ListwiseAP.from_preset("suprank")
    opt = torch.optim.Adam([x], lr=0.05)
    for _ in range(40):
        opt.zero_grad()
        loss_fn(F.normalize(x, dim=1), labels).backward()
        opt.step()
    assert ap_now() > before + 0.2


def test_autocast_bfloat16_computes_in_float32():
    raw, labels = raw_batch()
    e = F.normalize(raw, dim=1).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ListwiseAP()(e, labels)
        got_bf16 = ListwiseAP()(e.bfloat16(), labels)
    assert got.dtype == torch.float32
    assert got.item() == ListwiseAP()(e, labels).item()
    assert got_bf16.item() == ListwiseAP()(e.bfloat16().float(), labels).item()


def test_errors():
    e = F.normalize(torch.randn(8, 4), dim=1)
    with pytest.raises(NoPositiveError, match="sampler"):
        ListwiseAP()(e, torch.arange(8))
    with pytest.raises(ValueError, match="num_bins"):
        ListwiseAP(num_bins=1)
    with pytest.raises(ValueError, match="sim_range"):
        ListwiseAP(sim_range=(1, 0))
    with pytest.raises(ValueError, match="level"):
        ListwiseAP(column=2)(e, torch.arange(8) % 2)


# ---------------------------------------------------------------------------------------------
# multi-stage backpropagation
# ---------------------------------------------------------------------------------------------


class Normalize(nn.Module):
    def forward(self, x):
        return F.normalize(x, dim=1)


def small_model(batchnorm=False, dropout=0.0):
    torch.manual_seed(0)
    layers = [nn.Linear(10, 16)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(16))
    layers += [nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 8), Normalize()]
    return nn.Sequential(*layers)


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("batchnorm", [False, True])
def test_multistage_equals_full_batch_backprop(batchnorm):
    model = small_model(batchnorm=batchnorm).eval()  # eval-mode batch-norm: per-sample network
    images = torch.randn(26, 10, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(26) % 5
    loss_fn = ListwiseAP.from_preset("suprank")

    model.zero_grad()
    full = loss_fn(model(images), labels)
    full.backward()
    expected = grads(model)

    model.zero_grad()
    value = multistage_backward(model, images, labels, loss_fn, sub_batch_size=7)
    assert value.item() == pytest.approx(full.item(), abs=1e-6)
    for g, e in zip(grads(model), expected):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5)


def test_multistage_replays_dropout_and_updates_batchnorm_once():
    images = torch.randn(20, 10, generator=torch.Generator().manual_seed(2))
    labels = torch.arange(20) % 4
    loss_fn = ListwiseAP()

    # reference: the same sub-batches through one graph, from the same random state
    ref_model = small_model(batchnorm=True, dropout=0.3).train()
    torch.manual_seed(123)
    emb = torch.cat([ref_model(images[i : i + 6]) for i in range(0, 20, 6)])
    ref_loss = loss_fn(emb, labels)
    ref_loss.backward()
    after_ref = torch.get_rng_state()

    model = small_model(batchnorm=True, dropout=0.3).train()
    torch.manual_seed(123)
    value = multistage_backward(model, images, labels, loss_fn, sub_batch_size=6, progress=False)
    assert value.item() == pytest.approx(ref_loss.item(), abs=1e-6)
    for g, e in zip(grads(model), grads(ref_model)):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5)
    for (name, b), (_, rb) in zip(model.named_buffers(), ref_model.named_buffers()):
        torch.testing.assert_close(b, rb, msg=f"buffer {name}")
    assert torch.equal(torch.get_rng_state(), after_ref)


def test_multistage_scaler_and_errors():
    class Scaler:
        def scale(self, loss):
            return loss * 8.0

    model = small_model()
    images = torch.randn(12, 10)
    labels = torch.arange(12) % 3
    loss_fn = ListwiseAP()
    model.zero_grad()
    multistage_backward(model, images, labels, loss_fn, sub_batch_size=12)
    plain = grads(model)
    model.zero_grad()
    multistage_backward(model, images, labels, loss_fn, sub_batch_size=5, scaler=Scaler())
    for g, e in zip(grads(model), plain):
        torch.testing.assert_close(g, 8 * e, atol=1e-5, rtol=1e-5)

    with pytest.raises(ValueError, match="sub_batch_size"):
        multistage_backward(model, images, labels, loss_fn, sub_batch_size=0)
    with pytest.raises(ValueError, match="scalar"):
        multistage_backward(model, images, labels, lambda e, lab: e.sum(1), sub_batch_size=4)


# ------------------------------------------------------------------ naver's APLoss / TAPLoss


def naver_quantize(x, nq=25, lo=0.0, hi=1.0):
    """naver/deep-image-retrieval's quantiser written out: for bin k the two lines through
    (centre_k, 1) of slopes -a and +a, their minimum clamped at 0; the first and last bins are
    one-sided (a constant 1 on their outer side). Returns (N, nq, M)."""
    a = (nq - 1) / (hi - lo)
    k = torch.arange(nq, dtype=x.dtype).view(1, nq, 1)
    down = -a * x.unsqueeze(1) + (a * lo + (nq - k))  # 1 - a (x - c_k)
    up = a * x.unsqueeze(1) + ((2 - nq + k) - a * lo)  # 1 + a (x - c_k)
    down[:, 0] = 1.0
    up[:, nq - 1] = 1.0
    return torch.minimum(down, up).clamp(min=0)


def naver_ap(x, label, tie_aware=None):
    q = naver_quantize(x)
    c = q.sum(-1)
    cp = (q * label.unsqueeze(1)).sum(-1)
    if tie_aware is None:
        prec = cp.cumsum(-1) / (1e-16 + c.cumsum(-1))
        return (prec * cp / cp.sum(-1, keepdim=True)).sum(-1)
    C, Cp = c.cumsum(-1), cp.cumsum(-1)
    C1 = torch.cat([torch.zeros(len(x), 1, dtype=x.dtype), C[:, :-1]], 1)
    Cp1 = torch.cat([torch.zeros(len(x), 1, dtype=x.dtype), Cp[:, :-1]], 1)
    Np = label.sum(-1, keepdim=True)
    if tie_aware == "simplified":
        return (cp * (Cp1 + Cp + 1) / (C1 + C + 1) / Np).sum(-1)
    ratio = (cp - 1).clamp(min=0) / ((c - 1).clamp(min=0) + 1e-8)
    return (cp * (c * ratio + (Cp1 + 1 - ratio * (C1 + 1)) * torch.log((C + 1) / (C1 + 1))) / (c + 1e-8) / Np).sum(-1)


def test_binned_ap_reproduces_navers_values():
    x = torch.tensor([[0.9, 0.5, 0.1], [0.9, 0.9, 0.1]])
    pos = torch.tensor([[True, False, True]] * 2)
    ap = ListwiseAP().ap_from_scores(x, pos)
    tap = TieAwareListwiseAP().ap_from_scores(x, pos)
    taps = TieAwareListwiseAP(simplified=True).ap_from_scores(x, pos)
    # values of naver's APLoss / TAPLoss(simplified=False / True) on these lists (25 bins, [0, 1])
    torch.testing.assert_close(ap, torch.tensor([0.81667, 0.56667]), atol=1e-5, rtol=0)
    torch.testing.assert_close(tap, torch.tensor([0.73370, 0.64136]), atol=1e-5, rtol=0)
    torch.testing.assert_close(taps, torch.tensor([0.83218, 0.67417]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("tie_aware", [None, "full", "simplified"])
def test_binned_ap_equals_navers_quantiser_on_random_lists(tie_aware):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 40, generator=g, dtype=torch.float64) * 1.4 - 0.2  # beyond [0, 1] too
    label = torch.rand(6, 40, generator=g) < 0.3
    label[:, 0] = True
    loss = ListwiseAP() if tie_aware is None else TieAwareListwiseAP(simplified=tie_aware == "simplified")
    got = loss.ap_from_scores(x, label)
    torch.testing.assert_close(got, naver_ap(x, label.to(x.dtype), tie_aware), rtol=1e-6, atol=1e-7)


def test_revaud_preset_leaves_the_query_out_of_its_list():
    e = torch.nn.functional.normalize(torch.randn(12, 6, generator=torch.Generator().manual_seed(3)), dim=1)
    labels = torch.arange(12) % 3
    revaud = ListwiseAP.from_preset("revaud")
    assert (revaud.num_bins, revaud.sim_range, revaud.exclude_self) == (25, (0.0, 1.0), True)
    ap, n_pos = revaud.per_query(e, labels)
    s = e @ e.T
    keep = ~torch.eye(12, dtype=torch.bool)
    lists = s[keep].view(12, 11)
    pos = (labels[:, None] == labels[None, :])[keep].view(12, 11)
    torch.testing.assert_close(ap, naver_ap(lists.double(), pos.double()).float(), atol=1e-6, rtol=1e-5)
    assert n_pos.tolist() == [3] * 12
    tap = TieAwareListwiseAP.from_preset("revaud")
    assert isinstance(tap, TieAwareListwiseAP) and tap.exclude_self


def test_chunks_of_queries_give_the_same_loss_and_gradients():
    e = torch.nn.functional.normalize(torch.randn(48, 8, generator=torch.Generator().manual_seed(5)), dim=1)
    labels = torch.arange(48) % 6
    grads = []
    for chunk in (None, 25 * 48 * 5):  # one chunk, and chunks of 5 queries (recomputed in backward)
        x = e.clone().requires_grad_(True)
        loss = ListwiseAP(chunk_elements=chunk)(x, labels)
        loss.backward()
        grads.append((loss.detach(), x.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-6, rtol=1e-5)
