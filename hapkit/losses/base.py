"""What every loss shares: the base class and its declarations, input handling, and the one copy
of each small rule (the label-column check, the "no positive" check, the reduction over queries,
the memory budget of chunked computations).

Every hapkit loss is a pytorch-metric-learning loss (:class:`HapkitLoss` derives from PML's
``BaseMetricLossFunction``): it is called as ``loss(embeddings, labels, indices_tuple=None,
ref_emb=None, ref_labels=None)``, positionally as PML's wrappers do, and passes PML's
``isinstance`` checks (``DistributedLossWrapper``; :class:`hapkit.losses.CrossBatchMemory` for
memory banks). Labels stay (B, L), finest level first, where PML's own losses take (B,).

Two indices of the hierarchy are named apart throughout :mod:`hapkit.losses`: a label column
``column`` (c: 0 = finest, the positives of a binary loss share the query's label there) and a
number of shared levels ``shared`` (v: 0 = unrelated, L = same fine class, see
:func:`hapkit.hierarchy.shared_levels`).
"""

from __future__ import annotations

import inspect
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterator

import numpy as np
import torch
from pytorch_metric_learning.distances import DotProductSimilarity
from pytorch_metric_learning.losses import BaseMetricLossFunction
from torch.utils.checkpoint import checkpoint

from hapkit.errors import HapkitError, InputError
from hapkit.hierarchy import as_label_tensor
from hapkit.inputs import check_finite

__all__ = [
    "HapkitLoss",
    "check_indices_tuple",
    "LossInputs",
    "labels_checked_here",
    "prepare_inputs",
    "fill_self_",
    "NoPositiveError",
    "require_other_positive",
    "check_column",
    "ranking_mask",
    "binary_positives",
    "reduce_queries",
    "chunk_elements_for",
    "query_chunks",
    "run_chunked",
]


class NoPositiveError(HapkitError, ValueError):
    """A batch in which no query has a positive: the sampler must put several images per class."""


def check_indices_tuple(indices_tuple, loss_name: str) -> None:
    """Accept PML's ``indices_tuple`` (None, or 3 / 4 tensors of indices) and nothing else.

    hapkit's losses rank every (query, reference) pair themselves, so they ignore a mined tuple;
    what is refused is anything else in that position, such as a reference set passed
    positionally in the order ``(embeddings, labels, ref_emb, ref_labels)``.
    """
    if indices_tuple is None:
        return
    ok = isinstance(indices_tuple, (tuple, list)) and len(indices_tuple) in (3, 4) and all(
        isinstance(t, torch.Tensor) and t.dim() == 1 and not t.dtype.is_floating_point for t in indices_tuple
    )
    if not ok:
        raise InputError(
            f"{loss_name}: indices_tuple must be None or pytorch-metric-learning's tuple of 3 or 4 "
            f"index tensors, got {type(indices_tuple).__name__}. The call is loss(embeddings, "
            f"labels, indices_tuple=None, ref_emb=None, ref_labels=None): pass a reference set as "
            f"ref_emb=... and ref_labels=..."
        )


# The rows of ref_emb that are the queries themselves, set by HapkitLoss.forward for the duration
# of one call: composite losses (HAPPIER, ROADMAP) pass the reference set on to their parts
# without knowing about it, and a memory bank's call made outside that one never sees it.
_QUERY_OFFSET: ContextVar[int | None] = ContextVar("hapkit_query_offset", default=None)
# Whether this call checks its labels and positives (each check a host synchronisation); set by
# HapkitLoss.forward, read by prepare_inputs and the "no positive" check.
_CHECK_LABELS: ContextVar[bool] = ContextVar("hapkit_check_labels", default=True)


def labels_checked_here() -> bool:
    """Whether the loss call in progress checks its labels, their range and its positives."""
    return _CHECK_LABELS.get()


class HapkitLoss(BaseMetricLossFunction):
    """Base class of hapkit's losses: a pytorch-metric-learning loss that declares what a
    training loop needs to know about it.

    Call: ``loss(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None)``, PML's
    positional order. ``labels`` are (B, L) (or (B,) for one level), finest level first.
    ``indices_tuple`` (PML's mined pairs or triplets) is accepted and ignored: rank losses rank
    every pair of the batch (or of ``ref_emb``), proxy losses compare with their proxies.
    ``query_offset`` (keyword only) says that the queries are rows ``query_offset ..
    query_offset + B - 1`` of ``ref_emb`` (a batch gathered from several processes): each query
    is then known in its own ranking, as in the same-set call, and ``exclude_self`` removes it.
    Subclasses implement :meth:`batch_loss`; :meth:`forward` hands its value to PML's reducer
    and embedding regularizer, which leave an already reduced loss unchanged.

    Class attributes (read by :mod:`hapkit.training.engine`, never guessed from class names):

    - ``takes_reference_set``: the loss ranks queries against a reference set passed as
      ``ref_emb`` / ``ref_labels`` (rank losses); with several processes the engine gives it the
      gathered global batch, and a memory bank (:class:`hapkit.losses.CrossBatchMemory`) gives it
      the memory. False for losses against learned proxies or class weights, which see the local
      batch (their mean over samples makes DDP's gradient averaging exact).
    - ``has_parameters``: the loss has learnable parameters of its own (proxies, class weights),
      trained by the optimiser of ``parameter_group``, the recipe's ``optim.<group>`` section.

    :meth:`training_kwargs` fills the constructor arguments that come from the training data
    (class counts, embedding size, hierarchy, seed) when a recipe leaves them out.
    """

    takes_reference_set: ClassVar[bool] = True
    has_parameters: ClassVar[bool] = False
    parameter_group: ClassVar[str] = "loss"
    _check_finite: bool = True
    _check_labels: bool | None = None  # None: as check_finite
    _first_call_done: bool = False

    @property
    def check_finite(self) -> bool:
        """Refuse NaN / infinite ``embeddings`` and ``ref_emb`` with a NonFiniteError (default).

        The test costs a host synchronisation per call: a training loop that watches the loss
        itself (the engine does, once every few steps) sets it to False on its instance, which
        also sets it on the losses this one is made of (HAPPIER's, ROADMAP's parts).
        """
        return self._check_finite

    @check_finite.setter
    def check_finite(self, value: bool) -> None:
        for module in self.modules():
            if isinstance(module, HapkitLoss):
                object.__setattr__(module, "_check_finite", bool(value))

    @property
    def check_labels(self) -> bool:
        """Check the labels of every call (default: as :attr:`check_finite`), else of the first.

        The checks (non-negative ids forming a tree, class ids within the loss's classes, some
        query with a positive) read the labels on the host: one synchronisation each, several per
        call on a GPU. A training loop whose labels were validated once (the engine's sampler
        validates the whole training set) and that watches the loss itself turns them off: the
        first call of the loss still checks, so a recipe that cannot make positives fails at its
        first step; a later batch without any positive is not refused (its loss ranks nothing
        but the queries themselves, or is NaN when they are excluded). Setting it sets it on the
        losses this one is made of.
        """
        return self.check_finite if self._check_labels is None else self._check_labels

    @check_labels.setter
    def check_labels(self, value: bool) -> None:
        for module in self.modules():
            if isinstance(module, HapkitLoss):
                object.__setattr__(module, "_check_labels", bool(value))

    def get_default_distance(self):
        # What every hapkit loss computes: dot products of L2-normalised embeddings.
        return DotProductSimilarity(normalize_embeddings=False)

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *,
                query_offset: int | None = None):
        """The loss of ``embeddings`` (queries) against ``ref_emb`` (default: the batch itself)."""
        name = type(self).__name__
        if labels is None:
            raise InputError(f"{name}: labels are required, a (B, L) integer tensor finest level first")
        check_indices_tuple(indices_tuple, name)
        if self.check_finite:
            for arg, value in (("embeddings", embeddings), ("ref_emb", ref_emb)):
                if isinstance(value, torch.Tensor):
                    check_finite(value, f"{name}: {arg}", undefined="the loss and its gradient would be NaN",
                                 hint="Check the model and the learning rate (diverged training, fp16 overflow).")
        if query_offset is not None and ref_emb is None:
            raise InputError(f"{name}: query_offset locates the queries in ref_emb; pass ref_emb and ref_labels too")
        self.reset_stats()
        token = _QUERY_OFFSET.set(query_offset) if query_offset is not None else None
        checks = _CHECK_LABELS.set(self.check_labels or not self._first_call_done)
        try:
            loss_dict = self.compute_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        finally:
            _CHECK_LABELS.reset(checks)
            if token is not None:
                _QUERY_OFFSET.reset(token)
        object.__setattr__(self, "_first_call_done", True)  # only a call that returned has checked
        self.add_embedding_regularization_to_loss_dict(loss_dict, embeddings)
        return self.reducer(loss_dict, embeddings, labels)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        """PML's hook: the value of :meth:`batch_loss`, already reduced."""
        loss = self.batch_loss(embeddings, labels, ref_emb, ref_labels)
        return {"loss": {"losses": loss, "indices": None, "reduction_type": "already_reduced"}}

    def batch_loss(self, embeddings, labels, ref_emb=None, ref_labels=None) -> torch.Tensor:
        """The scalar loss; every subclass implements it."""
        raise NotImplementedError

    @classmethod
    def training_kwargs(cls, kwargs: dict, train_labels: np.ndarray, embedding_size: int, seed: int) -> dict:
        """``kwargs`` completed with what the constructor takes and the recipe did not give:
        ``num_classes`` (fine classes of the training labels), ``embedding_size``, ``hierarchy``
        (the (N, L) training labels) and ``seed``."""
        params = inspect.signature(cls.__init__).parameters
        labels = np.asarray(train_labels)
        labels = labels[:, None] if labels.ndim == 1 else labels
        filled = dict(kwargs)
        defaults = {
            "num_classes": lambda: int(labels[:, 0].max()) + 1,
            "embedding_size": lambda: int(embedding_size),
            "hierarchy": lambda: labels,
            "seed": lambda: int(seed),
        }
        for name, value in defaults.items():
            if name in params and name not in filled:
                filled[name] = value()
        return filled


@dataclass
class LossInputs:
    embeddings: torch.Tensor  # (B, D) float32
    labels: torch.Tensor  # (B, L) int64
    ref_emb: torch.Tensor  # (M, D) float32; the batch itself when no reference set is given
    ref_labels: torch.Tensor  # (M, L) int64
    same_set: bool  # True when ref_emb is the batch itself (query i is ref item i)
    # query i is ref item self_offset + i (0 in the same-set case); None: the queries are not in ref_emb
    self_offset: int | None = None

    @property
    def num_levels(self) -> int:
        return self.labels.shape[1]


def fill_self_(x: torch.Tensor, inputs: LossInputs, value) -> torch.Tensor:
    """Set each query's own entry of a (B, M) tensor to ``value`` in place (a no-op when the
    queries are not in the reference set); returns ``x``."""
    if inputs.self_offset is not None:
        off, B = inputs.self_offset, x.shape[0]
        x[:, off : off + B].fill_diagonal_(value)
    return x


def prepare_inputs(
    embeddings: torch.Tensor,
    labels,
    ref_emb: torch.Tensor | None = None,
    ref_labels=None,
    loss_name: str = "loss",
) -> LossInputs:
    """Validate a loss call and return float32 embeddings and (B, L) int64 labels on one device.

    Losses compute in float32 even under ``torch.autocast``: callers wrap their body in
    :func:`hapkit.losses.rank.float32_compute` and call this first.
    """
    if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2:
        shape = tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings)
        raise InputError(f"{loss_name}: embeddings must be a (B, D) tensor, got {shape}")
    if embeddings.shape[0] == 0:
        # a mean over no item is NaN (or the proxy losses' silent 0): refuse it here, once for all
        raise InputError(f"{loss_name}: embeddings is an empty batch (0 rows); give at least one item, "
                         f"e.g. DataLoader(..., drop_last=True) to drop a short last batch")
    device = embeddings.device
    labels = _label_tensor(labels, f"{loss_name} labels").to(device)
    if labels.shape[0] != embeddings.shape[0]:
        raise InputError(
            f"{loss_name}: {embeddings.shape[0]} embeddings but {labels.shape[0]} label rows"
        )
    if (ref_emb is None) != (ref_labels is None):
        raise InputError(f"{loss_name}: give both ref_emb and ref_labels, or neither")
    emb = embeddings.float()
    if ref_emb is None:
        return LossInputs(emb, labels, emb, labels, True, 0)
    if ref_emb.dim() != 2 or ref_emb.shape[1] != embeddings.shape[1]:
        raise InputError(
            f"{loss_name}: ref_emb must be (M, {embeddings.shape[1]}), got {tuple(ref_emb.shape)}"
        )
    ref_labels = _label_tensor(ref_labels, f"{loss_name} ref_labels").to(device)
    if ref_labels.shape[0] != ref_emb.shape[0]:
        raise InputError(
            f"{loss_name}: {ref_emb.shape[0]} reference embeddings but {ref_labels.shape[0]} label rows"
        )
    if ref_labels.shape[1] != labels.shape[1]:
        raise InputError(
            f"{loss_name}: labels have {labels.shape[1]} level(s), ref_labels {ref_labels.shape[1]}"
        )
    offset = _QUERY_OFFSET.get()
    if offset is not None and not (isinstance(offset, int) and 0 <= offset <= ref_emb.shape[0] - emb.shape[0]):
        raise InputError(
            f"{loss_name}: query_offset={offset!r} does not place {emb.shape[0]} queries inside the "
            f"{ref_emb.shape[0]} reference rows; give the row of ref_emb that holds the first query"
        )
    return LossInputs(emb, labels, ref_emb.to(device).float(), ref_labels, False, offset)


def _label_tensor(labels, name: str) -> torch.Tensor:
    """(N, L) int64 labels; their values (sign, tree) are checked unless the call skips it, which
    leaves only what the shape tells (no host synchronisation)."""
    if not labels_checked_here() and isinstance(labels, torch.Tensor) and labels.dim() in (1, 2) \
            and not (labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool):
        labels = labels[:, None] if labels.dim() == 1 else labels
        if labels.shape[1] > 0:
            return labels.long()
    return as_label_tensor(labels, name=name)


def check_column(column, num_levels: int, loss_name: str) -> None:
    """Raise when ``column`` is not a label column of labels with ``num_levels`` levels."""
    if isinstance(column, bool) or not isinstance(column, (int, np.integer)) or not 0 <= column < num_levels:
        raise InputError(
            f"{loss_name}: column={column!r} but the labels have {num_levels} level(s); column selects "
            f"the label column that defines positives (0 = finest ... {num_levels - 1} = coarsest)"
        )


def require_other_positive(related: torch.Tensor, inputs: LossInputs, what: str, loss_name: str) -> None:
    """Raise :class:`NoPositiveError` when no query has a related item other than itself.

    ``related`` is a (B, M) boolean mask of the reference items each query counts as positive;
    the query's own entry (the diagonal in the same-set protocol) does not count. A call that
    does not check its labels (:attr:`HapkitLoss.check_labels`) skips it.
    """
    if not labels_checked_here():
        return
    others = fill_self_(related.clone(), inputs, False)
    if not bool(others.any()):
        raise NoPositiveError(
            f"{loss_name}: no query in this batch of {related.shape[0]} has another item that "
            f"{what}, so there is nothing to rank. The sampler must put at least two images of "
            f"some class in every batch (e.g. pytorch_metric_learning.samplers.MPerClassSampler "
            f"with m >= 2, or hapkit.data.samplers.HierarchicalBatchSampler)."
        )


def ranking_mask(inputs: LossInputs, exclude_self: bool) -> torch.Tensor:
    """(B, M) bool: which reference items take part in each query's ranking.

    In the same-set case (or with ``query_offset``) the query is its own top-ranked positive by
    default (docs/definitions.md, 'Batch surrogates'); ``exclude_self`` removes it, as in the evaluation protocol.
    """
    B, M = inputs.embeddings.shape[0], inputs.ref_emb.shape[0]
    mask = torch.ones(B, M, dtype=torch.bool, device=inputs.embeddings.device)
    if exclude_self:
        fill_self_(mask, inputs, False)
    return mask


def binary_positives(inputs: LossInputs, column: int, ranking: torch.Tensor, loss_name: str) -> torch.Tensor:
    """(B, M) bool: reference items in the ranking that share the query's label in ``column``
    (raises :class:`NoPositiveError` when no query has one besides itself)."""
    check_column(column, inputs.num_levels, loss_name)
    pos = inputs.labels[:, column, None] == inputs.ref_labels[None, :, column]
    require_other_positive(pos, inputs, f"shares its label in column {column}", loss_name)
    return pos & ranking


def reduce_queries(per_query: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """1 - mean of a per-query surrogate over the queries whose ``weight`` (their number of
    positives, or total relevance) is positive; the others have no defined value. No host
    synchronisation (a boolean index would need one)."""
    valid = weight > 0
    return 1.0 - (per_query * valid).sum() / valid.sum()


def chunk_elements_for(chunk_elements: int | None, device: torch.device, cpu: int, gpu: int) -> int:
    """The memory knob of chunked losses: ``chunk_elements`` (values of the largest intermediate
    tensor of one chunk) when given, else the loss's default for the device type."""
    if chunk_elements is None:
        return cpu if device.type == "cpu" else gpu
    if int(chunk_elements) < 1:
        raise InputError(f"chunk_elements must be a positive number of values, got {chunk_elements}")
    return int(chunk_elements)


def query_chunks(pairs_per_query: torch.Tensor, gallery_size: int, chunk_elements: int) -> Iterator[slice]:
    """Consecutive query slices, chosen greedily so that each chunk's (pairs x gallery) block holds
    at most ``chunk_elements`` values (at least one query per chunk)."""
    B = pairs_per_query.shape[0]
    cost = (pairs_per_query.clamp(min=1) * max(gallery_size, 1)).tolist()
    start, acc = 0, 0
    for i, c in enumerate(cost):
        if i > start and acc + c > chunk_elements:
            yield slice(start, i)
            start, acc = i, 0
        acc += c
    if start < B:
        yield slice(start, B)


def run_chunked(fn: Callable[..., torch.Tensor], chunks: list[slice], *tensors, **static):
    """Concatenate ``fn(*(t[chunk] for t in tensors), **static)`` over query chunks.

    With several chunks and autograd on, each chunk is checkpointed so that only one chunk's
    (pairs x gallery) intermediates are alive at a time, in the backward pass as well.
    """
    outputs = []
    use_ckpt = len(chunks) > 1 and torch.is_grad_enabled()
    for sl in chunks:
        args = [t[sl] for t in tensors]
        if use_ckpt:
            outputs.append(checkpoint(lambda *a: fn(*a, **static), *args, use_reentrant=False))
        else:
            outputs.append(fn(*args, **static))
    return torch.cat(outputs) if outputs else tensors[0].new_zeros(0)
