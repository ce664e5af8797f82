"""Embedding extraction and streaming, exact retrieval evaluation.

``evaluate(embeddings, labels)`` ranks every item against all the others (same-set protocol: the
query is left out of its own gallery) and computes every metric of :mod:`hapkit.metrics` at every
level, a chunk of queries at a time: memory is O(chunk_size * N), never N x N. Pass
``gallery_embeddings`` / ``gallery_labels`` for the query/gallery protocol (DyML) and
``distractor_embeddings`` for extra gallery items related to no query (V = 0).

Result names (``RetrievalResults.summary`` and the columns of ``.per_query``), c = label column
(0 = finest), v = shared level (1..L, L = same fine class):

- ``H-AP``: hierarchical AP over all levels (HAPPIER), relevance ``relevance`` / ``alpha``;
- ``ASI``: average set intersection over all levels;
- ``NDCG``: NDCG with gain 2**V - 1 over the whole ranking;
- ``AP@c``: binary AP at level c (positives: same label in column c);
- ``mAP@R@c``: mAP@R at level c;
- ``R@k@c``: recall rate at k at level c, for every k in ``ks``;
- ``P@1@c``: precision at 1 at level c;
- ``ASI@c``: binary ASI at level c (positives: same label in column c; HAPPIER's
  ``with_binary_asi``, reported on DyML); computed only when asked for (``metrics=[..., "ASI@"]``);
- ``AP#v``: AP of shared level v alone (items sharing more than v levels removed).

Reference semantics kept (docs/definitions.md, 'Graded relevance'): in the same-set protocol the relevance counts the query
itself at level L (``count_query=True``), as the HAPPIER evaluation does, so that published numbers
are comparable.
"""

from __future__ import annotations

import contextlib
import math
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from hapkit.errors import InputError
from hapkit.hierarchy import (
    LabelError,
    as_label_tensor,
    check_tree,
    level_relevance,
    relevance as relevance_fn,
)
from hapkit.inputs import check_finite
from hapkit.metrics import RankedRelevant, Workspace, neighbour_agreement, rank_by_labels, rank_relevant, top1_failures

__all__ = [
    "evaluate",
    "RetrievalResults",
    "RetrievalMetrics",
    "extract_embeddings",
    "METRIC_FAMILIES",
    "OPTIONAL_FAMILIES",
    "metric_names",
    "nearest_neighbours",
    "neighbourhood_metrics",
]

# The families computed by default (metrics=None), and those computed only when named.
METRIC_FAMILIES = ("H-AP", "ASI", "NDCG", "AP", "mAP@R", "R@k", "P@1", "AP#")
OPTIONAL_FAMILIES = ("ASI@",)
_TOPK_FAMILIES = frozenset({"R@k", "P@1"})

# Query x gallery pairs per chunk. Working memory is about 40 bytes per pair plus ~200 per
# (query, relevant item): ~350 MB on CPU for 20,000 items; few large operations are also what a
# busy CPU runs best. GPUs take bigger chunks.
_CPU_CHUNK_ELEMENTS = 2**23
_CUDA_CHUNK_ELEMENTS = 2**26
# On CUDA the chunk follows the free memory: bytes of one query's working set per gallery item,
# per (relevant item, level), per relevant item, and the share of the free memory a chunk may take
_PAIR_BYTES, _RELEVANT_LEVEL_BYTES, _RELEVANT_BYTES, _FREE_SHARE = 40, 48, 64, 0.5


def cuda_chunk_size(free_bytes: int, num_gallery: int, num_levels: int, max_relevant: int, num_queries: int) -> int:
    """Queries per chunk on a GPU with ``free_bytes`` free (``torch.cuda.mem_get_info``): a
    chunk's scores and sort order grow with the gallery, the ranked relevant items with each
    query's relevant count (``max_relevant``, all items under a shared root) times the levels."""
    per_query = (_PAIR_BYTES * num_gallery
                 + max_relevant * (_RELEVANT_BYTES + _RELEVANT_LEVEL_BYTES * num_levels))
    return int(min(max(1, num_queries), max(1, int(free_bytes * _FREE_SHARE) // max(1, per_query))))


def _faiss_index(faiss, dim: int, device: torch.device):
    """An inner-product index where the search runs: on the GPU when faiss was built with GPU
    support, None when the search belongs on the GPU but this faiss has none (torch then ranks)."""
    index = faiss.IndexFlatIP(dim)
    if device.type != "cuda":
        return index
    if not hasattr(faiss, "StandardGpuResources"):
        return None
    return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), device.index or 0, index)


@dataclass
class RetrievalResults:
    """Result of :func:`evaluate`.

    Attributes:
        summary: flat ``{name: mean over queries}`` (names in the module docstring); a query with
            no positive for a metric is left out of that metric's mean.
        per_query: one row per query (index: the query's position), same column names; NaN where
            the query was left out. Sort it to find failure cases.
        num_queries: number of queries evaluated.
        skipped: ``{name: number of queries left out}`` for the metrics that left some out.
        settings: the protocol and options used.
    """

    summary: dict[str, float]
    per_query: pd.DataFrame
    num_queries: int
    skipped: dict[str, int] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        """The summary as a one-row DataFrame (convenient to concatenate runs)."""
        return pd.DataFrame([self.summary])

    def __getitem__(self, name: str) -> float:
        return self.summary[name]

    def __repr__(self) -> str:
        width = max((len(k) for k in self.summary), default=0)
        lines = [f"RetrievalResults({self.num_queries} queries, {self.settings.get('protocol', '?')} protocol)"]
        lines += [f"  {k:<{width}}  {v * 100:7.3f}" for k, v in self.summary.items()]
        if self.skipped:
            lines.append("  queries left out (no positive): " + ", ".join(f"{k}: {n}" for k, n in self.skipped.items()))
        return "\n".join(lines)


def metric_names(num_levels: int, metrics=None, columns=None, ks: Sequence[int] = (1, 4, 16)) -> list[str]:
    """The summary names :func:`evaluate` produces for these options, in order."""
    fams = _resolve_metrics(metrics)
    cols = _resolve_columns(columns, num_levels)
    ks = _resolve_ks(ks)
    names = [f for f in ("H-AP", "ASI", "NDCG") if f in fams]
    for c in cols:
        if "AP" in fams:
            names.append(f"AP@{c}")
        if "mAP@R" in fams:
            names.append(f"mAP@R@{c}")
        if "P@1" in fams:
            names.append(f"P@1@{c}")
        if "R@k" in fams:
            names += [f"R@{k}@{c}" for k in ks]
        if "ASI@" in fams:
            names.append(f"ASI@{c}")
    if "AP#" in fams:
        names += [f"AP#{v}" for v in range(1, num_levels + 1)]
    return names


# ----------------------------------------------------------------------------------------------
# Argument checks


def _resolve_metrics(metrics) -> set[str]:
    if metrics is None:
        return set(METRIC_FAMILIES)
    if isinstance(metrics, str):
        metrics = [metrics]
    out = set()
    known = list(METRIC_FAMILIES + OPTIONAL_FAMILIES)
    for m in metrics:
        m = str(m)
        fam = "AP#" if m.startswith("AP#") else "R@k" if m.startswith("R@") else "ASI@" if m.startswith("ASI@") else m
        if fam not in known:
            raise InputError(f"unknown metric {m!r}; choose among {known}")
        out.add(fam)
    if not out:
        raise InputError(f"metrics is empty; choose among {known} (or None for {list(METRIC_FAMILIES)})")
    return out


def _resolve_columns(columns, num_levels: int) -> list[int]:
    if columns is None:
        return list(range(num_levels))
    if isinstance(columns, int):
        columns = [columns]
    out = []
    for c in columns:
        c = int(c)
        if not -num_levels <= c < num_levels:
            raise InputError(f"label column {c} does not exist: the labels have {num_levels} level(s), 0 (finest) .. {num_levels - 1}")
        out.append(c % num_levels)
    return sorted(set(out))


def _resolve_ks(ks) -> list[int]:
    if isinstance(ks, int):
        ks = [ks]
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise InputError(f"ks must be positive integers, got {ks}")
    return ks


def _as_embeddings(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(x) if not isinstance(x, torch.Tensor) else x
    if t.dim() != 2:
        raise InputError(f"{name} must be a 2-D (N, D) array, got shape {tuple(t.shape)}")
    if not t.dtype.is_floating_point:
        raise InputError(f"{name} must be floating point, got {t.dtype}")
    check_finite(t, name)
    # Metrics are not differentiable: like torchmetrics, take model outputs as they come, without
    # asking for torch.no_grad (the ranking writes into preallocated buffers, which autograd refuses).
    return t.detach()


def _counts_at_levels(q_labels: torch.Tensor, g_labels: torch.Tensor, exclude: torch.Tensor | None) -> torch.Tensor:
    """(Q, L) number of gallery items sharing each query's label in each column, the item each
    query leaves out of its ranking (``exclude``, -1: none) not counted."""
    out = []
    Q = q_labels.shape[0]
    for c in range(q_labels.shape[1]):
        q_col, g_col = q_labels[:, c], g_labels[:, c]
        size = int(max(q_col.max(), g_col.max())) + 1
        if size > Q + g_col.shape[0]:
            # Sparse ids (up to 2**63 - 1) would make a huge bincount: count their ranks instead.
            dense = torch.unique(torch.cat([q_col, g_col]), return_inverse=True)[1]
            q_col, g_col, size = dense[:Q], dense[Q:], Q + g_col.shape[0]
        per_class = torch.bincount(g_col, minlength=size)
        out.append(per_class[q_col])
    counts = torch.stack(out, 1)
    if exclude is not None:
        left_out = exclude >= 0
        shares = g_labels[exclude.clamp(min=0)] == q_labels
        counts -= (shares & left_out[:, None]).to(counts.dtype)
    return counts


# ----------------------------------------------------------------------------------------------
# Nearest neighbours (top-k metrics only)


def _faiss():
    try:
        import faiss  # noqa: F401
    except ImportError:
        return None
    return faiss


def _exact_topk_torch(scores: torch.Tensor, k: int, exclude: torch.Tensor | None) -> torch.Tensor:
    """(Q, k) gallery indices of the first k items (ties: lower index first), -1 padded."""
    Q, G = scores.shape
    masked = scores
    if exclude is not None:
        masked = scores.clone()
        rows = (exclude >= 0).nonzero().flatten()
        masked[rows, exclude[rows]] = -math.inf
    k_eff = min(k, G)  # a row's excluded item, if any, never gets a rank below
    out = torch.full((Q, k), -1, dtype=torch.int64, device=scores.device)
    if k_eff <= 0:
        return out
    tau = masked.topk(k_eff, dim=1).values[:, -1:]
    # Everything scoring at least the k-th value; the exact ranking among them settles ties.
    rr = rank_relevant(scores, scores >= tau, exclude=exclude, check=False)
    rows, cols = (rr.rank <= k_eff).nonzero(as_tuple=True)
    out[rows, rr.rank[rows, cols] - 1] = rr.item[rows, cols]
    return out


def _topk_faiss(faiss, index, queries: torch.Tensor, gallery: torch.Tensor, k: int, exclude: torch.Tensor | None) -> torch.Tensor:
    """Top-k with faiss (inner product); rows with a tie among the scores that decide the top k
    are recomputed exactly with torch so that ties still go to the lower index."""
    Q = queries.shape[0]
    G = index.ntotal
    extra = 1 if exclude is not None else 0
    k_search = min(k + extra + 1, G)
    D, I = index.search(np.ascontiguousarray(queries.float().cpu().numpy()), k_search)
    D = torch.from_numpy(D)
    I = torch.from_numpy(I)
    if exclude is not None:
        keep = I != exclude.cpu()[:, None]
        # Move the query itself (when found) to the end, keeping the order of the others.
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
        D, I = D.gather(1, order), I.gather(1, order)
        n_valid = keep.sum(1)
    else:
        n_valid = torch.full((Q,), k_search, dtype=torch.int64, device="cpu")
    k_eff = min(k, G - extra)
    cols = torch.arange(D.shape[1], device="cpu")
    valid = cols[None, :] < n_valid[:, None]
    # A tie between two of the first k_eff + 1 valid scores may be ordered arbitrarily by faiss.
    decide = valid & (cols[None, :] <= k_eff)
    tie = torch.zeros(Q, dtype=torch.bool, device="cpu")
    if D.shape[1] > 1:
        tie = ((D[:, 1:] == D[:, :-1]) & decide[:, 1:]).any(1)
    out = torch.full((Q, k), -1, dtype=torch.int64, device="cpu")
    n_take = min(k_eff, I.shape[1])
    out[:, :n_take] = I[:, :n_take]
    if bool(tie.any()):
        rows = tie.nonzero().flatten()
        sub = queries[rows.to(queries.device)] @ gallery.T
        ex = exclude[rows.to(exclude.device)] if exclude is not None else None
        out[rows] = _exact_topk_torch(sub, k, ex).cpu()
    return out


# ----------------------------------------------------------------------------------------------
# Per-chunk metrics


def _full_chunk_metrics(rr: RankedRelevant, fams, cols, ks, L, rel_kwargs) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    if "H-AP" in fams:
        # Relevance only depends on each query's counts per shared level (the query itself counted
        # at level L in the same-set protocol, as the reference evaluation does).
        kw = dict(rel_kwargs)
        counts = rr.shared_counts()
        if kw.pop("count_query"):
            counts[:, L] += 1
        out["H-AP"] = rr.h_average_precision_of_levels(level_relevance(counts, L, **kw))
    if "ASI" in fams:
        out["ASI"] = rr.asi()
    if "NDCG" in fams:
        out["NDCG"] = rr.ndcg()
    for c in cols:
        min_shared = L - c  # tree labels: same label in column c <=> at least L - c shared levels
        if "AP" in fams:
            out[f"AP@{c}"] = rr.average_precision(min_shared)
        if "mAP@R" in fams:
            out[f"mAP@R@{c}"] = rr.map_at_r(min_shared)
        if "P@1" in fams:
            out[f"P@1@{c}"] = rr.precision_at_k((1,), min_shared)[1]
        if "R@k" in fams:
            for k, r in rr.recall_at_k(ks, min_shared).items():
                out[f"R@{k}@{c}"] = r
        if "ASI@" in fams:
            out[f"ASI@{c}"] = rr.binary_asi(min_shared)
    if "AP#" in fams:
        for v in range(1, L + 1):
            out[f"AP#{v}"] = rr.ap_exclusive(v)
    return out


def _topk_chunk_metrics(neighbours, q_labels, g_labels_ext, has_pos, fams, cols, ks, L) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    neighbours = neighbours.to(g_labels_ext.device)  # faiss answers on the CPU
    valid = neighbours >= 0
    nb_labels = g_labels_ext[neighbours.clamp(min=0)]  # (Q, k, L); distractor rows are -1
    for c in cols:
        hit = (nb_labels[:, :, c] == q_labels[:, None, c]) & valid
        empty = has_pos[:, c] == 0
        nan = torch.full(hit.shape[:1], float("nan"), dtype=torch.float64, device=hit.device)
        if "P@1" in fams:
            out[f"P@1@{c}"] = torch.where(empty, nan, hit[:, 0].to(torch.float64))
        if "R@k" in fams:
            for k in ks:
                out[f"R@{k}@{c}"] = torch.where(empty, nan, hit[:, :k].any(1).to(torch.float64))
    return out


# ----------------------------------------------------------------------------------------------
# The evaluation


@dataclass
class _Inputs:
    """The checked arguments of :func:`evaluate`: queries, gallery (the queries themselves in the
    same-set protocol) and distractors, with their labels, and the gallery item each query leaves
    out of its ranking (``exclude``, -1: none; the query itself in the same-set protocol)."""

    queries: torch.Tensor
    query_labels: torch.Tensor
    gallery: torch.Tensor
    gallery_labels: torch.Tensor
    distractors: torch.Tensor | None
    same_set: bool
    exclude: torch.Tensor | None

    @property
    def num_levels(self) -> int:
        return int(self.query_labels.shape[1])

    @property
    def num_gallery(self) -> int:
        """Items of the gallery proper (without distractors)."""
        return int(self.gallery.shape[0])


def _check_gallery_exclude(gallery_exclude, num_queries: int, num_gallery: int, same_set: bool,
                           device: torch.device = torch.device("cpu")) -> torch.Tensor | None:
    """The validated (Q,) int64 own-copy indices, on ``device`` (the labels')."""
    if gallery_exclude is None:
        return torch.arange(num_queries, device=device) if same_set else None
    if same_set:
        raise InputError(
            "gallery_exclude needs a separate gallery (gallery_embeddings / gallery_labels): in the "
            "same-set protocol each query already leaves itself out"
        )
    ex = torch.as_tensor(gallery_exclude)
    if ex.dtype.is_floating_point or ex.dtype == torch.bool or ex.shape != (num_queries,):
        raise InputError(
            f"gallery_exclude must be ({num_queries},) integers, one gallery index per query (-1: none), "
            f"got {tuple(ex.shape)} {ex.dtype}"
        )
    ex = ex.to(torch.int64)
    if ex.numel() and bool(((ex < -1) | (ex >= num_gallery)).any()):
        raise InputError(f"gallery_exclude holds indices outside [-1, {num_gallery}) (the gallery has {num_gallery} items)")
    return ex.to(device)


def _check_inputs(embeddings, labels, gallery_embeddings, gallery_labels, distractor_embeddings, gallery_exclude=None) -> _Inputs:
    q_emb = _as_embeddings(embeddings, "embeddings")
    same_set = gallery_embeddings is None and gallery_labels is None
    # One tree check: of the labels, or of queries and gallery together (they must form one tree).
    q_lab = as_label_tensor(labels, "labels", check=same_set)
    if q_lab.shape[0] != q_emb.shape[0]:
        raise InputError(f"embeddings has {q_emb.shape[0]} rows but labels has {q_lab.shape[0]}; give one label row per embedding")
    if q_emb.shape[0] == 0:
        raise InputError("no query to evaluate (embeddings is empty)")
    if same_set:
        g_emb, g_lab = q_emb, q_lab
    else:
        if gallery_embeddings is None or gallery_labels is None:
            raise InputError("give both gallery_embeddings and gallery_labels (query/gallery protocol), or neither (same-set protocol)")
        g_emb = _as_embeddings(gallery_embeddings, "gallery_embeddings")
        g_lab = as_label_tensor(gallery_labels, "gallery_labels", check=False)
        if g_lab.shape[0] != g_emb.shape[0]:
            raise InputError(f"gallery_embeddings has {g_emb.shape[0]} rows but gallery_labels has {g_lab.shape[0]}")
        if g_lab.shape[1] != q_lab.shape[1]:
            raise LabelError(f"labels have {q_lab.shape[1]} level(s) but gallery_labels have {g_lab.shape[1]}")
        # Queries and gallery must form one tree, or "same label in column c" and V disagree.
        check_tree(torch.cat([q_lab, g_lab]), name="labels and gallery_labels together")
    if g_emb.shape[1] != q_emb.shape[1]:
        raise InputError(f"query embeddings have dimension {q_emb.shape[1]} but gallery embeddings {g_emb.shape[1]}")
    d_emb = None
    if distractor_embeddings is not None:
        d_emb = _as_embeddings(distractor_embeddings, "distractor_embeddings")
        if d_emb.shape[1] != q_emb.shape[1]:
            raise InputError(f"distractor_embeddings have dimension {d_emb.shape[1]}, embeddings {q_emb.shape[1]}")
    if g_emb.shape[0] - int(same_set) + (0 if d_emb is None else d_emb.shape[0]) <= 0:
        raise InputError("the gallery is empty: the same-set protocol needs at least two items")
    exclude = _check_gallery_exclude(gallery_exclude, q_emb.shape[0], g_emb.shape[0], same_set, q_lab.device)
    return _Inputs(q_emb, q_lab, g_emb, g_lab, d_emb, same_set, exclude)


@dataclass
class _Plan:
    """How :func:`evaluate` computes: which metrics, where, in chunks of how many queries, and
    whether the full ranking is needed (every metric but R@k / P@1) or only the top k."""

    families: set
    columns: list[int]
    ks: list[int]
    names: list[str]
    relevance: dict
    device: torch.device
    dtype: torch.dtype
    chunk_size: int
    topk_only: bool
    use_faiss: bool
    k_needed: int
    workers: int


@contextlib.contextmanager
def _one_thread_per_op():
    """torch's intra-op threads set to 1 for the duration (restored after): chunks then run side
    by side in worker threads instead. Most operations of a chunk (sorts, scatters, compactions)
    run on one core anyway, and independent single-threaded chunks do not stall when the machine
    is busy, where multi-threaded operations wait for their slowest (descheduled) thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _plan(inputs: _Inputs, metrics, columns, relevance, alpha, weights, ks, chunk_size, device, use_faiss) -> _Plan:
    L = inputs.num_levels
    fams = _resolve_metrics(metrics)
    cols = _resolve_columns(columns, L)
    ks = _resolve_ks(ks)
    rel_kwargs = dict(kind=relevance, alpha=alpha, weights=weights, count_query=inputs.same_set)
    if "H-AP" in fams:  # fail now on a bad relevance option, not after the first chunk
        relevance_fn(torch.zeros(1, 1, dtype=torch.uint8, device="cpu"), L, **{**rel_kwargs, "count_query": False})
    dev = torch.device(device) if device is not None else inputs.queries.device
    dtype = torch.promote_types(torch.promote_types(inputs.queries.dtype, inputs.gallery.dtype), torch.float32)
    topk_only = fams <= _TOPK_FAMILIES
    faiss = _faiss()
    if use_faiss and faiss is None:
        raise ImportError("use_faiss=True but faiss is not installed: pip install faiss-cpu (or faiss-gpu)")
    if use_faiss is None:
        use_faiss = faiss is not None and dev.type == "cpu"
    if use_faiss and dev.type == "cuda" and not hasattr(faiss, "StandardGpuResources"):
        use_faiss = False  # a CPU index would copy every chunk to the host: torch ranks on the GPU
    G = inputs.num_gallery + (0 if inputs.distractors is None else inputs.distractors.shape[0])
    # faiss parallelises its searches itself; other CPU work runs chunks side by side
    workers = 1 if dev.type != "cpu" or (use_faiss and topk_only) else max(1, torch.get_num_threads())
    if chunk_size is None and dev.type == "cuda":
        # the items a query ranks as relevant: those sharing its coarsest label
        relevant = 0 if topk_only else int(_counts_at_levels(inputs.query_labels[:, -1:], inputs.gallery_labels[:, -1:],
                                                             None).max())
        chunk_size = cuda_chunk_size(torch.cuda.mem_get_info(dev)[0], G, L, relevant, inputs.queries.shape[0])
    elif chunk_size is None:
        chunk_size = max(1, _CPU_CHUNK_ELEMENTS // workers // G)
    if int(chunk_size) < 1:
        raise InputError(f"chunk_size must be >= 1, got {chunk_size}")
    return _Plan(
        families=fams, columns=cols, ks=ks, names=metric_names(L, fams, cols, ks), relevance=rel_kwargs,
        device=dev, dtype=dtype, chunk_size=int(chunk_size), topk_only=topk_only,
        use_faiss=bool(use_faiss) and topk_only, k_needed=max(ks) if "R@k" in fams else 1,
        workers=min(workers, -(-inputs.queries.shape[0] // int(chunk_size))),
    )


def _chunk_starts(inputs: _Inputs, plan: _Plan) -> range:
    return range(0, inputs.queries.shape[0], plan.chunk_size)


def _run_chunks(inputs: _Inputs, plan: _Plan, progress: bool, starts=None) -> torch.Tensor:
    """(len(plan.names), Q) float64 per-query values, NaN where a query has no positive, for the
    chunks that begin at ``starts`` (default: every chunk; the other rows stay NaN)."""
    dev, dtype, L = plan.device, plan.dtype, inputs.num_levels
    gallery = inputs.gallery.to(dev, dtype)
    if inputs.distractors is not None:
        gallery = torch.cat([gallery, inputs.distractors.to(dev, dtype)])
    n_main = inputs.num_gallery
    G = gallery.shape[0]
    Q = inputs.queries.shape[0]
    # distractors (after the gallery proper) share nothing: labels -1
    g_lab_ext = torch.cat([inputs.gallery_labels,
                           torch.full((G - n_main, L), -1, dtype=torch.int64, device=inputs.gallery_labels.device)])
    g_lab_dev = g_lab_ext.to(dev)
    index = has_pos = None
    if plan.use_faiss:
        index = _faiss_index(_faiss(), gallery.shape[1], dev)
        index.add(np.ascontiguousarray(gallery.float().cpu().numpy()))
    if plan.topk_only:
        has_pos = _counts_at_levels(inputs.query_labels, inputs.gallery_labels, inputs.exclude)

    # Filled in place: small per-chunk tensors kept alive between the large temporary ones would
    # fragment the CPU heap and make the memory footprint grow chunk after chunk.
    values = torch.full((len(plan.names), Q), float("nan"), dtype=torch.float64, device="cpu")
    local = threading.local()  # one Workspace per thread

    def run_chunk(start: int) -> None:
        if not hasattr(local, "workspace"):
            local.workspace = Workspace()
        workspace = local.workspace
        stop = min(start + plan.chunk_size, Q)
        q = inputs.queries[start:stop].to(dev, dtype)
        q_lab = inputs.query_labels[start:stop]
        exclude = None if inputs.exclude is None else inputs.exclude[start:stop].to(dev)
        if plan.topk_only:
            if plan.use_faiss:
                nb = _topk_faiss(_faiss(), index, q, gallery, plan.k_needed, exclude)
            else:
                nb = _exact_topk_torch(q @ gallery.T, plan.k_needed, exclude).cpu()
            out = _topk_chunk_metrics(nb, q_lab, g_lab_ext, has_pos[start:stop], plan.families, plan.columns,
                                      plan.ks, L)
        else:
            scores = torch.mm(q, gallery.T, out=workspace.get("scores", (stop - start, G), dtype, dev))
            rr = rank_by_labels(scores, q_lab.to(dev), g_lab_dev, exclude=exclude, workspace=workspace)
            del scores
            out = _full_chunk_metrics(rr, plan.families, plan.columns, plan.ks, L, plan.relevance)
        for i, name in enumerate(plan.names):
            values[i, start:stop] = out[name].cpu()

    starts = _chunk_starts(inputs, plan) if starts is None else starts
    bar = tqdm(total=len(starts), desc="evaluate", unit="chunk", disable=not progress, leave=False)
    try:
        if plan.workers == 1:
            for start in starts:
                run_chunk(start)
                bar.update()
        else:
            with _one_thread_per_op(), ThreadPoolExecutor(plan.workers) as pool:
                for done in as_completed([pool.submit(run_chunk, start) for start in starts]):
                    done.result()
                    bar.update()
    finally:
        bar.close()
    return values


def _results(values: torch.Tensor, inputs: _Inputs, plan: _Plan, relevance, alpha, weights) -> RetrievalResults:
    names = plan.names
    Q = values.shape[1]
    per_query = pd.DataFrame({n: values[i].numpy() for i, n in enumerate(names)})
    per_query.index.name = "query"
    summary = {n: float(np.nanmean(per_query[n].to_numpy())) if per_query[n].notna().any() else float("nan") for n in names}
    missing = per_query.isna().sum()
    skipped = {n: int(missing[n]) for n in names if missing[n] > 0}
    if skipped:
        worst = max(skipped.values())
        warnings.warn(
            f"{worst} of {Q} queries have no positive for some metric and are left out of its mean "
            f"(per metric: {skipped}); see RetrievalResults.skipped and .per_query.",
            stacklevel=3,
        )
    n_distractors = 0 if inputs.distractors is None else int(inputs.distractors.shape[0])
    settings = dict(
        protocol="same-set" if inputs.same_set else "query/gallery",
        num_gallery=inputs.num_gallery - int(inputs.same_set) + n_distractors,
        num_distractors=n_distractors,
        gallery_exclude=0 if inputs.same_set or inputs.exclude is None else int((inputs.exclude >= 0).sum()),
        num_levels=inputs.num_levels,
        relevance=relevance,
        alpha=alpha,
        weights=None if weights is None else list(weights),
        ks=plan.ks,
        chunk_size=plan.chunk_size,
        device=str(plan.device),
        faiss=plan.use_faiss,
    )
    return RetrievalResults(summary=summary, per_query=per_query, num_queries=Q, skipped=skipped, settings=settings)


def evaluate(
    embeddings,
    labels,
    *,
    gallery_embeddings=None,
    gallery_labels=None,
    distractor_embeddings=None,
    gallery_exclude=None,
    metrics=None,
    columns=None,
    relevance: str = "pop",
    alpha: float = 1.0,
    weights: Sequence[float] | None = None,
    ks: Sequence[int] = (1, 4, 16),
    chunk_size: int | None = None,
    device=None,
    progress: bool = True,
    use_faiss: bool | None = None,
    distributed: bool = False,
    indices=None,
    gallery_indices=None,
) -> RetrievalResults:
    """Exact retrieval metrics of embeddings, streamed over chunks of queries.

    Args:
        embeddings: (N, D) query embeddings (cosine similarity = dot product: L2-normalise them).
        labels: (N, L) integer tree labels, finest level first (1-D: one level).
        gallery_embeddings, gallery_labels: a separate gallery (query/gallery protocol). Without
            them every item is ranked against all the others (same-set protocol).
        distractor_embeddings: (M, D) extra gallery items related to no query (V = 0).
        gallery_exclude: (Q,) integers, a gallery index each query leaves out of its ranking (-1:
            none), for galleries that contain the queries themselves (DyML's benchmarks: the
            query's own copy is dropped; the reference code drops each query's first neighbour,
            which is that copy unless an exact duplicate ties with it). The left-out item is not
            counted anywhere for that query (relevance counts, positives). Query/gallery protocol.
        metrics: families of :data:`METRIC_FAMILIES` (``"H-AP", "ASI", "NDCG", "AP", "mAP@R",
            "R@k", "P@1", "AP#"``) and :data:`OPTIONAL_FAMILIES` (``"ASI@"``, binary ASI per
            column); None = every family of :data:`METRIC_FAMILIES`.
        columns: label columns c of the binary metrics (0 = finest); None = all.
        relevance, alpha, weights: H-AP relevance (:func:`hapkit.hierarchy.relevance`), default
            ``pop`` with alpha 1 as in every official HAPPIER config; ``weights`` for ``map``.
        ks: the k of R@k (default 1, 4, 16).
        chunk_size: queries per chunk (default: about 8M query x gallery pairs on CPU, 64M on GPU).
        device: where to compute (default: the embeddings' device).
        progress: show a tqdm progress bar.
        use_faiss: nearest neighbours by faiss (inner product) when only top-k metrics (R@k, P@1)
            are asked; None = when faiss is installed and the computation runs on CPU. Other
            metrics need the full ranking and always use the exact torch path.
        distributed: every process of the initialised ``torch.distributed`` group calls
            ``evaluate`` with its own shard of the queries (and of the gallery and distractors;
            shards may differ in size, even be empty) and gets the full, identical results: the
            shards are gathered once, each process ranks every ``world_size``-th chunk of queries
            with the single-process code, and the per-query values are summed over processes.
            Rows come in the order of the concatenated shards (process 0's first), or in the
            order of ``indices``. Bit for bit the single-process result with the same
            ``chunk_size``. Off by default: a process that evaluates alone must not wait for the
            others. (The other arguments must be the same on every process.)
        indices, gallery_indices: with ``distributed``, the position of each row of this
            process's query (gallery) shard in the whole set, e.g. the indices a
            ``DistributedSampler(shuffle=False, drop_last=False)`` gave it: rows are put back in
            that order and the copies the sampler repeats to even out the shards are dropped.
            ``indices`` also orders the gallery of the same-set protocol. Together they must cover
            0..N-1.

    Returns:
        :class:`RetrievalResults`. Ties in scores are broken by gallery index (the lower first).
        Queries without any positive for a metric are left out of its mean and counted in
        ``.skipped`` (a warning says so).

    On a CPU, chunks run side by side in ``torch.get_num_threads()`` worker threads, each of
    them with single-threaded operations: torch's thread count is set to 1 for the duration of
    the call and restored afterwards (other threads of the program that use torch meanwhile run
    single-threaded too). Independent chunks do not stall on a busy machine, where
    multi-threaded operations wait for their slowest, descheduled thread.
    """
    rank, world = _world() if distributed else (0, 1)
    if distributed:
        embeddings, labels, gallery_embeddings, gallery_labels, distractor_embeddings, gallery_exclude = _gathered(
            embeddings, labels, gallery_embeddings, gallery_labels, distractor_embeddings, gallery_exclude,
            indices, gallery_indices,
        )
    elif indices is not None or gallery_indices is not None:
        raise InputError("indices / gallery_indices order the shards of distributed=True; without it, pass the rows in order")
    inputs = _check_inputs(embeddings, labels, gallery_embeddings, gallery_labels, distractor_embeddings, gallery_exclude)
    plan = _plan(inputs, metrics, columns, relevance, alpha, weights, ks, chunk_size, device, use_faiss)
    if world > 1 and chunk_size is None and plan.device.type == "cuda":
        # each GPU has its own free memory: one chunk size for all, or the chunks would not line up
        import dataclasses

        import torch.distributed as dist

        agreed = torch.tensor([plan.chunk_size], device=_comm_device())
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        plan = dataclasses.replace(plan, chunk_size=int(agreed))
    if world == 1:
        values = _run_chunks(inputs, plan, progress)
    else:
        mine = list(_chunk_starts(inputs, plan))[rank::world]
        values = _sum_over_processes(_run_chunks(inputs, plan, progress and rank == 0, starts=mine), mine, plan.chunk_size)
    results = _results(values, inputs, plan, relevance, alpha, weights)
    results.settings["processes"] = world
    return results


# ----------------------------------------------------------------------------------------------
# The streaming form (torchmetrics)


def _retrieval_metrics_class():
    import torchmetrics
    from torchmetrics.utilities import dim_zero_cat

    class RetrievalMetrics(torchmetrics.Metric):
        """The streaming form of :func:`evaluate`, a ``torchmetrics.Metric``: embeddings and labels
        are collected batch by batch, and :meth:`compute` ranks them all exactly and returns the
        summary of :func:`evaluate` (the same names and values); the whole
        :class:`RetrievalResults` of the last computation is kept in :attr:`results`.

        It lives here, not in :mod:`hapkit.metrics`, because it is built on :func:`evaluate`,
        which sits above the per-query metrics. torchmetrics is imported on first use of this
        class (it takes seconds), so ``import hapkit.evaluate`` stays quick.

        >>> metric = RetrievalMetrics(metrics=["H-AP", "AP", "R@k"])          # doctest: +SKIP
        >>> for images, labels in loader:                                     # doctest: +SKIP
        ...     metric.update(model(images), labels)
        >>> metric.compute()["H-AP"]                                          # doctest: +SKIP

        ``update(embeddings, labels)`` adds queries that are also the gallery (same-set protocol,
        each query ranked against all the others); ``update(embeddings, labels, gallery=True)``
        adds items to a separate gallery (query/gallery protocol, as soon as one is added). With
        several processes, torchmetrics gathers every process's states before :meth:`compute`, so
        every process evaluates all of them (for test sets too large to evaluate on each process,
        give each its shard and call ``evaluate(..., distributed=True)``).

        Args: the options of :func:`evaluate` (``metrics``, ``columns``, ``relevance``, ``alpha``,
        ``weights``, ``ks``, ``chunk_size``, ``device``, ``use_faiss``); ``progress`` is off by
        default. Further keyword arguments go to ``torchmetrics.Metric``.
        """

        is_differentiable = False
        higher_is_better = True
        full_state_update = False

        def __init__(self, metrics=None, columns=None, relevance: str = "pop", alpha: float = 1.0,
                     weights: Sequence[float] | None = None, ks: Sequence[int] = (1, 4, 16),
                     chunk_size: int | None = None, device=None, use_faiss: bool | None = None,
                     progress: bool = False, **kwargs):
            super().__init__(**kwargs)
            _resolve_metrics(metrics)  # fail now on a bad option, not at the end of an epoch
            _resolve_ks(ks)
            self.options = dict(metrics=metrics, columns=columns, relevance=relevance, alpha=alpha,
                                weights=weights, ks=ks, chunk_size=chunk_size, device=device,
                                use_faiss=use_faiss, progress=progress)
            self.results: RetrievalResults | None = None
            for name in ("embeddings", "labels", "gallery_embeddings", "gallery_labels"):
                self.add_state(name, default=[], dist_reduce_fx="cat")

        def update(self, embeddings: torch.Tensor, labels, gallery: bool = False) -> None:
            """Add a batch of (B, D) embeddings with their (B, L) labels (queries, or gallery items)."""
            emb = _as_embeddings(embeddings, "embeddings").detach()
            lab = as_label_tensor(labels, "labels", check=False).to(emb.device)
            if lab.shape[0] != emb.shape[0]:
                raise InputError(f"RetrievalMetrics.update: {emb.shape[0]} embeddings but {lab.shape[0]} label rows")
            prefix = "gallery_" if gallery else ""
            getattr(self, prefix + "embeddings").append(emb)
            getattr(self, prefix + "labels").append(lab)

        def compute(self) -> dict[str, float]:
            """:func:`evaluate` of everything added since the last reset: its ``summary``."""
            if not len(self.embeddings):
                raise InputError("RetrievalMetrics.compute: no query was added (call update first)")
            gallery = {}
            if len(self.gallery_embeddings):
                gallery = dict(gallery_embeddings=dim_zero_cat(self.gallery_embeddings),
                               gallery_labels=dim_zero_cat(self.gallery_labels))
            self.results = evaluate(dim_zero_cat(self.embeddings), dim_zero_cat(self.labels), **gallery, **self.options)
            return dict(self.results.summary)

    # found by pickle (and by a copy made for another process) as hapkit.evaluate.RetrievalMetrics
    RetrievalMetrics.__module__, RetrievalMetrics.__qualname__ = __name__, "RetrievalMetrics"
    return RetrievalMetrics


def __getattr__(name: str):
    if name == "RetrievalMetrics":  # built on first use: torchmetrics takes seconds to import
        cls = globals()[name] = _retrieval_metrics_class()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------------------------
# Several processes (distributed=True)


def _world() -> tuple[int, int]:
    """(rank, world size) of the initialised default process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "evaluate(distributed=True) needs an initialised torch.distributed process group: start "
            "the processes with torchrun and call torch.distributed.init_process_group (or "
            "hapkit.training.distributed.init_distributed) first"
        )
    return dist.get_rank(), dist.get_world_size()


def _comm_device() -> torch.device:
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _gather_rows(x: torch.Tensor | None) -> torch.Tensor | None:
    """Every process's (n_r, ...) rows concatenated in process order, on the CPU (n_r may differ)."""
    import torch.distributed as dist

    if x is None:
        return None
    world = dist.get_world_size()
    if world == 1:
        return x.cpu()
    device = _comm_device()
    n = torch.tensor([x.shape[0]], device=device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(size) for size in sizes]
    padded = torch.zeros((max(sizes), *x.shape[1:]), dtype=x.dtype, device=device)
    padded[: x.shape[0]] = x.to(device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)]).cpu()


def _shard_description(embeddings, labels, gallery_embeddings, gallery_labels, distractor_embeddings,
                       gallery_exclude, indices, gallery_indices) -> dict:
    """What every process's shard must agree on, and this shard's error (None if it is fine)."""
    try:
        q = _as_embeddings(embeddings, "embeddings")
        lab = as_label_tensor(labels, "labels", check=False)
        if lab.shape[0] != q.shape[0]:
            raise InputError(f"embeddings has {q.shape[0]} rows but labels has {lab.shape[0]}")
        described = {"dim": q.shape[1], "dtype": str(q.dtype), "levels": lab.shape[1]}
        for name, x, rows in (("gallery_embeddings", gallery_embeddings, None), ("gallery_labels", gallery_labels, None),
                              ("distractor_embeddings", distractor_embeddings, None),
                              ("gallery_exclude", gallery_exclude, q.shape[0]), ("indices", indices, q.shape[0]),
                              ("gallery_indices", gallery_indices, None)):
            described[name] = x is not None
            if x is not None and rows is not None and len(x) != rows:
                raise InputError(f"{name} has {len(x)} entries for this process's {rows} queries")
        if gallery_indices is not None and gallery_embeddings is not None and len(gallery_indices) != len(gallery_embeddings):
            raise InputError(f"gallery_indices has {len(gallery_indices)} entries for {len(gallery_embeddings)} gallery rows")
        return {**described, "error": None}
    except (ValueError, LabelError) as err:
        return {"error": str(err)}


def _in_order(indices: torch.Tensor, *rows):
    """``rows`` sorted by ``indices``, each index once (the first copy): the sampler's order."""
    idx = torch.as_tensor(indices).to(torch.int64).flatten()
    order = torch.argsort(idx, stable=True)
    idx = idx[order]
    first = torch.ones_like(idx, dtype=torch.bool)
    first[1:] = idx[1:] != idx[:-1]
    keep = order[first]
    if not torch.equal(idx[first], torch.arange(int(first.sum()))):
        raise InputError(
            "indices (gallery_indices) of all processes together must cover 0..N-1, each index at "
            "least once (the indices of a DistributedSampler over the whole set)"
        )
    return [None if x is None else x[keep] for x in rows]


def _gathered(embeddings, labels, gallery_embeddings, gallery_labels, distractor_embeddings, gallery_exclude,
              indices, gallery_indices):
    """The whole inputs of :func:`evaluate` from every process's shard, the same on every process."""
    import torch.distributed as dist

    mine = _shard_description(embeddings, labels, gallery_embeddings, gallery_labels, distractor_embeddings,
                              gallery_exclude, indices, gallery_indices)
    every = [None] * dist.get_world_size()
    if len(every) == 1:
        every = [mine]
    else:
        dist.all_gather_object(every, mine)
    errors = [f"process {r}: {d['error']}" for r, d in enumerate(every) if d["error"]]
    if errors:  # raised by every process alike: none is left waiting for the others
        raise InputError("evaluate(distributed=True): " + "; ".join(errors))
    if any({k: v for k, v in d.items() if k != "error"} != {k: v for k, v in every[0].items() if k != "error"} for d in every):
        raise InputError(
            "evaluate(distributed=True): the processes' shards disagree (embedding size, dtype, label "
            f"levels, or which of the optional arguments are given): {every}"
        )
    q_emb, q_lab = _gather_rows(torch.as_tensor(embeddings)), _gather_rows(as_label_tensor(labels, "labels", check=False))
    exclude = None if gallery_exclude is None else _gather_rows(torch.as_tensor(gallery_exclude).to(torch.int64))
    if indices is not None:
        q_emb, q_lab, exclude = _in_order(_gather_rows(torch.as_tensor(indices).to(torch.int64)), q_emb, q_lab, exclude)
    g_emb = g_lab = None
    if gallery_embeddings is not None or gallery_labels is not None:
        g_emb = _gather_rows(torch.as_tensor(gallery_embeddings))
        g_lab = _gather_rows(as_label_tensor(gallery_labels, "gallery_labels", check=False))
        if gallery_indices is not None:
            g_emb, g_lab = _in_order(_gather_rows(torch.as_tensor(gallery_indices).to(torch.int64)), g_emb, g_lab)
    d_emb = None if distractor_embeddings is None else _gather_rows(torch.as_tensor(distractor_embeddings))
    return q_emb, q_lab, g_emb, g_lab, d_emb, exclude


def _sum_over_processes(values: torch.Tensor, starts, chunk_size: int) -> torch.Tensor:
    """Every process computed the rows of its chunks: the whole table on every process."""
    import torch.distributed as dist

    mine = torch.zeros(values.shape[1], dtype=torch.bool)
    for start in starts:
        mine[start : start + chunk_size] = True
    # the others' rows count 0 here: x + 0 = x exactly, and a NaN (no positive) stays NaN
    shared = torch.where(mine, values, torch.zeros_like(values)).to(_comm_device())
    dist.all_reduce(shared, op=dist.ReduceOp.SUM)
    return shared.cpu()


# ----------------------------------------------------------------------------------------------
# Landmark retrieval: the revisited Oxford / Paris protocol and test-time processing
#
# Radenović et al. (CVPR 2018) label every database image, per query, as easy, hard, junk
# (unclear) or negative. Three protocols are read from the same ranking:
#
#   protocol  positives      ignored (removed from the ranking before scoring)
#   easy      easy           junk + hard
#   medium    easy + hard    junk
#   hard      hard           junk + easy
#
# AP is the reference's trapezoidal form (revisitop's compute_ap): for the j-th positive (0-based)
# at 0-based rank r of the list without ignored images, add ((j / r if r > 0 else 1) +
# (j + 1) / (r + 1)) / 2 / |P|: the mean of the precision just before and just after each
# positive. The standard (non-interpolated) AP adds (j + 1) / (r + 1) / |P| only; it is always at
# least as large (one positive at rank 2: 0.5 standard, 0.25 trapezoidal). naver's evaluation
# (Revaud et al., ICCV 2019, whose published numbers use it) scores with scikit-learn's standard
# AP: pass ap="standard" to compare with those numbers.
#
# mP@k: #positives in the top min(k, rank of the last positive) / that number (1-based ranks of
# the list without ignored images), so a query with 2 positives, both in the top 5, has P@5 = 1.

__all__ += [
    "evaluate_revisited", "REVISITED_PROTOCOLS", "revisited_ranking_metrics", "revisited_ranking_table",
    "alpha_query_expansion", "combine_scales", "multiscale_embeddings", "extract_multiscale_embeddings",
]

REVISITED_PROTOCOLS = ("easy", "medium", "hard")
_EASY, _HARD, _JUNK = 1, 2, 3
_STATUS = {"easy": _EASY, "hard": _HARD, "junk": _JUNK, "negative": 0}
# protocol -> (statuses counted as positives, statuses removed from the ranking)
_ROLES = {
    "easy": ((_EASY,), (_JUNK, _HARD)),
    "medium": ((_EASY, _HARD), (_JUNK,)),
    "hard": ((_HARD,), (_JUNK, _EASY)),
}
_AP_FORMS = ("trapezoid", "standard")

# Query x gallery pairs per chunk: about 16 bytes each (scores, then sort order and inverse
# permutation), i.e. ~130 MB on CPU whatever the gallery size; with R1M's million distractors a
# chunk holds 8 queries.
_REVISITED_CPU_PAIRS = 2**23
_REVISITED_CUDA_PAIRS = 2**26


def _revisited_protocols(protocols) -> list[str]:
    if isinstance(protocols, str):
        protocols = [protocols]
    protocols = list(protocols)
    bad = [p for p in protocols if p not in REVISITED_PROTOCOLS]
    if bad or not protocols:
        raise InputError(f"unknown protocol(s) {bad}; choose among {list(REVISITED_PROTOCOLS)}")
    return [p for p in REVISITED_PROTOCOLS if p in protocols]


def _gnd_statuses(gnd, num_gallery: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, R) gallery indices (-1 padded) and their status (easy / hard / junk) for each query of
    a revisited ground truth (a list of dicts with 'easy', 'hard' and 'junk' index lists), on
    ``device`` (default the CPU)."""
    if isinstance(gnd, Mapping) and "gnd" in gnd:
        gnd = gnd["gnd"]  # the whole gnd_<name>.pkl content was passed
    rows = []
    for q, entry in enumerate(gnd):
        if not isinstance(entry, Mapping) or "easy" not in entry or "hard" not in entry:
            found = sorted(entry) if isinstance(entry, Mapping) else type(entry).__name__
            raise InputError(
                f"gnd[{q}] must be a dict with 'easy', 'hard' and 'junk' gallery index lists (the revisited "
                f"gnd_<name>.pkl format), got {found}; the classic Oxford/Paris files ('ok' lists) are not "
                f"revisited ground truth"
            )
        seen: dict[int, str] = {}
        for name in ("easy", "hard", "junk"):
            idx = np.asarray(entry.get(name, []), dtype=np.float64).reshape(-1)
            if idx.size and (np.any(idx != np.round(idx)) or idx.min() < 0 or idx.max() >= num_gallery):
                bad = idx[(idx != np.round(idx)) | (idx < 0) | (idx >= num_gallery)][0]
                raise InputError(
                    f"gnd[{q}]['{name}'] holds {bad:g}, not an index of the {num_gallery} gallery images "
                    f"(0-based indices into imlist); is the gallery the dataset's imlist, in its order?"
                )
            for i in idx.astype(np.int64).tolist():
                if seen.setdefault(i, name) != name:
                    raise InputError(
                        f"gnd[{q}]: gallery image {i} is listed both as '{seen[i]}' and as '{name}'; each image "
                        f"has one status per query"
                    )
        rows.append(seen)
    if not rows:
        raise InputError("gnd is empty: no query to evaluate")
    width = max(1, max(len(r) for r in rows))
    # filled row by row on the host, then copied to the device in one transfer each
    items = np.full((len(rows), width), -1, dtype=np.int64)
    status = np.zeros((len(rows), width), dtype=np.int8)
    for q, seen in enumerate(rows):
        if seen:
            items[q, : len(seen)] = list(seen.keys())
            status[q, : len(seen)] = [_STATUS[s] for s in seen.values()]
    return torch.from_numpy(items).to(device), torch.from_numpy(status).to(device)


def _revisited_chunk_values(position, status, num_ranked, protocols, ks, ap) -> dict[str, torch.Tensor]:
    """Per-query AP and P@k of a chunk from the 0-based positions of each query's labelled images
    (``position`` (C, R), ``num_ranked`` for padding) and their status (C, R)."""
    position, order = position.sort(dim=1)
    status = status.gather(1, order)
    valid = position < num_ranked
    out: dict[str, torch.Tensor] = {}
    for p in protocols:
        pos_codes, ign_codes = _ROLES[p]
        positive = torch.isin(status, torch.tensor(pos_codes, dtype=status.dtype, device=status.device)) & valid
        ignored = torch.isin(status, torch.tensor(ign_codes, dtype=status.dtype, device=status.device)) & valid
        # the rank among the images that stay, and the number of positives ranked before
        r = (position - (ignored.cumsum(1) - ignored.long())).double()
        j = (positive.cumsum(1) - positive.long()).double()
        n_pos = positive.sum(1)
        after = (j + 1) / (r + 1)
        if ap == "trapezoid":
            before = torch.where(r > 0, j / r.clamp(min=1), torch.ones_like(r))
            terms = (before + after) / 2
        else:
            terms = after
        empty = n_pos == 0
        nan = torch.full(n_pos.shape, float("nan"), dtype=torch.float64, device=n_pos.device)
        out[f"AP@{p}"] = torch.where(empty, nan, (terms * positive).sum(1) / n_pos.clamp(min=1))
        rank1 = torch.where(positive, r + 1, torch.zeros_like(r))  # 1-based, 0 off the positives
        last = rank1.max(1).values
        for k in ks:
            cut = last.clamp(max=k)
            hits = (positive & (rank1 <= cut[:, None])).sum(1)
            out[f"P@{k}@{p}"] = torch.where(empty, nan, hits / cut.clamp(min=1))
    return out


def evaluate_revisited(
    query_embeddings,
    gallery_embeddings,
    gnd,
    ks: Sequence[int] = (1, 5, 10),
    distractor_embeddings=None,
    *,
    protocols: Sequence[str] = REVISITED_PROTOCOLS,
    ap: str = "trapezoid",
    chunk_size: int | None = None,
    device=None,
    progress: bool = True,
) -> RetrievalResults:
    """The revisited Oxford / Paris protocol (Radenović et al., CVPR 2018): mAP and mP@k under the
    Easy, Medium and Hard protocols, exact, streamed over chunks of queries.

    Args:
        query_embeddings: (Q, D) embeddings of the (cropped) query images.
        gallery_embeddings: (G, D) embeddings of the database images, in the order of the ground
            truth's ``imlist``.
        gnd: one dict per query with the 0-based gallery index lists ``easy``, ``hard`` and
            ``junk`` (the ``gnd`` list of the official ``gnd_<name>.pkl``; the whole file content
            is accepted too).
        ks: the k of mP@k (default 1, 5, 10 as revisitop).
        distractor_embeddings: (M, D) extra database images related to no query (R1M); they only
            extend the gallery, so memory stays bounded by the chunk size.
        protocols: a subset of ``("easy", "medium", "hard")``.
        ap: ``"trapezoid"`` (the reference's form, default) or ``"standard"`` (non-interpolated AP,
            the one of naver's evaluation; see the comment at the head of this section).
        chunk_size: queries per chunk (default: about 8M query x gallery pairs on CPU, 64M on GPU).
        device: where to compute (default: the embeddings' device).
        progress: show a tqdm progress bar.

    Returns:
        :class:`RetrievalResults` with ``summary`` ``mAP@{protocol}`` and ``mP@{k}@{protocol}``,
        ``per_query`` columns ``AP@{protocol}`` and ``P@{k}@{protocol}``, and ``skipped``: a query
        with no positive under a protocol (e.g. no hard image) is NaN in ``per_query`` and left
        out of that protocol's means, as in the reference. Ties in scores are broken by gallery
        index (the lower first; distractors come after the gallery).
    """
    protocols = _revisited_protocols(protocols)
    if ap not in _AP_FORMS:
        raise InputError(f"ap must be one of {_AP_FORMS}, got {ap!r}")
    ks = _resolve_ks(ks)
    queries = _as_embeddings(query_embeddings, "query_embeddings")
    gallery = _as_embeddings(gallery_embeddings, "gallery_embeddings")
    parts = [gallery]
    if distractor_embeddings is not None:
        parts.append(_as_embeddings(distractor_embeddings, "distractor_embeddings"))
    for name, t in zip(("gallery_embeddings", "distractor_embeddings"), parts):
        if t.shape[1] != queries.shape[1]:
            raise InputError(f"query embeddings have dimension {queries.shape[1]} but {name} {t.shape[1]}")
    dev = torch.device(device) if device is not None else queries.device
    items, status = _gnd_statuses(gnd, gallery.shape[0], dev)
    if items.shape[0] != queries.shape[0]:
        raise InputError(f"gnd describes {items.shape[0]} queries but query_embeddings has {queries.shape[0]} rows")

    dtype = torch.promote_types(torch.promote_types(queries.dtype, gallery.dtype), torch.float32)
    ranked = torch.cat([t.to(dev, dtype) for t in parts])
    num_ranked = ranked.shape[0]
    if chunk_size is None:
        budget = _REVISITED_CUDA_PAIRS if dev.type == "cuda" else _REVISITED_CPU_PAIRS
        chunk_size = max(1, budget // num_ranked)
    if int(chunk_size) < 1:
        raise InputError(f"chunk_size must be >= 1, got {chunk_size}")
    chunk_size = int(chunk_size)

    Q = queries.shape[0]
    names = [f"AP@{p}" for p in protocols] + [f"P@{k}@{p}" for p in protocols for k in ks]
    # filled on the device without a synchronisation per chunk, read back once at the end
    values = torch.full((len(names), Q), float("nan"), dtype=torch.float64, device=dev)
    for start in tqdm(range(0, Q, chunk_size), desc="evaluate", unit="chunk", disable=not progress, leave=False):
        stop = min(start + chunk_size, Q)
        scores = queries[start:stop].to(dev, dtype) @ ranked.T
        order = scores.argsort(dim=1, descending=True, stable=True)
        del scores
        # position[q, g] = rank of gallery image g for query q (the inverse permutation of order)
        position = torch.empty_like(order).scatter_(1, order, torch.arange(num_ranked, device=dev).expand_as(order))
        del order
        chunk_items = items[start:stop]
        labelled = position.gather(1, chunk_items.clamp(min=0))
        del position
        labelled = torch.where(chunk_items >= 0, labelled, torch.full_like(labelled, num_ranked))
        out = _revisited_chunk_values(labelled, status[start:stop], num_ranked, protocols, ks, ap)
        for i, name in enumerate(names):
            values[i, start:stop] = out[name]
    values = values.cpu()

    per_query = pd.DataFrame({n: values[i].numpy() for i, n in enumerate(names)})
    per_query.index.name = "query"
    summary, skipped = {}, {}
    for col in names:  # summary name = "m" + column: mAP@medium, mP@5@hard, ...
        kept = per_query[col].dropna()
        summary["m" + col] = float(kept.mean()) if len(kept) else float("nan")
        if len(kept) < Q:
            skipped["m" + col] = Q - len(kept)
    settings = dict(
        protocol="revisited", protocols=protocols, ap=ap, num_gallery=num_ranked,
        num_distractors=num_ranked - gallery.shape[0], ks=ks, chunk_size=chunk_size, device=str(dev),
    )
    return RetrievalResults(summary=summary, per_query=per_query, num_queries=Q, skipped=skipped, settings=settings)


def _ranking_problem(ranking: Sequence[str]):
    """One query whose gallery is ranked exactly as ``ranking`` (statuses, rank 1 first)."""
    bad = sorted({s for s in ranking if s not in _STATUS})
    if bad:
        raise InputError(f"unknown status(es) {bad} in the ranking; use {list(_STATUS)}")
    n = len(ranking)
    gallery = torch.arange(n, 0, -1, dtype=torch.float64)[:, None]  # decreasing scores
    gnd = [{s: [i for i, x in enumerate(ranking) if x == s] for s in ("easy", "hard", "junk")}]
    return torch.ones(1, 1, dtype=torch.float64), gallery, gnd


def revisited_ranking_metrics(ranking: Sequence[str], ks: Sequence[int] = (1, 5, 10), ap: str = "trapezoid") -> dict[str, float]:
    """AP and P@k under each protocol of one ranking written as statuses, rank 1 first:
    ``["easy", "junk", "negative", "hard", ...]`` (NaN where the protocol has no positive)."""
    q, g, gnd = _ranking_problem(ranking)
    res = evaluate_revisited(q, g, gnd, ks=ks, ap=ap, progress=False)
    return {k: float(v) for k, v in res.per_query.iloc[0].items()}


def revisited_ranking_table(ranking: Sequence[str], protocol: str = "medium") -> pd.DataFrame:
    """The revisited AP of one ranking (statuses, rank 1 first) under ``protocol``, rank by rank:
    each image's role, its rank once the ignored images are removed, the precision just before
    and just after it and its trapezoidal and standard AP terms (their sums are the two APs)."""
    (protocol,) = _revisited_protocols([protocol])
    q, g, gnd = _ranking_problem(ranking)
    pos_codes, ign_codes = _ROLES[protocol]
    n_pos = sum(_STATUS[s] in pos_codes for s in ranking)
    rows, kept, found = [], 0, 0
    for i, s in enumerate(ranking):
        role = "positive" if _STATUS[s] in pos_codes else "ignored" if _STATUS[s] in ign_codes else "negative"
        row = {"rank": i + 1, "status": s, "role": role, "rank without ignored": pd.NA,
               "precision before": np.nan, "precision after": np.nan, "trapezoid term": 0.0, "standard term": 0.0}
        if role != "ignored":
            row["rank without ignored"] = kept + 1
            if role == "positive":
                before = found / kept if kept else 1.0
                after = (found + 1) / (kept + 1)
                row.update({"precision before": before, "precision after": after,
                            "trapezoid term": (before + after) / 2 / n_pos, "standard term": after / n_pos})
                found += 1
            kept += 1
        rows.append(row)
    return pd.DataFrame(rows).set_index("rank")


def alpha_query_expansion(query_embeddings, gallery_embeddings, k: int, alpha: float, chunk_size: int | None = None,
                          device=None) -> torch.Tensor:
    """α-query expansion (Radenović et al., TPAMI 2018; naver's ``--aqe K ALPHA``): each query is
    replaced by ``q + Σ_j s_j^α d_j`` over its k most similar gallery images d_j (similarity s_j),
    L2-normalised. ``alpha = 0`` is average query expansion; ``k = 0`` returns the queries.

    Similarities below zero weigh 0 (naver raises them to an integer power, which keeps the sign
    for odd α; the k nearest neighbours of a query are in practice all positive). Pass the
    gallery with its distractors for R1M: memory stays bounded by chunks of queries. ``device``:
    where to compute, and where the expanded queries are returned (default: the queries' device).
    """
    queries = _as_embeddings(query_embeddings, "query_embeddings")
    if device is not None:
        queries = queries.to(device)
    gallery = _as_embeddings(gallery_embeddings, "gallery_embeddings").to(queries.device, queries.dtype)
    if k < 0 or alpha < 0:
        raise InputError(f"k and alpha must be non-negative, got k={k}, alpha={alpha}")
    if k == 0:
        return queries.clone()
    k = min(int(k), gallery.shape[0])
    budget = _REVISITED_CUDA_PAIRS if queries.device.type == "cuda" else _REVISITED_CPU_PAIRS
    step = int(chunk_size) if chunk_size is not None else max(1, budget // gallery.shape[0])
    out = torch.empty_like(queries)
    for start in range(0, queries.shape[0], step):
        q = queries[start:start + step]
        sims, idx = (q @ gallery.T).topk(k, dim=1)
        weights = sims.clamp(min=0).pow(alpha)
        out[start:start + step] = F.normalize(q + (weights[:, :, None] * gallery[idx]).sum(1), dim=1)
    return out


def combine_scales(embeddings: Sequence[torch.Tensor], power: float = 3.0) -> torch.Tensor:
    """One embedding from several scales: the signed power mean ``sign(m)|m|^(1/p)`` of
    ``m = mean_s sign(x_s)|x_s|^p`` (naver's ``--pooling gem --gemp 3``, p = 3), L2-normalised;
    p = 1 is the plain mean (what SupRank's multi-scale code computes). One scale: itself,
    normalised."""
    x = torch.stack([e.float() for e in embeddings])
    if x.shape[0] > 1:
        def signed_power(t, p):
            return t.sign() * t.abs().clamp(min=1e-6).pow(p)

        x = signed_power(signed_power(x, power).mean(0), 1.0 / power)[None]
    return F.normalize(x[0], dim=-1)


def multiscale_embeddings(model, images: torch.Tensor, scales: Sequence[float] = (1.0, 2**-0.5, 0.5), power: float = 3.0) -> torch.Tensor:
    """``model``'s embeddings of a batch at each scale (bilinear resize of the image tensor,
    ``align_corners=False``, sides rounded), combined by :func:`combine_scales`. The default scales
    1, 1/√2, 1/2 are those of SupRank's landmark evaluation."""
    if not scales or any(s <= 0 for s in scales):
        raise InputError(f"scales must be positive, got {list(scales)}")
    h, w = images.shape[-2:]
    outs = []
    for s in scales:
        x = images
        if s != 1:
            size = (max(1, int(round(h * s))), max(1, int(round(w * s))))
            x = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        outs.append(model(x))
    return combine_scales(outs, power)


class _MultiScale(nn.Module):
    def __init__(self, model, scales, power):
        super().__init__()
        self.model, self.scales, self.power = model, tuple(scales), power
        self.train(model.training)

    def forward(self, images):
        return multiscale_embeddings(self.model, images, self.scales, self.power)


def extract_multiscale_embeddings(
    model, loader, scales: Sequence[float] = (1.0, 2**-0.5, 0.5), power: float = 3.0, **kwargs
):
    """:func:`extract_embeddings` with every batch embedded at several scales
    (:func:`multiscale_embeddings`); ``kwargs`` go to :func:`extract_embeddings`. ``scales`` None
    or ``(1,)``: the plain single-scale embedding."""
    if scales is None or tuple(scales) == (1,):
        return extract_embeddings(model, loader, **kwargs)
    return extract_embeddings(_MultiScale(model, scales, power), loader, **kwargs)


# ----------------------------------------------------------------------------------------------
# Embedding extraction


def _split_batch(batch):
    if isinstance(batch, dict):
        for ik, lk in (("image", "label"), ("images", "labels")):
            if ik in batch and lk in batch:
                return batch[ik], batch[lk]
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError(
        "the loader must yield (images, labels) batches (or dicts with 'image' and 'label'), got "
        f"{type(batch).__name__}"
    )


def _autocast(device: torch.device, amp: bool | torch.dtype):
    """The autocast context of ``amp`` (see :func:`extract_embeddings`)."""
    if isinstance(amp, torch.dtype):
        return torch.autocast(device_type=device.type, dtype=amp)
    return torch.autocast(device_type=device.type, enabled=bool(amp) and device.type == "cuda")


def extract_embeddings(model, loader, device=None, amp: bool | torch.dtype = True, progress: bool = True):
    """Embed every batch of ``loader`` with ``model``; returns (embeddings, labels).

    Runs in eval mode without gradients (the model's previous mode is restored afterwards), with
    autocast on CUDA when ``amp`` is True (float16, CPU runs stay in float32); ``amp`` a dtype
    (the training's, e.g. ``torch.bfloat16``) autocasts to that dtype on any device. ``device`` defaults to the device of
    the model's parameters. Returns a float32 CPU tensor (N, D) and int64 labels (N, L), validated
    as a tree.
    """
    if device is None:
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    embs, labs = [], []
    try:
        with torch.no_grad():
            for batch in tqdm(loader, desc="embeddings", unit="batch", disable=not progress, leave=False):
                images, labels = _split_batch(batch)
                images = images.to(device, non_blocking=True)
                with _autocast(device, amp):
                    out = model(images)
                embs.append(out.detach().float().cpu())
                labs.append(torch.as_tensor(labels).cpu())
    finally:
        model.train(was_training)
    if not embs:
        raise InputError("the loader yielded no batch")
    embeddings = torch.cat(embs)
    labels = as_label_tensor(torch.cat(labs), "labels")
    if labels.shape[0] != embeddings.shape[0]:
        raise InputError(f"the model returned {embeddings.shape[0]} embeddings for {labels.shape[0]} labels")
    return embeddings, labels


# ----------------------------------------------------------------------------------------------
# Neighbourhoods: how an embedding space is organised, level by level


def nearest_neighbours(
    embeddings,
    k: int,
    gallery_embeddings=None,
    chunk_size: int | None = None,
    device=None,
    use_faiss: bool | None = None,
) -> torch.Tensor:
    """(Q, k) int64 indices of each query's k most similar gallery items (inner product), most
    similar first, ties to the lower index (as :func:`evaluate` ranks them).

    Without ``gallery_embeddings`` every item is a query against all the others (itself left
    out). ``use_faiss``: as :func:`evaluate` (None = when faiss is installed and on CPU); the
    exact tie order is kept either way. Memory: one chunk of (queries x gallery) scores at a time.
    """
    query = _as_embeddings(embeddings, "embeddings")
    same_set = gallery_embeddings is None
    gallery = query if same_set else _as_embeddings(gallery_embeddings, "gallery_embeddings")
    if gallery.shape[1] != query.shape[1]:
        raise InputError(f"queries are {query.shape[1]}-d but the gallery is {gallery.shape[1]}-d")
    available = gallery.shape[0] - (1 if same_set else 0)
    if not 1 <= int(k) <= available:
        raise InputError(f"k must be between 1 and {available} (the gallery size{' minus the query' if same_set else ''}), got {k}")
    k = int(k)
    dev = torch.device(device) if device is not None else query.device
    faiss = _faiss()
    if use_faiss and faiss is None:
        raise ImportError("use_faiss=True but faiss is not installed: pip install faiss-cpu (or faiss-gpu)")
    use_faiss = (faiss is not None and dev.type == "cpu") if use_faiss is None else bool(use_faiss)
    gallery_dev = gallery.to(dev)
    elements = _CUDA_CHUNK_ELEMENTS if dev.type == "cuda" else _CPU_CHUNK_ELEMENTS
    rows = int(chunk_size) if chunk_size else max(1, elements // max(1, gallery.shape[0]))
    index = None
    if use_faiss:
        index = faiss.IndexFlatIP(gallery.shape[1])
        index.add(np.ascontiguousarray(gallery.float().cpu().numpy()))
    out = []
    for start in range(0, query.shape[0], rows):
        q = query[start:start + rows].to(dev)
        exclude = torch.arange(start, start + q.shape[0], device=dev) if same_set else None
        if index is not None:
            out.append(_topk_faiss(faiss, index, q, gallery_dev, k, exclude))
        else:
            out.append(_exact_topk_torch(q @ gallery_dev.T, k, exclude).cpu())
    return torch.cat(out)


def neighbourhood_metrics(embeddings, labels, k: int = 64, **options) -> dict[str, float]:
    """How the embedding space is organised at every level, as flat metrics (fractions):

    - ``kNN@{k}@{c}``: for label column c, the fraction of each item's k nearest neighbours that
      share its label at c, averaged over items (:func:`hapkit.metrics.neighbour_agreement`);
    - ``top1 wrong``: the fraction of items whose nearest neighbour is of another fine class, and
      ``top1 wrong#{v}`` (v = 0 .. L-1): the fraction of items whose nearest neighbour is wrong
      and shares exactly v levels with them (0: not even the coarsest label; they sum to
      ``top1 wrong``), the severity of HAPPIER's failure analysis
      (:func:`hapkit.metrics.top1_failures`).

    Every item is a query against all the others; ``options`` go to :func:`nearest_neighbours`.
    """
    labels = as_label_tensor(labels, "labels")
    if labels.shape[0] != _as_embeddings(embeddings, "embeddings").shape[0]:
        raise InputError(f"{labels.shape[0]} labels for {_as_embeddings(embeddings, 'embeddings').shape[0]} embeddings")
    neighbours = nearest_neighbours(embeddings, k, **options)
    agreement = neighbour_agreement(labels, neighbours)
    failures = top1_failures(labels, neighbours[:, 0])
    L = labels.shape[1]
    out = {f"kNN@{k}@{c}": float(agreement[c]) for c in range(L)}
    N = labels.shape[0]
    out["top1 wrong"] = float(failures.sum()) / N
    out.update({f"top1 wrong#{v}": float(failures[v]) / N for v in range(L)})
    return out
