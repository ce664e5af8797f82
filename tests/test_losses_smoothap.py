"""SmoothAP against a loop reference, against pytorch-metric-learning, and its errors."""

import pytest
import torch
import torch.nn.functional as F

from hapkit.hierarchy import LabelError
from hapkit.metrics import average_precision
from hapkit.losses import SmoothAP
from hapkit.losses.base import NoPositiveError


def sig(x, tau):
    return torch.sigmoid((x / tau).clamp(-50, 50))


def smooth_ap_reference(emb, labels, ref_emb=None, ref_labels=None, tau=0.01, exclude_self=False):
    """Loop form of Smooth-AP (Brown et al. 2020) on 1-D labels, float64."""
    same = ref_emb is None
    ref_emb = emb if same else ref_emb
    ref_labels = labels if same else ref_labels
    aps = []
    for q in range(emb.shape[0]):
        gallery = [j for j in range(ref_emb.shape[0]) if not (same and exclude_self and j == q)]
        s = {j: emb[q] @ ref_emb[j] for j in gallery}
        pos = [j for j in gallery if ref_labels[j] == labels[q]]
        if not pos:
            continue
        total = 0.0
        for k in pos:
            rank = 1.0 + sum(sig(s[j] - s[k], tau) for j in gallery if j != k)
            rank_pos = 1.0 + sum(sig(s[j] - s[k], tau) for j in pos if j != k)
            total = total + rank_pos / rank
        aps.append(total / len(pos))
    return 1.0 - torch.stack(aps).mean()


def off_diagonal(m):
    """(B, B) -> (B, B - 1): each query's row without the query itself."""
    B = m.shape[0]
    return m[~torch.eye(B, dtype=torch.bool)].view(B, B - 1)


def batch(B=12, D=6, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=1)
    labels = torch.arange(B) % classes
    return emb, labels


def check_value_and_grad(loss_fn, ref_fn, emb, *args):
    x = emb.clone().float().requires_grad_(True)
    value = loss_fn(x, *args)
    (grad,) = torch.autograd.grad(value, x)
    xr = emb.clone().requires_grad_(True)
    ref = ref_fn(xr, *args)
    (grad_ref,) = torch.autograd.grad(ref, xr)
    assert float(value.detach()) == pytest.approx(float(ref.detach()), abs=1e-5)
    torch.testing.assert_close(grad.double(), grad_ref, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("exclude_self", [False, True])
def test_matches_loop_reference(exclude_self):
    emb, labels = batch()
    labels[:3] = 7  # unequal class sizes
    check_value_and_grad(
        SmoothAP(exclude_self=exclude_self),
        lambda x, lab: smooth_ap_reference(x, lab, exclude_self=exclude_self),
        emb, labels,
    )


def test_reference_set_and_temperature():
    emb, labels = batch(B=6, seed=1)
    ref, ref_labels = batch(B=10, seed=2)
    ref_labels = ref_labels % 3
    x = emb.float().requires_grad_(True)
    value = SmoothAP(tau=0.05)(x, labels, ref_emb=ref.float(), ref_labels=ref_labels)
    xr = emb.clone().requires_grad_(True)
    expected = smooth_ap_reference(xr, labels, ref, ref_labels, tau=0.05)
    assert float(value.detach()) == pytest.approx(float(expected.detach()), abs=1e-5)
    (g,) = torch.autograd.grad(value, x)
    (gr,) = torch.autograd.grad(expected, xr)
    torch.testing.assert_close(g.double(), gr, atol=1e-4, rtol=1e-3)


def test_level_selects_label_column():
    emb, fine = batch(B=12, classes=6)
    labels = torch.stack([fine, fine // 3], dim=1)
    loss = SmoothAP(column=1)(emb.float(), labels)
    expected = smooth_ap_reference(emb, fine // 3)
    assert float(loss) == pytest.approx(float(expected), abs=1e-5)


@pytest.mark.parametrize("chunk_elements, chunks", [(64, 16), (64 * 3, 6), (None, 1)])
def test_chunking_gives_identical_values_and_gradients(chunk_elements, chunks):
    from hapkit.losses import smoothap

    # 16 queries with 4 positives each against a gallery of 16: 64 values per query
    budget = chunk_elements if chunk_elements is not None else smoothap.CHUNK_ELEMENTS
    assert len(list(smoothap.query_chunks(torch.full((16,), 4), 16, budget))) == chunks
    emb, labels = batch(B=16)
    x1 = emb.float().requires_grad_(True)
    x2 = emb.float().requires_grad_(True)
    v1 = SmoothAP()(x1, labels)
    v2 = SmoothAP(chunk_elements=chunk_elements)(x2, labels)
    v1.backward()
    v2.backward()
    assert v1.item() == pytest.approx(v2.item(), abs=1e-6)
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-6, rtol=1e-5)


def test_agrees_with_pml_where_its_assumption_holds_and_not_elsewhere():
    """PML 2.9.0's SmoothAPLoss reshapes the batch into class blocks: it is right only for a
    batch sorted by class with as many classes as samples per class (it mixes the two counts)."""
    from pytorch_metric_learning.losses import SmoothAPLoss

    pml = SmoothAPLoss(temperature=0.01)
    emb, _ = batch(B=16)
    emb = emb.float()
    square = torch.arange(16) // 4  # 4 classes x 4 samples, sorted
    assert float(SmoothAP()(emb, square)) == pytest.approx(float(pml(emb, square)), abs=1e-5)

    emb = emb[:12]
    for labels in (
        torch.arange(12) // 4,  # 3 classes x 4 samples, sorted: equal counts, still wrong in PML
        torch.arange(12) % 4,  # 4 x 3, interleaved
    ):
        ours = float(SmoothAP()(emb, labels))
        assert ours == pytest.approx(float(smooth_ap_reference(emb.double(), labels)), abs=1e-5)
        assert abs(float(pml(emb, labels)) - ours) > 1e-3

    unequal = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    ours = float(SmoothAP()(emb, unequal))
    assert ours == pytest.approx(float(smooth_ap_reference(emb.double(), unequal)), abs=1e-5)
    with pytest.raises(ValueError):  # PML 2.9.0 refuses unequal class counts
        pml(emb, unequal)


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
    loss_fn = SmoothAP()
    opt = torch.optim.Adam([x], lr=0.05)
    for _ in range(40):
        opt.zero_grad()
        loss_fn(F.normalize(x, dim=1), labels).backward()
        opt.step()
    assert ap_now() > before + 0.2


def test_autocast_bfloat16_computes_in_float32():
    emb, labels = batch(B=12)
    emb = emb.float()
    expected = SmoothAP()(emb, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = SmoothAP()(emb, labels)
        got_bf16 = SmoothAP()(emb.bfloat16(), labels)
    assert got.dtype == torch.float32
    assert float(got) == float(expected)
    assert float(got_bf16) == float(SmoothAP()(emb.bfloat16().float(), labels))


def test_errors():
    emb, labels = batch(B=8)
    emb = emb.float()
    with pytest.raises(ValueError, match="embeddings must be a"):
        SmoothAP()(emb[0], labels)
    with pytest.raises(ValueError, match="label rows"):
        SmoothAP()(emb, labels[:5])
    with pytest.raises(LabelError, match="two parents"):
        SmoothAP()(emb, torch.tensor([[0, 0], [0, 1]] * 4))
    with pytest.raises(NoPositiveError, match="sampler"):
        SmoothAP()(emb, torch.arange(8))
    with pytest.raises(ValueError, match="level"):
        SmoothAP(column=1)(emb, labels)
    with pytest.raises(ValueError, match="tau"):
        SmoothAP(tau=0.0)
