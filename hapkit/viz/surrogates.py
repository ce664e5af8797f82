"""Figures and small experiments for the chapter on rank surrogates (notebook 02).

- :func:`step_figure` / :func:`step_explorer`: the Heaviside step, its sigmoid relaxation
  (Smooth-AP) and SupRank's piecewise upper step, with sliders for tau / delta / rho.
- :func:`ap_along_score` / :func:`ap_along_score_figure`: AP as a function of one similarity, a
  staircase with zero derivative almost everywhere, next to its smooth surrogates.
- :func:`surrogate_vs_exact` / :func:`bound_summary` / :func:`bounds_figure`: per-query surrogate
  against the exact metric on random and on clustered ("trained-like") batches; the SupRank-based
  surrogates of H-AP, AP and NDCG (HAPPIER, SupAP, SupNDCG) never exceed the exact value. SupRank's
  recall@k surrogate (SupRecall) is compared both with the exact recall@k and with the
  sigmoid recall of the exact ranks, the one it bounds (:data:`DOCUMENTED_BOUNDS`).
- :func:`decomposability_experiment` / :func:`decomposability_figure`: batch AP against dataset AP
  when embeddings are optimised with SupAP alone or with ROADMAP (SupAP + calibration).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
import torch.nn.functional as F
from plotly.subplots import make_subplots
from tqdm.auto import tqdm

from hapkit import metrics
from hapkit.hierarchy import relevance, shared_levels
from hapkit.losses.happier import HAPLoss
from hapkit.losses.listwise_ap import ListwiseAP
from hapkit.losses.rank import DEFAULT_STEP, heaviside_step, sigmoid_step, upper_step
from hapkit.losses.roadmap import ROADMAP, SupAP
from hapkit.losses.smoothap import SmoothAP
from hapkit.losses.suprank import SupNDCG, SupRecall

__all__ = [
    "STEP_DEFAULTS",
    "step_curves",
    "step_figure",
    "step_explorer",
    "ap_along_score",
    "ap_along_score_figure",
    "random_batch",
    "clustered_batch",
    "SURROGATE_LOSSES",
    "DEFAULT_SURROGATES",
    "DOCUMENTED_BOUNDS",
    "recall_at_ks",
    "surrogate_vs_exact",
    "bound_summary",
    "bound_checks",
    "bounds_figure",
    "decomposability_experiment",
    "decomposability_figure",
]

# SupRank / HAPPIER SOP configuration of the upper step (docs/definitions.md, 'Step functions'), as hapkit.losses.rank.UpperStep holds it
STEP_DEFAULTS = {name: getattr(DEFAULT_STEP, name) for name in ("tau", "delta", "rho", "start", "offset")}


# --------------------------------------------------------------------------------------------
# Step functions
# --------------------------------------------------------------------------------------------


def step_curves(
    tau: float = DEFAULT_STEP.tau,
    delta: float = DEFAULT_STEP.delta,
    rho: float = DEFAULT_STEP.rho,
    start: float = DEFAULT_STEP.start,
    offset: float = DEFAULT_STEP.offset,
    d_max: float = 0.15,
    num: int = 601,
) -> pd.DataFrame:
    """Heaviside, sigmoid_tau and upper step on d in [-d_max, d_max] (one row per d)."""
    d = torch.linspace(-d_max, d_max, num, dtype=torch.float64)
    return pd.DataFrame(
        {
            "d": d.numpy(),
            "heaviside": heaviside_step(d).numpy(),
            "sigmoid": sigmoid_step(d, tau).numpy(),
            "upper": upper_step(d, tau, rho, delta, start, offset).numpy(),
        }
    )


_STEP_TRACES = (
    ("heaviside", "exact step H(d)", "black", "solid"),
    ("sigmoid", "sigmoid (Smooth-AP)", "#1f77b4", "dash"),
    ("upper", "SupRank upper step", "#d62728", "solid"),
)


def _step_layout(fig: go.Figure, params: Mapping[str, float]) -> None:
    title = ", ".join(f"{k}={v:g}" for k, v in params.items())
    fig.update_layout(
        title=f"Steps of the rank: {title}",
        xaxis_title="d = s_j - s_k (j competes with k)",
        yaxis_title="contribution of j to rank(k)",
        yaxis_range=[-0.1, 3.0],
        template="plotly_white",
        legend={"x": 0.01, "y": 0.99},
        height=380,
    )


def step_figure(**params) -> go.Figure:
    """The three steps for the given ``tau, delta, rho, start, offset`` (defaults: STEP_DEFAULTS)."""
    params = {**STEP_DEFAULTS, **params}
    df = step_curves(**params)
    fig = go.Figure(
        [
            go.Scatter(x=df.d, y=df[col], name=name, line={"color": color, "dash": dash})
            for col, name, color, dash in _STEP_TRACES
        ]
    )
    _step_layout(fig, params)
    return fig


def step_explorer(**params):
    """Sliders for tau, delta and rho driving the step figure (an ipywidgets VBox).

    Uses a plotly ``FigureWidget`` when available (plotly >= 6 needs ``anywidget``), otherwise
    re-draws the figure in an ``Output`` widget. The slider callbacks are plain functions, so
    setting ``slider.value`` from Python updates the figure too.
    """
    import ipywidgets as widgets

    params = {**STEP_DEFAULTS, **params}
    sliders = {
        "tau": widgets.FloatLogSlider(value=params["tau"], base=10, min=-3, max=-1, step=0.05,
                                      description="tau", readout_format=".3f"),
        "delta": widgets.FloatSlider(value=params["delta"], min=0.0, max=0.12, step=0.005,
                                     description="delta", readout_format=".3f"),
        "rho": widgets.FloatLogSlider(value=params["rho"], base=10, min=0, max=3, step=0.05,
                                      description="rho", readout_format=".0f"),
    }

    def current() -> dict:
        return {**params, **{k: s.value for k, s in sliders.items()}}

    try:
        figure = go.FigureWidget(step_figure(**params))
    except ImportError:
        figure = None
    if figure is not None:

        def redraw(_change=None):
            p = current()
            df = step_curves(**p)
            with figure.batch_update():
                for trace, (col, *_rest) in zip(figure.data, _STEP_TRACES):
                    trace.y = df[col].to_numpy()
                _step_layout(figure, p)

        view = figure
    else:
        view = widgets.Output()

        def redraw(_change=None):
            view.clear_output(wait=True)
            with view:
                step_figure(**current()).show()

        redraw()
    for s in sliders.values():
        s.observe(redraw, names="value")
    box = widgets.VBox([widgets.HBox(list(sliders.values())), view])
    box.sliders, box.figure = sliders, view
    return box


# --------------------------------------------------------------------------------------------
# AP along one similarity
# --------------------------------------------------------------------------------------------

# a query's ranked list: similarities and whether each item is a positive
_FIXED_SIMS = (0.75, 0.5, 0.3, 0.1, -0.1, -0.3, -0.5)
_FIXED_POS = (0, 1, 0, 1, 0, 0, 1)


def ap_along_score(values: Sequence[float] | None = None, num: int = 115) -> pd.DataFrame:
    """Exact AP, Smooth-AP and SupAP of one query while one positive's similarity ``t`` moves.

    The query ranks seven fixed items (similarities 0.75 ... -0.5, three positives) and one more
    positive whose similarity is ``t``; the query itself is left out. Returns a long table with
    the value and the derivative d/dt of each (the exact AP is piecewise constant: its derivative
    is 0 wherever it exists).
    """
    ts = np.linspace(-0.95, 0.95, num) if values is None else np.asarray(values, dtype=float)
    query = torch.tensor([[1.0, 0.0]])
    fixed = torch.tensor(_FIXED_SIMS, dtype=torch.float32)
    fixed_ref = torch.stack([fixed, (1 - fixed**2).sqrt()], dim=1)
    ref_labels = torch.tensor([*_FIXED_POS, 1])
    surrogates = {"Smooth-AP": SmoothAP(), "SupAP": SupAP()}
    rows = []
    for t in ts:
        tt = torch.tensor(float(t), requires_grad=True)
        moving = torch.stack([tt, (1 - tt**2).sqrt()])[None]
        ref = torch.cat([fixed_ref, moving])
        scores = torch.cat([fixed, tt.detach()[None]])[None]
        exact = metrics.average_precision(scores, (ref_labels == 1)[None]).item()
        rows.append({"t": t, "method": "exact AP", "value": exact, "derivative": 0.0})
        for name, loss in surrogates.items():
            value = 1.0 - loss(query, torch.tensor([1]), ref_emb=ref, ref_labels=ref_labels)
            (grad,) = torch.autograd.grad(value, tt, retain_graph=True)
            rows.append({"t": t, "method": name, "value": value.item(), "derivative": grad.item()})
    return pd.DataFrame(rows)


def ap_along_score_figure(df: pd.DataFrame) -> go.Figure:
    """Value (top) and derivative (bottom) of AP and its surrogates against ``t``."""
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=("AP of the query", "derivative d/dt"))
    colors = {"exact AP": "black", "Smooth-AP": "#1f77b4", "SupAP": "#d62728"}
    for method, part in df.groupby("method", sort=False):
        style = {"color": colors.get(method), "shape": "hv" if method == "exact AP" else "linear"}
        fig.add_trace(go.Scatter(x=part.t, y=part.value, name=method, line=style,
                                 legendgroup=method), row=1, col=1)
        fig.add_trace(go.Scatter(x=part.t, y=part.derivative, name=method, line=style,
                                 legendgroup=method, showlegend=False), row=2, col=1)
    for s in _FIXED_SIMS:
        fig.add_vline(x=s, line={"color": "lightgrey", "dash": "dot"})
    fig.update_xaxes(title_text="similarity t of the moving positive", row=2, col=1)
    fig.update_layout(template="plotly_white", height=520)
    return fig


# --------------------------------------------------------------------------------------------
# Bounds: surrogate against exact metric on a batch
# --------------------------------------------------------------------------------------------


def _two_level_labels(batch_size: int, samples_per_class: int, coarse_classes: int) -> torch.Tensor:
    if batch_size % samples_per_class:
        raise ValueError("batch_size must be a multiple of samples_per_class")
    n_fine = batch_size // samples_per_class
    if n_fine % coarse_classes:
        raise ValueError("the number of fine classes must be a multiple of coarse_classes")
    fine = torch.arange(batch_size) // samples_per_class
    return torch.stack([fine, fine // (n_fine // coarse_classes)], dim=1)


def random_batch(batch_size=64, dim=16, samples_per_class=4, coarse_classes=2, seed=0):
    """L2-normalised random embeddings and (B, 2) labels: an untrained network's batch."""
    g = torch.Generator().manual_seed(seed)
    labels = _two_level_labels(batch_size, samples_per_class, coarse_classes)
    return F.normalize(torch.randn(batch_size, dim, generator=g), dim=1), labels


def clustered_batch(batch_size=64, dim=16, samples_per_class=4, coarse_classes=2, spread=0.6,
                    seed=0):
    """A trained-like batch: samples around their fine-class centre, centres around their
    coarse-class centre (``spread`` scales the within-class noise)."""
    g = torch.Generator().manual_seed(seed)
    labels = _two_level_labels(batch_size, samples_per_class, coarse_classes)
    coarse = torch.randn(coarse_classes, dim, generator=g)
    fine = coarse[labels[::samples_per_class, 1]] + 0.8 * torch.randn(
        batch_size // samples_per_class, dim, generator=g
    )
    x = fine[labels[:, 0]] + spread * torch.randn(batch_size, dim, generator=g)
    return F.normalize(x, dim=1), labels


SURROGATE_LOSSES = ("HAPPIER", "SupAP", "SupNDCG", "SupRecall", "Smooth-AP", "ListwiseAP")
DEFAULT_SURROGATES = ("HAPPIER", "SupAP", "SupNDCG", "Smooth-AP", "ListwiseAP")

# metric names of the recall@k pairs
RECALL = "R@k"
SIGMOID_RECALL = "sigmoid R@k of the exact ranks"

# (loss, metric) pairs where the surrogate is documented never to exceed the metric (query by
# query): rank~ >= rank term by term, and each metric decreases with the ranks. SupRecall bounds the
# sigmoid recall of the exact ranks (the same outer sigmoid), not the exact recall@k itself.
DOCUMENTED_BOUNDS = (("HAPPIER", "H-AP"), ("SupAP", "AP"), ("SupNDCG", "NDCG"), ("SupRecall", SIGMOID_RECALL))


def recall_at_ks(scores: torch.Tensor, positives: torch.Tensor, ks=(1, 2, 4, 8, 16), temp: float | None = None):
    """(Q,) recall@k in SupRank's form, averaged over ``ks``: the positives within the first k
    divided by min(|P|, k). Ranks count ties as ahead (rank(j) = #{i : s_i >= s_j}), as the SupRank
    rank does. With ``temp``, the indicator rank(j) <= k is replaced by sigmoid((k - rank(j)) /
    temp), the outer relaxation of SupRecall applied to the exact ranks. Queries without a
    positive get 0."""
    scores = scores.to(torch.float64)
    rank = (scores[:, None, :] >= scores[:, :, None]).sum(-1).to(torch.float64)  # (Q, M): rank of item j
    n_pos = positives.sum(1).to(torch.float64)
    out = torch.zeros(scores.shape[0], dtype=torch.float64)
    for k in ks:
        hit = (rank <= k).to(torch.float64) if temp is None else sigmoid_step(k - rank, temp)
        out = out + torch.where(positives, hit, 0.0).sum(1) / n_pos.clamp(max=k).clamp(min=1)
    return out / len(ks)


def _hap_pairs(emb, labels, exact):
    hap, _ = HAPLoss().per_query(emb, labels)
    rel = relevance(exact["V"], labels.shape[1], "pop")
    return [("H-AP", hap, metrics.h_average_precision(exact["scores"], rel, exact["V"]))]


def _recall_pairs(emb, labels, exact):
    loss = SupRecall()
    sur = loss.per_query(emb, labels)[0]
    return [(RECALL, sur, recall_at_ks(exact["scores"], exact["positives"], loss.ks)),
            (SIGMOID_RECALL, sur, recall_at_ks(exact["scores"], exact["positives"], loss.ks, temp=loss.temp))]


# loss name -> (emb, labels, exact quantities) -> [(metric, surrogate per query, exact per query)]
_PAIRS: dict[str, Callable] = {
    "HAPPIER": _hap_pairs,
    "SupAP": lambda emb, labels, exact: [("AP", SupAP().per_query(emb, labels)[0], exact["AP"])],
    "SupNDCG": lambda emb, labels, exact: [("NDCG", SupNDCG().per_query(emb, labels)[0],
                                            metrics.ndcg(exact["scores"], exact["V"]))],
    "SupRecall": _recall_pairs,
    "Smooth-AP": lambda emb, labels, exact: [("AP", SmoothAP().per_query(emb, labels)[0], exact["AP"])],
    "ListwiseAP": lambda emb, labels, exact: [("AP", ListwiseAP.from_preset("suprank").per_query(emb, labels)[0],
                                               exact["AP"])],
}
assert set(_PAIRS) == set(SURROGATE_LOSSES)


def _pairs_for_batch(emb: torch.Tensor, labels: torch.Tensor, losses=DEFAULT_SURROGATES) -> list[tuple]:
    """(loss, metric, surrogate per query, exact per query), the query in its own ranking."""
    unknown = set(losses) - set(SURROGATE_LOSSES)
    if unknown:
        raise ValueError(f"unknown surrogate(s) {sorted(unknown)}; choose among {', '.join(SURROGATE_LOSSES)}")
    scores = emb @ emb.T
    V = shared_levels(labels, labels)
    positives = labels[:, None, 0] == labels[None, :, 0]
    exact = {"scores": scores, "V": V, "positives": positives, "AP": metrics.average_precision(scores, positives)}
    with torch.no_grad():
        return [(name, metric, torch.as_tensor(sur).numpy(), torch.as_tensor(ex).numpy())
                for name in losses for metric, sur, ex in _PAIRS[name](emb, labels, exact)]


def surrogate_vs_exact(num_batches: int = 4, batch_size: int = 64, dim: int = 16,
                       samples_per_class: int = 4, coarse_classes: int = 2, spread: float = 0.6,
                       seed: int = 0, progress: bool = False,
                       losses: Sequence[str] = DEFAULT_SURROGATES) -> pd.DataFrame:
    """Per-query surrogate and exact metric on random and clustered batches (long table).

    Columns: batch_kind, batch, loss, metric, query, surrogate, exact. Each surrogate of
    ``losses`` (names of :data:`SURROGATE_LOSSES`) is compared with the exact metric it relaxes, on
    the same batch and with the same ranking (the query is its own top-ranked positive, as in
    training); SupRecall with two (:data:`DOCUMENTED_BOUNDS`).
    """
    makers: dict[str, Callable] = {"random": random_batch, "clustered": clustered_batch}
    rows = []
    jobs = [(kind, b) for kind in makers for b in range(num_batches)]
    for kind, b in tqdm(jobs, desc="batches", disable=not progress):
        kwargs = dict(batch_size=batch_size, dim=dim, samples_per_class=samples_per_class,
                      coarse_classes=coarse_classes, seed=seed + b)
        if kind == "clustered":
            kwargs["spread"] = spread
        emb, labels = makers[kind](**kwargs)
        for loss, metric, sur, exact in _pairs_for_batch(emb, labels, losses):
            rows.append(pd.DataFrame({
                "batch_kind": kind, "batch": b, "loss": loss, "metric": metric,
                "query": np.arange(len(sur)), "surrogate": sur.astype(float), "exact": exact,
            }))
    return pd.concat(rows, ignore_index=True)


def bound_summary(df: pd.DataFrame, tol: float = 1e-6) -> pd.DataFrame:
    """Per batch kind and loss: mean surrogate and exact value, largest excess surrogate - exact,
    and the number of queries where the surrogate exceeds the exact metric (by more than tol)."""
    excess = df.surrogate - df.exact
    g = df.assign(excess=excess, above=excess > tol).groupby(["batch_kind", "loss", "metric"], sort=False)
    return g.agg(mean_surrogate=("surrogate", "mean"), mean_exact=("exact", "mean"),
                 max_excess=("excess", "max"), queries_above=("above", "sum"),
                 queries=("above", "size")).reset_index()


def bound_checks(summary: pd.DataFrame) -> pd.Series:
    """For each (loss, metric) of :data:`DOCUMENTED_BOUNDS` in a :func:`bound_summary` table:
    True when the surrogate exceeds the metric on no query."""
    pairs = [p for p in DOCUMENTED_BOUNDS if ((summary.loss == p[0]) & (summary.metric == p[1])).any()]
    return pd.Series({f"{loss} <= {metric}": bool(summary.loc[(summary.loss == loss) & (summary.metric == metric),
                                                              "queries_above"].sum() == 0)
                      for loss, metric in pairs}, name="bound holds", dtype=bool)


def bounds_figure(df: pd.DataFrame) -> go.Figure:
    """Scatter of surrogate against exact value per query, one panel per (loss, metric)."""
    pairs = list(dict.fromkeys(zip(df.loss, df.metric)))
    fig = make_subplots(rows=1, cols=len(pairs), subplot_titles=[f"{loss} ({metric})" for loss, metric in pairs])
    colors = {"random": "#7f7f7f", "clustered": "#2ca02c"}
    for i, (loss, metric) in enumerate(pairs, start=1):
        for kind, part in df[(df.loss == loss) & (df.metric == metric)].groupby("batch_kind", sort=False):
            fig.add_trace(go.Scatter(x=part.exact, y=part.surrogate, mode="markers", name=kind,
                                     marker={"size": 4, "color": colors.get(kind), "opacity": 0.6},
                                     legendgroup=kind, showlegend=i == 1), row=1, col=i)
        fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", showlegend=False,
                                 line={"color": "black", "dash": "dot"}), row=1, col=i)
        fig.update_xaxes(title_text="exact", range=[0, 1.02], row=1, col=i)
        fig.update_yaxes(range=[0, 1.02], row=1, col=i)
    fig.update_yaxes(title_text="surrogate", row=1, col=1)
    fig.update_layout(template="plotly_white", height=340, width=260 * len(pairs) + 80)
    return fig


# --------------------------------------------------------------------------------------------
# Decomposability gap
# --------------------------------------------------------------------------------------------


def _off_diagonal(m: torch.Tensor) -> torch.Tensor:
    B = m.shape[0]
    return m[~torch.eye(B, dtype=torch.bool, device=m.device)].view(B, B - 1)


def _mean_ap(emb: torch.Tensor, labels: torch.Tensor) -> float:
    """Exact mAP of a set, each item querying all the others."""
    scores = emb @ emb.T
    positives = labels[:, None] == labels[None, :]
    return metrics.average_precision(_off_diagonal(scores), _off_diagonal(positives)).mean().item()


def decomposability_experiment(
    losses: Mapping[str, Callable[[], torch.nn.Module]] | None = None,
    batchings: Sequence[str] = ("fixed", "random"),
    num_classes: int = 32,
    samples_per_class: int = 4,
    classes_per_batch: int = 8,
    dim: int = 8,
    epochs: int = 30,
    lr: float = 0.05,
    eval_every: int = 5,
    seed: int = 0,
    progress: bool = False,
) -> pd.DataFrame:
    """Optimise free embeddings (one learnable vector per item) and track batch vs dataset AP.

    Every batch holds ``classes_per_batch`` whole classes. With ``"fixed"`` batching the set is
    cut once into batches that never change, so a loss never compares items of different
    batches: the batch APs can all be high while the dataset AP is not (the decomposability gap
    at its worst). With ``"random"`` batching classes are redrawn at every step. Each epoch is
    num_classes / classes_per_batch steps; every ``eval_every`` epochs (and at the start and the
    end) the exact batch AP (mean over the fixed batches, or over 8 fixed random batches) and the
    dataset AP are recorded.

    ``losses`` maps a name to a constructor (default: SupAP alone and ROADMAP = SupAP +
    calibration, weights 1:1). Returns a long table: loss, batching, epoch, batch_ap, dataset_ap,
    gap (= batch_ap - dataset_ap).
    """
    losses = losses or {"SupAP": SupAP, "ROADMAP": ROADMAP}
    if num_classes % classes_per_batch:
        raise ValueError("num_classes must be a multiple of classes_per_batch")
    labels = torch.arange(num_classes).repeat_interleave(samples_per_class)
    members = torch.arange(len(labels)).view(num_classes, samples_per_class)
    steps_per_epoch = num_classes // classes_per_batch
    rows = []
    jobs = [(name, batching) for name in losses for batching in batchings]
    for name, batching in tqdm(jobs, desc="runs", disable=not progress):
        if batching not in ("fixed", "random"):
            raise ValueError(f"batching must be 'fixed' or 'random', got {batching!r}")
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(len(labels), dim, generator=g).requires_grad_(True)
        partition = torch.randperm(num_classes, generator=g).view(steps_per_epoch, classes_per_batch)
        if batching == "fixed":
            eval_classes = list(partition)
        else:
            eval_g = torch.Generator().manual_seed(seed + 1)
            eval_classes = [torch.randperm(num_classes, generator=eval_g)[:classes_per_batch]
                            for _ in range(8)]
        eval_batches = [members[c].flatten() for c in eval_classes]
        loss_fn = losses[name]()
        opt = torch.optim.Adam([x], lr=lr)
        for epoch in range(epochs + 1):
            if epoch:
                for step in range(steps_per_epoch):
                    classes = (partition[step] if batching == "fixed"
                               else torch.randperm(num_classes, generator=g)[:classes_per_batch])
                    idx = members[classes].flatten()
                    opt.zero_grad()
                    loss_fn(F.normalize(x[idx], dim=1), labels[idx]).backward()
                    opt.step()
            if epoch % eval_every and epoch != epochs:
                continue
            with torch.no_grad():
                e = F.normalize(x, dim=1)
                batch_ap = float(np.mean([_mean_ap(e[i], labels[i]) for i in eval_batches]))
                dataset_ap = _mean_ap(e, labels)
            rows.append({"loss": name, "batching": batching, "epoch": epoch, "batch_ap": batch_ap,
                         "dataset_ap": dataset_ap, "gap": batch_ap - dataset_ap})
    return pd.DataFrame(rows)


def decomposability_figure(df: pd.DataFrame) -> go.Figure:
    """Batch AP (dashed) and dataset AP (solid) over epochs, one panel per batching."""
    batchings = list(dict.fromkeys(df.batching))
    fig = make_subplots(rows=1, cols=len(batchings), shared_yaxes=True,
                        subplot_titles=[f"{b} batches" for b in batchings])
    palette = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd"]
    colors = {name: palette[i % len(palette)] for i, name in enumerate(dict.fromkeys(df.loss))}
    for col, batching in enumerate(batchings, start=1):
        for name, part in df[df.batching == batching].groupby("loss", sort=False):
            for what, dash in (("batch_ap", "dash"), ("dataset_ap", "solid")):
                label = f"{name}: {'batch' if what == 'batch_ap' else 'dataset'} AP"
                fig.add_trace(go.Scatter(x=part.epoch, y=part[what], name=label, legendgroup=label,
                                         showlegend=col == 1,
                                         line={"color": colors[name], "dash": dash}), row=1, col=col)
        fig.update_xaxes(title_text="epoch", row=1, col=col)
    fig.update_yaxes(title_text="exact mAP", range=[0, 1.02], row=1, col=1)
    fig.update_layout(template="plotly_white", height=380)
    return fig
