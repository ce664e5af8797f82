"""SupRecall and SupNDCG against loop references, their bound property and their errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from hapkit.losses import SupNDCG, SupRecall
from hapkit.losses.base import NoPositiveError
from hapkit.metrics import ndcg as exact_ndcg

KS = (1, 2, 4, 8, 16)


def sig(x, tau):
    return torch.sigmoid((x / tau).clamp(-50, 50))


def upper(d, tau=0.01, rho=100.0, delta=0.05, start=0.5, offset=1.44, paper_branch=False):
    if d <= 0:
        return sig(d, tau)
    if d <= delta:
        return start + sig(d, tau)
    return rho * (d if paper_branch else d - delta) + offset


def heaviside(d):
    return 1.0 if d >= 0 else 0.0  # exact step: a constant, no gradient


def gallery_of(q, n, same, exclude_self):
    return [j for j in range(n) if not (same and exclude_self and j == q)]


def recall_reference(emb, labels, ks=KS, temp=1.0, exclude_self=False, ref_emb=None,
                     ref_labels=None, **step):
    same = ref_emb is None
    ref_emb = emb if same else ref_emb
    ref_labels = labels if same else ref_labels
    scores = []
    for q in range(emb.shape[0]):
        gallery = gallery_of(q, ref_emb.shape[0], same, exclude_self)
        pos = [j for j in gallery if ref_labels[j] == labels[q]]
        if not pos:
            continue
        s = {j: emb[q] @ ref_emb[j] for j in gallery}
        ranks = {}
        for k in pos:
            r = 1.0
            for j in gallery:
                if j == k:
                    continue
                r = r + (heaviside(s[j] - s[k]) if j in pos else upper(s[j] - s[k], **step))
            ranks[k] = r
        rec = sum(sum(sig(k_ - ranks[k], temp) for k in pos) / min(len(pos), k_) for k_ in ks)
        scores.append(rec / len(ks))
    return 1 - torch.stack(scores).mean()


def shared(a, b):
    return sum(int(x == y) for x, y in zip(a.tolist(), b.tolist()))


def ndcg_reference(emb, labels, exclude_self=False, **step):
    scores = []
    for q in range(emb.shape[0]):
        gallery = gallery_of(q, emb.shape[0], True, exclude_self)
        s = {j: emb[q] @ emb[j] for j in gallery}
        V = {j: shared(labels[q], labels[j]) for j in gallery}
        dcg = 0.0
        for k in gallery:
            if V[k] == 0:
                continue
            r = torch.ones((), dtype=emb.dtype)
            for j in gallery:
                if j != k:
                    r = r + (upper(s[j] - s[k], **step) if V[j] < V[k] else heaviside(s[j] - s[k]))
            dcg = dcg + (2 ** V[k] - 1) / torch.log2(1 + r)
        gains = sorted((2 ** v - 1 for v in V.values()), reverse=True)
        ideal = sum(g / math.log2(1 + i) for i, g in enumerate(gains, start=1))
        if ideal > 0:
            scores.append(dcg / ideal)
    return 1 - torch.stack(scores).mean()


def exact_ranking(scores_row):
    return sorted(range(len(scores_row)), key=lambda j: (-float(scores_row[j]), j))


def exact_recall(scores, positives, ks=KS):
    out = []
    for q in range(scores.shape[0]):
        n_pos = int(positives[q].sum())
        if not n_pos:
            continue
        order = exact_ranking(scores[q])
        out.append(sum(sum(bool(positives[q, j]) for j in order[:k]) / min(n_pos, k) for k in ks) / len(ks))
    return sum(out) / len(out)


def off_diagonal(m):
    """(B, B) -> (B, B - 1): each query's row without the query itself."""
    B = m.shape[0]
    return m[~torch.eye(B, dtype=torch.bool)].view(B, B - 1)


def two_level(B=12, fine=6, seed=0, D=6):
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(B, D, generator=g, dtype=torch.float64)
    f = torch.arange(B) % fine
    return raw, torch.stack([f, f // 3], dim=1)


def compare(loss, ref_fn, raw, *args):
    x = raw.float().requires_grad_(True)
    value = loss(F.normalize(x, dim=1), *args)
    (g,) = torch.autograd.grad(value, x)
    xr = raw.clone().requires_grad_(True)
    ref = ref_fn(F.normalize(xr, dim=1), *args)
    (gr,) = torch.autograd.grad(ref, xr)
    assert value.item() == pytest.approx(ref.item(), abs=1e-5)
    torch.testing.assert_close(g.double(), gr, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("exclude_self", [False, True])
def test_recall_matches_loop_reference(exclude_self):
    raw, labels = two_level(B=14)
    labels[:3] = torch.tensor([5, 1])  # unequal class sizes
    compare(
        SupRecall(exclude_self=exclude_self),
        lambda x, lab: recall_reference(x, lab[:, 0], exclude_self=exclude_self),
        raw, labels,
    )


def test_recall_options_level_reference_set_paper_branch():
    raw, labels = two_level(B=8, seed=1)
    ref_raw, ref_labels = two_level(B=12, seed=2)
    kw = dict(ks=(1, 3), temp=0.5, delta=0.1, offset=1.2, paper_branch=True)
    e, r = F.normalize(raw, dim=1), F.normalize(ref_raw, dim=1)
    got = SupRecall(column=1, **kw)(e.float(), labels, ref_emb=r.float(), ref_labels=ref_labels)
    step = {k: kw[k] for k in ("delta", "offset", "paper_branch")}
    expected = recall_reference(e, labels[:, 1], ks=(1, 3), temp=0.5, ref_emb=r,
                                ref_labels=ref_labels[:, 1], **step)
    assert got.item() == pytest.approx(expected.item(), abs=1e-5)


@pytest.mark.parametrize("exclude_self", [False, True])
def test_ndcg_matches_loop_reference(exclude_self):
    raw, labels = two_level(B=12)
    compare(
        SupNDCG(exclude_self=exclude_self),
        lambda x, lab: ndcg_reference(x, lab, exclude_self=exclude_self),
        raw, labels,
    )


def test_ndcg_three_levels_and_start_offset():
    raw, labels = two_level(B=12, seed=5)
    labels = torch.cat([labels, (labels[:, 1:] // 2)], dim=1)
    compare(
        SupNDCG(start=0.0, offset=1.0),
        lambda x, lab: ndcg_reference(x, lab, start=0.0, offset=1.0),
        raw, labels,
    )


def test_chunking_gives_identical_values_and_gradients():
    raw, labels = two_level(B=16)
    for make in (lambda c: SupRecall(chunk_elements=c), lambda c: SupNDCG(chunk_elements=c)):
        x1 = raw.float().requires_grad_(True)
        x2 = raw.float().requires_grad_(True)
        v1 = make(None)(F.normalize(x1, dim=1), labels)
        v2 = make(5)(F.normalize(x2, dim=1), labels)
        v1.backward()
        v2.backward()
        assert v1.item() == pytest.approx(v2.item(), abs=1e-6)
        torch.testing.assert_close(x1.grad, x2.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_ndcg_surrogate_lower_bounds_exact_ndcg(seed):
    raw, labels = two_level(B=16, seed=seed)
    if seed % 2:  # trained-like batch: samples close to a class centre, plus exact ties
        centres = torch.randn(6, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        raw = centres[labels[:, 0]] + 0.1 * raw
        raw[1] = raw[0]
    e = F.normalize(raw, dim=1).float()
    smooth, ideal = SupNDCG().per_query(e, labels)
    V = (labels[:, None, :] == labels[None, :, :]).sum(-1)
    exact = exact_ndcg(e @ e.T, V)  # the query is in its own ranking, as in the loss
    assert bool((ideal > 0).all())
    assert bool((smooth.double() <= exact + 1e-6).all())
    assert bool((smooth.double() < exact - 1e-3).any())  # a real bound, not an equality


def optimise(loss_fn, metric, labels, steps=40, class_offset=0.0):
    g = torch.Generator().manual_seed(3)
    fine = labels if labels.dim() == 1 else labels[:, 0]
    centres = torch.randn(int(fine.max()) + 1, 8, generator=g)
    x = (torch.randn(24, 8, generator=g) + class_offset * centres[fine]).requires_grad_(True)
    before = metric(x)
    opt = torch.optim.Adam([x], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(F.normalize(x, dim=1), labels).backward()
        opt.step()
    return before, metric(x)


def test_optimising_embeddings_raises_exact_recall():
    labels = torch.arange(24) % 6
    positives = labels[:, None] == labels[None, :]
    positives.fill_diagonal_(False)

    def recall(x):
        with torch.no_grad():
            e = F.normalize(x, dim=1)
            s = e @ e.T
            s.fill_diagonal_(-float("inf"))
            return exact_recall(s, positives)

    # from a partly trained start: on random embeddings most positives have rank~ > k + 50,
    # where sigmoid_1(k - rank~) is clamped flat and gives no gradient at all
    before, after = optimise(SupRecall(), recall, labels, class_offset=0.5)
    assert after > before + 0.2


def test_optimising_embeddings_raises_exact_ndcg():
    fine = torch.arange(24) % 8
    labels = torch.stack([fine, fine // 4], dim=1)
    V = off_diagonal((labels[:, None, :] == labels[None, :, :]).sum(-1))

    def ndcg(x):  # exact NDCG without the query in its own ranking
        with torch.no_grad():
            e = F.normalize(x, dim=1)
            return exact_ndcg(off_diagonal(e @ e.T), V).mean().item()

    before, after = optimise(SupNDCG(), ndcg, labels)
    assert after > before + 0.2


@pytest.mark.parametrize("make", [SupRecall, SupNDCG])
def test_autocast_bfloat16_computes_in_float32(make):
    raw, labels = two_level()
    e = F.normalize(raw, dim=1).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = make()(e, labels)
        got_bf16 = make()(e.bfloat16(), labels)
    assert got.dtype == torch.float32
    assert got.item() == make()(e, labels).item()
    assert got_bf16.item() == make()(e.bfloat16().float(), labels).item()


def test_errors():
    e = F.normalize(torch.randn(6, 4), dim=1)
    with pytest.raises(NoPositiveError, match="sampler"):
        SupRecall()(e, torch.arange(6))
    with pytest.raises(NoPositiveError, match="coarsest"):
        SupNDCG()(e, torch.stack([torch.arange(6), torch.arange(6)], dim=1))
    with pytest.raises(ValueError, match="ks"):
        SupRecall(ks=(0, 2))
    with pytest.raises(ValueError, match="temp"):
        SupRecall(temp=0)
    with pytest.raises(ValueError, match="tau"):
        SupNDCG(tau=-1)
    with pytest.raises(ValueError, match="level"):
        SupRecall(column=3)(e, torch.arange(6) % 2)
    with pytest.raises(ValueError, match="ref_labels"):
        SupNDCG()(e, torch.arange(6) % 2, ref_emb=e)
