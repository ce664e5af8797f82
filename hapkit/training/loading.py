"""Training data loading that is reproducible, resumable mid-epoch and sharded across processes.

Random augmentation normally draws from the global generator of whichever worker process loads
an image, so the same run with another number of workers, or resumed in the middle of an epoch,
sees different crops. Here every item of every batch gets its own seed, a function of
(run seed, epoch, batch index, position in the global batch); the loader seeds the generators
with it just before loading the item. The augmented batch is therefore the same whatever the
number of workers, processes or interruptions.

Resuming and sharding are the samplers' own (:mod:`hapkit.data.samplers`: ``set_epoch(epoch,
start_batch)``, ``num_replicas`` / ``rank``); :class:`SeededBatches` only attaches the item seeds to
the indices the sampler yields.
"""

from __future__ import annotations

import random
from contextlib import contextmanager

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["item_seed", "SeededItems", "SeededBatches", "make_train_loader"]

_MASK = (1 << 64) - 1


def _mix(x: int) -> int:
    # splitmix64 finaliser: nearby inputs give unrelated outputs
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def item_seed(seed: int, epoch: int, batch: int, position: int) -> int:
    """A 63-bit seed for one item of one batch, independent of workers and processes."""
    h = _mix(seed & _MASK)
    for v in (epoch, batch, position):
        h = _mix(h ^ (v & _MASK))
    return h >> 1


@contextmanager
def _preserved_rng():
    """Restore the torch (CPU), numpy and python global generators on exit."""
    torch_state = torch.random.default_generator.get_state()
    py_state = random.getstate()
    np_state = np.random.get_state()
    try:
        yield
    finally:
        torch.random.default_generator.set_state(torch_state)
        random.setstate(py_state)
        np.random.set_state(np_state)


def _seed_all(seed: int) -> None:
    torch.random.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


class SeededItems(Dataset):
    """A dataset read with ``(index, seed)`` keys: the item is loaded under that seed.

    The global generators are restored afterwards (once per batch when the loader fetches whole
    batches), so reading data never disturbs the training process's random streams.
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        with _preserved_rng():
            _seed_all(seed)
            return self.dataset[index]

    def __getitems__(self, keys):
        # DataLoader's batched fetch: saving and restoring the states costs more than a
        # small image's transform, so do it once per batch
        out = []
        with _preserved_rng():
            for index, seed in keys:
                _seed_all(seed)
                out.append(self.dataset[index])
        return out


class SeededBatches:
    """Batch sampler yielding ``(index, seed)`` keys for the batches of a hapkit batch sampler.

    ``sampler`` (:class:`hapkit.data.HierarchicalBatchSampler` or
    :class:`~hapkit.data.MPerClassBatchSampler`) yields this process's slice of each global batch
    of its current epoch, from its ``start_batch`` on; the item seed of each index depends on the
    run seed, the epoch, the batch's number in the epoch and the item's position in the GLOBAL
    batch, so that it is the same for any number of processes, workers or interruptions.
    """

    def __init__(self, sampler, seed: int):
        self.sampler = sampler
        self.seed = seed

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        # read the position before iterating: a sampler run to its end moves on to the next epoch
        epoch, start, rank = self.sampler.epoch, self.sampler.start_batch, self.sampler.rank
        for b, local in enumerate(self.sampler, start=start):
            offset = rank * len(local)
            yield [(int(i), item_seed(self.seed, epoch, b, offset + j)) for j, i in enumerate(local)]


def make_train_loader(
    dataset,
    sampler,
    seed: int,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader over ``dataset`` driven by a hapkit batch ``sampler`` (see :class:`SeededBatches`);
    select the epoch and resume position with ``sampler.set_epoch(epoch, start_batch)``.

    Workers persist across epochs (no start-up cost per epoch) and prefetch 4 batches each.
    """
    kwargs = {}
    if num_workers > 0:
        kwargs = dict(persistent_workers=True, prefetch_factor=4)
    return DataLoader(
        SeededItems(dataset),
        batch_sampler=SeededBatches(sampler, seed),
        num_workers=num_workers,
        pin_memory=pin_memory,
        # a private generator: creating an epoch's iterator must not consume the global stream
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    )
