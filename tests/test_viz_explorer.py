"""The ranking explorer: rankings, per-query metrics and every control, driven without a kernel."""

import base64
import io

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageColor

from hapkit.evaluate import evaluate
from hapkit.viz import level_colors
from hapkit.viz import agreement_figure
from hapkit.viz.explorer import RankingExplorer
from hapkit.viz.explorer_state import ORDERS, rank_queries, top_k_ranking

N_FINE, PER_CLASS = 8, 5
LEVELS = ["fine", "mid", "top"]


def make_data(seed=0, dim=6, noise=1.0):
    rng = np.random.default_rng(seed)
    fine = np.repeat(np.arange(N_FINE), PER_CLASS)
    labels = np.stack([fine, fine // 2, fine // 4], 1)
    centres = rng.normal(size=(N_FINE, dim))
    emb = centres[fine] + noise * rng.normal(size=(len(fine), dim))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    images = rng.integers(0, 256, size=(len(fine), 8, 8, 3), dtype=np.uint8)
    return torch.from_numpy(emb), labels, images


@pytest.fixture(scope="module")
def data():
    return make_data()


@pytest.fixture()
def explorer(data):
    emb, labels, images = data
    return RankingExplorer(emb, labels, images, level_names=LEVELS, top_k=5, thumb_size=16)


# ------------------------------------------------------------------------ references (loops)


def ref_order(emb, q):
    """Every other item by decreasing dot product, ties to the lower index."""
    e = np.asarray(emb, dtype=np.float64)
    scores = [(float(e[q] @ e[j]), j) for j in range(len(e)) if j != q]
    return [j for _, j in sorted(scores, key=lambda t: (-t[0], t[1]))]


def ref_shared(labels, q, j):
    return sum(int(labels[q, c] == labels[j, c]) for c in range(labels.shape[1]))


def ref_ap(emb, labels, q, c):
    hits, total = 0, 0.0
    order = ref_order(emb, q)
    n_pos = sum(labels[j, c] == labels[q, c] for j in order)
    for rank, j in enumerate(order, start=1):
        if labels[j, c] == labels[q, c]:
            hits += 1
            total += hits / rank
    return total / n_pos


def ref_hap(emb, labels, q):
    """H-AP with 'pop' relevance (alpha 1), the query counted at level L (docs/definitions.md, 'Graded relevance')."""
    L = labels.shape[1]
    order = ref_order(emb, q)
    V = [ref_shared(labels, q, j) for j in order]
    count = {v: V.count(v) for v in range(L + 1)}
    count[L] += 1
    rel = [v / count[v] if v > 0 else 0.0 for v in V]
    num = 0.0
    for k in range(len(order)):
        if rel[k] > 0:
            hrank = sum(min(rel[j], rel[k]) for j in range(k + 1) if rel[j] > 0)
            num += hrank / (k + 1)
    return num / sum(rel)


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# ----------------------------------------------------------------------------- functions


def test_top_k_ranking_matches_brute_force_with_ties():
    emb, labels, _ = make_data(seed=1)
    emb = emb.clone()
    emb[7] = emb[3]  # exact ties: the lower index must come first
    emb[12] = emb[3]
    for q in (0, 3, 7, 20):
        got = top_k_ranking(emb, q, 9).tolist()
        assert got == ref_order(emb, q)[:9]
    assert top_k_ranking(emb, 3, 100).tolist() == ref_order(emb, 3)  # k larger than the gallery


def test_rank_queries_orders_and_skips_undefined():
    per_query = pd.DataFrame(
        {"H-AP": [0.9, 0.2, np.nan, 0.5, 0.6], "AP@0": [0.1, 0.3, 0.4, 0.5, 0.9], "AP@1": [0.9, 0.2, 0.4, 0.1, 0.6]}
    )
    assert rank_queries(per_query, 0, "disagree") == [0, 4, 1, 3]
    assert rank_queries(per_query, 0, "hap-ap") == [0, 3, 1, 4]  # largest H-AP - AP first; ties by index
    assert rank_queries(per_query, 0, "ap-hap") == [4, 1, 3, 0]
    assert rank_queries(per_query, 0, "low-hap", n=2) == [1, 3]
    assert rank_queries(per_query, 1, "low-ap") == [3, 1, 4, 0]
    assert rank_queries(per_query, 1, "disagree") == [3, 0, 1, 4]
    with pytest.raises(ValueError, match="unknown order"):
        rank_queries(per_query, 0, "best")
    with pytest.raises(ValueError, match="AP@2"):
        rank_queries(per_query, 2)


# ------------------------------------------------------------------------------ explorer


def test_initial_state_matches_references(data, explorer):
    emb, labels, _ = data
    per_query = evaluate(emb, labels, metrics=("H-AP", "ASI", "NDCG", "AP"), progress=False).per_query
    pd.testing.assert_frame_equal(explorer.per_query, per_query)
    # the first query is the one where H-AP and AP@0 disagree most
    gaps = [abs(ref_hap(emb, labels, q) - ref_ap(emb, labels, q, 0)) for q in range(len(labels))]
    assert explorer.query == int(np.argmax(gaps))
    q = explorer.query
    assert explorer.ranking.tolist() == ref_order(emb, q)[:5]
    assert explorer.shared.tolist() == [ref_shared(labels, q, j) for j in ref_order(emb, q)[:5]]
    assert explorer.query_metrics["AP@0"] == pytest.approx(ref_ap(emb, labels, q, 0), abs=1e-12)
    assert explorer.query_metrics["H-AP"] == pytest.approx(ref_hap(emb, labels, q), abs=1e-12)
    assert len(explorer.gallery.children) == 1 + 5
    assert f"{explorer.query_metrics['H-AP']:.3f}" in explorer.info.value
    assert "query" in repr(explorer) and "view" in " ".join(explorer._repr_mimebundle_())


def test_query_slider_updates_ranking_metrics_and_views(data, explorer):
    emb, labels, _ = data
    for q in (0, 17, 39):
        explorer.query_slider.value = q
        state = explorer.state()
        assert state["query"] == q
        assert state["ranking"] == ref_order(emb, q)[:5]
        assert state["shared"] == [ref_shared(labels, q, j) for j in state["ranking"]]
        for c in range(3):
            assert state["metrics"][f"AP@{c}"] == pytest.approx(ref_ap(emb, labels, q, c), abs=1e-12)
            assert f"{ref_ap(emb, labels, q, c):.3f}" in explorer.info.value
        assert state["metrics"]["H-AP"] == pytest.approx(ref_hap(emb, labels, q), abs=1e-12)
        assert f"<b>query {q}</b>" in explorer.info.value
        # the tiles: the query, then the ranked items with their V
        captions = [t.children[1].value for t in explorer.gallery.children]
        assert f"query {q}" in captions[0]
        for rank, v in enumerate(state["shared"], start=1):
            assert f"#{rank} · V={v}" in captions[rank]


def test_column_toggle_changes_ap_level_list_and_marks(data, explorer):
    emb, labels, _ = data
    explorer.query_slider.value = 11
    before = explorer.state()["listed"]
    assert before == rank_queries(explorer.per_query, 0, "disagree", 20)
    explorer.column_toggle.value = 2
    assert explorer.column == 2
    assert explorer.state()["listed"] == rank_queries(explorer.per_query, 2, "disagree", 20)
    assert "background:#eef'>AP@top" in explorer.info.value  # the chosen level is highlighted
    marks = sum("✓" in t.children[1].value for t in explorer.gallery.children[1:])
    assert marks == sum(v >= 1 for v in explorer.shared)  # positives at the top level share >= 1 level
    explorer.column_toggle.value = 0
    marks = sum("✓" in t.children[1].value for t in explorer.gallery.children[1:])
    assert marks == sum(v == 3 for v in explorer.shared)
    assert explorer.query == 11  # the query stays


def test_query_list_buttons_and_order(explorer):
    listed = explorer.state()["listed"]
    explorer.query_list.value = listed[3]
    assert explorer.query == listed[3] and explorer.query_slider.value == listed[3]
    explorer.next_button.click()
    assert explorer.query == listed[4] and explorer.query_list.value == listed[4]
    explorer.prev_button.click()
    explorer.prev_button.click()
    assert explorer.query == listed[2]
    explorer.query_list.value = listed[0]
    explorer.prev_button.click()  # wraps around the list
    assert explorer.query == listed[-1]
    # a query outside the list: the buttons move to the neighbouring index
    outside = next(q for q in range(40) if q not in listed)
    explorer.query_slider.value = outside
    assert explorer.query_list.value is None
    explorer.next_button.click()
    assert explorer.query == (outside + 1) % 40
    for order in ORDERS:
        explorer.order_dropdown.value = order
        assert explorer.state()["listed"] == rank_queries(explorer.per_query, explorer.column, order, 20)


def test_top_k_slider(data, explorer):
    emb, _, _ = data
    explorer.k_slider.value = 12
    assert len(explorer.ranking) == 12 and len(explorer.gallery.children) == 13
    assert explorer.ranking.tolist() == ref_order(emb, explorer.query)[:12]
    assert explorer.k_slider.max == min(50, 39)


def test_thumbnails_from_array_dataset_and_function(data):
    emb, labels, images = data

    class Images:
        def __len__(self):
            return len(images)

        def load_image(self, i):  # uint8 CxHxW tensors, as hapkit datasets return
            return torch.from_numpy(images[i]).permute(2, 0, 1)

    sources = [images, Images(), lambda i: images[i].astype(np.float32) / 255.0, list(images)]
    for source in sources:
        ex = RankingExplorer(emb, labels, source, top_k=3, thumb_size=24)
        png = ex.thumbnail_png(5)
        expected = np.kron(images[5], np.ones((3, 3, 1), dtype=np.uint8))  # nearest-neighbour x3
        np.testing.assert_array_equal(decode_png(png), expected)
        first = ex.gallery.children[0].children[0]
        assert first.value == ex.thumbnail_png(ex.query)
    # without images: coloured tiles in the V colour
    ex = RankingExplorer(emb, labels, None, top_k=3)
    colors = level_colors(3)
    for tile, v in zip(ex.gallery.children[1:], ex.shared):
        assert colors[v] in tile.children[0].value
    with pytest.raises(ValueError, match="one image per embedding"):
        RankingExplorer(emb, labels, images[:5])


def test_given_results_are_used_and_checked(data, monkeypatch):
    emb, labels, _ = data
    results = evaluate(emb, labels, progress=False)
    import hapkit.evaluate

    def fail(*a, **k):
        raise AssertionError("evaluate must not run when results are given")

    monkeypatch.setattr(hapkit.evaluate, "evaluate", fail)
    ex = RankingExplorer(emb, labels, results=results, top_k=3, query=4)
    assert ex.query == 4 and ex.query_metrics["NDCG"] == results.per_query.at[4, "NDCG"]
    with pytest.raises(ValueError, match="queries but there are"):
        RankingExplorer(emb[:20], labels[:20], results=results)
    with pytest.raises(ValueError, match="lacks"):
        RankingExplorer(emb, labels, results=results.per_query.drop(columns=["AP@1"]))
    monkeypatch.undo()
    qg = evaluate(emb[::2], labels[::2], gallery_embeddings=emb[1::2], gallery_labels=labels[1::2], progress=False)
    with pytest.raises(ValueError, match="same-set"):
        RankingExplorer(emb[::2], labels[::2], results=qg)


def test_input_errors(data):
    emb, labels, _ = data
    with pytest.raises(ValueError, match="one label row per embedding"):
        RankingExplorer(emb[:10], labels)
    bad = emb.clone()
    bad[3, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        RankingExplorer(bad, labels)
    with pytest.raises(ValueError, match="column must be"):
        RankingExplorer(emb, labels, column=3)
    with pytest.raises(ValueError, match="level name"):
        RankingExplorer(emb, labels, level_names=["a", "b"])
    with pytest.raises(ValueError, match="query must be"):
        RankingExplorer(emb, labels, query=40)
    with pytest.raises(Exception, match="two parents"):
        RankingExplorer(emb, np.stack([np.arange(40) % 8, np.arange(40) % 3], 1))


def test_static_figure_draws_the_rankings(data, explorer):
    emb, labels, images = data
    everything = rank_queries(explorer.per_query, 0, "disagree")
    assert explorer.disagreements(4, one_per_class=False) == everything[:4]
    queries = explorer.disagreements(3)
    firsts = [q for i, q in enumerate(everything) if labels[q, 0] not in {labels[p, 0] for p in everything[:i]}]
    assert queries == firsts[:3] and len({labels[q, 0] for q in queries}) == 3
    queries = queries[:2]
    fig = explorer.figure(queries, top_k=4, tile=16)
    image, *legend = fig.data
    assert [t.name for t in legend] == [f"V={v}: " + n for v, n in zip((3, 2, 1), ("same fine", "same mid", "same top"))] + ["V=0: unrelated"]
    canvas = np.asarray(Image.open(io.BytesIO(base64.b64decode(image.source.split(",", 1)[1]))).convert("RGB"))
    text = " ".join(a.text for a in fig.layout.annotations)
    colors = level_colors(3)
    border, gap, head, cell = 4, 6, 30, 16 + 8
    row_h = head + cell + 16
    for r, q in enumerate(queries):
        assert f"<b>query {q}</b>" in text and f"H-AP {explorer.per_query.at[q, 'H-AP']:.3f}" in text
        y0 = r * row_h + head
        x0 = gap
        tile = canvas[y0 + border : y0 + border + 16, x0 + border : x0 + border + 16]
        np.testing.assert_array_equal(tile, np.kron(images[q], np.ones((2, 2, 1), dtype=np.uint8)))
        for i, j in enumerate(ref_order(emb, q)[:4]):
            x0 = gap + (i + 1) * (cell + gap)
            frame = canvas[y0 + 1, x0 + cell // 2]
            v = ref_shared(labels, q, j)
            assert tuple(frame) == ImageColor.getrgb(colors[v])
            inner = canvas[y0 + border : y0 + border + 16, x0 + border : x0 + border + 16]
            np.testing.assert_array_equal(inner, np.kron(images[j], np.ones((2, 2, 1), dtype=np.uint8)))
    assert explorer.query_table(queries).index.tolist() == queries
    fig = explorer.ranks_figure(queries, length=12)
    drawn = {}
    for trace in fig.data:  # one trace per shared level V
        v = int(trace.name.split(":")[0][2:])
        for x, y in zip(trace.x, trace.y):
            drawn[(y.split(":")[0], x)] = v
    for q in queries:
        expected = [ref_shared(labels, q, j) for j in ref_order(emb, q)[:12]]
        assert [drawn[(f"query {q}", r)] for r in range(1, 13)] == expected
    assert any(f"H-AP {explorer.per_query.at[q, 'H-AP']:.3f}" in y for q in queries for t in fig.data for y in t.y)
    with pytest.raises(ValueError, match="no query"):
        explorer.figure([])


def test_agreement_figure_and_from_embedding_set(data):
    emb, labels, images = data
    res = evaluate(emb, labels, progress=False)
    per_query = res.per_query.copy()
    per_query.loc[2, "AP@0"] = np.nan
    fig = agreement_figure(per_query, 0, LEVELS, highlight=[1, 2, 5])
    points, marked, diagonal = fig.data
    assert len(points.x) == 39 and list(marked.text) == ["1", "5"]
    assert fig.layout.xaxis.title.text == "AP@fine"
    with pytest.raises(ValueError, match="AP@3"):
        agreement_figure(per_query, 3)

    from hapkit.data import EmbeddingSet

    class Store:
        def __init__(self):
            self.images = images

    items = EmbeddingSet(
        embeddings=emb.numpy().astype(np.float32), labels=labels, indices=np.arange(40), level_names=LEVELS,
        class_names=[[f"f{i}" for i in range(8)], [f"m{i}" for i in range(4)], ["t0", "t1"]], dataset=Store(),
    )
    ex = RankingExplorer.from_embedding_set(items, results=res, top_k=2, query=9)
    assert ex.level_names == LEVELS and "f1" in ex.info.value and "m0" in ex.info.value
    np.testing.assert_array_equal(decode_png(ex.thumbnail_png(9))[::9, ::9], images[9])


# ------------------------------------------------------------------------ two models


def two_models():
    emb, labels, images = make_data(seed=0)
    other, _, _ = make_data(seed=0, noise=2.5)  # the same items, a worse embedding
    return emb, other, labels, images


def test_model_gaps_order_the_queries_by_how_differently_two_models_rank_them():
    from hapkit.viz.explorer_state import rank_model_gaps

    a = pd.DataFrame({"H-AP": [0.9, 0.2, np.nan, 0.5], "AP@0": [0.1, 0.3, 0.4, 0.5]})
    b = pd.DataFrame({"H-AP": [0.1, 0.3, 0.2, 0.9], "AP@0": [0.1, 0.9, 0.4, 0.6]})
    assert rank_model_gaps(a, b, 0, "gap") == [0, 3, 1]
    assert rank_model_gaps(a, b, 0, "first") == [0, 1, 3]
    assert rank_model_gaps(a, b, 0, "second") == [3, 1, 0]
    assert rank_model_gaps(a, b, 0, "gap-ap") == [1, 3, 0, 2]
    with pytest.raises(ValueError, match="unknown order"):
        rank_model_gaps(a, b, 0, "best")


def test_comparison_shows_one_query_under_both_models():
    from hapkit.viz.explorer import ComparisonExplorer
    from hapkit.viz.explorer_state import RankingState

    emb, other, labels, images = two_models()
    good = RankingState(emb, labels, level_names=LEVELS, top_k=4)
    bad = RankingState(other, labels, level_names=LEVELS, top_k=4)
    ex = ComparisonExplorer({"good": good, "bad": bad}, images=images, thumb_size=16)
    gaps = np.abs(good.per_query["H-AP"] - bad.per_query["H-AP"]).to_numpy()
    listed = ex.state()["listed"]
    assert listed[0] == int(np.argmax(gaps)) and ex.state()["query"] == listed[0]
    assert np.all(np.diff(gaps[listed]) <= 1e-12)  # largest gap first
    for name, ref in (("good", emb), ("bad", other)):
        state = ex.state()["models"][name]
        assert state["ranking"] == ref_order(ref, state["query"])[:4]
        assert len(ex.galleries[name].children) == 5
        assert f"H-AP {state['metrics']['H-AP']:.3f}" in ex.headers[name].value
    ex.next_button.click()
    assert ex.state()["query"] == listed[1]
    assert all(m["query"] == listed[1] for m in ex.state()["models"].values())
    ex.column_toggle.value = 2
    assert all(m["column"] == 2 for m in ex.state()["models"].values())
    ex.k_slider.value = 6
    assert all(len(g.children) == 7 for g in ex.galleries.values())
    fig = ex.figure(listed[:2], top_k=3, tile=16)
    text = " ".join(a.text for a in fig.layout.annotations)
    assert f"good, query {listed[0]}" in text and f"bad, query {listed[1]}" in text
    with pytest.raises(ValueError, match="same images"):
        ComparisonExplorer({"a": good, "b": RankingState(emb[:20], labels[:20])})
    with pytest.raises(ValueError, match="at least two"):
        ComparisonExplorer({"a": good})
