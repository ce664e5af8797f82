"""Batch samplers: composition, determinism per (seed, epoch), no repeats, resume, sharding, errors."""

import itertools
from collections import Counter

import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils import common_functions as pml_cf

from hapkit.data import HierarchicalBatchSampler, MPerClassBatchSampler


def tree_labels(n_super=3, fine_per_super=10, images=6, seed=0):
    """(N, 2) labels: fine classes of ``images`` images each, grouped into super-classes."""
    rows = [(s * fine_per_super + f, s) for s in range(n_super) for f in range(fine_per_super) for _ in range(images)]
    lab = np.array(rows, dtype=np.int64)
    return lab[np.random.default_rng(seed).permutation(len(lab))]  # dataset order is arbitrary


# ------------------------------------------------------------------ MPerClassBatchSampler


def check_m_per_class(batches, labels, batch_size, m):
    for b in batches:
        assert len(b) == batch_size
        counts = Counter(labels[b].tolist())
        assert set(counts.values()) == {m} and len(counts) == batch_size // m


@pytest.mark.parametrize("fill, expected", [("packed", 30 * 2 * 4 // 16), ("passes", 7 * 2)])
def test_m_per_class_batches_are_k_classes_of_m_without_repeats(fill, expected):
    lab = tree_labels(images=9)  # 9 images: 2 groups of 4 per class, 1 image left out each epoch
    s = MPerClassBatchSampler(lab, batch_size=16, m=4, seed=3, fill=fill)
    batches = list(s)
    check_m_per_class(batches, lab[:, 0], 16, 4)
    flat = [i for b in batches for i in b]
    assert len(flat) == len(set(flat))  # each image at most once per epoch
    # passes: 4 classes at a time until they run out (2 passes each); the last 2 of 30 classes
    # never fill a batch of 4 classes
    assert len(batches) == s.batches_per_epoch == expected


class _Identity:
    """A stand-in generator: no shuffling, so the epoch can be checked against a transcription."""

    def permutation(self, n):
        return np.arange(n) if isinstance(n, int) else np.asarray(n)


def reference_passes(class_images, batch_size, m):
    """The reference samplers' epoch (Smooth-AP / ROADMAP / HAPPIER), transcribed as a loop:
    each pass over the classes takes m images from every class that has m left while the batch
    is not full; an incomplete pass ends the epoch."""
    pools = [list(c) for c in class_images]
    out = []
    while True:
        batch = []
        for pool in pools:
            if len(pool) >= m and len(batch) < batch_size // m:
                batch.append(pool[:m])
                del pool[:m]
        if len(batch) < batch_size // m:
            return out
        out.append([i for group in batch for i in group])


def test_m_per_class_passes_is_the_reference_epoch():
    rng = np.random.default_rng(0)
    for _ in range(20):
        sizes = rng.integers(4, 30, size=rng.integers(4, 12))
        lab = np.repeat(np.arange(len(sizes)), sizes)
        m, k = 4, int(rng.integers(2, 4))
        s = MPerClassBatchSampler(lab, batch_size=m * k, m=m, fill="passes")
        members = [np.nonzero(lab == c)[0] for c in range(len(sizes))]
        got = [b.tolist() for b in s._passes(members, _Identity())]
        assert got == reference_passes(members, m * k, m)
    # an unbalanced set: depending on the class order, passes leave groups the packed epoch uses
    lab = np.array([0] * 40 + [1] * 4 + [2] * 4 + [3] * 4)
    passes = {len(MPerClassBatchSampler(lab, 8, 4, seed=seed, fill="passes")) for seed in range(20)}
    assert passes == {2, 3} and len(MPerClassBatchSampler(lab, 8, 4, fill="packed")) == 3


def test_m_per_class_max_per_class_caps_the_images_of_a_class():
    lab = np.repeat(np.arange(12), 20)  # 12 classes of 20 images
    s = MPerClassBatchSampler(lab, batch_size=16, m=4, max_per_class=8, seed=1)
    batches = list(s)
    assert max(Counter(lab[[i for b in batches for i in b]].tolist()).values()) <= 8
    assert len(batches) == 12 * 2 // 4  # two groups of each class, 4 classes per batch
    with pytest.raises(ValueError, match="below m"):
        MPerClassBatchSampler(lab, batch_size=16, m=4, max_per_class=3)
    with pytest.raises(ValueError, match="fill"):
        MPerClassBatchSampler(lab, batch_size=16, m=4, fill="all")


def test_m_per_class_uses_the_largest_possible_number_of_batches():
    # one big class (40 images = 10 groups) and three of 4 images, 2 classes per batch: a class
    # appears at most once per batch, so only 3 batches exist, each with the big class
    lab = np.array([0] * 40 + [1] * 4 + [2] * 4 + [3] * 4)
    batches = list(MPerClassBatchSampler(lab, batch_size=8, m=4, fill="packed"))
    assert len(batches) == 3
    assert all(Counter(lab[b].tolist())[0] == 4 for b in batches)
    # brute force on random class sizes: no larger number of batches is feasible
    rng = np.random.default_rng(0)
    for _ in range(20):
        sizes = rng.integers(4, 30, size=rng.integers(3, 9))
        lab = np.repeat(np.arange(len(sizes)), sizes)
        m, k = 4, int(rng.integers(2, 4))
        groups = sizes // m
        best = max(b for b in range(0, groups.sum() // k + 1) if np.minimum(groups, b).sum() >= b * k)
        batches = list(MPerClassBatchSampler(lab, batch_size=m * k, m=m, seed=int(rng.integers(100)), fill="packed"))
        assert len(batches) == best
        check_m_per_class(batches, lab, m * k, m)
        assert len({i for b in batches for i in b}) == len(batches) * m * k


def test_deterministic_per_seed_and_epoch():
    lab = tree_labels()
    a = MPerClassBatchSampler(lab, 12, 3, seed=1)
    b = MPerClassBatchSampler(lab, 12, 3, seed=1)
    c = MPerClassBatchSampler(lab, 12, 3, seed=2)
    for s in (a, b, c):
        s.set_epoch(4)
    ea, eb, ec = list(a), list(b), list(c)
    assert ea == eb and ea != ec
    a.set_epoch(5)
    assert list(a) != ea
    a.set_epoch(4)
    assert list(a) == ea


def test_an_epoch_run_to_the_end_moves_on():
    lab = tree_labels()
    s = MPerClassBatchSampler(lab, 12, 3, seed=1)
    first, second = list(s), list(s)
    assert first != second
    s.set_epoch(1)
    assert list(s) == second


@pytest.mark.parametrize("kind", ["mper", "hier"])
def test_resume_mid_epoch_gives_the_remaining_batches(kind):
    lab = tree_labels()
    make = {
        "mper": lambda: MPerClassBatchSampler(lab, 12, 3, seed=5),
        "hier": lambda: HierarchicalBatchSampler(lab, 24, 3, seed=5, batches_per_super_tuple=3),
    }[kind]
    s = make()
    s.set_epoch(2)
    full = list(s)
    assert len(full) > 4
    s.set_epoch(2, start_batch=3)
    assert len(s) == len(full) - 3
    assert list(s) == full[3:]
    # what an engine stores in a checkpoint, restored into a fresh sampler
    s.set_epoch(2, start_batch=4)
    state = s.state_dict()
    fresh = make()
    fresh.load_state_dict(state)
    assert list(fresh) == full[4:]
    # after the resumed epoch, the next one is the same as without interruption
    ref = make()
    ref.set_epoch(3)
    assert list(fresh) == list(ref)
    other = make()
    other.seed += 1
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)


def test_works_as_a_dataloader_batch_sampler():
    lab = tree_labels()
    ds = torch.utils.data.TensorDataset(torch.arange(len(lab)), torch.from_numpy(lab))
    s = MPerClassBatchSampler(lab, 12, 3, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=s)
    got = [(idx.tolist(), y) for idx, y in loader]
    assert len(got) == len(s) == s.batches_per_epoch
    for idx, y in got:
        assert len(idx) == 12 and torch.equal(y, torch.from_numpy(lab[idx]))


@pytest.mark.parametrize("kind", ["mper", "hier"])
def test_sharding_splits_each_global_batch(kind):
    lab = tree_labels()
    if kind == "mper":
        make = lambda **kw: MPerClassBatchSampler(lab, 12, 3, seed=1, **kw)  # noqa: E731
    else:
        make = lambda **kw: HierarchicalBatchSampler(lab, 24, 3, seed=1, **kw)  # noqa: E731
    whole = list(make())
    parts = [list(make(num_replicas=3, rank=r)) for r in range(3)]
    for b, pieces in zip(whole, zip(*parts)):
        assert [i for p in pieces for i in p] == b
    with pytest.raises(ValueError, match="num_replicas"):
        make(num_replicas=5, rank=0)


def test_m_per_class_errors():
    lab = tree_labels()
    with pytest.raises(ValueError, match="not divisible by m=5"):
        MPerClassBatchSampler(lab, 12, 5)
    small = np.array([0] * 8 + [1] * 8 + [2] * 2)
    with pytest.raises(ValueError, match=r"class 2 in column 0 has 2.*drop_small_classes=True"):
        MPerClassBatchSampler(small, 8, 4)
    s = MPerClassBatchSampler(small, 8, 4, drop_small_classes=True)
    assert all(2 not in small[b] for b in s)
    with pytest.raises(ValueError, match="needs 3 classes"):
        MPerClassBatchSampler(small[:16], 12, 4)
    with pytest.raises(ValueError, match="label column 2 is out of range"):
        MPerClassBatchSampler(lab, 12, 3, column=2)
    # labels are validated as a tree
    with pytest.raises(ValueError, match="two parents"):
        MPerClassBatchSampler(np.array([[0, 0], [0, 1], [1, 1], [1, 1]]), 2, 1)


def test_m_per_class_at_a_coarser_level():
    lab = tree_labels()
    s = MPerClassBatchSampler(lab, 12, 4, column=1)
    check_m_per_class(list(s), lab[:, 1], 12, 4)


# ------------------------------------------------------------------ HierarchicalBatchSampler


def test_hierarchical_batches_hold_two_super_classes_of_k_per_class():
    lab = tree_labels(n_super=4, fine_per_super=10, images=5)
    s = HierarchicalBatchSampler(lab, batch_size=32, samples_per_class=4, batches_per_super_tuple=3, seed=0)
    batches = list(s)
    assert len(batches) == len(list(itertools.combinations(range(4), 2))) * 3
    pairs = Counter()
    for b in batches:
        assert len(b) == 32
        supers = Counter(lab[b, 1].tolist())
        assert len(supers) == 2 and set(supers.values()) == {16}
        pairs[tuple(sorted(supers))] += 1
        fine = Counter(lab[b, 0].tolist())
        assert set(fine.values()) == {4} and len(fine) == 8
    assert set(pairs.values()) == {3}  # every pair of super-classes, batches_per_super_tuple times


def test_hierarchical_small_classes_are_sampled_with_replacement_like_the_reference():
    # SOP has products with 2 images while the recipe asks for 4 per class
    lab = tree_labels(n_super=2, fine_per_super=6, images=2)
    s = HierarchicalBatchSampler(lab, batch_size=16, samples_per_class=4, batches_per_super_tuple=2)
    for b in s:
        assert len(b) == 16 and set(Counter(lab[b, 0].tolist()).values()) == {4}
        assert len(set(b)) <= 8  # at most the 2 images of each of the 4 classes, repeated


def test_hierarchical_is_deterministic_and_leaves_global_random_state_alone():
    lab = tree_labels()
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    a = HierarchicalBatchSampler(lab, 24, 3, seed=9)
    b = HierarchicalBatchSampler(lab, 24, 3, seed=9)
    a.set_epoch(1)
    b.set_epoch(1)
    first = list(a)
    assert first == list(b)
    b.set_epoch(2)
    assert list(b) != first
    c = HierarchicalBatchSampler(lab, 24, 3, seed=10)
    c.set_epoch(1)
    assert list(c) != first
    assert np.array_equal(np.random.get_state()[1], before)
    assert pml_cf.NUMPY_RANDOM is np.random


def test_hierarchical_errors():
    lab = tree_labels(n_super=3, fine_per_super=3, images=5)
    with pytest.raises(ValueError, match="allow_smaller_batches"):
        HierarchicalBatchSampler(lab, 32, 4)  # 16 per super-class = 4 classes, only 3 exist
    s = HierarchicalBatchSampler(lab, 32, 4, allow_smaller_batches=True)
    assert all(len(b) == 24 for b in s)
    with pytest.raises(ValueError, match="multiple of super_classes_per_batch"):
        HierarchicalBatchSampler(lab, 25, 4)
    with pytest.raises(ValueError, match="not divisible by samples_per_class"):
        HierarchicalBatchSampler(lab, 24, 5)
    with pytest.raises(ValueError, match="coarser"):
        HierarchicalBatchSampler(lab, 24, 4, column=0)
    with pytest.raises(ValueError, match="fewer than super_classes_per_batch"):
        HierarchicalBatchSampler(lab[lab[:, 1] == 0], 24, 4)
    # level picks the column that defines super-classes
    three = np.concatenate([lab, lab[:, 1:] // 2], axis=1)
    s = HierarchicalBatchSampler(three, 12, 3, column=2, allow_smaller_batches=False, batches_per_super_tuple=2)
    assert all(len(set(three[b, 2].tolist())) == 2 for b in s)
