"""The smoothed-rank machinery: step functions, chunked upper-step sums, exact counts, smooth H-AP.

Every function is checked against a dense form written here (loops or (Q, M, M) tensors).
"""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hapkit.losses.rank import (
    UpperStep,
    exact_shared_counts,
    float32_compute,
    heaviside_step,
    sigmoid_step,
    smooth_hap,
    upper_rank_sum,
    upper_step,
    upper_step_derivative,
)

ROOT = Path(__file__).resolve().parents[1]


def dense_upper(d, tau=0.01, rho=100.0, delta=0.05, start=0.5, offset=1.44, paper_branch=False):
    """The piecewise upper step (docs/definitions.md, 'Step functions'), written out branch by branch."""
    sig = torch.sigmoid((d / tau).clamp(-50, 50))
    lin = rho * d + offset if paper_branch else rho * (d - delta) + offset
    out = torch.where(d > delta, lin, start + sig)
    return torch.where(d <= 0, sig, out)


def random_scores(Q, M, seed, ties=False):
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(Q, M, generator=g) * 0.6 - 0.2
    if ties:  # a coarse grid makes many exact ties, which H(0) = 1 must count
        s = (s * 20).round() / 20
    return s


def random_levels(Q, M, top, seed, ignored=True):
    g = torch.Generator().manual_seed(seed + 1)
    low = -1 if ignored else 0
    return torch.randint(low, top + 1, (Q, M), generator=g)


# ---------------------------------------------------------------------------------------------
# step functions


def test_upper_step_branch_values():
    d = torch.tensor([-0.1, 0.0, 0.02, 0.05, 0.2])
    sig = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731
    expected = [sig(-10.0), 0.5, 0.5 + sig(2.0), 0.5 + sig(5.0), 100 * 0.15 + 1.44]
    torch.testing.assert_close(upper_step(d), torch.tensor(expected))
    paper = upper_step(d, paper_branch=True)
    assert float(paper[-1]) == pytest.approx(100 * 0.2 + 1.44)
    inat = upper_step(d, start=0.0, offset=1.0)
    assert float(inat[2]) == pytest.approx(sig(2.0)) and float(inat[4]) == pytest.approx(16.0)


def test_sigmoid_step_clamps_exponent():
    d = torch.tensor([-10.0, 10.0])
    out = sigmoid_step(d, 0.01)
    assert float(out[0]) == pytest.approx(1.0 / (1.0 + math.exp(50.0)), rel=1e-5)
    assert float(out[1]) == 1.0


def test_upper_step_bounds_heaviside_with_start_at_least_half():
    # start + sigmoid(0+) >= 1 needs start >= 0.5: the SOP defaults give an upper bound
    d = torch.linspace(-1, 1, 4001)
    assert bool((upper_step(d) >= heaviside_step(d)).all())
    assert bool((upper_step(d, paper_branch=True) >= heaviside_step(d)).all())


def test_heaviside_counts_ties_and_has_no_gradient():
    d = torch.tensor([-1e-7, 0.0, 1e-7], requires_grad=True)
    h = heaviside_step(d)
    assert h.tolist() == [0.0, 1.0, 1.0] and not h.requires_grad


@pytest.mark.parametrize("paper_branch", [False, True])
def test_upper_step_derivative_matches_autograd(paper_branch):
    d = torch.cat([torch.linspace(-0.8, 0.3, 1101), torch.tensor([0.0, 0.05, -0.5, 0.5])])
    d = d.double().requires_grad_(True)
    (auto,) = torch.autograd.grad(upper_step(d, paper_branch=paper_branch).sum(), d)
    torch.testing.assert_close(upper_step_derivative(d.detach()), auto)
    step = UpperStep(paper_branch=paper_branch)
    torch.testing.assert_close(step._pair_slope(d.detach()), auto)
    torch.testing.assert_close(step._pair_sum(d.detach()[None]), upper_step(d, paper_branch=paper_branch).sum()[None].detach())


def test_upper_step_rejects_bad_parameters():
    with pytest.raises(ValueError, match="tau"):
        UpperStep(tau=0.0)
    with pytest.raises(ValueError, match="rho"):
        UpperStep(rho=-1.0)


# ---------------------------------------------------------------------------------------------
# chunked sums


def dense_upper_rank_sum(scores, levels, **step):
    """sum_{j : 0 <= lev_j < lev_k} upper(s_j - s_k) with a (Q, M, M) tensor."""
    d = scores[:, None, :] - scores[:, :, None]  # [q, k, j]
    less = (levels[:, None, :] >= 0) & (levels[:, None, :] < levels[:, :, None])
    return (dense_upper(d, **step) * less).sum(-1)


@pytest.mark.parametrize("chunk", [1, 37, 10**7])
@pytest.mark.parametrize("ties", [False, True])
def test_upper_rank_sum_matches_dense_value_and_gradient(chunk, ties):
    Q, M = 7, 23  # a reference set larger than the batch
    s = random_scores(Q, M, seed=3, ties=ties).double()
    lev = random_levels(Q, M, top=3, seed=3)
    weights = torch.rand(Q, M, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    x = s.clone().requires_grad_(True)
    out = upper_rank_sum(x, lev, UpperStep(), chunk_elements=chunk)
    (grad,) = torch.autograd.grad((out * weights).sum(), x)
    xr = s.clone().requires_grad_(True)
    ref = dense_upper_rank_sum(xr, lev)
    (grad_ref,) = torch.autograd.grad((ref * weights).sum(), xr)
    torch.testing.assert_close(out, ref.detach())
    torch.testing.assert_close(grad, grad_ref)
    assert bool((out[lev <= 0] == 0).all())  # nothing is less relevant than level 0 / ignored


def test_upper_rank_sum_options_and_float32():
    s = random_scores(5, 16, seed=4)
    lev = random_levels(5, 16, top=2, seed=4, ignored=False)
    opts = dict(tau=0.05, rho=10.0, delta=0.1, start=0.0, offset=1.0, paper_branch=True)
    out = upper_rank_sum(s, lev, UpperStep(**opts))
    torch.testing.assert_close(out, dense_upper_rank_sum(s, lev, **opts), rtol=1e-5, atol=1e-5)
    assert out.dtype == torch.float32


def test_upper_rank_sum_checks_shapes():
    with pytest.raises(ValueError, match="scores and shared"):
        upper_rank_sum(torch.zeros(3, 4), torch.zeros(3, 5, dtype=torch.long))


def test_exact_shared_counts_brute_force_with_ties():
    s = random_scores(6, 30, seed=5, ties=True)
    lev = random_levels(6, 30, top=2, seed=5)
    counts = exact_shared_counts(s, lev, 2)
    for q in range(6):
        for k in range(30):
            for v in range(3):
                n = sum(1 for j in range(30) if lev[q, j] == v and s[q, j] >= s[q, k])
                assert counts[q, k, v] == n


# ---------------------------------------------------------------------------------------------
# smooth H-AP


def dense_smooth_hap(scores, levels, shared_rel, step=None):
    """The H-AP surrogate (docs/definitions.md, 'HAPPIER: H-AP lower bound') with (Q, M, M) tensors; ignored items (level < 0) removed."""
    step = step or {}
    Q, M = scores.shape
    valid = levels >= 0
    rel = torch.where(valid, shared_rel.gather(1, levels.clamp(min=0)), torch.zeros_like(scores))
    d = scores[:, None, :] - scores[:, :, None]  # [q, k, j] = s_j - s_k
    not_k = ~torch.eye(M, dtype=torch.bool)[None]
    comp = valid[:, None, :] & not_k
    less = levels[:, None, :] < levels[:, :, None]
    steps = torch.where(less, dense_upper(d, **step), (d >= 0).to(d.dtype))
    rank = 1.0 + (steps * comp).sum(-1)
    min_rel = torch.minimum(rel[:, None, :], rel[:, :, None])
    h_rank = rel + ((d >= 0) * comp * min_rel).sum(-1)
    return (torch.where(rel > 0, h_rank / rank, torch.zeros_like(rank))).sum(-1) / rel.sum(-1)


@pytest.mark.parametrize("ties", [False, True])
def test_smooth_hap_matches_dense(ties):
    Q, M = 6, 20
    s = random_scores(Q, M, seed=6, ties=ties).double()
    lev = random_levels(Q, M, top=3, seed=6)
    lev[:, 0] = 3  # every query has something relevant
    lev[:, 1], s[:, 1] = -1, 1.0  # an ignored item above everything (an excluded query itself)
    shared_rel = torch.rand(Q, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    shared_rel[:, 0] = 0.0
    x = s.clone().requires_grad_(True)
    hap, total = smooth_hap(x, lev, shared_rel)
    (grad,) = torch.autograd.grad(hap.sum(), x)
    xr = s.clone().requires_grad_(True)
    ref = dense_smooth_hap(xr, lev, shared_rel)
    (grad_ref,) = torch.autograd.grad(ref.sum(), xr)
    torch.testing.assert_close(hap, ref.detach())
    torch.testing.assert_close(grad, grad_ref)
    expected_total = torch.where(lev >= 0, shared_rel.gather(1, lev.clamp(min=0)), 0.0).sum(1)
    torch.testing.assert_close(total, expected_total)


def test_smooth_hap_binary_is_smooth_ap_upper_bound_form():
    # one level with relevance [0, 1]: rank+ / rank~ averaged over positives
    s = random_scores(4, 12, seed=7).double()
    lev = random_levels(4, 12, top=1, seed=7, ignored=False)
    lev[:, 0] = 1
    hap, total = smooth_hap(s, lev, torch.tensor([[0.0, 1.0]], dtype=torch.float64).expand(4, 2))
    for q in range(4):
        pos = [k for k in range(12) if lev[q, k] == 1]
        ap = 0.0
        for k in pos:
            d = s[q] - s[q, k]
            others = torch.arange(12) != k
            rank = 1 + float((torch.where(lev[q] == 1, (d >= 0).double(), dense_upper(d)) * others).sum())
            rank_pos = 1 + float(((d >= 0) & (lev[q] == 1) & others).sum())
            ap += rank_pos / rank
        assert float(hap[q]) == pytest.approx(ap / len(pos), rel=1e-12)
        assert float(total[q]) == len(pos)


def test_float32_compute_disables_autocast():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
        with float32_compute(torch.device("cpu")):
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# memory: the point of the chunked implementation


def import_benchmark():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_losses
    finally:
        sys.path.pop(0)
    return bench_losses


def test_benchmark_dense_forms_agree_with_hapkit():
    bench = import_benchmark()
    emb, labels = bench.sop_like_batch(32, 16)
    for name, (_, dense) in bench.LOSSES.items():
        if dense is None or not bench._available(name):
            continue
        ours = bench._build(name, "hapkit", 32, 16)(emb, labels)
        theirs = bench._build(name, "dense", 32, 16)(emb, labels)
        assert ours.item() == pytest.approx(theirs.item(), abs=1e-5), name


@pytest.mark.slow
def test_peak_memory_is_quadratic_not_cubic():
    """Forward + backward of HAPLoss at B = 384 stays far below one (B, B, B) float32 tensor."""
    bench_losses = import_benchmark()
    B = 384
    cube_mb = B**3 * 4 / 2**20  # 216 MB: a single dense (B, B, B) tensor
    result = bench_losses.measure_in_subprocess("HAPLoss", "hapkit", B, dim=128, repeats=1, threads=1)
    assert result["peak_mb"] < cube_mb / 4, result
