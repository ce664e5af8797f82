"""An interactive ranking explorer (ipywidgets 8): pick a query, see what the model retrieves.

:class:`RankingExplorer` shows a query image and its top-k retrieved images as thumbnails framed
by the number of levels v each shares with the query (grey = unrelated, darker = more shared; the
colours of :func:`hapkit.viz.ranking.level_colors`), with the query's per-query metrics: H-AP
(HAPPIER, Ramzi et al., ECCV 2022), NDCG, ASI and the binary AP at a label column chosen with a
toggle. A list ranks the queries where H-AP and AP disagree most (or the lowest H-AP / AP): those
are the rankings whose mistakes are graded very differently by the two metrics.

The explorer is a thin view: what it shows lives in a :class:`~hapkit.viz.explorer_state.RankingState`
(``explorer.ranking_state``), and every control only calls one of its methods, then redraws.
Setting a control's ``.value`` (or ``Button.click()``) therefore works without a kernel.
:meth:`RankingExplorer.figure` draws the same view as a static plotly figure, which renders where
widgets do not (exported notebooks).

>>> explorer = RankingExplorer(embeddings, labels, images, level_names=["variant", "shape", "family"])  # doctest: +SKIP
>>> explorer            # the widget, in a notebook                                                   # doctest: +SKIP
>>> explorer.figure(explorer.disagreements(3))                                                         # doctest: +SKIP
"""

from __future__ import annotations

import html
import io
from typing import Callable, Sequence

import numpy as np

from hapkit.viz.explorer_state import ORDERS, RankingState
from hapkit.viz.images import blank_tile, embedding_images, framed, image_grid, to_rgb_array
from hapkit.viz.ranking import level_colors, level_label, ranking_figure

__all__ = ["RankingExplorer", "ComparisonExplorer", "rankings_figure"]

_QUERY_BORDER = "#1f3b73"


def _to_rgb(color: str) -> tuple[int, int, int]:
    """(r, g, b) integers of a plotly colour string (``#rrggbb`` or ``rgb(r, g, b)``)."""
    from plotly.colors import convert_colors_to_same_type, unlabel_rgb

    (rgb,), _ = convert_colors_to_same_type([color], colortype="rgb")
    return tuple(int(round(float(x))) for x in unlabel_rgb(rgb))


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


def _fmt(v) -> str:
    return "–" if v is None or not np.isfinite(v) else f"{v:.3f}"


class _Thumbnails:
    """The items' images as framed thumbnails (widgets) and tile pixels (static figures)."""

    def __init__(self, images, n: int, thumb_size: int):
        self.image_fn = _image_source(images, n)
        self.thumb_size = int(thumb_size)
        self._png_cache: dict[int, bytes] = {}

    def png(self, item: int) -> bytes:
        """PNG bytes of item ``item``'s thumbnail, ``thumb_size`` wide (nearest-neighbour upscaling
        keeps small images crisp); cached."""
        if item not in self._png_cache:
            from PIL import Image

            img = Image.fromarray(self.image_fn(item))
            scale = self.thumb_size / max(img.size)
            size = (max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale)))
            resample = Image.NEAREST if scale >= 1 else Image.LANCZOS
            buf = io.BytesIO()
            img.resize(size, resample).save(buf, format="PNG")
            self._png_cache[item] = buf.getvalue()
        return self._png_cache[item]

    def tile(self, item: int, caption: str, color: str, width: int = 4):
        import ipywidgets as w

        size = f"{self.thumb_size}px"
        if self.image_fn is not None:
            pic = w.Image(value=self.png(item), format="png", layout=w.Layout(width=size, height=size))
        else:
            pic = w.HTML(f"<div style='width:{size};height:{size};background:{color}'></div>")
        pic.layout.border = f"{width}px solid {color}"
        text = w.HTML(f"<div style='font-size:80%;line-height:1.2;width:{self.thumb_size + 8}px'>{caption}</div>")
        return w.VBox([pic, text], layout=w.Layout(margin="2px 4px", align_items="center"))

    def pixels(self, item: int, tile: int, color: str) -> np.ndarray:
        if self.image_fn is None:
            return blank_tile(tile, tile, _to_rgb(color))
        from PIL import Image

        img = Image.fromarray(self.image_fn(item)).resize((tile, tile), Image.NEAREST)
        return np.asarray(img.convert("RGB"), dtype=np.uint8)

    def ranking_tiles(self, state: RankingState, colors: list[str]) -> list:
        """The query's tile, then one per retrieved item, framed by its shared level v."""
        q = state.query
        tiles = [self.tile(q, f"<b>query {q}</b><br>{html.escape(state.class_name(q, 0))}", _QUERY_BORDER, 5)]
        for rank, (item, v) in enumerate(zip(state.ranking.tolist(), state.shared.tolist()), start=1):
            mark = " ✓" if state.is_positive(v) else ""
            caption = f"#{rank} · V={v}{mark}<br>{html.escape(state.class_name(item, 0))}"
            tiles.append(self.tile(item, caption, colors[v]))
        return tiles


def _legend(level_labels: list[str], colors: list[str]) -> str:
    items = "".join(
        f"<span style='display:inline-block;margin-right:12px'>"
        f"<span style='display:inline-block;width:12px;height:12px;background:{colors[v]};"
        f"border:1px solid #444;vertical-align:middle'></span> {html.escape(level_labels[v])}</span>"
        for v in range(len(level_labels) - 1, -1, -1)
    )
    return f"<div style='font-size:90%'>frame colour = shared levels with the query: {items}</div>"


def rankings_figure(rows, k: int, column: int, thumbs: _Thumbnails, tile: int = 56, title: str | None = None):
    """A static plotly figure of rankings: ``rows`` is a list of ``(state, query, label)``, each row
    the query then its top ``k`` items framed by their shared level v, under a title band with
    ``label`` and the query's H-AP, NDCG and AP at ``column``.

    Geometry: tiles of ``tile`` px inside a 4-px frame, 6 px apart, under a 30-px title band."""
    import plotly.express as px
    import plotly.graph_objects as go

    if not rows:
        raise ValueError("no query to draw")
    first = rows[0][0]
    colors = level_colors(first.num_levels)
    labels = [level_label(v, first.num_levels, first.level_names) for v in range(first.num_levels + 1)]
    border, gap, head, foot = 4, 6, 30, 16
    cell = tile + 2 * border
    bands, annotations = [], []
    for r, (s, q, label) in enumerate(rows):
        ranking, V = s.ranking_of(q, k)
        items = [(q, _QUERY_BORDER, "query")] + [
            (item, colors[v], f"#{i + 1} V={v}") for i, (item, v) in enumerate(zip(ranking.tolist(), V.tolist()))
        ]
        row = image_grid([framed(thumbs.pixels(i, tile, c), _to_rgb(c), border) for i, c, _ in items], len(items),
                         pad=gap)
        bands += [blank_tile(head - gap, row.shape[1]), row, blank_tile(foot - gap, row.shape[1])]
        y0 = r * (head + cell + foot) + head
        m = s.per_query.loc[q]
        annotations.append(dict(
            x=gap, y=y0 - head / 2, xanchor="left", yanchor="middle", showarrow=False,
            text=(f"<b>{label}</b> ({html.escape(s.class_name(q, 0))}): H-AP {_fmt(m['H-AP'])}, "
                  f"NDCG {_fmt(m['NDCG'])}, AP@{html.escape(s.level_names[column])} {_fmt(m[f'AP@{column}'])}"),
            font=dict(size=12),
        ))
        annotations += [
            dict(x=gap + j * (cell + gap) + cell / 2, y=y0 + cell + 8, showarrow=False, text=caption,
                 font=dict(size=10), xanchor="center", yanchor="middle")
            for j, (_, _, caption) in enumerate(items)
        ]
    width = max(b.shape[1] for b in bands)
    bands = [np.pad(b, ((0, 0), (0, width - b.shape[1]), (0, 0)), constant_values=255) for b in bands]
    canvas = np.concatenate(bands)
    fig = px.imshow(canvas, binary_string=True)
    for v in range(first.num_levels, -1, -1):  # legend entries for the frame colours
        fig.add_trace(go.Scatter(
            x=[None], y=[None], mode="markers", name=labels[v],
            marker=dict(symbol="square", size=12, color=colors[v], line=dict(width=1, color="#444")),
        ))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    fig.update_layout(
        annotations=annotations,
        width=max(canvas.shape[1], 640),
        height=canvas.shape[0] + 110,
        margin=dict(l=0, r=0, t=40, b=60),
        plot_bgcolor="white",
        showlegend=True,
        legend=dict(title="frame: shared levels", orientation="h", x=0, y=0, yanchor="top"),
        title=title or f"top {k} retrieved items (AP at the {first.level_names[column]} level)",
    )
    return fig


class _Controls:
    """The controls both explorers share (query slider, ◀ / ▶, query list, list order, level
    toggle, top-k slider), wired to a state object with ``show_query``, ``step``, ``set_order``,
    ``set_column`` and ``set_top_k``; subclasses build the widgets and define ``_redraw``."""

    def _connect(self, state) -> None:
        self._syncing = False
        self.query_slider.observe(lambda ch: self._act(state.show_query, ch["new"]), names="value")
        self.query_list.observe(lambda ch: ch["new"] is not None and self._act(state.show_query, ch["new"]), names="value")
        self.order_dropdown.observe(lambda ch: self._act(state.set_order, ch["new"]), names="value")
        self.column_toggle.observe(lambda ch: self._act(state.set_column, ch["new"]), names="value")
        self.k_slider.observe(lambda ch: self._act(state.set_top_k, ch["new"]), names="value")
        self.prev_button.on_click(lambda _: self._act(state.step, -1))
        self.next_button.on_click(lambda _: self._act(state.step, 1))

    def _act(self, change, value) -> None:
        """Apply one change to the state (unless a redraw is setting the controls), then redraw."""
        if self._syncing:
            return
        change(value)
        self._redraw()

    def _sync_controls(self, state, listed_options) -> None:
        """Set the controls from the state without their callbacks acting again."""
        self._syncing = True
        try:
            self.query_slider.value = state.query
            self.column_toggle.value = state.column
            self.k_slider.value = state.top_k
            self.query_list.options = listed_options
            self.query_list.value = state.query if state.query in state.listed else None
        finally:
            self._syncing = False


class RankingExplorer(_Controls):
    """Browse the rankings of a retrieval model, one query at a time.

    Args:
        embeddings, labels, level_names, class_names, top_k, column, query, results, relevance,
            list_size, progress: as :class:`~hapkit.viz.explorer_state.RankingState`.
        images: thumbnails: a uint8 (N, H, W, 3) array, a sequence of images, a dataset with
            ``load_image(i)`` or a function ``i -> image`` (None: coloured tiles only).
        thumb_size: thumbnail width in pixels (default 72).

    Controls: ``query_slider``, ``query_list``, ``order_dropdown``, ``column_toggle``,
    ``k_slider``, ``prev_button``, ``next_button``; views ``info``, ``gallery``, ``legend``; the
    whole layout ``widget``. The displayed state is ``ranking_state`` (its fields are also
    readable here: ``query``, ``column``, ``top_k``, ``ranking``, ``shared``, ``query_metrics``,
    ``per_query``).
    """

    def __init__(self, embeddings, labels, images=None, *, thumb_size: int = 72, **state_options):
        import ipywidgets as w

        self.ranking_state = state = RankingState(embeddings, labels, **state_options)
        N = len(state)
        self.thumbnails = _Thumbnails(images, N, thumb_size)
        self.colors = level_colors(state.num_levels)
        self.level_labels = [level_label(v, state.num_levels, state.level_names) for v in range(state.num_levels + 1)]

        # ---- controls
        self.query_slider = w.IntSlider(
            value=state.query, min=0, max=N - 1, description="query", continuous_update=False,
            layout=w.Layout(width="420px"),
        )
        self.prev_button = w.Button(description="◀", tooltip="previous query", layout=w.Layout(width="40px"))
        self.next_button = w.Button(description="▶", tooltip="next query", layout=w.Layout(width="40px"))
        self.order_dropdown = w.Dropdown(
            options=[(label, key) for key, label in ORDERS.items()], value=state.order, description="list by",
            layout=w.Layout(width="330px"),
        )
        self.query_list = w.Select(options=[], rows=8, description="queries", layout=w.Layout(width="330px"))
        self.column_toggle = w.ToggleButtons(
            options=[(name, c) for c, name in enumerate(state.level_names)], value=state.column,
            description="AP level", style={"button_width": "auto"},
        )
        self.k_slider = w.IntSlider(
            value=state.top_k, min=1, max=min(50, N - 1), description="top k", continuous_update=False,
        )
        # ---- views
        self.info = w.HTML()
        self.legend = w.HTML(_legend(self.level_labels, self.colors))
        self.gallery = w.HBox(layout=w.Layout(flex_flow="row wrap", align_items="flex-start"))
        left = w.VBox([w.HBox([self.query_slider, self.prev_button, self.next_button]), self.column_toggle, self.k_slider])
        right = w.VBox([self.order_dropdown, self.query_list])
        self.widget = w.VBox([w.HBox([left, right]), self.info, self.legend, self.gallery])

        self._connect(state)
        self._redraw()

    @classmethod
    def from_embedding_set(cls, items, **kwargs) -> "RankingExplorer":
        """An explorer of a :class:`hapkit.data.EmbeddingSet` (its images as thumbnails)."""
        kwargs.setdefault("images", embedding_images(items) if items.dataset is not None else None)
        kwargs.setdefault("level_names", items.level_names)
        kwargs.setdefault("class_names", items.class_names)
        return cls(items.embeddings, items.labels, **kwargs)

    # ------------------------------------------------------------ the state, read through

    def __getattr__(self, name):
        # query, column, top_k, ranking, shared, query_metrics, per_query, level_names, ...
        if name != "ranking_state" and "ranking_state" in self.__dict__:
            return getattr(self.ranking_state, name)
        raise AttributeError(name)

    def state(self) -> dict:
        """The displayed state as plain values (:meth:`RankingState.snapshot`)."""
        return self.ranking_state.snapshot()

    def show_query(self, query: int) -> None:
        """Display ``query`` (an item index) and keep every control in step with it."""
        self._act(self.ranking_state.show_query, query)

    # ---------------------------------------------------------------------------- drawing

    def _redraw(self) -> None:
        s = self.ranking_state
        self._sync_controls(s, [
            (f"{q:>5}  H-AP {s.per_query.at[q, 'H-AP']:.2f}  AP@{s.column} {s.per_query.at[q, f'AP@{s.column}']:.2f}", q)
            for q in s.listed
        ])
        self.info.value = self._info_html()
        self.gallery.children = self._tiles()

    def _info_html(self) -> str:
        s = self.ranking_state
        q, m, c = s.query, s.query_metrics, s.column
        names = " / ".join(
            f"{html.escape(s.level_names[col])} <b>{html.escape(s.class_name(q, col))}</b>"
            for col in range(s.num_levels)
        )
        cells = [("H-AP", m.get("H-AP")), ("NDCG", m.get("NDCG"))]
        if "ASI" in m:
            cells.append(("ASI", m["ASI"]))
        cells += [(f"AP@{s.level_names[col]}", m.get(f"AP@{col}")) for col in range(s.num_levels)]
        head = "".join(
            f"<th style='padding:2px 8px;{'background:#eef' if name == f'AP@{s.level_names[c]}' else ''}'>"
            f"{html.escape(name)}</th>"
            for name, _ in cells
        )
        body = "".join(f"<td style='padding:2px 8px;text-align:center'>{_fmt(v)}</td>" for _, v in cells)
        n_pos = sum(s.is_positive(v) for v in s.shared)
        return (
            f"<div><b>query {q}</b>: {names}</div>"
            f"<table style='border-collapse:collapse;margin:4px 0'><tr>{head}</tr><tr>{body}</tr></table>"
            f"<div style='color:#555'>binary AP at <b>{html.escape(s.level_names[c])}</b>: "
            f"{n_pos} of the top {len(s.ranking)} share the query's {html.escape(s.level_names[c])} (✓)</div>"
        )

    def thumbnail_png(self, item: int) -> bytes:
        """PNG bytes of item ``item``'s thumbnail (see :class:`_Thumbnails`)."""
        return self.thumbnails.png(item)

    def _tiles(self) -> list:
        return self.thumbnails.ranking_tiles(self.ranking_state, self.colors)

    # ------------------------------------------------------------------------ static views

    def figure(self, queries: Sequence[int] | None = None, top_k: int | None = None, column: int | None = None, tile: int = 56):
        """A static plotly figure of several queries' rankings (:func:`rankings_figure`): one row
        per query. Renders in exported notebooks, unlike widgets."""
        s = self.ranking_state
        queries = s.disagreements(3) if queries is None else [int(q) for q in queries]
        k = s.top_k if top_k is None else max(1, min(int(top_k), len(s) - 1))
        column = s.column if column is None else int(column)
        return rankings_figure([(s, q, f"query {q}") for q in queries], k, column, self.thumbnails, tile)

    def ranks_figure(self, queries: Sequence[int] | None = None, length: int = 64, column: int | None = None):
        """The first ``length`` ranks of several queries as rows of squares coloured by v
        (:func:`hapkit.viz.ranking.ranking_figure`): longer than thumbnails can show, which is where
        H-AP and AP often part ways (e.g. after the last same-variant item). Row titles carry the
        query's metrics over its whole ranking, from ``per_query``."""
        s = self.ranking_state
        queries = s.disagreements(3) if queries is None else [int(q) for q in queries]
        if not queries:
            raise ValueError("no query to draw")
        column = s.column if column is None else int(column)
        length = max(1, min(int(length), len(s) - 1))
        rows = {}
        for q in queries:
            _, V = s.ranking_of(q, length)
            m = s.per_query.loc[q]
            rows[f"query {q}: H-AP {_fmt(m['H-AP'])}, AP@{s.level_names[column]} {_fmt(m[f'AP@{column}'])}"] = V.tolist()
        fig = ranking_figure(rows, num_levels=s.num_levels, level_names=s.level_names, show_metrics=(),
                             title=f"first {length} ranks (colour = shared levels with the query)")
        size = max(4, min(26, 900 // length))
        fig.update_traces(marker_size=size, marker_line_width=0.5 if size < 12 else 1)
        fig.update_xaxes(dtick=max(1, length // 16))
        fig.update_layout(height=140 + 50 * len(rows))
        return fig

    # ----------------------------------------------------------------------- notebook display

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def __repr__(self) -> str:
        s = self.ranking_state
        return (
            f"RankingExplorer({len(s)} items, {s.num_levels} levels, query {s.query}, "
            f"top {s.top_k}, AP at {s.level_names[s.column]})"
        )


class ComparisonExplorer(_Controls):
    """The same query under several models side by side (e.g. HAPPIER and SupAP from the grid).

    Args:
        models: ``{name: EmbeddingSet}`` (:class:`hapkit.data.EmbeddingSet` of the same images) or
            ``{name: RankingState}``.
        images: thumbnails (default: the first embedding set's images).
        results: optional ``{name: RetrievalResults}`` of those embeddings (computed otherwise).
        top_k, column, list_size, thumb_size: as :class:`RankingExplorer`.

    The query list orders the queries by how differently the first two models rank them
    (:data:`~hapkit.viz.explorer_state.COMPARE_ORDERS`); every control acts on all the models.
    The displayed state is ``comparison`` (a :class:`~hapkit.viz.explorer_state.ComparisonState`).
    """

    def __init__(self, models: dict, images=None, *, results: dict | None = None, top_k: int = 8, column: int = 0,
                 list_size: int = 20, thumb_size: int = 56):
        import ipywidgets as w

        from hapkit.viz.explorer_state import COMPARE_ORDERS, ComparisonState

        states, first_set = {}, None
        for name, m in models.items():
            if isinstance(m, RankingState):
                states[name] = m
                continue
            first_set = first_set or m
            states[name] = RankingState(m.embeddings, m.labels, level_names=m.level_names, class_names=m.class_names,
                                        top_k=top_k, column=column, results=(results or {}).get(name))
        self.comparison = cmp = ComparisonState(states, list_size=list_size)
        if images is None and first_set is not None and first_set.dataset is not None:
            images = embedding_images(first_set)
        self.thumbnails = _Thumbnails(images, len(cmp), thumb_size)
        L = cmp.first.num_levels
        self.colors = level_colors(L)
        self.level_labels = [level_label(v, L, cmp.first.level_names) for v in range(L + 1)]

        self.query_slider = w.IntSlider(value=cmp.query, min=0, max=len(cmp) - 1, description="query",
                                        continuous_update=False, layout=w.Layout(width="420px"))
        self.prev_button = w.Button(description="◀", tooltip="previous query", layout=w.Layout(width="40px"))
        self.next_button = w.Button(description="▶", tooltip="next query", layout=w.Layout(width="40px"))
        self.order_dropdown = w.Dropdown(options=[(label, key) for key, label in COMPARE_ORDERS.items()],
                                         value=cmp.order, description="list by", layout=w.Layout(width="420px"))
        self.query_list = w.Select(options=[], rows=8, description="queries", layout=w.Layout(width="420px"))
        self.column_toggle = w.ToggleButtons(options=[(n, c) for c, n in enumerate(cmp.first.level_names)],
                                             value=cmp.column, description="AP level", style={"button_width": "auto"})
        self.k_slider = w.IntSlider(value=cmp.top_k, min=1, max=min(50, len(cmp) - 1), description="top k",
                                    continuous_update=False)
        self.headers = {name: w.HTML() for name in cmp.names}
        self.galleries = {name: w.HBox(layout=w.Layout(flex_flow="row wrap", align_items="flex-start"))
                          for name in cmp.names}
        left = w.VBox([w.HBox([self.query_slider, self.prev_button, self.next_button]), self.column_toggle,
                       self.k_slider])
        right = w.VBox([self.order_dropdown, self.query_list])
        rows = [w.VBox([self.headers[n], self.galleries[n]]) for n in cmp.names]
        self.widget = w.VBox([w.HBox([left, right]), w.HTML(_legend(self.level_labels, self.colors)), *rows])

        self._connect(cmp)
        self._redraw()

    def state(self) -> dict:
        return self.comparison.snapshot()

    def _redraw(self) -> None:
        cmp = self.comparison
        gaps = cmp.gaps(cmp.listed) if cmp.listed else None
        self._sync_controls(cmp, [(f"{q:>5}  H-AP gap {gaps.at[q, 'H-AP gap']:+.2f}", q) for q in cmp.listed])
        for name, s in cmp.states.items():
            m = s.query_metrics
            self.headers[name].value = (
                f"<div><b>{html.escape(name)}</b>: H-AP {_fmt(m.get('H-AP'))}, NDCG {_fmt(m.get('NDCG'))}, "
                f"AP@{html.escape(s.level_names[s.column])} {_fmt(m.get(f'AP@{s.column}'))}</div>"
            )
            self.galleries[name].children = self.thumbnails.ranking_tiles(s, self.colors)

    def figure(self, queries: Sequence[int] | None = None, top_k: int | None = None, tile: int = 48):
        """A static figure: for each query, one row per model (:func:`rankings_figure`)."""
        cmp = self.comparison
        queries = cmp.listed[:2] if queries is None else [int(q) for q in queries]
        k = cmp.top_k if top_k is None else int(top_k)
        rows = [(s, q, f"{name}, query {q}") for q in queries for name, s in cmp.states.items()]
        return rankings_figure(rows, k, cmp.column, self.thumbnails, tile,
                               title=f"the same queries under {' and '.join(cmp.names)}")

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def __repr__(self) -> str:
        cmp = self.comparison
        return f"ComparisonExplorer({' vs '.join(cmp.names)}, {len(cmp)} items, query {cmp.query})"
