"""What the ranking explorer shows, as plain data: no widget, fully testable.

:class:`RankingState` holds a set of embeddings ranked in the same-set protocol, their per-query
metrics (from :func:`hapkit.evaluate.evaluate`, the same numbers as the dataset summary) and the
current view: which query, which label column the binary AP is taken at, how many retrieved items,
and which queries the list offers (ordered by how much H-AP and AP disagree, or the lowest H-AP /
AP). :class:`hapkit.viz.explorer.RankingExplorer` is a thin ipywidgets view over it.

Two indices of the hierarchy are kept apart in names: a label column ``c`` (0 = finest, as in
``AP@c``) and a number of shared levels ``v`` (0 = unrelated, L = same fine class, as in the ``V``
of :func:`hapkit.hierarchy.shared_levels`). Positives of the binary AP at column c are the items
with v >= L - c.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch

from hapkit.hierarchy import as_label_tensor, shared_levels

__all__ = ["RankingState", "ComparisonState", "ORDERS", "COMPARE_ORDERS", "rank_queries", "rank_model_gaps",
           "top_k_ranking"]

# How the query list can be ordered: key -> label shown in the dropdown
ORDERS: dict[str, str] = {
    "disagree": "|H-AP − AP| (largest first)",
    "hap-ap": "H-AP − AP: mild mistakes",
    "ap-hap": "AP − H-AP: severe mistakes",
    "low-hap": "lowest H-AP",
    "low-ap": "lowest AP",
}
METRICS = ("H-AP", "ASI", "NDCG", "AP")


def rank_queries(per_query: pd.DataFrame, column: int = 0, order: str = "disagree", n: int | None = None) -> list[int]:
    """Query indices of ``per_query`` (:attr:`hapkit.evaluate.RetrievalResults.per_query`) sorted by
    ``order`` (see :data:`ORDERS`), with AP taken at label column ``column``; queries whose H-AP or
    AP is undefined (no positive) are left out. Ties keep the lower query index first."""
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; choose one of {list(ORDERS)}")
    ap_col = f"AP@{column}"
    for col in ("H-AP", ap_col):
        if col not in per_query:
            raise ValueError(f"per_query has no column {col!r}; evaluate with metrics including 'H-AP' and 'AP'")
    hap = per_query["H-AP"].to_numpy(dtype=np.float64)
    ap = per_query[ap_col].to_numpy(dtype=np.float64)
    key = {
        "disagree": -np.abs(hap - ap),
        "hap-ap": ap - hap,
        "ap-hap": hap - ap,
        "low-hap": hap,
        "low-ap": ap,
    }[order]
    valid = np.isfinite(hap) & np.isfinite(ap)
    idx = np.nonzero(valid)[0]
    idx = idx[np.argsort(key[idx], kind="stable")]
    out = per_query.index.to_numpy()[idx].astype(int).tolist()
    return out if n is None else out[:n]


def top_k_ranking(embeddings: torch.Tensor, query: int, k: int) -> np.ndarray:
    """Gallery indices of the ``k`` items most similar (dot product) to item ``query``, the query
    itself left out, ties to the lower index (the order :func:`hapkit.evaluate.evaluate` uses)."""
    scores = embeddings @ embeddings[query]
    order = torch.sort(scores, descending=True, stable=True).indices
    order = order[order != query]
    return order[:k].cpu().numpy()


def _check_per_query(results, n: int, num_levels: int) -> pd.DataFrame:
    per_query = getattr(results, "per_query", results)
    if not isinstance(per_query, pd.DataFrame):
        raise TypeError("results must be a RetrievalResults (hapkit.evaluate.evaluate) or its per_query DataFrame")
    if len(per_query) != n:
        raise ValueError(f"results has {len(per_query)} queries but there are {n} embeddings; evaluate these embeddings")
    needed = ["H-AP", "NDCG", *[f"AP@{c}" for c in range(num_levels)]]
    missing = [c for c in needed if c not in per_query]
    if missing:
        raise ValueError(
            f"results.per_query lacks {missing}; evaluate with metrics=('H-AP', 'NDCG', 'AP') and every level"
        )
    if getattr(results, "settings", {}).get("protocol", "same-set") != "same-set":
        raise ValueError("the explorer ranks each item against the others: give same-set results")
    return per_query


def _step_target(query: int, listed: list[int], n: int, delta: int) -> int:
    """The query ``delta`` places from ``query`` in ``listed`` (wrapping around), or ``delta``
    item indices away when ``query`` is not listed."""
    if query in listed:
        return listed[(listed.index(query) + delta) % len(listed)]
    return (query + delta) % n


class RankingState:
    """The rankings of a retrieval model and the explorer's current view of them.

    Args:
        embeddings: (N, D) embeddings (L2-normalised: similarity = dot product), ranked in the
            same-set protocol (every item is a query; its gallery is all the other items).
        labels: (N, L) tree labels, finest level first.
        level_names: names of the label columns, finest first (default ``level 0``...).
        class_names: one list of class names per level, to caption items.
        top_k: number of retrieved items shown (default 10).
        column: label column of the binary AP shown first (default 0, the finest).
        query: first query shown (default: the one where H-AP and AP disagree most).
        results: a :class:`hapkit.evaluate.RetrievalResults` of these embeddings with H-AP, ASI,
            NDCG and AP in its ``per_query``; computed here when None.
        relevance: H-AP relevance when computing ``results`` (default ``pop``, as HAPPIER).
        list_size: number of queries in the query list (default 20).
        progress: show a progress bar while evaluating.

    The view (``query``, ``column``, ``top_k``, ``order``) changes through :meth:`show_query`,
    :meth:`set_column`, :meth:`set_top_k`, :meth:`set_order` and :meth:`step`; after each,
    ``ranking`` (gallery indices of the top k), ``shared`` (their v), ``query_metrics`` (the
    query's row of ``per_query``) and ``listed`` (the query list) describe what to show.
    """

    def __init__(
        self,
        embeddings,
        labels,
        level_names: Sequence[str] | None = None,
        class_names: Sequence[Sequence[str]] | None = None,
        top_k: int = 10,
        column: int = 0,
        query: int | None = None,
        results=None,
        relevance: str = "pop",
        list_size: int = 20,
        progress: bool = False,
    ):
        from hapkit import evaluate as evaluation

        emb = embeddings if isinstance(embeddings, torch.Tensor) else torch.as_tensor(np.asarray(embeddings))
        if emb.dim() != 2 or not emb.dtype.is_floating_point:
            raise ValueError(f"embeddings must be a floating-point (N, D) array, got {emb.dtype} {tuple(emb.shape)}")
        if not bool(torch.isfinite(emb).all()):
            raise ValueError("embeddings contain NaN or infinite values: their ranking is undefined")
        emb = emb.detach().cpu()
        self.labels = as_label_tensor(labels, "labels")
        N, L = self.labels.shape
        if emb.shape[0] != N:
            raise ValueError(f"embeddings has {emb.shape[0]} rows but labels has {N}; give one label row per embedding")
        if N < 2:
            raise ValueError("the explorer needs at least two items (a query and a gallery)")
        self.embeddings = emb.to(torch.promote_types(emb.dtype, torch.float32))
        self.num_levels = L
        self.level_names = list(level_names) if level_names is not None else [f"level {c}" for c in range(L)]
        if len(self.level_names) != L:
            raise ValueError(f"{len(self.level_names)} level name(s) for labels with {L} level(s)")
        if class_names is not None and len(class_names) != L:
            raise ValueError(f"class_names needs one list of names per level ({L}), got {len(class_names)}")
        self.class_names = [list(c) for c in class_names] if class_names is not None else None
        if not 0 <= column < L:
            raise ValueError(f"column must be a label column 0..{L - 1}, got {column}")
        if results is None:
            results = evaluation.evaluate(self.embeddings, self.labels, metrics=METRICS, relevance=relevance,
                                          progress=progress)
        self.results = results
        self.per_query = _check_per_query(results, N, L)

        self.column = int(column)
        self.order = "disagree"
        self.list_size = int(list_size)
        self.top_k = max(1, min(int(top_k), N - 1))
        if query is None:
            first = rank_queries(self.per_query, self.column, self.order, 1)
            query = first[0] if first else 0
        if not 0 <= int(query) < N:
            raise ValueError(f"query must be an item index 0..{N - 1}, got {query}")
        self.query = int(query)
        self.listed: list[int] = []
        self.ranking = np.zeros(0, dtype=np.int64)
        self.shared = np.zeros(0, dtype=np.int64)
        self.query_metrics: dict[str, float] = {}
        self._refresh_list()
        self._update()

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    # ---------------------------------------------------------------------------- changes

    def show_query(self, query: int) -> None:
        """Make ``query`` (an item index) the current query."""
        query = int(query)
        if not 0 <= query < len(self):
            raise ValueError(f"query must be an item index 0..{len(self) - 1}, got {query}")
        self.query = query
        self._update()

    def set_column(self, column: int) -> None:
        """Take the binary AP at label column ``column`` (the query list follows it)."""
        column = int(column)
        if not 0 <= column < self.num_levels:
            raise ValueError(f"column must be a label column 0..{self.num_levels - 1}, got {column}")
        self.column = column
        self._refresh_list()
        self._update()

    def set_order(self, order: str) -> None:
        """Order the query list by ``order`` (a key of :data:`ORDERS`)."""
        if order not in ORDERS:
            raise ValueError(f"unknown order {order!r}; choose one of {list(ORDERS)}")
        self.order = order
        self._refresh_list()

    def set_top_k(self, k: int) -> None:
        self.top_k = max(1, min(int(k), len(self) - 1))
        self._update()

    def step(self, delta: int) -> None:
        """Show the query ``delta`` places further in the query list (wrapping around); when the
        current query is not listed, the next / previous item index instead."""
        self.show_query(_step_target(self.query, self.listed, len(self), delta))

    def _refresh_list(self) -> None:
        self.listed = rank_queries(self.per_query, self.column, self.order, self.list_size)

    def _update(self) -> None:
        self.ranking, self.shared = self.ranking_of(self.query, self.top_k)
        self.query_metrics = {k: float(v) for k, v in self.per_query.loc[self.query].items()}

    # ------------------------------------------------------------------------------ reads

    def ranking_of(self, query: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(items, v): the top ``k`` gallery items of ``query`` and the levels each shares with it."""
        items = top_k_ranking(self.embeddings, query, k)
        v = shared_levels(self.labels[query : query + 1], self.labels[torch.as_tensor(items)])[0].long().numpy()
        return items, v

    def is_positive(self, shared: int, column: int | None = None) -> bool:
        """Whether an item sharing ``shared`` levels is a positive of the binary AP at ``column``."""
        column = self.column if column is None else column
        return int(shared) >= self.num_levels - column

    def class_name(self, item: int, column: int) -> str:
        """The class of ``item`` in label column ``column`` (its name when known)."""
        label = int(self.labels[item, column])
        if self.class_names is not None:
            return str(self.class_names[column][label])
        return str(label)

    def disagreements(self, n: int = 3, column: int | None = None, one_per_class: bool = True) -> list[int]:
        """The ``n`` queries where H-AP and AP (at ``column``, default the current one) differ most.

        With ``one_per_class`` (default) only the first query of each fine class counts: images
        of one class tend to have near-identical rankings, and showing three of them says little
        more than showing one.
        """
        order = rank_queries(self.per_query, self.column if column is None else column, "disagree")
        if not one_per_class:
            return order[:n]
        out, seen = [], set()
        for q in order:
            fine = int(self.labels[q, 0])
            if fine not in seen:
                seen.add(fine)
                out.append(q)
                if len(out) == n:
                    break
        return out

    def query_table(self, queries: Sequence[int], column: int | None = None) -> pd.DataFrame:
        """The per-query metrics of ``queries`` with their labels (one row per query)."""
        column = self.column if column is None else column
        rows = []
        for q in queries:
            row = {"query": int(q)}
            row.update({name: self.class_name(int(q), c) for c, name in enumerate(self.level_names)})
            m = self.per_query.loc[int(q)]
            row.update({k: float(m[k]) for k in ("H-AP", "NDCG", "ASI") if k in m})
            row[f"AP@{self.level_names[column]}"] = float(m[f"AP@{column}"])
            rows.append(row)
        return pd.DataFrame(rows).set_index("query")

    def snapshot(self) -> dict:
        """The current view as plain values (query, column, top-k items, their v, metrics, list)."""
        return {
            "query": self.query,
            "column": self.column,
            "top_k": self.top_k,
            "ranking": self.ranking.tolist(),
            "shared": self.shared.tolist(),
            "metrics": dict(self.query_metrics),
            "listed": list(self.listed),
        }

    def __repr__(self) -> str:
        return (
            f"RankingState({len(self)} items, {self.num_levels} levels, query {self.query}, "
            f"top {self.top_k}, AP at {self.level_names[self.column]})"
        )


# How a comparison lists its queries: key -> label shown in the dropdown. "first" / "second" are
# the two models in the order given.
COMPARE_ORDERS: dict[str, str] = {
    "gap": "|H-AP(first) − H-AP(second)| (largest first)",
    "first": "H-AP(first) − H-AP(second): the first model is better",
    "second": "H-AP(second) − H-AP(first): the second model is better",
    "gap-ap": "|AP(first) − AP(second)| at the chosen level",
}


def rank_model_gaps(per_query_a: pd.DataFrame, per_query_b: pd.DataFrame, column: int = 0, order: str = "gap",
                    n: int | None = None) -> list[int]:
    """Queries sorted by how differently two models rank them (see :data:`COMPARE_ORDERS`): the
    gap of their H-AP (or of their AP at label column ``column``); undefined queries left out,
    ties to the lower index."""
    if order not in COMPARE_ORDERS:
        raise ValueError(f"unknown order {order!r}; choose one of {list(COMPARE_ORDERS)}")
    metric = f"AP@{column}" if order == "gap-ap" else "H-AP"
    for frame in (per_query_a, per_query_b):
        if metric not in frame:
            raise ValueError(f"per_query has no column {metric!r}")
    a = per_query_a[metric].to_numpy(dtype=np.float64)
    b = per_query_b[metric].to_numpy(dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"the two models rank different queries ({a.shape[0]} and {b.shape[0]})")
    key = {"gap": -np.abs(a - b), "gap-ap": -np.abs(a - b), "first": b - a, "second": a - b}[order]
    idx = np.nonzero(np.isfinite(a) & np.isfinite(b))[0]
    idx = idx[np.argsort(key[idx], kind="stable")]
    out = per_query_a.index.to_numpy()[idx].astype(int).tolist()
    return out if n is None else out[:n]


class ComparisonState:
    """The same queries under several models (e.g. HAPPIER and SupAP on the same test images).

    ``states``: ``{model name: RankingState}`` over the same items (same labels). One query, one
    label column and one k are shown for every model; the query list orders the queries by how
    differently the first two models rank them (:func:`rank_model_gaps`).
    """

    def __init__(self, states: dict, list_size: int = 20, order: str = "gap"):
        if len(states) < 2:
            raise ValueError(f"a comparison needs at least two models, got {list(states)}")
        self.states = dict(states)
        first = next(iter(self.states.values()))
        for name, s in self.states.items():
            if not torch.equal(s.labels, first.labels):
                raise ValueError(f"model {name!r} ranks other items than {next(iter(self.states))!r}: "
                                 f"compare embeddings of the same images")
        if order not in COMPARE_ORDERS:
            raise ValueError(f"unknown order {order!r}; choose one of {list(COMPARE_ORDERS)}")
        self.order = order
        self.list_size = int(list_size)
        self.listed: list[int] = []
        self._refresh_list()
        self.show_query(self.listed[0] if self.listed else first.query)

    @property
    def names(self) -> list[str]:
        return list(self.states)

    @property
    def first(self) -> RankingState:
        return next(iter(self.states.values()))

    @property
    def query(self) -> int:
        return self.first.query

    @property
    def column(self) -> int:
        return self.first.column

    @property
    def top_k(self) -> int:
        return self.first.top_k

    def __len__(self) -> int:
        return len(self.first)

    def show_query(self, query: int) -> None:
        for s in self.states.values():
            s.show_query(query)

    def set_column(self, column: int) -> None:
        for s in self.states.values():
            s.set_column(column)
        self._refresh_list()

    def set_top_k(self, k: int) -> None:
        for s in self.states.values():
            s.set_top_k(k)

    def set_order(self, order: str) -> None:
        if order not in COMPARE_ORDERS:
            raise ValueError(f"unknown order {order!r}; choose one of {list(COMPARE_ORDERS)}")
        self.order = order
        self._refresh_list()

    def step(self, delta: int) -> None:
        """As :meth:`RankingState.step`, over the comparison's query list."""
        self.show_query(_step_target(self.query, self.listed, len(self), delta))

    def _refresh_list(self) -> None:
        a, b = list(self.states.values())[:2]
        self.listed = rank_model_gaps(a.per_query, b.per_query, self.column, self.order, self.list_size)

    def gaps(self, queries: Sequence[int] | None = None) -> pd.DataFrame:
        """Per query, each model's H-AP and AP at the current column, and the first two models' gap."""
        queries = self.listed if queries is None else [int(q) for q in queries]
        rows = []
        for q in queries:
            row = {"query": q}
            for name, s in self.states.items():
                row[f"H-AP {name}"] = float(s.per_query.at[q, "H-AP"])
                row[f"AP@{s.level_names[self.column]} {name}"] = float(s.per_query.at[q, f"AP@{self.column}"])
            a, b = self.names[:2]
            row["H-AP gap"] = row[f"H-AP {a}"] - row[f"H-AP {b}"]
            rows.append(row)
        return pd.DataFrame(rows).set_index("query")

    def snapshot(self) -> dict:
        return {"query": self.query, "column": self.column, "top_k": self.top_k, "listed": list(self.listed),
                "models": {name: s.snapshot() for name, s in self.states.items()}}
