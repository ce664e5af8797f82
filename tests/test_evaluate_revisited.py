"""The revisited Oxford / Paris protocol (hapkit.evaluate.evaluate_revisited) and the landmark
test-time processing (α-query expansion, multi-scale embeddings)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from hapkit.evaluate import (
    REVISITED_PROTOCOLS,
    RetrievalResults,
    alpha_query_expansion,
    combine_scales,
    evaluate_revisited,
    extract_multiscale_embeddings,
    multiscale_embeddings,
    revisited_ranking_metrics,
    revisited_ranking_table,
)

REPO = Path(__file__).resolve().parents[1]
ROLES = {  # protocol -> (positive lists, ignored lists), as docs/definitions.md, 'Revisited Oxford and Paris' defines them
    "easy": (("easy",), ("junk", "hard")),
    "medium": (("easy", "hard"), ("junk",)),
    "hard": (("hard",), ("junk", "easy")),
}


def reference_query(scores, entry, ks, standard=False):
    """One query, the obvious way: rank, delete the ignored images, walk down the list."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")  # ties: lower index first
    out = {}
    for protocol, (pos_lists, ign_lists) in ROLES.items():
        positives = {int(i) for name in pos_lists for i in entry[name]}
        ignored = {int(i) for name in ign_lists for i in entry[name]}
        kept = [int(i) for i in order if int(i) not in ignored]
        ranks = [r for r, i in enumerate(kept) if i in positives]  # 0-based, ascending
        if not positives:
            out[f"AP@{protocol}"] = math.nan
            out.update({f"P@{k}@{protocol}": math.nan for k in ks})
            continue
        ap = 0.0
        for j, r in enumerate(ranks):
            after = (j + 1) / (r + 1)
            before = 1.0 if r == 0 else j / r
            ap += (after if standard else (before + after) / 2) / len(positives)
        out[f"AP@{protocol}"] = ap
        for k in ks:
            cut = min(ranks[-1] + 1, k)
            out[f"P@{k}@{protocol}"] = sum(r + 1 <= cut for r in ranks) / cut
    return out


def reference(q, g, gnd, ks, standard=False):
    s = (np.asarray(q, dtype=np.float64) @ np.asarray(g, dtype=np.float64).T)
    return pd.DataFrame([reference_query(s[i], gnd[i], ks, standard) for i in range(len(gnd))])


def random_problem(num_queries=9, num_gallery=40, dim=6, seed=0, ties=False):
    rng = np.random.default_rng(seed)
    g = rng.normal(size=(num_gallery, dim))
    q = rng.normal(size=(num_queries, dim))
    if ties:  # small integers, duplicated rows: exact ties everywhere
        g = np.round(g * 1.5)
        g[1::3] = g[0::3][: len(g[1::3])]
        q = np.round(q * 1.5)
    gnd = []
    for i in range(num_queries):
        status = rng.choice(4, size=num_gallery, p=[0.55, 0.2, 0.15, 0.1])  # negative, easy, hard, junk
        if i == 1:
            status[status == 2] = 0  # no hard image: left out of the Hard protocol
        if i == 2:
            status[(status == 1) | (status == 2)] = 3  # only junk: left out of every protocol
        entry = {name: np.flatnonzero(status == code).tolist() for name, code in (("easy", 1), ("hard", 2), ("junk", 3))}
        entry["bbx"] = [0.0, 0.0, 10.0, 10.0]
        gnd.append(entry)
    return torch.tensor(q, dtype=torch.float32), torch.tensor(g, dtype=torch.float32), gnd


def test_junk_before_the_positives_is_removed_not_counted():
    # ranking: junk, easy, negative, hard, junk, easy
    gallery = torch.tensor([[6.0], [5.0], [4.0], [3.0], [2.0], [1.0]])
    gnd = [{"easy": [1, 5], "hard": [3], "junk": [0, 4]}]
    res = evaluate_revisited(torch.ones(1, 1), gallery, gnd, ks=(1, 2, 5), progress=False)
    assert isinstance(res, RetrievalResults) and res.num_queries == 1
    row = res.per_query.iloc[0]
    # Medium: junk removed -> easy, negative, hard, easy at ranks 0, 1, 2, 3; positives at 0, 2, 3
    medium = ((1 + 1) / 2 + (1 / 2 + 2 / 3) / 2 + (2 / 3 + 3 / 4) / 2) / 3
    assert row["AP@medium"] == pytest.approx(medium)
    # Easy: junk and hard removed -> easy, negative, easy: positives at 0 and 2
    assert row["AP@easy"] == pytest.approx((1 + (1 / 2 + 2 / 3) / 2) / 2)
    # Hard: junk and easy removed -> negative, hard: its only positive at rank 1
    assert row["AP@hard"] == pytest.approx((0 + 1 / 2) / 2)
    # mP@k: top min(k, rank of the last positive), 1-based, after removal
    assert row["P@1@medium"] == 1.0 and row["P@2@medium"] == 0.5 and row["P@5@medium"] == pytest.approx(3 / 4)
    assert row["P@5@hard"] == pytest.approx(1 / 2) and row["P@5@easy"] == pytest.approx(2 / 3)
    # counting the junk as negatives instead would lower the first positive to rank 1
    counted = evaluate_revisited(torch.ones(1, 1), gallery, [{"easy": [1, 5], "hard": [3], "junk": []}], progress=False)
    assert counted.per_query.loc[0, "AP@medium"] < row["AP@medium"]


def test_a_query_without_hard_positive_is_left_out_of_the_hard_mean():
    gallery = torch.tensor([[4.0], [3.0], [2.0], [1.0]])
    gnd = [{"easy": [1], "hard": [], "junk": [0]}, {"easy": [2], "hard": [0], "junk": []}]
    res = evaluate_revisited(torch.ones(2, 1), gallery, gnd, ks=(1,), progress=False)
    assert math.isnan(res.per_query.loc[0, "AP@hard"]) and math.isnan(res.per_query.loc[0, "P@1@hard"])
    assert res.summary["mAP@hard"] == res.per_query.loc[1, "AP@hard"] == 1.0  # mean over query 1 alone
    assert res.skipped == {"mAP@hard": 1, "mP@1@hard": 1}
    # Easy: query 0's easy image is first once the junk is removed; query 1's is second once its
    # hard image is removed
    assert res.summary["mAP@easy"] == pytest.approx((1.0 + (0 + 1 / 2) / 2) / 2)
    assert list(res.summary) == ["mAP@easy", "mAP@medium", "mAP@hard", "mP@1@easy", "mP@1@medium", "mP@1@hard"]
    assert "left out" in repr(res)


@pytest.mark.parametrize("chunk_size", [1, 4, None])
@pytest.mark.parametrize("ties", [False, True])
def test_agrees_with_a_loop_over_queries(chunk_size, ties):
    q, g, gnd = random_problem(ties=ties)
    ks = (1, 5, 10)
    res = evaluate_revisited(q, g, gnd, ks=ks, chunk_size=chunk_size, progress=False)
    expected = reference(q, g, gnd, ks)
    pd.testing.assert_frame_equal(res.per_query.reset_index(drop=True), expected[res.per_query.columns], check_exact=False)
    for name, value in res.summary.items():
        assert value == pytest.approx(float(expected[name[1:]].mean()))  # NaN queries left out
    assert res.skipped["mAP@hard"] == 2 and res.skipped["mAP@easy"] == 1
    assert res.settings["protocol"] == "revisited" and res.settings["num_gallery"] == len(g)


def test_distractors_only_extend_the_gallery():
    q, g, gnd = random_problem(seed=1)
    d = torch.randn(25, g.shape[1], generator=torch.Generator().manual_seed(3))
    res = evaluate_revisited(q, g, gnd, distractor_embeddings=d, chunk_size=2, progress=False)
    expected = reference(q, torch.cat([g, d]), gnd, (1, 5, 10))  # distractors: neither positive nor junk
    pd.testing.assert_frame_equal(res.per_query.reset_index(drop=True), expected[res.per_query.columns], check_exact=False)
    assert res.settings["num_distractors"] == 25 and res.settings["num_gallery"] == len(g) + 25
    alone = evaluate_revisited(q, g, gnd, progress=False)
    assert res.summary["mAP@medium"] <= alone.summary["mAP@medium"]


def test_standard_ap_differs_from_the_trapezoidal_one():
    # one positive at rank 2: standard AP 1/2, the trapezoid averages the precision 0 before it
    # and 1/2 after it
    assert revisited_ranking_metrics(["negative", "easy"])["AP@easy"] == pytest.approx(0.25)
    assert revisited_ranking_metrics(["negative", "easy"], ap="standard")["AP@easy"] == pytest.approx(0.5)
    q, g, gnd = random_problem(seed=2)
    trap = evaluate_revisited(q, g, gnd, progress=False)
    std = evaluate_revisited(q, g, gnd, ap="standard", progress=False)
    expected = reference(q, g, gnd, (1,), standard=True)
    np.testing.assert_allclose(std.per_query["AP@medium"], expected["AP@medium"])
    kept = trap.per_query["AP@medium"].notna()
    assert (std.per_query["AP@medium"][kept] >= trap.per_query["AP@medium"][kept] - 1e-12).all()
    assert std.summary["mAP@medium"] > trap.summary["mAP@medium"]
    # the standard form is scikit-learn's AP on the ranking without the ignored images
    from sklearn.metrics import average_precision_score

    s = (q[0] @ g.T).numpy()
    keep = np.setdiff1d(np.arange(len(g)), gnd[0]["junk"])
    y = np.isin(keep, gnd[0]["easy"] + gnd[0]["hard"])
    assert std.per_query.loc[0, "AP@medium"] == pytest.approx(average_precision_score(y, s[keep]))
    assert trap.settings["ap"] == "trapezoid" and std.settings["ap"] == "standard"


def test_ranking_table_terms_sum_to_both_aps():
    ranking = ["junk", "easy", "hard", "negative", "junk", "easy", "negative", "hard"]
    for protocol in REVISITED_PROTOCOLS:
        table = revisited_ranking_table(ranking, protocol)
        assert list(table.index) == list(range(1, len(ranking) + 1))
        got = revisited_ranking_metrics(ranking)
        assert table["trapezoid term"].sum() == pytest.approx(got[f"AP@{protocol}"])
        assert table["standard term"].sum() == pytest.approx(revisited_ranking_metrics(ranking, ap="standard")[f"AP@{protocol}"])
        ignored = table["role"] == "ignored"
        assert table.loc[ignored, "rank without ignored"].isna().all()
        assert table.loc[~ignored, "rank without ignored"].tolist() == list(range(1, int((~ignored).sum()) + 1))
    hard = revisited_ranking_table(ranking, "hard")
    assert hard.loc[2, "role"] == "ignored" and hard.loc[3, "rank without ignored"] == 1  # easy images removed


def test_protocol_subset_and_argument_errors():
    q, g, gnd = random_problem(num_queries=3)
    res = evaluate_revisited(q, g, gnd, ks=(5,), protocols=["hard", "medium"], progress=False)
    assert list(res.summary) == ["mAP@medium", "mAP@hard", "mP@5@medium", "mP@5@hard"]
    assert list(evaluate_revisited(q, g, {"gnd": gnd, "imlist": []}, progress=False).summary)[0] == "mAP@easy"
    with pytest.raises(ValueError, match="unknown protocol"):
        evaluate_revisited(q, g, gnd, protocols=["difficult"])
    with pytest.raises(ValueError, match="ap must be one of"):
        evaluate_revisited(q, g, gnd, ap="interpolated")
    with pytest.raises(ValueError, match="gnd describes 3 queries but query_embeddings has 2 rows"):
        evaluate_revisited(q[:2], g, gnd)
    with pytest.raises(ValueError, match=r"gnd\[1\]\['junk'\] holds 40, not an index of the 40 gallery images"):
        evaluate_revisited(q, g, [gnd[0], {**gnd[1], "junk": [40]}, gnd[2]])
    with pytest.raises(ValueError, match=r"gnd\[0\]: gallery image 3 is listed both as 'easy' and as 'junk'"):
        evaluate_revisited(q[:1], g, [{"easy": [3], "hard": [], "junk": [3]}])
    with pytest.raises(ValueError, match="'ok' lists"):
        evaluate_revisited(q[:1], g, [{"ok": [1], "junk": []}])
    with pytest.raises(ValueError, match="dimension"):
        evaluate_revisited(q, g[:, :2], gnd)
    with pytest.raises(ValueError, match="non-finite"):
        evaluate_revisited(q, g, gnd, distractor_embeddings=torch.full((2, q.shape[1]), float("nan")))
    with pytest.raises(ValueError, match="unknown status"):
        revisited_ranking_metrics(["easy", "positive"])


_R1M_SCRIPT = r"""
import json, resource, sys, time
import torch
from hapkit.evaluate import evaluate_revisited
sys.path.insert(0, sys.argv[1])
from test_evaluate_revisited import r1m_problem
q, g, d, gnd = r1m_problem()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
res = evaluate_revisited(q, g, gnd, distractor_embeddings=d, progress=False)
seconds = time.perf_counter() - t
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({"grown_kib": grown, "seconds": seconds, "chunk_size": res.settings["chunk_size"],
                  "num_gallery": res.settings["num_gallery"], "head": res.per_query.head(3).to_dict("list")}))
"""


def r1m_problem(num_queries=100, num_distractors=300_000, dim=8):
    """Each query with 3 easy, 1 hard and 1 junk gallery image of its own (near it), drowned in
    many random distractors."""
    g = torch.Generator().manual_seed(11)
    q = torch.nn.functional.normalize(torch.randn(num_queries, dim, generator=g), dim=1)
    spread = torch.tensor([0.1, 0.1, 0.1, 0.3, 0.2])[:, None, None]
    gallery = q[None] + spread * torch.randn(5, num_queries, dim, generator=g)  # image 5i + k of query i
    gallery = torch.nn.functional.normalize(gallery.transpose(0, 1).reshape(-1, dim), dim=1)
    gnd = [{"easy": [5 * i, 5 * i + 1, 5 * i + 2], "hard": [5 * i + 3], "junk": [5 * i + 4]} for i in range(num_queries)]
    distractors = torch.nn.functional.normalize(torch.randn(num_distractors, dim, generator=g), dim=1)
    return q, gallery, distractors, gnd


def test_a_million_scale_gallery_runs_in_bounded_memory():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", _R1M_SCRIPT, str(REPO / "tests")], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    q, g, d, gnd = r1m_problem()
    pairs = q.shape[0] * (g.shape[0] + d.shape[0])
    # the planned chunks respect the pair budget: all queries at once would be 3.6x over it
    assert report["chunk_size"] * report["num_gallery"] <= 2**23 < pairs / 3
    # peak memory: scores, order and positions of one chunk (~16 bytes a pair, 134 MB), far below
    # the ~480 MB that all the queries at once would need
    assert report["grown_kib"] * 1024 < 250e6, report
    # float64 reference scores: a near tie among 300,000 float32 scores may go either way
    expected = reference(q[:3], torch.cat([g, d]), gnd[:3], (1, 5, 10))
    for name, values in report["head"].items():
        np.testing.assert_allclose(values, expected[name], atol=1e-4, err_msg=name)


def test_alpha_query_expansion_matches_its_definition():
    g = torch.Generator().manual_seed(0)
    gallery = torch.nn.functional.normalize(torch.randn(30, 5, generator=g), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(4, 5, generator=g), dim=1)
    k, alpha = 3, 3.0
    expanded = alpha_query_expansion(queries, gallery, k=k, alpha=alpha, chunk_size=3)
    for i, q in enumerate(queries):
        sims = gallery @ q
        top = torch.argsort(sims, descending=True)[:k]
        v = q + sum(sims[j].clamp(min=0) ** alpha * gallery[j] for j in top)
        torch.testing.assert_close(expanded[i], v / v.norm())
    aqe = alpha_query_expansion(queries, gallery, k=2, alpha=0)  # average query expansion
    top2 = (queries @ gallery.T).topk(2).indices
    torch.testing.assert_close(aqe, torch.nn.functional.normalize(queries + gallery[top2].sum(1), dim=1))
    torch.testing.assert_close(alpha_query_expansion(queries, gallery, k=0, alpha=3), queries)
    with pytest.raises(ValueError, match="non-negative"):
        alpha_query_expansion(queries, gallery, k=-1, alpha=1)


def test_combine_scales_is_a_signed_power_mean():
    a = torch.tensor([[0.6, -0.8, 0.0]])
    b = torch.tensor([[0.0, -1.0, 0.0]])
    p = 3.0
    m = [(0.6**p + 0.0) / 2, -(0.8**p + 1.0) / 2, 0.0]
    v = torch.tensor([[math.copysign(abs(x) ** (1 / p), x) if x else 0.0 for x in m]])
    torch.testing.assert_close(combine_scales([a, b], power=p), v / v.norm())
    torch.testing.assert_close(combine_scales([a, b], power=1.0), torch.nn.functional.normalize((a + b) / 2, dim=1))
    torch.testing.assert_close(combine_scales([2 * a]), a)


class MeanColour(nn.Module):
    """A 'model' whose embedding is the mean colour plus the image height (so scales differ)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return torch.cat([x.mean((2, 3)), torch.full((x.shape[0], 1), float(x.shape[2]))], 1) * self.w


def test_multiscale_embeddings_resize_and_combine():
    model = MeanColour()
    images = torch.rand(2, 3, 16, 12)
    scales = (1.0, 2**-0.5, 0.5)
    out = multiscale_embeddings(model, images, scales)
    resized = [images] + [torch.nn.functional.interpolate(images, size=(round(16 * s), round(12 * s)), mode="bilinear",
                                                          align_corners=False) for s in scales[1:]]
    assert [r.shape[2] for r in resized] == [16, 11, 8]
    torch.testing.assert_close(out, combine_scales([model(r) for r in resized], 3.0))
    with pytest.raises(ValueError, match="positive"):
        multiscale_embeddings(model, images, (1.0, 0.0))


def test_extract_multiscale_embeddings_keeps_the_model_mode():
    model = MeanColour().eval()
    images = torch.rand(5, 3, 8, 8)
    loader = [(images[:3], torch.zeros(3, 1, dtype=torch.long)), (images[3:], torch.zeros(2, 1, dtype=torch.long))]
    emb, labels = extract_multiscale_embeddings(model, loader, scales=(1.0, 0.5), progress=False)
    torch.testing.assert_close(emb, multiscale_embeddings(model, images, (1.0, 0.5)))
    assert labels.shape == (5, 1) and not model.training
    model.train()
    extract_multiscale_embeddings(model, loader, progress=False)
    assert model.training
