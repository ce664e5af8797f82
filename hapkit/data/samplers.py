"""Batch samplers for ranking losses: each batch is a list of dataset indices.

Use them as ``DataLoader(dataset, batch_sampler=sampler)``. Both are deterministic functions of
``(seed, epoch)``: call :meth:`set_epoch` before each epoch (as with ``DistributedSampler``); an
epoch iterated to the end without a ``set_epoch`` call moves on to the next epoch by itself.
To resume an interrupted epoch, ``set_epoch(epoch, start_batch=n)`` (or ``load_state_dict`` of a
saved ``state_dict()`` whose ``start_batch`` the engine set to the number of batches it had
consumed) makes the next iteration yield exactly the batches n, n+1, ... of that epoch.

For multi-process training, ``num_replicas`` / ``rank`` give each process its contiguous slice
of every global batch (the global batch is what a gathered rank loss sees).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import numpy as np
from pytorch_metric_learning.samplers import HierarchicalSampler as _PMLHierarchicalSampler
from pytorch_metric_learning.utils import common_functions as _pml_cf

from hapkit.hierarchy import as_label_tensor

__all__ = ["HierarchicalBatchSampler", "MPerClassBatchSampler"]


class _EpochBatchSampler:
    """Shared machinery: epoch/seed bookkeeping, resume, sharding, iteration."""

    def __init__(self, batch_size: int, seed: int, num_replicas: int, rank: int):
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas), got rank={rank}, num_replicas={num_replicas}")
        if batch_size % num_replicas:
            raise ValueError(
                f"batch_size {batch_size} is not divisible by num_replicas {num_replicas}: every "
                f"process must get the same number of images"
            )
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.epoch = 0
        self.start_batch = 0
        self._plan_cache: tuple[int, list[list[int]]] | None = None

    # -- subclasses implement this: the full (global) batches of one epoch
    def _make_batches(self, rng_seed: np.random.SeedSequence) -> list[list[int]]:
        raise NotImplementedError

    def batches_for_epoch(self, epoch: int) -> list[list[int]]:
        """All global batches of ``epoch`` (deterministic given the seed)."""
        if self._plan_cache is None or self._plan_cache[0] != epoch:
            seq = np.random.SeedSequence([self.seed, epoch])
            self._plan_cache = (epoch, self._make_batches(seq))
        return self._plan_cache[1]

    @property
    def batches_per_epoch(self) -> int:
        """Number of batches in a full epoch (``len`` counts only those still to come)."""
        return len(self.batches_for_epoch(self.epoch))

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch whose batches the next iteration yields, from ``start_batch`` on."""
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "start_batch": self.start_batch, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(
                f"sampler state was saved with seed {state['seed']} but this sampler has seed "
                f"{self.seed}: the resumed batches would differ"
            )
        self.set_epoch(state["epoch"], state.get("start_batch", 0))

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch - self.start_batch)

    def _shard(self, batch: list[int]) -> list[int]:
        if self.num_replicas == 1:
            return batch
        per = len(batch) // self.num_replicas
        return batch[self.rank * per : (self.rank + 1) * per]

    def __iter__(self):
        epoch, start = self.epoch, self.start_batch
        batches = self.batches_for_epoch(epoch)
        for b in range(start, len(batches)):
            yield self._shard(batches[b])
        # an epoch run to its end moves on, so a loop that never calls set_epoch still reshuffles
        if self.epoch == epoch and self.start_batch == start:
            self.set_epoch(epoch + 1)


def _labels_with_column(labels, column: int, what: str) -> np.ndarray:
    lab = as_label_tensor(labels, name=f"{what} labels").numpy()
    if not 0 <= column < lab.shape[1]:
        raise ValueError(f"{what}: label column {column} is out of range for labels with {lab.shape[1]} level(s)")
    return lab


# PML's sampler draws from the module-level ``common_functions.NUMPY_RANDOM``; it is swapped for a
# seeded generator while PML builds an epoch, under a lock so concurrent samplers cannot interleave.
_PML_RNG_LOCK = threading.Lock()


@contextmanager
def _pml_random_state(seed_seq: np.random.SeedSequence):
    with _PML_RNG_LOCK:
        saved = _pml_cf.NUMPY_RANDOM
        _pml_cf.NUMPY_RANDOM = np.random.RandomState(np.random.MT19937(seed_seq))
        try:
            yield
        finally:
            _pml_cf.NUMPY_RANDOM = saved


class HierarchicalBatchSampler(_EpochBatchSampler):
    """Batches made of ``super_classes_per_batch`` super-classes (HAPPIER / SOP recipe).

    Each batch draws ``super_classes_per_batch`` super-classes (labels in label column
    ``column``); half
    of the batch (for 2) comes from each, as ``samples_per_class`` images of each of several
    distinct fine classes (column 0). Every combination of super-classes gives
    ``batches_per_super_tuple`` batches per epoch, in shuffled order. SOP recipe: batch 256,
    4 per class, 2 super-classes per batch, 5 batches per pair.

    This wraps pytorch-metric-learning's ``HierarchicalSampler`` (which yields whole batches and
    reshuffles on every ``__iter__`` from a global random state) with a seeded, per-epoch random
    state, resuming and sharding. As in the reference code, a fine class with fewer than
    ``samples_per_class`` images is sampled WITH replacement (SOP has classes of 2 images and the
    recipe asks 4), and images may repeat across batches of an epoch.

    A super-class that cannot fill its part of a batch would give short batches silently in PML;
    here it raises an error unless ``allow_smaller_batches=True``.
    """

    def __init__(
        self,
        labels,
        batch_size: int,
        samples_per_class: int,
        super_classes_per_batch: int = 2,
        batches_per_super_tuple: int = 5,
        seed: int = 0,
        column: int = 1,
        allow_smaller_batches: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        super().__init__(batch_size, seed, num_replicas, rank)
        lab = _labels_with_column(labels, column, "HierarchicalBatchSampler")
        if column == 0:
            raise ValueError(
                "HierarchicalBatchSampler: column must be a coarser label column than 0 (the fine classes)"
            )
        if super_classes_per_batch < 1 or batch_size % super_classes_per_batch:
            raise ValueError(
                f"batch_size {batch_size} must be a multiple of super_classes_per_batch "
                f"{super_classes_per_batch}"
            )
        sub = batch_size // super_classes_per_batch
        if samples_per_class < 1 or sub % samples_per_class:
            raise ValueError(
                f"batch_size / super_classes_per_batch = {sub} is not divisible by samples_per_class "
                f"{samples_per_class}"
            )
        supers = np.unique(lab[:, column])
        if supers.size < super_classes_per_batch:
            raise ValueError(
                f"HierarchicalBatchSampler: {supers.size} super-class(es) in column {column}, fewer than "
                f"super_classes_per_batch={super_classes_per_batch}"
            )
        if not allow_smaller_batches:
            need = sub // samples_per_class
            for s in supers:
                n_fine = np.unique(lab[lab[:, column] == s, 0]).size
                if n_fine < need:
                    raise ValueError(
                        f"HierarchicalBatchSampler: super-class {int(s)} (column {column}) has {n_fine} fine "
                        f"class(es) but each batch needs {need} from it ({sub} images / "
                        f"{samples_per_class} per class): lower batch_size, raise samples_per_class, or "
                        f"pass allow_smaller_batches=True"
                    )
        self.samples_per_class = int(samples_per_class)
        self.super_classes_per_batch = int(super_classes_per_batch)
        self.batches_per_super_tuple = int(batches_per_super_tuple)
        self.column = int(column)
        with _pml_random_state(np.random.SeedSequence([self.seed, 2**31])):
            self._pml = _PMLHierarchicalSampler(
                lab,
                batch_size=batch_size,
                samples_per_class=samples_per_class,
                batches_per_super_tuple=batches_per_super_tuple,
                super_classes_per_batch=super_classes_per_batch,
                inner_label=0,
                outer_label=column,
            )

    def _make_batches(self, seed_seq):
        with _pml_random_state(seed_seq):
            self._pml.reshuffle()
            batches = [[int(i) for i in b] for b in self._pml.batches]
        if self.num_replicas > 1:
            # a short batch (allow_smaller_batches) is trimmed so that every rank gets equal shares
            batches = [b[: len(b) - len(b) % self.num_replicas] for b in batches]
        return batches

    def __repr__(self):
        return (
            f"HierarchicalBatchSampler(batch_size={self.batch_size}, samples_per_class="
            f"{self.samples_per_class}, super_classes_per_batch={self.super_classes_per_batch}, "
            f"batches_per_super_tuple={self.batches_per_super_tuple}, column={self.column}, "
            f"seed={self.seed})"
        )


class MPerClassBatchSampler(_EpochBatchSampler):
    """Batches of ``batch_size // m`` distinct classes with ``m`` images each, WITHOUT replacement.

    Every image appears at most once per epoch, as in the reference sampler of Smooth-AP /
    ROADMAP / HAPPIER. pytorch-metric-learning's ``MPerClassSampler`` is not that: it draws
    ``m`` images per class independently for every batch (with replacement across batches, and
    within a class smaller than m), for an epoch length fixed by ``length_before_new_iter``.

    Per epoch each class's images are shuffled and cut into groups of ``m`` (a remainder smaller
    than ``m`` is left out this epoch; with ``max_per_class`` only that many images of a class
    take part, SupRank's ``reduce_per_class``). Two ways to make the epoch's batches (``fill``):

    - ``"passes"`` (the reference samplers of Smooth-AP, ROADMAP and HAPPIER, the default): the
      classes are shuffled once; each pass over them takes one group from each of the first k
      classes (k = classes per batch) that still have one, and gives one batch; the epoch ends at
      the first pass that finds fewer than k such classes. On unbalanced data this leaves many
      groups unused, and the epoch length (hence the number of steps of a recipe) is the
      reference's.
    - ``"packed"``: as many batches as the groups allow: the largest B such that
      ``sum_c min(groups_c, B) >= B * k``; surplus groups are dropped at random, and groups are
      dealt to batches largest class first into the emptiest batches, so that no class appears
      twice in a batch.

    Batch order and the order inside a batch are shuffled. A class with fewer than ``m`` images
    can never be sampled: that is an error unless ``drop_small_classes=True`` (the reference
    samplers skip such classes silently).
    """

    def __init__(
        self,
        labels,
        batch_size: int,
        m: int,
        seed: int = 0,
        column: int = 0,
        drop_small_classes: bool = False,
        fill: str = "passes",
        max_per_class: int | None = None,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        super().__init__(batch_size, seed, num_replicas, rank)
        if int(m) < 1:
            raise ValueError(f"m (images per class) must be >= 1, got {m}")
        if fill not in ("passes", "packed"):
            raise ValueError(f"fill must be 'passes' (the reference samplers) or 'packed', got {fill!r}")
        if max_per_class is not None and int(max_per_class) < m:
            raise ValueError(f"max_per_class={max_per_class} is below m={m}: no class could give a group")
        self.fill = fill
        self.max_per_class = None if max_per_class is None else int(max_per_class)
        if batch_size % m:
            raise ValueError(
                f"batch_size {batch_size} is not divisible by m={m}: a batch holds batch_size // m "
                f"classes of exactly m images each"
            )
        lab = _labels_with_column(labels, column, "MPerClassBatchSampler")[:, column]
        self.m = int(m)
        self.column = int(column)
        self.classes_per_batch = batch_size // self.m
        order = np.argsort(lab, kind="stable")
        classes, starts, counts = np.unique(lab[order], return_index=True, return_counts=True)
        small = counts < self.m
        if small.any() and not drop_small_classes:
            worst = int(np.argmin(counts))
            raise ValueError(
                f"MPerClassBatchSampler: {int(small.sum())} class(es) have fewer than m={self.m} images "
                f"(e.g. class {int(classes[worst])} in column {column} has {int(counts[worst])}); they "
                f"could never be sampled without replacement. Lower m, or pass "
                f"drop_small_classes=True to leave them out (as the reference sampler does)."
            )
        self._groups = [order[s : s + n] for s, n, sm in zip(starts, counts, small) if not sm]
        self.dropped_classes = int(small.sum())
        if len(self._groups) < self.classes_per_batch:
            raise ValueError(
                f"MPerClassBatchSampler: a batch needs {self.classes_per_batch} classes with >= {self.m} "
                f"images but only {len(self._groups)} exist: lower batch_size or m"
            )
        self.num_classes = len(self._groups)

    def _make_batches(self, seed_seq):
        rng = np.random.default_rng(seed_seq)
        members = [rng.permutation(g)[: self.max_per_class] for g in self._groups]
        batches = self._passes(members, rng) if self.fill == "passes" else self._packed(members, rng)
        return [[int(i) for i in rng.permutation(b)] for b in batches]

    def _passes(self, members: list[np.ndarray], rng) -> list[np.ndarray]:
        """The reference epoch: each pass gives one batch from the first k classes (in a shuffled
        order) that still have a group of m unused images."""
        m, k = self.m, self.classes_per_batch
        order = rng.permutation(len(members))
        left = np.array([len(g) // m for g in members])
        used = np.zeros(len(members), dtype=np.int64)
        # the first k classes with a group left are those `active` holds: every class before
        # `upcoming` in the order is active or exhausted, and classes never come back
        active: list[int] = []
        upcoming, batches = 0, []
        while True:
            while len(active) < k and upcoming < len(order):
                c = int(order[upcoming])
                upcoming += 1
                if left[c] > 0:
                    active.append(c)
            if len(active) < k:
                break
            batches.append(np.concatenate([members[c][used[c] * m : (used[c] + 1) * m] for c in active]))
            used[active] += 1
            active = [c for c in active if used[c] < left[c]]
        return [batches[i] for i in rng.permutation(len(batches))]

    def _packed(self, members: list[np.ndarray], rng) -> list[np.ndarray]:
        m, k = self.m, self.classes_per_batch
        groups = np.array([len(g) // m for g in members])
        # largest number of batches B with sum_c min(groups_c, B) >= B * k (concave in B)
        lo, hi = 0, int(groups.sum()) // k
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if np.minimum(groups, mid).sum() >= mid * k:
                lo = mid
            else:
                hi = mid - 1
        n_batches = lo
        if n_batches == 0:
            return []
        take = np.minimum(groups, n_batches)
        # drop surplus groups at random; any d_c <= B with sum = B*k is realisable (Gale-Ryser)
        surplus = int(take.sum()) - n_batches * k
        if surplus:
            slots = np.repeat(np.arange(len(take)), take)
            np.subtract.at(take, rng.choice(slots, size=surplus, replace=False), 1)
        # largest classes first, each into the emptiest batches (random tie-break)
        capacity = np.full(n_batches, k)
        batches: list[list[np.ndarray]] = [[] for _ in range(n_batches)]
        order = np.lexsort((rng.random(len(take)), -take))
        for c in order:
            d = int(take[c])
            if d == 0:
                continue
            score = capacity + rng.random(n_batches)
            chosen = np.argpartition(-score, d - 1)[:d]
            capacity[chosen] -= 1
            for j, b in enumerate(chosen):
                batches[b].append(members[c][j * m : (j + 1) * m])
        return [np.concatenate(batches[b]) for b in rng.permutation(n_batches)]

    def __repr__(self):
        return (
            f"MPerClassBatchSampler(batch_size={self.batch_size}, m={self.m}, column={self.column}, "
            f"classes={self.num_classes}, fill={self.fill!r}, max_per_class={self.max_per_class}, seed={self.seed})"
        )
