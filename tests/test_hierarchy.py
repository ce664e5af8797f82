import numpy as np
import pytest
import torch

from hapkit.hierarchy import (
    LabelError,
    as_label_tensor,
    shared_counts,
    relevance,
    shared_levels,
)


def random_tree_labels(rng, n, branching=(3, 3)):
    """(n, L) labels built top-down, so they are a tree by construction."""
    coarse = rng.integers(0, branching[0], size=n)
    cols = [coarse]
    for b in branching[1:]:
        cols.insert(0, cols[0] * b + rng.integers(0, b, size=n))
    return np.stack(cols, axis=1)


def test_accepts_numpy_lists_and_1d():
    t = as_label_tensor([[0, 0], [1, 0], [2, 1]])
    assert t.dtype == torch.int64 and t.shape == (3, 2)
    one = as_label_tensor(np.array([3, 1, 3], dtype=np.int32))
    assert one.shape == (3, 1) and one[:, 0].tolist() == [3, 1, 3]


def test_rejects_fine_label_with_two_parents_and_names_it():
    labels = np.array([[0, 0], [1, 0], [1, 2], [2, 1]])
    with pytest.raises(LabelError, match=r"label 1 at level 0 has two parents at level 1, 0 \(row 1\) and 2 \(row 2\)"):
        as_label_tensor(labels)


def test_rejects_violation_between_middle_and_top_levels():
    labels = np.array([[0, 0, 0], [1, 1, 0], [2, 1, 1]])
    with pytest.raises(LabelError, match="label 1 at level 1 has two parents at level 2"):
        as_label_tensor(labels)


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.array([[0.0, 1.0]]), "integer dtype.*cast them"),
        (np.array([[0.5, 1.0]]), "integer dtype"),
        (np.array([[0, -1]]), "1 negative value"),
        (np.zeros((2, 2, 2), dtype=int), r"shape \(N, L\)"),
        (np.zeros((3, 0), dtype=int), "no level"),
    ],
)
def test_rejects_malformed_arrays(bad, message):
    with pytest.raises(LabelError, match=message):
        as_label_tensor(bad)


def test_shared_levels_matches_loops():
    rng = np.random.default_rng(0)
    q = random_tree_labels(rng, 17)
    g = random_tree_labels(rng, 23)
    V = shared_levels(torch.as_tensor(q), torch.as_tensor(g))
    for i in range(len(q)):
        for j in range(len(g)):
            assert V[i, j] == sum(int(q[i, c] == g[j, c]) for c in range(q.shape[1]))


def test_shared_levels_rejects_level_mismatch():
    with pytest.raises(LabelError, match="2 level"):
        shared_levels(torch.zeros(2, 2, dtype=torch.long), torch.zeros(3, 3, dtype=torch.long))


def loop_pop(V, L, alpha, count_query):
    rel = np.zeros(V.shape)
    for q in range(V.shape[0]):
        for k in range(V.shape[1]):
            v = V[q, k]
            if v == 0:
                continue
            n = sum(1 for x in V[q] if x == v) + (1 if count_query and v == L else 0)
            rel[q, k] = v**alpha / n
    return rel


def loop_map(V, weights):
    rel = np.zeros(V.shape)
    for q in range(V.shape[0]):
        for k in range(V.shape[1]):
            rel[q, k] = sum(weights[p - 1] / sum(1 for x in V[q] if x >= p) for p in range(1, V[q, k] + 1))
    return rel


@pytest.mark.parametrize("count_query", [False, True])
@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_pop_relevance_matches_definition(count_query, alpha):
    rng = np.random.default_rng(1)
    labels = torch.as_tensor(random_tree_labels(rng, 40))
    V = shared_levels(labels[:9], labels)
    rel = relevance(V, 3, "pop", alpha=alpha, count_query=count_query)
    np.testing.assert_allclose(rel.numpy(), loop_pop(V.numpy(), 3, alpha, count_query), rtol=1e-12)


def test_map_relevance_matches_definition():
    rng = np.random.default_rng(2)
    labels = torch.as_tensor(random_tree_labels(rng, 40))
    V = shared_levels(labels[:9], labels)
    weights = [0.2, 0.3, 0.5]
    rel = relevance(V, 3, "map", weights=weights)
    np.testing.assert_allclose(rel.numpy(), loop_map(V.numpy(), weights), rtol=1e-12)


def test_relevance_zero_for_unrelated_and_counts_query():
    V = torch.tensor([[2, 2, 1, 0]], dtype=torch.uint8)
    counts = shared_counts(V, 2, count_query=True)
    assert counts.tolist() == [[1, 1, 3]]
    rel = relevance(V, 2, "pop", count_query=True)
    assert rel.tolist() == [[2 / 3, 2 / 3, 1.0, 0.0]]


def test_relevance_errors():
    V = torch.zeros(1, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="unknown relevance kind"):
        relevance(V, 2, "ndcg")
    with pytest.raises(ValueError, match="one weight per level"):
        relevance(V, 2, "map", weights=[1.0])
