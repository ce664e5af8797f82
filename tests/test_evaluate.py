"""Streaming evaluation (hapkit.evaluate): reference values, protocols, paths and errors."""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hapkit.evaluate import RetrievalResults, evaluate, extract_embeddings, metric_names
from hapkit.hierarchy import LabelError, relevance as make_relevance, shared_levels
from reference_values import load_reference
from test_metrics import assert_close, bf_binary_asi, bf_metrics

KS = (1, 2, 4)


def clustered(n=60, levels=3, dim=8, seed=0, ties=False):
    """Small hierarchical data: every coarse class holds several fine classes of 2+ items."""
    g = torch.Generator().manual_seed(seed)
    fine = torch.arange(n) // 3
    cols = [fine]
    for _ in range(levels - 1):
        cols.append(cols[-1] // 2)
    labels = torch.stack(cols, 1)
    x = torch.randn(int(fine.max()) + 1, dim, generator=g)[fine] + 0.8 * torch.randn(n, dim, generator=g)
    if ties:
        # Small integer vectors, some duplicated: many exact ties, and every dot product is exact
        # whatever the order of summation (chunked or not).
        x = (x * 1.5).round()
        x[1::4] = x[0::4][: x[1::4].shape[0]]
        return x, labels
    return torch.nn.functional.normalize(x, dim=1), labels


def brute_force(q_emb, q_lab, g_emb, g_lab, same_set, relevance="pop", alpha=1.0, weights=None):
    """Per-query brute-force metrics, averaged like evaluate() (NaN queries left out)."""
    S = (q_emb @ g_emb.T).double()
    L = q_lab.shape[1]
    V = shared_levels(q_lab, g_lab)
    Vx = V.clone()
    if same_set:
        Vx.fill_diagonal_(0)
    rel = make_relevance(Vx, L, kind=relevance, alpha=alpha, weights=weights, count_query=same_set)
    rows = []
    for q in range(S.shape[0]):
        ex = q if same_set else None
        rows.append(bf_metrics(S[q].tolist(), Vx[q].tolist(), L, rel[q].tolist(), ks=KS, exclude=ex))
    frame = pd.DataFrame(rows)
    return {c: float(frame[c].mean()) for c in frame.columns}, frame


# ----------------------------------------------------------------------------------------------
# The authors' reference values


def _reference_name(key: str) -> str:
    if key.endswith("_multi"):
        return key[: -len("_multi")]
    name, level = re.fullmatch(r"(.+)_level(\d+)", key).groups()
    return f"{name}@{level}"


def test_reproduces_reference_metrics_same_set():
    ref = load_reference("metrics_same_set.json")
    emb = torch.tensor(ref["embeddings"], dtype=torch.float32)
    labels = torch.tensor(ref["labels"])
    res = evaluate(emb, labels, progress=False)
    assert res.num_queries == len(labels) and not res.skipped
    for key, value in ref["metrics"].items():
        # float32 reference: agreement to ~2e-8 observed, 1e-7 is float32 resolution.
        assert res.summary[_reference_name(key)] == pytest.approx(value, abs=1e-7), key


# ----------------------------------------------------------------------------------------------
# Against the brute force, every protocol


@pytest.mark.parametrize("ties", [False, True])
def test_same_set_matches_brute_force(ties):
    emb, labels = clustered(ties=ties)
    want, frame = brute_force(emb, labels, emb, labels, same_set=True)
    res = evaluate(emb, labels, ks=KS, progress=False)
    assert_close(res.summary, want)
    assert list(res.per_query.columns) == list(res.summary)
    assert np.allclose(res.per_query[frame.columns].to_numpy(), frame.to_numpy(), atol=1e-9, equal_nan=True)


def test_query_gallery_with_distractors_matches_brute_force():
    emb, labels = clustered(n=72, seed=1)
    q, g = slice(0, 72, 3), [i for i in range(72) if i % 3]
    distractors = torch.nn.functional.normalize(torch.randn(10, emb.shape[1], generator=torch.Generator().manual_seed(2)), dim=1)
    # Distractors are gallery items sharing nothing: a fresh label at every level.
    fresh = labels.max(0).values + 1 + torch.arange(10)[:, None]
    g_emb = torch.cat([emb[g], distractors])
    g_lab = torch.cat([labels[g], fresh])
    want, _ = brute_force(emb[q], labels[q], g_emb, g_lab, same_set=False)
    res = evaluate(
        emb[q], labels[q], gallery_embeddings=emb[g], gallery_labels=labels[g],
        distractor_embeddings=distractors, ks=KS, progress=False,
    )
    assert_close(res.summary, want)
    assert res.settings["protocol"] == "query/gallery" and res.settings["num_distractors"] == 10


def test_binary_asi_per_column_is_asked_for_and_matches_the_loop_reference():
    emb, labels = clustered(n=48, seed=7)
    plain = evaluate(emb, labels, ks=KS, progress=False)
    assert not any(n.startswith("ASI@") for n in plain.summary)  # not a default metric
    res = evaluate(emb, labels, metrics=["AP", "ASI@"], progress=False)
    assert list(res.summary) == ["AP@0", "ASI@0", "AP@1", "ASI@1", "AP@2", "ASI@2"]
    S = (emb @ emb.T).double()
    for c in range(3):
        same = labels[:, c, None] == labels[None, :, c]
        want = [bf_binary_asi(S[q].tolist(), same[q].tolist(), exclude=q) for q in range(len(labels))]
        assert np.allclose(res.per_query[f"ASI@{c}"].to_numpy(), want, atol=1e-12)
    # one level: binary ASI is the ASI of the one-level hierarchy
    one = evaluate(emb, labels[:, 2], metrics=["ASI", "ASI@"], progress=False)
    assert one.summary["ASI@0"] == pytest.approx(one.summary["ASI"], abs=1e-12)


@pytest.mark.filterwarnings("ignore:.*no positive")
def test_a_gallery_holding_the_queries_leaves_each_querys_own_copy_out():
    """DyML: the gallery contains the query images; each query's own copy leaves its ranking."""
    emb, labels = clustered(n=60, seed=8)
    queries = torch.arange(0, 60, 4)
    exclude = queries.clone()
    exclude[3] = -1  # this query keeps its copy
    res = evaluate(emb[queries], labels[queries], gallery_embeddings=emb, gallery_labels=labels,
                   gallery_exclude=exclude, ks=KS, metrics=["AP", "R@k", "ASI@", "H-AP", "NDCG"], progress=False)
    S = (emb[queries] @ emb.T).double()
    V = shared_levels(labels[queries], labels)
    for i in range(len(queries)):
        ex = int(exclude[i]) if exclude[i] >= 0 else None
        Vx = V[i].clone()
        if ex is not None:
            Vx[ex] = 0  # left out: counted nowhere
        rel = make_relevance(Vx[None], 3, count_query=False)[0]
        want = bf_metrics(S[i].tolist(), Vx.tolist(), 3, rel.tolist(), ks=KS, exclude=ex)
        for name in res.per_query.columns:
            if name.startswith("ASI@"):
                c = int(name[4:])
                w = bf_binary_asi(S[i].tolist(), (Vx >= 3 - c).tolist(), exclude=ex)
            else:
                w = want[name]
            got = res.per_query.loc[i, name]
            assert (math.isnan(w) and math.isnan(got)) or got == pytest.approx(w, abs=1e-9), (i, name)
    assert res.per_query.loc[3, "R@1@0"] == 1.0 and res.settings["gallery_exclude"] == len(queries) - 1
    # the top-k paths (torch and faiss) leave the same items out
    top_names = [n for n in res.summary if n.startswith("R@")]
    for use_faiss in (False, True) if _has_faiss() else (False,):
        top = evaluate(emb[queries], labels[queries], gallery_embeddings=emb, gallery_labels=labels,
                       gallery_exclude=exclude, ks=KS, metrics=["R@k"], use_faiss=use_faiss, progress=False)
        assert top.per_query.equals(res.per_query[top_names]), use_faiss


def test_gallery_exclude_errors():
    emb, labels = clustered(n=12, levels=2)
    with pytest.raises(ValueError, match="same-set protocol"):
        evaluate(emb, labels, gallery_exclude=torch.arange(12), progress=False)
    kw = dict(gallery_embeddings=emb, gallery_labels=labels, progress=False)
    with pytest.raises(ValueError, match=r"\(4,\) integers"):
        evaluate(emb[:4], labels[:4], gallery_exclude=torch.arange(3), **kw)
    with pytest.raises(ValueError, match=r"outside \[-1, 12\)"):
        evaluate(emb[:4], labels[:4], gallery_exclude=torch.tensor([0, 1, 2, 12]), **kw)


def _has_faiss() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def test_map_relevance_and_alpha_match_brute_force():
    emb, labels = clustered(seed=3)
    for kwargs in (dict(relevance="map", weights=[1.0, 2.0, 5.0]), dict(relevance="pop", alpha=2.5)):
        want, _ = brute_force(emb, labels, emb, labels, same_set=True, **kwargs)
        res = evaluate(emb, labels, metrics=["H-AP"], progress=False, **kwargs)
        assert list(res.summary) == ["H-AP"]
        assert res.summary["H-AP"] == pytest.approx(want["H-AP"], abs=1e-9)


def test_one_level_h_ap_is_ap():
    emb, labels = clustered(levels=1, seed=4)
    res = evaluate(emb, labels[:, 0], progress=False)
    assert res.summary["H-AP"] == pytest.approx(res.summary["AP@0"], abs=1e-12)
    assert res.summary["AP#1"] == pytest.approx(res.summary["AP@0"], abs=1e-12)


# ----------------------------------------------------------------------------------------------
# Other libraries


def test_agrees_with_pytorch_metric_learning():
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    emb, labels = clustered(n=90, levels=1, seed=5)
    calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"), k="max_bin_count", device=torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        acc = calc.get_accuracy(emb, labels[:, 0], emb, labels[:, 0], ref_includes_query=True)
    res = evaluate(emb, labels, metrics=["P@1", "mAP@R"], progress=False)
    assert res.summary["P@1@0"] == pytest.approx(acc["precision_at_1"], abs=1e-6)
    assert res.summary["mAP@R@0"] == pytest.approx(acc["mean_average_precision_at_r"], abs=1e-6)


# ----------------------------------------------------------------------------------------------
# Paths and chunking give the same numbers


@settings(max_examples=8, deadline=None)
@given(st.integers(1, 70), st.integers(0, 1000), st.booleans())
def test_results_do_not_depend_on_chunk_size(chunk_size, seed, ties):
    emb, labels = clustered(seed=seed, ties=ties)
    a = evaluate(emb, labels, ks=KS, chunk_size=chunk_size, progress=False)
    b = evaluate(emb, labels, ks=KS, chunk_size=64, progress=False)
    assert a.per_query.equals(b.per_query)


@pytest.mark.filterwarnings("ignore:.*no positive")
@pytest.mark.parametrize("ties", [False, True])
def test_faiss_and_torch_top_k_paths_agree_with_the_full_ranking(ties):
    pytest.importorskip("faiss")
    emb, labels = clustered(n=80, seed=6, ties=ties)
    full = evaluate(emb, labels, ks=KS, progress=False)
    names = [n for n in full.summary if n.startswith(("R@", "P@1"))]
    for use_faiss in (True, False):
        top = evaluate(emb, labels, metrics=["R@k", "P@1"], ks=KS, use_faiss=use_faiss, chunk_size=7, progress=False)
        assert top.settings["faiss"] is use_faiss
        assert list(top.summary) == names
        assert top.per_query.equals(full.per_query[names]), use_faiss
    # query/gallery with distractors, k larger than the gallery
    q_emb, g_emb = emb[:20], emb[20:30]
    kw = dict(gallery_embeddings=g_emb, gallery_labels=labels[20:30], distractor_embeddings=emb[30:33] * -1,
              metrics=["R@k"], ks=(1, 5, 50), progress=False)
    a = evaluate(q_emb, labels[:20], use_faiss=True, **kw)
    b = evaluate(q_emb, labels[:20], use_faiss=False, **kw)
    c = evaluate(q_emb, labels[:20], **{**kw, "metrics": None})
    assert a.per_query.equals(b.per_query)
    assert a.per_query.equals(c.per_query[list(a.summary)])


# ----------------------------------------------------------------------------------------------
# Results object


def test_results_object():
    emb, labels = clustered(n=30, levels=2)
    res = evaluate(emb, labels, columns=[0], ks=(1, 8), progress=False)
    assert isinstance(res, RetrievalResults)
    assert list(res.summary) == metric_names(2, columns=[0], ks=(1, 8))
    assert list(res.summary) == ["H-AP", "ASI", "NDCG", "AP@0", "mAP@R@0", "P@1@0", "R@1@0", "R@8@0", "AP#1", "AP#2"]
    frame = res.to_frame()
    assert frame.shape == (1, len(res.summary)) and frame.iloc[0].to_dict() == res.summary
    assert res.per_query.shape == (30, len(res.summary)) and res.per_query.index.name == "query"
    assert res["H-AP"] == res.summary["H-AP"]
    assert "H-AP" in repr(res) and "30 queries" in repr(res)


def test_queries_without_positive_are_counted_and_left_out():
    emb, labels = clustered(n=30, levels=2)
    labels = labels.clone()
    labels[0, 0] = 99  # a fine class of one item (same parent): no positive at level 0
    with pytest.warns(UserWarning, match="1 of 30 queries"):
        res = evaluate(emb, labels, progress=False)
    assert res.skipped["AP@0"] == 1 and "AP@1" not in res.skipped
    assert math.isnan(res.per_query.loc[0, "AP@0"])
    assert res.summary["AP@0"] == pytest.approx(res.per_query["AP@0"].iloc[1:].mean())
    assert "no positive" in repr(res)


# ----------------------------------------------------------------------------------------------
# Errors


def test_bad_inputs_are_rejected_with_clear_errors():
    emb, labels = clustered(n=12, levels=2)
    with pytest.raises(ValueError, match="12 rows but labels has 11"):
        evaluate(emb, labels[:11], progress=False)
    bad = emb.clone()
    bad[3, 0] = float("nan")
    bad[5] = float("inf")
    with pytest.raises(ValueError, match=r"9 non-finite value\(s\).*2 of 12 row\(s\), first at row 3"):
        evaluate(bad, labels, progress=False)
    not_tree = labels.clone()
    not_tree[0, 1] = 7
    with pytest.raises(LabelError, match="two parents"):
        evaluate(emb, not_tree, progress=False)
    with pytest.raises(LabelError, match="two parents"):
        evaluate(emb[:6], labels[:6], gallery_embeddings=emb[6:], gallery_labels=not_tree[6:] * 0 + torch.tensor([0, 5]), progress=False)
    with pytest.raises(ValueError, match="both gallery_embeddings and gallery_labels"):
        evaluate(emb, labels, gallery_embeddings=emb, progress=False)
    with pytest.raises(ValueError, match="dimension"):
        evaluate(emb, labels, distractor_embeddings=torch.zeros(3, 5), progress=False)
    with pytest.raises(ValueError, match="unknown metric 'MRR'"):
        evaluate(emb, labels, metrics=["MRR"], progress=False)
    with pytest.raises(ValueError, match="label column 2 does not exist"):
        evaluate(emb, labels, columns=[2], progress=False)
    with pytest.raises(ValueError, match="relevance 'map' needs one weight per level"):
        evaluate(emb, labels, relevance="map", progress=False)
    with pytest.raises(ValueError, match="floating point"):
        evaluate(emb.long(), labels, progress=False)
    with pytest.raises(ValueError, match="at least two items"):
        evaluate(emb[:1], labels[:1], progress=False)


# ----------------------------------------------------------------------------------------------
# Embedding extraction


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(6, 4)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.lin(x))


def test_extract_embeddings():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(10, 6, generator=g)
    labels = torch.stack([torch.arange(10) % 4, torch.arange(10) % 4 // 2], 1)
    data = torch.utils.data.TensorDataset(images, labels)
    loader = torch.utils.data.DataLoader(data, batch_size=3)
    net = _Net().train()
    emb, lab = extract_embeddings(net, loader, progress=False)
    assert net.training  # previous mode restored
    assert emb.dtype == torch.float32 and emb.shape == (10, 4) and not emb.requires_grad
    assert torch.allclose(emb, net.eval()(images).detach(), atol=1e-6)  # eval mode: no dropout
    assert lab.dtype == torch.int64 and torch.equal(lab, labels)
    dict_loader = [{"image": images[:5], "label": labels[:5, 0]}, {"image": images[5:], "label": labels[5:, 0]}]
    emb2, lab2 = extract_embeddings(net, dict_loader, device="cpu", progress=False)
    assert torch.allclose(emb2, emb, atol=1e-6) and lab2.shape == (10, 1)
    with pytest.raises(TypeError, match=r"\(images, labels\)"):
        extract_embeddings(net, [images], progress=False)


def test_nearest_neighbours_are_the_exact_ranking_with_ties_to_the_lower_index():
    from hapkit.evaluate import nearest_neighbours

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    x[10] = x[3]  # an exact tie
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    s = x @ x.T
    np.fill_diagonal(s, -np.inf)
    expected = np.argsort(-s, axis=1, kind="stable")[:, :7]
    for use_faiss in (False, None):
        got = nearest_neighbours(x, 7, use_faiss=use_faiss, chunk_size=64).numpy()
        np.testing.assert_array_equal(got, expected)
    gallery = rng.normal(size=(50, 8)).astype(np.float32)
    cross = np.argsort(-(x @ gallery.T), axis=1, kind="stable")[:, :3]
    np.testing.assert_array_equal(nearest_neighbours(x, 3, gallery_embeddings=gallery).numpy(), cross)
    with pytest.raises(ValueError, match="k must be between 1 and 299"):
        nearest_neighbours(x, 300)


def test_neighbourhood_metrics_of_a_perfectly_nested_space():
    from hapkit.evaluate import neighbourhood_metrics

    # 4 coarse groups far apart, 2 fine classes each close together: every neighbour among the
    # 3 nearest shares the fine class, so nothing fails
    rng = np.random.default_rng(1)
    fine = np.repeat(np.arange(8), 4)
    labels = np.stack([fine, fine // 2], 1)
    centres = np.eye(8)[fine // 2 * 2] * 10 + np.eye(8)[fine] * 1.0
    x = centres + 0.01 * rng.normal(size=centres.shape)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    m = neighbourhood_metrics(x, labels, k=3)
    assert m["kNN@3@0"] == 1.0 and m["kNN@3@1"] == 1.0 and m["top1 wrong"] == 0.0
    m = neighbourhood_metrics(x, labels, k=7)  # 3 same-class + 4 sibling-class neighbours
    assert m["kNN@7@0"] == pytest.approx(3 / 7) and m["kNN@7@1"] == pytest.approx(1.0)
    assert m["top1 wrong#0"] == 0.0 and m["top1 wrong#1"] == 0.0


def test_the_benchmarks_full_sort_baseline_computes_the_same_metrics():
    """bench_evaluate.py times evaluate against a full sort of every gallery: same numbers."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import bench_evaluate
    finally:
        sys.path.pop(0)
    emb, labels = bench_evaluate.clustered_embeddings(1000, dim=16)  # 100 fine classes in 80 middle ones
    baseline = bench_evaluate.straightforward_evaluate(emb, labels, chunk_size=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = evaluate(emb, labels, progress=False).summary
    assert baseline.keys() <= ours.keys()
    for name, value in baseline.items():
        # float32 dot products computed in other blocks may round differently: a near tie may swap
        assert ours[name] == pytest.approx(value, abs=1e-6, nan_ok=True), name
