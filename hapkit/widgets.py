"""An interactive ranking explorer (ipywidgets 8): pick a query, see what the model retrieves.

:class:`RankingExplorer` shows a query image and its top-k retrieved images as thumbnails framed
by the number of levels V each shares with the query (grey = unrelated, darker = more shared; the
colours of :func:`hapkit.viz.level_colors`), with the query's per-query metrics: H-AP (HAPPIER,
Ramzi et al., ECCV 2022), NDCG, ASI and the binary AP at a level chosen with a toggle. The values
come from :func:`hapkit.evaluate.evaluate`'s ``per_query`` table, the same numbers as the dataset
summary. A list ranks the queries where H-AP and AP disagree most (or the lowest H-AP / AP): those
are the rankings whose mistakes are graded very differently by the two metrics.

Every callback is a plain method, so the explorer also works without a kernel: setting a
control's ``.value`` (or ``Button.click()``) updates :attr:`RankingExplorer.ranking`,
:attr:`~RankingExplorer.shared` and the displayed widgets. :meth:`RankingExplorer.figure` draws
the same view as a static plotly figure, which renders where widgets do not (exported notebooks).

>>> explorer = RankingExplorer(embeddings, labels, images, level_names=["variant", "shape", "family"])  # doctest: +SKIP
>>> explorer            # the widget, in a notebook                                                   # doctest: +SKIP
>>> explorer.figure(explorer.disagreements(3))                                                         # doctest: +SKIP
"""

from __future__ import annotations

import html
import io
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from hapkit.embedding_space import to_rgb_array
from hapkit.hierarchy import as_label_tensor, shared_levels
from hapkit.viz import level_colors, level_label

__all__ = ["RankingExplorer", "ORDERS", "rank_queries", "top_k_ranking", "agreement_figure"]

# How the query list can be ordered: key -> label shown in the dropdown
ORDERS: dict[str, str] = {
    "disagree": "|H-AP − AP| (largest first)",
    "hap-ap": "H-AP − AP: mild mistakes",
    "ap-hap": "AP − H-AP: severe mistakes",
    "low-hap": "lowest H-AP",
    "low-ap": "lowest AP",
}
_METRICS = ("H-AP", "ASI", "NDCG", "AP")
_QUERY_BORDER = "#1f3b73"


def rank_queries(per_query: pd.DataFrame, level: int = 0, order: str = "disagree", n: int | None = None) -> list[int]:
    """Query indices of ``per_query`` (:attr:`hapkit.evaluate.RetrievalResults.per_query`) sorted by
    ``order`` (see :data:`ORDERS`), with AP taken at label level ``level``; queries whose H-AP or
    AP is undefined (no positive) are left out. Ties keep the lower query index first."""
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; choose one of {list(ORDERS)}")
    ap_col = f"AP@{level}"
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


def agreement_figure(
    per_query: pd.DataFrame,
    level: int = 0,
    level_names: Sequence[str] | None = None,
    highlight: Sequence[int] = (),
    title: str | None = None,
):
    """Scatter of every query's H-AP against its binary AP at ``level`` (from
    :attr:`hapkit.evaluate.RetrievalResults.per_query`); ``highlight`` marks some queries.

    Points far above the diagonal rank the fine class badly but keep the mistakes close in the
    hierarchy; points below it find the fine class yet bring unrelated items forward.
    """
    import plotly.graph_objects as go

    ap_col = f"AP@{level}"
    for col in ("H-AP", ap_col):
        if col not in per_query:
            raise ValueError(f"per_query has no column {col!r}")
    name = level_names[level] if level_names is not None else f"level {level}"
    frame = per_query[["H-AP", ap_col]].dropna()
    fig = go.Figure()
    fig.add_trace(go.Scatter(
        x=frame[ap_col], y=frame["H-AP"], mode="markers", name="queries",
        marker=dict(size=4, opacity=0.5, color="#4c78a8"), text=[f"query {q}" for q in frame.index],
        hovertemplate="%{text}<br>AP %{x:.3f}<br>H-AP %{y:.3f}<extra></extra>",
    ))
    marked = [int(q) for q in highlight if int(q) in frame.index]
    if marked:
        fig.add_trace(go.Scatter(
            x=frame.loc[marked, ap_col], y=frame.loc[marked, "H-AP"], mode="markers+text", name="highlighted",
            text=[str(q) for q in marked], textposition="top center",
            marker=dict(size=10, color="#d62728", symbol="diamond"),
        ))
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="H-AP = AP", line=dict(dash="dot", color="#888")))
    fig.update_layout(
        title=title or f"per query: H-AP against AP at the {name} level",
        xaxis=dict(title=f"AP@{name}", range=[-0.02, 1.02]),
        yaxis=dict(title="H-AP", range=[-0.02, 1.02], scaleanchor="x"),
        width=560, height=520, plot_bgcolor="white",
    )
    return fig


def _to_rgb(color: str) -> tuple[int, int, int]:
    """(r, g, b) integers of a plotly colour string (``#rrggbb`` or ``rgb(r, g, b)``)."""
    from plotly.colors import convert_colors_to_same_type, unlabel_rgb

    (rgb,), _ = convert_colors_to_same_type([color], colortype="rgb")
    return tuple(int(round(float(x))) for x in unlabel_rgb(rgb))


class RankingExplorer:
    """Browse the rankings of a retrieval model, one query at a time.

    Args:
        embeddings: (N, D) embeddings (L2-normalised: similarity = dot product), ranked in the
            same-set protocol (every item is a query; its gallery is all the other items).
        labels: (N, L) tree labels, finest level first.
        images: thumbnails: a uint8 (N, H, W, 3) array, a sequence of images, a dataset with
            ``load_image(i)`` or a function ``i -> image`` (None: coloured tiles only).
        level_names: names of the label columns, finest first (default ``level 0``...).
        class_names: one list of class names per level, to caption thumbnails.
        top_k: number of retrieved items shown (default 10).
        level: label column of the binary AP shown first (default 0, the finest).
        query: first query shown (default: the one where H-AP and AP disagree most).
        results: a :class:`hapkit.evaluate.RetrievalResults` of these embeddings with H-AP, ASI,
            NDCG and AP in its ``per_query``; computed here when None.
        relevance: H-AP relevance when computing ``results`` (default ``pop``, as HAPPIER).
        list_size: number of queries in the query list (default 20).
        thumb_size: thumbnail width in pixels (default 72).
        progress: show a progress bar while evaluating.

    Attributes (the displayed state): ``query``, ``level``, ``top_k``, ``ranking`` (gallery
    indices of the top k), ``shared`` (their V), ``query_metrics`` (the query's row of
    ``per_query``); controls ``query_slider``, ``query_list``, ``order_dropdown``,
    ``level_toggle``, ``k_slider``, ``prev_button``, ``next_button``; views ``info``,
    ``gallery``, ``legend``; the whole layout ``widget``.
    """

    def __init__(
        self,
        embeddings,
        labels,
        images=None,
        level_names: Sequence[str] | None = None,
        class_names: Sequence[Sequence[str]] | None = None,
        top_k: int = 10,
        level: int = 0,
        query: int | None = None,
        results=None,
        relevance: str = "pop",
        list_size: int = 20,
        thumb_size: int = 72,
        progress: bool = False,
    ):
        import ipywidgets as w

        from hapkit.evaluate import evaluate

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
        if not 0 <= level < L:
            raise ValueError(f"level must be a label column 0..{L - 1}, got {level}")
        self._image_fn = self._image_source(images, N)
        self.thumb_size = int(thumb_size)
        self._png_cache: dict[int, bytes] = {}

        if results is None:
            results = evaluate(self.embeddings, self.labels, metrics=_METRICS, relevance=relevance, progress=progress)
        self.results = results
        self.per_query = self._check_per_query(results, N, L)
        self.colors = level_colors(L)
        self.level_labels = [level_label(v, L, self.level_names) for v in range(L + 1)]

        self.level = int(level)
        self.order = "disagree"
        self.list_size = int(list_size)
        self.top_k = max(1, min(int(top_k), N - 1))
        if query is None:
            first = rank_queries(self.per_query, self.level, self.order, 1)
            query = first[0] if first else 0
        if not 0 <= int(query) < N:
            raise ValueError(f"query must be an item index 0..{N - 1}, got {query}")
        self.query = int(query)
        self.ranking = np.zeros(0, dtype=np.int64)
        self.shared = np.zeros(0, dtype=np.int64)
        self.query_metrics: dict[str, float] = {}

        # ---- controls
        self.query_slider = w.IntSlider(
            value=self.query, min=0, max=N - 1, description="query", continuous_update=False,
            layout=w.Layout(width="420px"),
        )
        self.prev_button = w.Button(description="◀", tooltip="previous query", layout=w.Layout(width="40px"))
        self.next_button = w.Button(description="▶", tooltip="next query", layout=w.Layout(width="40px"))
        self.order_dropdown = w.Dropdown(
            options=[(label, key) for key, label in ORDERS.items()], value=self.order, description="list by",
            layout=w.Layout(width="330px"),
        )
        self.query_list = w.Select(options=[], rows=8, description="queries", layout=w.Layout(width="330px"))
        self.level_toggle = w.ToggleButtons(
            options=[(name, c) for c, name in enumerate(self.level_names)], value=self.level,
            description="AP level", style={"button_width": "auto"},
        )
        self.k_slider = w.IntSlider(
            value=self.top_k, min=1, max=min(50, N - 1), description="top k", continuous_update=False,
        )
        # ---- views
        self.info = w.HTML()
        self.legend = w.HTML(self._legend_html())
        self.gallery = w.HBox(layout=w.Layout(flex_flow="row wrap", align_items="flex-start"))
        left = w.VBox([w.HBox([self.query_slider, self.prev_button, self.next_button]), self.level_toggle, self.k_slider])
        right = w.VBox([self.order_dropdown, self.query_list])
        self.widget = w.VBox([w.HBox([left, right]), self.info, self.legend, self.gallery])

        self._syncing = False
        self.query_slider.observe(self._on_query_slider, names="value")
        self.query_list.observe(self._on_query_list, names="value")
        self.order_dropdown.observe(self._on_order, names="value")
        self.level_toggle.observe(self._on_level, names="value")
        self.k_slider.observe(self._on_k, names="value")
        self.prev_button.on_click(lambda _: self.step(-1))
        self.next_button.on_click(lambda _: self.step(1))
        self._refresh_list()
        self.update()

    # ------------------------------------------------------------------ construction helpers

    @classmethod
    def from_embedding_set(cls, items, **kwargs) -> "RankingExplorer":
        """An explorer of a :class:`hapkit.embedding_space.EmbeddingSet` (its images as thumbnails)."""
        kwargs.setdefault("images", items.images() if items.dataset is not None else None)
        kwargs.setdefault("level_names", items.level_names)
        kwargs.setdefault("class_names", items.class_names)
        return cls(items.embeddings, items.labels, **kwargs)

    @staticmethod
    def _image_source(images, n: int) -> Callable[[int], np.ndarray] | None:
        if images is None:
            return None
        if callable(images) and not hasattr(images, "__len__"):
            return lambda i: to_rgb_array(images(i))
        if hasattr(images, "load_image"):
            if len(images) != n:
                raise ValueError(f"the image dataset has {len(images)} items for {n} embeddings")
            return lambda i: to_rgb_array(images.load_image(i))
        if len(images) != n:
            raise ValueError(f"{len(images)} images for {n} embeddings; give one image per embedding")
        return lambda i: to_rgb_array(images[i])

    @staticmethod
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

    # ------------------------------------------------------------------------- callbacks

    def _on_query_slider(self, change) -> None:
        if not self._syncing:
            self.show_query(change["new"])

    def _on_query_list(self, change) -> None:
        if change["new"] is not None and not self._syncing:
            self.show_query(change["new"])

    def _on_order(self, change) -> None:
        self.order = change["new"]
        self._refresh_list()

    def _on_level(self, change) -> None:
        self.level = int(change["new"])
        self._refresh_list()
        self.update()

    def _on_k(self, change) -> None:
        self.top_k = int(change["new"])
        self.update()

    def step(self, delta: int) -> None:
        """Show the query ``delta`` places further in the query list (wrapping around); when the
        current query is not listed, the next / previous item index instead."""
        listed = [v for _, v in self.query_list.options]
        if self.query in listed:
            target = listed[(listed.index(self.query) + delta) % len(listed)]
        else:
            target = (self.query + delta) % len(self.labels)
        self.show_query(target)

    def show_query(self, query: int) -> None:
        """Display ``query`` (an item index) and keep every control in step with it."""
        query = int(query)
        if not 0 <= query < len(self.labels):
            raise ValueError(f"query must be an item index 0..{len(self.labels) - 1}, got {query}")
        self.query = query
        self._syncing = True
        try:
            self.query_slider.value = query  # its observer calls back here: a no-op
            listed = [v for _, v in self.query_list.options]
            self.query_list.value = query if query in listed else None
        finally:
            self._syncing = False
        self.update()

    def _refresh_list(self) -> None:
        queries = rank_queries(self.per_query, self.level, self.order, self.list_size)
        ap = f"AP@{self.level}"
        options = [
            (f"{q:>5}  H-AP {self.per_query.at[q, 'H-AP']:.2f}  {ap} {self.per_query.at[q, ap]:.2f}", q)
            for q in queries
        ]
        self._syncing = True
        try:
            self.query_list.options = options
            self.query_list.value = self.query if self.query in queries else None
        finally:
            self._syncing = False

    # ---------------------------------------------------------------------------- display

    def update(self) -> None:
        """Recompute the current query's ranking and redraw the views."""
        q = self.query
        self.ranking = top_k_ranking(self.embeddings, q, self.top_k)
        self.shared = shared_levels(self.labels[q : q + 1], self.labels[torch.as_tensor(self.ranking)])[0].long().numpy()
        row = self.per_query.loc[q]
        self.query_metrics = {k: float(v) for k, v in row.items()}
        self.info.value = self._info_html()
        self.gallery.children = self._tiles()

    def _class_name(self, item: int, level: int) -> str:
        label = int(self.labels[item, level])
        if self.class_names is not None:
            return str(self.class_names[level][label])
        return str(label)

    def _info_html(self) -> str:
        q, m, c = self.query, self.query_metrics, self.level
        names = " / ".join(
            f"{html.escape(self.level_names[lvl])} <b>{html.escape(self._class_name(q, lvl))}</b>"
            for lvl in range(self.num_levels)
        )
        cells = [("H-AP", m.get("H-AP")), ("NDCG", m.get("NDCG"))]
        if "ASI" in m:
            cells.append(("ASI", m["ASI"]))
        cells += [(f"AP@{self.level_names[lvl]}", m.get(f"AP@{lvl}")) for lvl in range(self.num_levels)]
        head = "".join(
            f"<th style='padding:2px 8px;{'background:#eef' if name == f'AP@{self.level_names[c]}' else ''}'>"
            f"{html.escape(name)}</th>"
            for name, _ in cells
        )
        body = "".join(f"<td style='padding:2px 8px;text-align:center'>{_fmt(v)}</td>" for _, v in cells)
        n_pos = int((self.shared >= self.num_levels - c).sum())
        return (
            f"<div><b>query {q}</b>: {names}</div>"
            f"<table style='border-collapse:collapse;margin:4px 0'><tr>{head}</tr><tr>{body}</tr></table>"
            f"<div style='color:#555'>binary AP at <b>{html.escape(self.level_names[c])}</b>: "
            f"{n_pos} of the top {len(self.ranking)} share the query's {html.escape(self.level_names[c])} (✓)</div>"
        )

    def _legend_html(self) -> str:
        items = "".join(
            f"<span style='display:inline-block;margin-right:12px'>"
            f"<span style='display:inline-block;width:12px;height:12px;background:{self.colors[v]};"
            f"border:1px solid #444;vertical-align:middle'></span> {html.escape(self.level_labels[v])}</span>"
            for v in range(self.num_levels, -1, -1)
        )
        return f"<div style='font-size:90%'>frame colour = shared levels with the query: {items}</div>"

    def thumbnail_png(self, item: int) -> bytes:
        """PNG bytes of item ``item``'s thumbnail, ``thumb_size`` wide (nearest-neighbour upscaling
        keeps small images crisp); cached."""
        if item not in self._png_cache:
            from PIL import Image

            img = Image.fromarray(self._image_fn(item))
            scale = self.thumb_size / max(img.size)
            size = (max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale)))
            resample = Image.NEAREST if scale >= 1 else Image.LANCZOS
            buf = io.BytesIO()
            img.resize(size, resample).save(buf, format="PNG")
            self._png_cache[item] = buf.getvalue()
        return self._png_cache[item]

    def _tile(self, item: int, caption: str, color: str, width: int = 4):
        import ipywidgets as w

        size = f"{self.thumb_size}px"
        if self._image_fn is not None:
            pic = w.Image(value=self.thumbnail_png(item), format="png", layout=w.Layout(width=size, height=size))
        else:
            pic = w.HTML(f"<div style='width:{size};height:{size};background:{color}'></div>")
        pic.layout.border = f"{width}px solid {color}"
        text = w.HTML(f"<div style='font-size:80%;line-height:1.2;width:{self.thumb_size + 8}px'>{caption}</div>")
        return w.VBox([pic, text], layout=w.Layout(margin="2px 4px", align_items="center"))

    def _tiles(self) -> list:
        L, c = self.num_levels, self.level
        q = self.query
        tiles = [self._tile(q, f"<b>query {q}</b><br>{html.escape(self._class_name(q, 0))}", _QUERY_BORDER, 5)]
        for rank, (item, v) in enumerate(zip(self.ranking.tolist(), self.shared.tolist()), start=1):
            mark = " ✓" if v >= L - c else ""
            caption = f"#{rank} · V={v}{mark}<br>{html.escape(self._class_name(item, 0))}"
            tiles.append(self._tile(item, caption, self.colors[v]))
        return tiles

    def state(self) -> dict:
        """The displayed state as plain values (query, level, top-k items, their V, metrics)."""
        return {
            "query": self.query,
            "level": self.level,
            "top_k": self.top_k,
            "ranking": self.ranking.tolist(),
            "shared": self.shared.tolist(),
            "metrics": dict(self.query_metrics),
            "listed": [v for _, v in self.query_list.options],
        }

    def disagreements(self, n: int = 3, level: int | None = None, one_per_class: bool = True) -> list[int]:
        """The ``n`` queries where H-AP and AP (at ``level``, default the explorer's) differ most.

        With ``one_per_class`` (default) only the first query of each fine class counts: images
        of one class tend to have near-identical rankings, and showing three of them says little
        more than showing one.
        """
        order = rank_queries(self.per_query, self.level if level is None else level, "disagree")
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

    def query_table(self, queries: Sequence[int], level: int | None = None) -> pd.DataFrame:
        """The per-query metrics of ``queries`` with their labels (one row per query)."""
        level = self.level if level is None else level
        rows = []
        for q in queries:
            row = {"query": int(q)}
            row.update({name: self._class_name(int(q), lvl) for lvl, name in enumerate(self.level_names)})
            m = self.per_query.loc[int(q)]
            row.update({k: float(m[k]) for k in ("H-AP", "NDCG", "ASI") if k in m})
            row[f"AP@{self.level_names[level]}"] = float(m[f"AP@{level}"])
            rows.append(row)
        return pd.DataFrame(rows).set_index("query")

    # ------------------------------------------------------------------------ static view

    def figure(self, queries: Sequence[int] | None = None, top_k: int | None = None, level: int | None = None, tile: int = 56):
        """A static plotly figure of several queries' rankings: one row per query, the query then
        its top-k items, each framed by its shared level V; the row title gives the query's
        H-AP, NDCG and AP at ``level``. Renders in exported notebooks, unlike widgets."""
        import plotly.express as px
        import plotly.graph_objects as go

        queries = self.disagreements(3) if queries is None else [int(q) for q in queries]
        if not queries:
            raise ValueError("no query to draw")
        k = self.top_k if top_k is None else max(1, min(int(top_k), len(self.labels) - 1))
        level = self.level if level is None else int(level)
        L = self.num_levels
        border, gap, head = 4, 6, 30
        cell = tile + 2 * border
        width = (k + 1) * (cell + gap) + gap + 12  # a wider gap after the query
        row_h = head + cell + 16
        canvas = np.full((len(queries) * row_h, width, 3), 255, dtype=np.uint8)
        annotations = []
        for r, q in enumerate(queries):
            ranking = top_k_ranking(self.embeddings, q, k)
            V = shared_levels(self.labels[q : q + 1], self.labels[torch.as_tensor(ranking)])[0].long().tolist()
            y0 = r * row_h + head
            m = self.per_query.loc[q]
            annotations.append(dict(
                x=gap, y=r * row_h + head / 2, xanchor="left", yanchor="middle", showarrow=False,
                text=(f"<b>query {q}</b> ({html.escape(self._class_name(q, 0))}): H-AP {_fmt(m['H-AP'])}, "
                      f"NDCG {_fmt(m['NDCG'])}, AP@{html.escape(self.level_names[level])} {_fmt(m[f'AP@{level}'])}"),
                font=dict(size=12),
            ))
            items = [(q, _QUERY_BORDER, "query")] + [
                (item, self.colors[v], f"#{i + 1} V={v}") for i, (item, v) in enumerate(zip(ranking.tolist(), V))
            ]
            for j, (item, color, caption) in enumerate(items):
                x0 = gap + j * (cell + gap) + (12 if j > 0 else 0)
                canvas[y0 : y0 + cell, x0 : x0 + cell] = _to_rgb(color)
                canvas[y0 + border : y0 + border + tile, x0 + border : x0 + border + tile] = self._tile_pixels(item, tile, color)
                annotations.append(dict(
                    x=x0 + cell / 2, y=y0 + cell + 8, showarrow=False, text=caption, font=dict(size=10),
                    xanchor="center", yanchor="middle",
                ))
        fig = px.imshow(canvas, binary_string=True)
        for v in range(L, -1, -1):  # legend entries for the frame colours
            fig.add_trace(go.Scatter(
                x=[None], y=[None], mode="markers", name=self.level_labels[v],
                marker=dict(symbol="square", size=12, color=self.colors[v], line=dict(width=1, color="#444")),
            ))
        fig.update_xaxes(visible=False)
        fig.update_yaxes(visible=False)
        fig.update_layout(
            annotations=annotations,
            width=max(width, 640),
            height=canvas.shape[0] + 110,
            margin=dict(l=0, r=0, t=40, b=60),
            plot_bgcolor="white",
            showlegend=True,
            legend=dict(title="frame: shared levels", orientation="h", x=0, y=0, yanchor="top"),
            title=f"top {k} retrieved items (AP at the {self.level_names[level]} level)",
        )
        return fig

    def ranks_figure(self, queries: Sequence[int] | None = None, length: int = 64, level: int | None = None):
        """The first ``length`` ranks of several queries as rows of squares coloured by V
        (:func:`hapkit.viz.ranking_figure`): longer than thumbnails can show, which is where H-AP
        and AP often part ways (e.g. after the last same-variant item). Row titles carry the
        query's metrics over its whole ranking, from ``per_query``."""
        from hapkit.viz import ranking_figure

        queries = self.disagreements(3) if queries is None else [int(q) for q in queries]
        if not queries:
            raise ValueError("no query to draw")
        level = self.level if level is None else int(level)
        length = max(1, min(int(length), len(self.labels) - 1))
        rows = {}
        for q in queries:
            ranking = top_k_ranking(self.embeddings, q, length)
            V = shared_levels(self.labels[q : q + 1], self.labels[torch.as_tensor(ranking)])[0].long().tolist()
            m = self.per_query.loc[q]
            name = f"query {q}: H-AP {_fmt(m['H-AP'])}, AP@{self.level_names[level]} {_fmt(m[f'AP@{level}'])}"
            rows[name] = V
        fig = ranking_figure(rows, num_levels=self.num_levels, level_names=self.level_names, show_metrics=(),
                             title=f"first {length} ranks (colour = shared levels with the query)")
        size = max(4, min(26, 900 // length))
        fig.update_traces(marker_size=size, marker_line_width=0.5 if size < 12 else 1)
        fig.update_xaxes(dtick=max(1, length // 16))
        fig.update_layout(height=140 + 50 * len(rows))
        return fig

    def _tile_pixels(self, item: int, tile: int, color: str) -> np.ndarray:
        if self._image_fn is None:
            return np.broadcast_to(np.array(_to_rgb(color), dtype=np.uint8), (tile, tile, 3))
        from PIL import Image

        img = Image.fromarray(self._image_fn(item)).resize((tile, tile), Image.NEAREST)
        return np.asarray(img.convert("RGB"), dtype=np.uint8)

    # ----------------------------------------------------------------------- notebook display

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def __repr__(self) -> str:
        return (
            f"RankingExplorer({len(self.labels)} items, {self.num_levels} levels, query {self.query}, "
            f"top {self.top_k}, AP at {self.level_names[self.level]})"
        )


def _fmt(v) -> str:
    return "–" if v is None or not np.isfinite(v) else f"{v:.3f}"
