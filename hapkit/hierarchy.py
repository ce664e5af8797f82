"""Label trees: validation, the shared-level matrix V and graded relevance.

Labels are an integer array of shape (N, L), column 0 the finest level (product, species) and
column L-1 the coarsest (super-category, kingdom). They must form a tree: two items with the same
label at column c have the same label at every column > c.

``V(q, k)`` counts the columns at which query q and item k agree. For tree labels this is the
number of levels they share counted from the top, so ``V == L`` means "same fine class" and
``V == 0`` means "nothing in common". Graded relevance (HAPPIER) is a function of V alone plus the
number of items at each level for the query.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from hapkit.errors import HapkitError, InputError

__all__ = [
    "LabelError",
    "as_label_tensor",
    "check_tree",
    "shared_levels",
    "shared_counts",
    "relevance",
    "level_relevance",
    "RELEVANCE_KINDS",
]

RELEVANCE_KINDS = ("pop", "map")


class LabelError(HapkitError, ValueError):
    """Raised for label arrays that are not (N, L) non-negative integer trees."""


def as_label_tensor(labels, name: str = "labels", check: bool = True) -> torch.Tensor:
    """Return ``labels`` as a (N, L) int64 tensor, validating shape, dtype, sign and tree structure.

    Accepts numpy arrays, torch tensors and nested lists. A 1-D array is one level (L = 1).
    With ``check=False`` the (costly on huge arrays) tree check is skipped; callers that validated
    once use it to avoid doing the work again.
    """
    if isinstance(labels, torch.Tensor):
        t = labels
    else:
        try:
            arr = np.asarray(labels)
        except (ValueError, TypeError):  # ragged nested lists
            arr = np.empty(0, dtype=object)
        if arr.dtype == object:
            raise LabelError(
                f"{name} must be a rectangular array of integer ids below 2**63, got ragged, "
                f"too large or non-numeric data"
            )
        if arr.dtype.kind not in "biuf":
            raise LabelError(f"{name} must have an integer dtype, got {arr.dtype}")
        if arr.dtype.kind == "u" and arr.dtype.itemsize == 8:
            if arr.size and int(arr.max()) >= 2**63:
                raise LabelError(f"{name} holds ids of 2**63 or more: re-index them below 2**63 (e.g. np.unique(column, return_inverse=True)[1])")
            arr = arr.astype(np.int64)
        t = torch.from_numpy(arr.copy()) if arr.size else torch.from_numpy(arr)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        if t.dtype.is_floating_point and t.numel() and bool(torch.all(t == t.round())):
            hint = " (the values are whole numbers: cast them with .long() / .astype(int))"
        else:
            hint = ""
        raise LabelError(f"{name} must have an integer dtype, got {t.dtype}{hint}")
    if t.dim() == 1:
        t = t.unsqueeze(1)
    if t.dim() != 2:
        raise LabelError(
            f"{name} must have shape (N, L) with the finest level in column 0, got shape {tuple(t.shape)}"
        )
    if t.shape[1] == 0:
        raise LabelError(f"{name} has no level (shape {tuple(t.shape)}): give at least one column")
    t = t.long()
    if t.numel() and int(t.min()) < 0:
        n_neg = int((t < 0).sum())
        raise LabelError(
            f"{name} contains {n_neg} negative value(s); labels must be non-negative class ids: "
            f"re-index each column, e.g. with np.unique(column, return_inverse=True)[1]"
        )
    if check:
        check_tree(t, name=name)
    return t


def check_tree(labels: torch.Tensor, name: str = "labels") -> None:
    """Raise :class:`LabelError` naming a fine label with two parents if ``labels`` is not a tree.

    Checking each pair of adjacent columns suffices: if every label at column c has a single parent
    at c + 1, then by induction it has a single ancestor at every coarser column.
    """
    labels = torch.as_tensor(labels)
    if labels.dim() == 1 or labels.shape[1] < 2 or labels.shape[0] == 0:
        return
    for c in range(labels.shape[1] - 1):
        child_col, parent_col = labels[:, c], labels[:, c + 1]
        child_ids = parent_ids = None
        if (int(child_col.max()) + 1) * (int(parent_col.max()) + 1) > 2**62:
            # Large ids (hashes, 2**40 and up) would overflow the int64 key below: rank them
            # instead, which keeps label equality and so the answer.
            child_ids, child_col = torch.unique(child_col, return_inverse=True)
            parent_ids, parent_col = torch.unique(parent_col, return_inverse=True)
        # One 1-D unique over a combined key: torch.unique(dim=0) is far slower on large arrays.
        base = int(parent_col.max()) + 1
        keys = torch.unique(child_col * base + parent_col)  # sorted by child, then parent
        children = keys // base
        if keys.numel() == torch.unique(child_col).numel():
            continue
        dup = (children[1:] == children[:-1]).nonzero()[0, 0]
        child = int(children[dup])
        p1, p2 = int(keys[dup] % base), int(keys[dup + 1] % base)
        if child_ids is not None:
            child, p1, p2 = int(child_ids[child]), int(parent_ids[p1]), int(parent_ids[p2])
        rows = (labels[:, c] == child).nonzero().flatten()
        r1 = int(rows[labels[rows, c + 1] == p1][0])
        r2 = int(rows[labels[rows, c + 1] == p2][0])
        raise LabelError(
            f"{name} do not form a tree: label {child} at level {c} has two parents at level {c + 1}, "
            f"{p1} (row {r1}) and {p2} (row {r2}). Column 0 must be the finest level and every fine "
            f"label must belong to exactly one coarser label."
        )


def shared_levels(query_labels: torch.Tensor, gallery_labels: torch.Tensor) -> torch.Tensor:
    """V(q, k): the number of label columns shared by each query and each gallery item.

    Returns a (Q, G) uint8 tensor on the device of ``gallery_labels`` (values 0..L). Memory is
    O(Q * G): it loops over the (few) levels instead of broadcasting a (Q, G, L) tensor.
    """
    q = torch.as_tensor(query_labels)
    g = torch.as_tensor(gallery_labels)
    if q.dim() == 1:
        q = q.unsqueeze(1)
    if g.dim() == 1:
        g = g.unsqueeze(1)
    if q.shape[1] != g.shape[1]:
        raise LabelError(
            f"query labels have {q.shape[1]} level(s) but gallery labels have {g.shape[1]}"
        )
    q = q.to(g.device)
    V = torch.zeros(q.shape[0], g.shape[0], dtype=torch.uint8, device=g.device)
    for c in range(q.shape[1]):
        V += q[:, c, None] == g[None, :, c]
    return V


def shared_counts(V: torch.Tensor, num_levels: int, count_query: bool = False) -> torch.Tensor:
    """n_q(v): number of gallery items sharing exactly v levels with each query, shape (Q, L + 1), int64.

    ``count_query`` adds the query itself to v = L (the reference evaluation counts over the
    whole set, query included, although the query is not in its own gallery).
    """
    counts = torch.stack([(V == v).sum(dim=1) for v in range(num_levels + 1)], dim=1)
    if count_query:
        counts[:, num_levels] += 1
    return counts


def relevance(
    V: torch.Tensor,
    num_levels: int,
    kind: str = "pop",
    alpha: float = 1.0,
    weights: Sequence[float] | None = None,
    count_query: bool = False,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Graded relevance rel(q, k) of every gallery item for every query (HAPPIER), shape of V.

    - ``pop``: rel = w[V] / n_q(V) with w[v] = v ** alpha and w[0] = 0.
    - ``map``: rel = sum_{p=1..V} weights[p-1] / |{j : V(q, j) >= p}| with user ``weights`` for
      levels 1..L (level L = same fine class).

    Items with V = 0 have relevance 0. ``count_query`` reproduces the reference evaluation's
    counting of the query itself at level L (see :func:`shared_counts`); use it in the same-set
    protocol to match the published numbers. Any positive rescaling of the weights leaves every
    metric unchanged.
    """
    counts = shared_counts(V, num_levels, count_query=count_query)
    per_level = level_relevance(counts, num_levels, kind, alpha, weights, dtype)
    return torch.gather(per_level, 1, V.long())


def level_relevance(
    counts: torch.Tensor,
    num_levels: int,
    kind: str = "pop",
    alpha: float = 1.0,
    weights: Sequence[float] | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The relevance of each shared level v (0..L) for each query, (Q, L + 1), from the counts
    n_q(v) of :func:`shared_counts`: what :func:`relevance` gives every item at that level."""
    if kind not in RELEVANCE_KINDS:
        raise InputError(f"unknown relevance kind {kind!r}; choose one of {RELEVANCE_KINDS}")
    counts = counts.to(dtype)
    if kind == "pop":
        w = torch.arange(num_levels + 1, dtype=dtype, device=counts.device) ** alpha
        w[0] = 0.0
        return w[None, :] / counts.clamp(min=1)
    if weights is None or len(weights) != num_levels:
        raise InputError(
            f"relevance 'map' needs one weight per level 1..{num_levels}, got {weights!r}"
        )
    w = torch.as_tensor([0.0, *weights], dtype=dtype, device=counts.device)
    # |{j : V >= p}| = suffix sums of the exact-level counts
    at_least = counts.flip(1).cumsum(1).flip(1)
    per_level = (w[None, :] / at_least.clamp(min=1)).cumsum(1)
    per_level[:, 0] = 0.0
    return per_level
