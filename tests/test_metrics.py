"""Exact ranking metrics (hapkit.metrics) against a pure-Python brute force and other libraries."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hapkit import metrics as M
from hapkit.hierarchy import relevance as make_relevance

NAN = float("nan")


# ----------------------------------------------------------------------------------------------
# Brute-force reference: loops over one query's explicit ranking. Also imported by
# test_evaluate.py.


def bf_ranking(scores, exclude=None):
    """Gallery indices in rank order: decreasing score, ties to the lower index."""
    items = [j for j in range(len(scores)) if j != exclude]
    return sorted(items, key=lambda j: (-scores[j], j))


def bf_metrics(scores, V, L, rel=None, ks=(1, 2, 4), exclude=None) -> dict[str, float]:
    """Every metric of one query, straight from docs/definitions.md, 'Metrics'."""
    order = bf_ranking(list(scores), exclude)
    Vr = [int(V[j]) for j in order]
    out: dict[str, float] = {}
    for c in range(L):
        pos = [v >= L - c for v in Vr]
        P = sum(pos)
        if P == 0:
            for name in ["AP", "mAP@R", "P@1"] + [f"R@{k}" for k in ks]:
                out[f"{name}@{c}"] = NAN
            continue
        ap = mapr = 0.0
        seen = 0
        for i, p in enumerate(pos):
            if p:
                seen += 1
                ap += seen / (i + 1)
                if i + 1 <= P:
                    mapr += seen / (i + 1)
        out[f"AP@{c}"] = ap / P
        out[f"mAP@R@{c}"] = mapr / P
        out[f"P@1@{c}"] = float(pos[0])
        for k in ks:
            out[f"R@{k}@{c}"] = float(any(pos[:k]))
    if rel is not None:
        rr = [float(rel[j]) for j in order]
        total = sum(rr)
        hap = 0.0
        for k, rk in enumerate(rr):
            if rk > 0:
                hrank = sum(min(rj, rk) for rj in rr[: k + 1] if rj > 0)
                hap += hrank / (k + 1)
        out["H-AP"] = hap / total if total > 0 else NAN
    ideal = sorted(Vr, reverse=True)
    dcg = sum((2**v - 1) / math.log2(i + 2) for i, v in enumerate(Vr))
    idcg = sum((2**v - 1) / math.log2(i + 2) for i, v in enumerate(ideal))
    out["NDCG"] = dcg / idcg if idcg > 0 else NAN
    R = sum(v > 0 for v in Vr)
    asi = 0.0
    for n in range(1, R + 1):
        asi += sum(min(Vr[:n].count(v), ideal[:n].count(v)) for v in range(1, L + 1)) / n
    out["ASI"] = asi / R if R else NAN
    for v in range(1, L + 1):
        kept = [x for x in Vr if x <= v]
        P = kept.count(v)
        if P == 0:
            out[f"AP#{v}"] = NAN
            continue
        seen = 0
        s = 0.0
        for i, x in enumerate(kept):
            if x == v:
                seen += 1
                s += seen / (i + 1)
        out[f"AP#{v}"] = s / P
    return out


def bf_binary_asi(scores, positive, exclude=None) -> float:
    """Binary ASI of one query from its definition: (1/|P|) sum_{n=1..|P|} #(positives in top n) / n."""
    order = bf_ranking(list(scores), exclude)
    pos = [bool(positive[j]) for j in order]
    P = sum(pos)
    if P == 0:
        return NAN
    return sum(sum(pos[:n]) / n for n in range(1, P + 1)) / P


def assert_close(got: dict, want: dict, tol: float = 1e-9, context=""):
    for name, w in want.items():
        g = got[name]
        if math.isnan(w):
            assert math.isnan(g), f"{name}: expected NaN, got {g} {context}"
        else:
            assert abs(g - w) <= tol, f"{name}: {g} != {w} {context}"


def hapkit_metrics(S, V, L, rel=None, ks=(1, 2, 4), exclude=None) -> list[dict[str, float]]:
    """The same metrics from hapkit, one dict per query."""
    rr = M.rank_relevant(S, V, exclude=exclude, num_levels=L)
    cols: dict[str, torch.Tensor] = {"NDCG": rr.ndcg(), "ASI": rr.asi()}
    for c in range(L):
        m = L - c
        cols[f"AP@{c}"] = rr.average_precision(m)
        cols[f"mAP@R@{c}"] = rr.map_at_r(m)
        cols[f"P@1@{c}"] = rr.precision_at_k((1,), m)[1]
        for k, r in rr.recall_at_k(ks, m).items():
            cols[f"R@{k}@{c}"] = r
    for v in range(1, L + 1):
        cols[f"AP#{v}"] = rr.ap_exclusive(v)
    if rel is not None:
        cols["H-AP"] = rr.h_average_precision(rel.gather(1, rr.item.clamp(min=0)))
    return [{k: float(t[q]) for k, t in cols.items()} for q in range(S.shape[0])]


def random_case(rng: random.Random, dtype=torch.float64):
    Q, G, L = rng.randint(1, 4), rng.randint(1, 16), rng.randint(1, 3)
    n_values = rng.choice([2, 3, 6, 1000])  # few distinct values: many ties
    S = torch.tensor([[rng.randrange(n_values) / 7 - 0.5 for _ in range(G)] for _ in range(Q)], dtype=dtype)
    V = torch.tensor([[rng.randint(0, L) for _ in range(G)] for _ in range(Q)], dtype=torch.uint8)
    return S, V, L


@pytest.fixture(params=["radix", "histogram"])
def ranking_path(request, monkeypatch):
    """Both ways of ranking on a CPU: the radix sort of 16-bit bins (the default) and the
    histogram of bins (the GPU path, and the radix path's fallback on heavy ties)."""
    if request.param == "histogram":
        monkeypatch.setattr(M, "_radix_entries", lambda *args: None)
    return request.param


# ----------------------------------------------------------------------------------------------
# Against the brute force


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_every_metric_matches_brute_force_with_ties(dtype, ranking_path):
    rng = random.Random(0)
    for case in range(60):
        S, V, L = random_case(rng, dtype)
        exclude = None
        if case % 2:
            exclude = torch.tensor([rng.randint(-1, S.shape[1] - 1) for _ in range(S.shape[0])])
        rel = make_relevance(V, L, kind="pop")
        got = hapkit_metrics(S, V, L, rel, exclude=exclude)
        for q in range(S.shape[0]):
            ex = None if exclude is None or exclude[q] < 0 else int(exclude[q])
            relq = rel[q].clone()
            if ex is not None:
                relq[ex] = 0.0
            want = bf_metrics(S[q].tolist(), V[q].tolist(), L, relq.tolist(), exclude=ex)
            assert_close(got[q], want, context=f"(case {case}, query {q})")


def test_functional_api_matches_brute_force():
    rng = random.Random(1)
    for _ in range(12):
        S, V, L = random_case(rng)
        rel = make_relevance(V, L, kind="map", weights=[rng.random() + 0.1 for _ in range(L)])
        for q in range(S.shape[0]):
            want = bf_metrics(S[q].tolist(), V[q].tolist(), L, rel[q].tolist(), ks=(1, 3))
            c = rng.randrange(L)
            pos = V >= L - c
            got = {
                f"AP@{c}": float(M.average_precision(S, pos)[q]),
                f"mAP@R@{c}": float(M.map_at_r(S, pos)[q]),
                f"R@1@{c}": float(M.recall_at_k(S, pos, ks=(1, 3))[1][q]),
                f"R@3@{c}": float(M.recall_at_k(S, pos, ks=(1, 3))[3][q]),
                f"P@1@{c}": float(M.precision_at_k(S, pos)[1][q]),
                "H-AP": float(M.h_average_precision(S, rel, V)[q]),
                "NDCG": float(M.ndcg(S, V)[q]),
                "ASI": float(M.asi(S, V, L)[q]),
                "AP#1": float(M.ap_exclusive(S, V, 1)[q]),
            }
            assert_close(got, {k: want[k] for k in got})
            # Grouping by relevance value instead of level id gives the same H-AP.
            assert float(M.h_average_precision(S, rel)[q]) == pytest.approx(want["H-AP"], abs=1e-12, nan_ok=True)


def test_precision_at_k_matches_brute_force():
    rng = random.Random(2)
    for _ in range(30):
        S, V, _ = random_case(rng)
        pos = V > 0
        got = M.precision_at_k(S, pos, ks=(1, 2, 5))
        for q in range(S.shape[0]):
            order = bf_ranking(S[q].tolist())
            flags = [bool(pos[q, j]) for j in order]
            for k in (1, 2, 5):
                want = sum(flags[:k]) / k if any(flags) else NAN
                assert float(got[k][q]) == pytest.approx(want, abs=1e-12, nan_ok=True)


def test_general_relevance_h_ap_matches_brute_force():
    """Continuous relevance (many distinct values), no shared levels."""
    rng = random.Random(3)
    for _ in range(20):
        S, _, _ = random_case(rng)
        rel = torch.tensor([[rng.choice([0.0, rng.random()]) for _ in range(S.shape[1])] for _ in range(S.shape[0])], dtype=torch.float64)
        got = M.h_average_precision(S, rel)
        for q in range(S.shape[0]):
            want = bf_metrics(S[q].tolist(), [0] * S.shape[1], 1, rel[q].tolist())["H-AP"]
            assert float(got[q]) == pytest.approx(want, abs=1e-12, nan_ok=True)


def test_large_row_with_crowded_bins(ranking_path):
    """Thousands of items, many sharing score bins and exact ties: the bucketing stays exact."""
    g = torch.Generator().manual_seed(0)
    G = 3000
    S = (torch.randn(3, G, generator=g) * 4).round() / 4  # ~30 distinct values: huge ties
    S[1] = torch.randn(G, generator=g).float().double()  # a tie-free row
    V = torch.randint(0, 3, (3, G), generator=g)
    rr = M.rank_relevant(S, V, exclude=torch.tensor([5, -1, 0]))
    for q, ex in enumerate([5, None, 0]):
        order = bf_ranking(S[q].tolist(), ex)
        want = [(r + 1, j) for r, j in enumerate(order) if V[q, j] > 0]
        n = int(rr.count[q])
        assert n == len(want)
        assert rr.rank[q, :n].tolist() == [r for r, _ in want]
        assert rr.item[q, :n].tolist() == [j for _, j in want]
        assert rr.shared[q, :n].tolist() == [int(V[q, j]) for _, j in want]


def test_extreme_and_signed_zero_scores(ranking_path):
    S = torch.tensor([[3e38, -3e38, 0.0, -0.0, 1e38, 3e38, 1e-40, -1e-40]], dtype=torch.float32)
    V = torch.tensor([[1, 1, 2, 1, 0, 2, 1, 1]])
    rr = M.rank_relevant(S, V)
    order = bf_ranking(S[0].tolist())
    want = [(r + 1, j) for r, j in enumerate(order) if V[0, j] > 0]
    assert rr.rank[0].tolist() == [r for r, _ in want]
    assert rr.item[0].tolist() == [j for _, j in want]


def test_the_radix_path_settles_crowded_bins_and_hands_heavy_ties_over(monkeypatch):
    g = torch.Generator().manual_seed(1)
    G = 4000
    spread = torch.randn(2, G, generator=g, dtype=torch.float64)
    spread[0, 7] = 60.0  # one far outlier: the others share few bins, long runs to settle
    V = torch.randint(0, 3, (2, G), generator=g)
    calls = []
    radix = M._radix_entries
    monkeypatch.setattr(M, "_radix_entries", lambda *a: calls.append(radix(*a)) or calls[-1])
    for S, handed_over in ((spread, False), ((spread * 2).round() / 2, True)):  # ~20 distinct values
        calls.clear()
        rr = M.rank_relevant(S, V, exclude=torch.tensor([3, -1]))
        assert (calls[0] is None) is handed_over
        for q, ex in enumerate([3, None]):
            order = bf_ranking(S[q].tolist(), ex)
            want = [(r + 1, j) for r, j in enumerate(order) if V[q, j] > 0]
            n = int(rr.count[q])
            assert rr.rank[q, :n].tolist() == [r for r, _ in want]
            assert rr.item[q, :n].tolist() == [j for _, j in want]


def test_rank_by_labels_equals_rank_relevant_with_the_shared_levels():
    rng = random.Random(7)
    for trial in range(10):
        Q, G = rng.randint(1, 6), rng.randint(1, 50)
        fine_q = torch.tensor([rng.randrange(8) for _ in range(Q)])
        fine_g = torch.tensor([rng.randrange(8) for _ in range(G)])
        q_lab = torch.stack([fine_q, fine_q // 2, fine_q // 4], 1)
        g_lab = torch.stack([fine_g, fine_g // 2, fine_g // 4], 1)
        if trial % 2:
            g_lab[: G // 3] = -1  # distractors
        S = torch.tensor([[rng.randrange(5) / 4 for _ in range(G)] for _ in range(Q)])
        ex = torch.tensor([rng.randint(-1, G - 1) for _ in range(Q)])
        a = M.rank_by_labels(S, q_lab, g_lab, exclude=ex)
        V = (q_lab[:, None, :] == g_lab[None, :, :]).sum(-1)
        b = M.rank_relevant(S, V, exclude=ex, num_levels=3)
        for name in ("shared", "rank", "item", "count", "gallery_size"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name


# ----------------------------------------------------------------------------------------------
# Against other libraries


def test_average_precision_matches_sklearn():
    from sklearn.metrics import average_precision_score

    g = torch.Generator().manual_seed(0)
    S = torch.randn(20, 50, generator=g, dtype=torch.float64)  # continuous: no ties
    P = torch.rand(20, 50, generator=g) < 0.2
    P[:, 0] = True
    got = M.average_precision(S, P)
    for q in range(20):
        want = average_precision_score(P[q].numpy(), S[q].numpy())
        assert float(got[q]) == pytest.approx(want, abs=1e-12)


def test_ndcg_matches_sklearn_with_exponential_gains():
    from sklearn.metrics import ndcg_score

    g = torch.Generator().manual_seed(1)
    S = torch.randn(15, 40, generator=g, dtype=torch.float64)
    V = torch.randint(0, 4, (15, 40), generator=g)
    got = M.ndcg(S, V)
    gains = (2.0 ** V.double() - 1).numpy()
    for q in range(15):
        want = ndcg_score(gains[q : q + 1], S[q : q + 1].numpy())
        assert float(got[q]) == pytest.approx(want, abs=1e-12)


# ----------------------------------------------------------------------------------------------
# Hand-worked cases


def test_hand_worked_ap_and_map_at_r():
    # ranking: positive, negative, positive, negative, positive
    S = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    P = torch.tensor([[1, 0, 1, 0, 1]], dtype=torch.bool)
    assert float(M.average_precision(S, P)[0]) == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    assert float(M.map_at_r(S, P)[0]) == pytest.approx((1 + 2 / 3) / 3)
    r = M.recall_at_k(S, P, ks=(1, 2))
    assert float(r[1][0]) == 1.0 and float(r[2][0]) == 1.0
    assert float(M.precision_at_k(S, P, ks=(2,))[2][0]) == 0.5


def test_ties_go_to_the_lower_index():
    S = torch.tensor([[1.0, 1.0, 1.0]])
    # The positive is last among equals: rank 3.
    assert float(M.average_precision(S, torch.tensor([[0, 0, 1]]))[0]) == pytest.approx(1 / 3)
    assert float(M.average_precision(S, torch.tensor([[1, 0, 0]]))[0]) == 1.0
    assert float(M.recall_at_k(S, torch.tensor([[0, 1, 0]]), ks=(1,))[1][0]) == 0.0


def test_same_ap_different_h_ap():
    """Two rankings with the fine-level positives at ranks 1 and 4: same AP. In the first, the
    item ranked 2nd is a sibling (V = 1), in the second it is unrelated: H-AP tells them apart."""
    rel = [0.0, 0.5, 1.0]  # relevance of V = 0, 1, 2
    first, second = [2, 1, 0, 2], [2, 0, 1, 2]
    for ranking in (first, second):
        assert M.ranking_metrics(ranking, 2)["AP@0"] == pytest.approx((1 + 2 / 4) / 2)
    hap_first = M.ranking_metrics(first, 2, relevance=[rel[v] for v in first])["H-AP"]
    hap_second = M.ranking_metrics(second, 2, relevance=[rel[v] for v in second])["H-AP"]
    # first: (1/1 + (0.5 + 0.5)/2 + (1 + 0.5 + 1)/4) / 2.5; second: (1 + 1/3 + 2.5/4) / 2.5
    assert hap_first == pytest.approx(0.85)
    assert hap_second == pytest.approx(47 / 60)
    table = M.h_rank_table(first, 2, relevance=[rel[v] for v in first])
    assert table["H-rank"].tolist() == pytest.approx([1.0, 1.0, 0.0, 2.5])
    assert table["H-rank/rank"].sum() / table["rel"].sum() == pytest.approx(hap_first)


def test_h_rank_table_with_pop_relevance():
    ranking = [3, 2, 0, 3, 1, 2]
    table = M.h_rank_table(ranking, 3)
    # pop: rel = v / #items at level v
    assert table["rel"].tolist() == pytest.approx([3 / 2, 2 / 2, 0, 3 / 2, 1 / 1, 2 / 2])
    hap = table["H-rank/rank"].sum() / table["rel"].sum()
    assert hap == pytest.approx(M.ranking_metrics(ranking, 3)["H-AP"])


def test_ndcg_asi_and_exclusive_ap_by_hand():
    ranking = [1, 2, 0, 2]  # V of ranks 1..4, L = 2
    m = M.ranking_metrics(ranking, 2)
    dcg = 1 / math.log2(2) + 3 / math.log2(3) + 3 / math.log2(5)
    idcg = 3 / math.log2(2) + 3 / math.log2(3) + 1 / math.log2(4)
    assert m["NDCG"] == pytest.approx(dcg / idcg)
    # R = 3; ideal top-n: [2], [2, 2], [2, 2, 1]
    si = [0 / 1, 1 / 2, 2 / 3]  # n = 1: level 1 vs ideal level 2; n = 2: one level-2 match ...
    assert m["ASI"] == pytest.approx(sum(si) / 3)
    # AP#1: without the V > 1 items the ranking is [1, 0]; AP#2 keeps all: 2s at ranks 2 and 4
    assert m["AP#1"] == pytest.approx(1.0)
    assert m["AP#2"] == pytest.approx((1 / 2 + 2 / 4) / 2)


def test_binary_asi_by_hand_and_against_the_loop_reference():
    # positives at ranks 2, 3 and 6 of 7: |P| = 3, hits in the top 1..3 = 0, 1, 2
    scores = torch.tensor([[7.0, 6, 5, 4, 3, 2, 1]])
    positive = torch.tensor([[0, 1, 1, 0, 0, 1, 0]], dtype=torch.bool)
    assert M.binary_asi(scores, positive)[0].item() == pytest.approx((0 / 1 + 1 / 2 + 2 / 3) / 3)
    assert math.isnan(M.binary_asi(scores, torch.zeros_like(positive))[0].item())
    rng = random.Random(0)
    for trial in range(30):
        G = rng.randint(1, 40)
        S = torch.tensor([[rng.choice([0.1, 0.5, 0.9]) if trial % 2 else rng.random() for _ in range(G)] for _ in range(4)])
        P = torch.rand(4, G, generator=torch.Generator().manual_seed(trial)) < 0.3
        got = M.binary_asi(S, P)
        for q in range(4):
            want = bf_binary_asi(S[q].tolist(), P[q].tolist())
            assert (math.isnan(want) and math.isnan(got[q].item())) or got[q].item() == pytest.approx(want, abs=1e-12)


# ----------------------------------------------------------------------------------------------
# Properties


levels_strategy = st.integers(1, 3).flatmap(
    lambda L: st.tuples(
        st.just(L),
        st.lists(st.lists(st.integers(0, L), min_size=1, max_size=12), min_size=1, max_size=3).filter(
            lambda rows: len({len(r) for r in rows}) == 1
        ),
    )
)


@settings(max_examples=40, deadline=None)
@given(levels_strategy)
def test_perfect_ranking_scores_one(case):
    L, rows = case
    V = torch.tensor(rows)
    S = V.double() + 0.0  # sorted by V: ideal for every level at once (ties among equals)
    rel = make_relevance(V, L, kind="map", weights=[1.0] * L)  # map relevance grows with V
    got = hapkit_metrics(S, V, L, rel)
    for q, row in enumerate(got):
        for name, value in row.items():
            assert math.isnan(value) or value == pytest.approx(1.0), (name, value, rows[q])
    pop = make_relevance(V, L, kind="pop")
    # With pop relevance (not monotone in V) the ideal H-AP ranking sorts by relevance.
    hap = M.h_average_precision(pop, pop, V)
    assert torch.all(torch.isnan(hap) | (torch.abs(hap - 1) < 1e-12))


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(0, 5), min_size=2, max_size=14),
    st.lists(st.booleans(), min_size=2, max_size=14),
    st.floats(0.01, 100.0),
)
def test_h_ap_with_one_level_is_ap_and_is_scale_invariant(scores, flags, scale):
    n = min(len(scores), len(flags))
    S = torch.tensor([scores[:n]], dtype=torch.float64)
    P = torch.tensor([flags[:n]])
    rel = P.double()
    ap = M.average_precision(S, P)
    hap = M.h_average_precision(S, rel, P.to(torch.uint8))
    assert torch.allclose(hap, ap, equal_nan=True, atol=1e-12)
    assert torch.allclose(M.h_average_precision(S, rel * scale), hap, equal_nan=True, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.1, 10.0))
def test_scaling_graded_relevance_leaves_h_ap_unchanged(seed, scale):
    g = torch.Generator().manual_seed(seed)
    V = torch.randint(0, 4, (3, 12), generator=g)
    S = torch.randint(0, 5, (3, 12), generator=g).double()
    rel = make_relevance(V, 3, kind="pop")
    a = M.h_average_precision(S, rel, V)
    b = M.h_average_precision(S, rel * scale, V)
    assert torch.allclose(a, b, equal_nan=True, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000))
def test_exclude_is_removing_the_item(seed):
    # (the radix path; test_every_metric_matches_brute_force_with_ties covers both with exclude)
    rng = random.Random(seed)
    S, V, L = random_case(rng)
    G = S.shape[1]
    if G < 2:
        return
    ex = torch.tensor([rng.randrange(G) for _ in range(S.shape[0])])
    with_ex = hapkit_metrics(S, V, L, exclude=ex)
    for q in range(S.shape[0]):
        keep = [j for j in range(G) if j != int(ex[q])]
        without = hapkit_metrics(S[q : q + 1, keep], V[q : q + 1, keep], L)[0]
        assert_close(with_ex[q], without)


def test_workspace_reuse_does_not_change_results():
    rng = random.Random(5)
    ws = M.Workspace()
    for _ in range(15):
        S, V, L = random_case(rng)
        a = M.rank_relevant(S, V, num_levels=L)
        b = M.rank_relevant(S, V, num_levels=L, workspace=ws)
        assert torch.equal(a.rank, b.rank) and torch.equal(a.item, b.item) and torch.equal(a.shared, b.shared)


# ----------------------------------------------------------------------------------------------
# Bad inputs


def test_non_finite_scores_are_rejected():
    S = torch.tensor([[1.0, float("nan"), 0.0], [float("inf"), 0.0, 1.0]])
    with pytest.raises(ValueError, match="2 non-finite value"):
        M.average_precision(S, torch.ones(2, 3, dtype=torch.bool))


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="shape of scores"):
        M.average_precision(torch.zeros(2, 3), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(Q, G\)"):
        M.ndcg(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4, dtype=torch.long))


def test_bad_levels_and_relevance_are_rejected():
    S = torch.zeros(1, 3)
    with pytest.raises(ValueError, match=">= 0"):
        M.ndcg(S, torch.tensor([[0, -1, 2]]))
    with pytest.raises(ValueError, match="integer shared levels"):
        M.ndcg(S, torch.tensor([[0.0, 1.0, 2.0]]))
    with pytest.raises(ValueError, match="boolean"):
        M.average_precision(S, torch.tensor([[0.0, 0.5, 1.0]]))
    with pytest.raises(ValueError, match="level v >= 1"):
        M.ap_exclusive(S, torch.tensor([[0, 1, 2]]), 0)
    with pytest.raises(ValueError, match="num_levels"):
        M.asi(S, torch.tensor([[0, 1, 3]]), num_levels=2)
    with pytest.raises(ValueError, match="finite and >= 0"):
        M.h_average_precision(S, torch.tensor([[0.0, -1.0, 1.0]]))
    with pytest.raises(ValueError, match="shared level 0"):
        M.h_average_precision(S, torch.tensor([[1.0, 0.0, 1.0]]), torch.tensor([[0, 1, 1]]))
    with pytest.raises(ValueError, match="function of the shared level"):
        M.h_average_precision(S, torch.tensor([[1.0, 2.0, 1.0]]), torch.tensor([[1, 1, 1]]))
    with pytest.raises(ValueError, match="positive integers"):
        M.recall_at_k(S, torch.ones(1, 3, dtype=torch.bool), ks=(0,))
    with pytest.raises(ValueError, match="exclude"):
        M.rank_relevant(S, torch.ones(1, 3, dtype=torch.bool), exclude=torch.tensor([3]))


def test_queries_without_positive_give_nan():
    S = torch.tensor([[1.0, 2.0], [2.0, 1.0]])
    P = torch.tensor([[False, False], [True, False]])
    ap = M.average_precision(S, P)
    assert math.isnan(float(ap[0])) and float(ap[1]) == 1.0
    assert np.isnan(M.ndcg(S, P.to(torch.long)).numpy()[0])


# ----------------------------------------------------------------------------------------------
# Neighbourhoods


def test_neighbour_agreement_by_hand():
    from hapkit.metrics import neighbour_agreement, top1_failures

    # fine, coarse: items 0,1 in class 0 (coarse 0); 2 in class 1 (coarse 0); 3 in class 2 (coarse 1)
    labels = np.array([[0, 0], [0, 0], [1, 0], [2, 1]])
    neighbours = np.array([[1, 2], [2, 3], [0, 1], [0, -1]])  # item 3 has one neighbour listed
    agree = neighbour_agreement(labels, neighbours)
    # fine: item0 1/2, item1 0/2, item2 0/2, item3 0/1 -> mean 1/8
    # coarse: item0 2/2, item1 1/2, item2 2/2, item3 0/1 -> mean 5/8
    np.testing.assert_allclose(agree.numpy(), [1 / 8, 5 / 8])
    # top-1: item0 -> 1 right; item1 -> 2 shares the coarse level (v=1); item2 -> 0 shares v=1;
    # item3 -> 0 shares nothing (v=0)
    assert top1_failures(labels, neighbours[:, 0]).tolist() == [1, 2]
    with pytest.raises(ValueError, match=r"\(4, k\) index matrix"):
        neighbour_agreement(labels, neighbours[:3])
    with pytest.raises(ValueError, match=r"lie in \[0, 4\)"):
        neighbour_agreement(labels, neighbours + 5)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000))
def test_neighbour_agreement_matches_a_loop(seed):
    from hapkit.metrics import neighbour_agreement, top1_failures

    rng = np.random.default_rng(seed)
    n, k = 30, 5
    fine = rng.integers(0, 6, n)
    labels = np.stack([fine, fine // 2, fine // 4], 1)
    neighbours = np.stack([rng.choice(np.delete(np.arange(n), i), k, replace=False) for i in range(n)])
    expected = [np.mean([np.mean([labels[j, c] == labels[i, c] for j in neighbours[i]]) for i in range(n)])
                for c in range(3)]
    np.testing.assert_allclose(neighbour_agreement(labels, neighbours).numpy(), expected, atol=1e-12)
    counts = [0, 0, 0]
    for i in range(n):
        v = sum(labels[neighbours[i, 0], c] == labels[i, c] for c in range(3))
        if v < 3:
            counts[v] += 1
    assert top1_failures(labels, neighbours[:, 0]).tolist() == counts
