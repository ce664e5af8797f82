"""How often a training step's loss reads the device on the host: every such read (``.item()``,
``bool(t)``, ``.tolist()``, a boolean index...) is a synchronisation on a GPU. Counted on the CPU,
where the same calls are made, with a torch function mode that records them."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from hapkit.losses.base import NoPositiveError
from hapkit.training.engine import build_loss
from hapkit.training.recipes import load_recipe

# calls that need the values of a tensor on the host (a GPU tensor's: a synchronisation)
READS = {"item", "__bool__", "__int__", "__float__", "__index__", "tolist", "numpy", "cpu", "nonzero", "argwhere",
         "unique", "unique_consecutive", "masked_select", "masked_scatter", "masked_scatter_", "equal"}


class HostReads(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        index = args[1] if name == "__getitem__" and len(args) > 1 else ()
        index = index if isinstance(index, tuple) else (index,)
        boolean_index = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
        if name in READS or boolean_index or (name == "where" and len(args) == 1):
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def batch(seed, B=32, D=16):
    g = torch.Generator().manual_seed(seed)
    fine = torch.arange(B) // 4
    labels = torch.stack([fine, fine // 2, fine // 4], dim=1)
    return F.normalize(torch.randn(B, D, generator=g), dim=1).requires_grad_(True), labels


def engine_loss(recipe, **options):
    """The recipe's loss as the engine builds it, finite checks off as the engine sets them."""
    cfg = load_recipe(recipe, overrides=["model.embedding_size=16"])
    train_labels = np.stack([np.arange(64) // 4, np.arange(64) // 8, np.arange(64) // 16], axis=1)
    loss = build_loss(cfg, train_labels, embedding_size=16)
    loss.check_finite = False
    for k, v in options.items():
        setattr(loss, k, v)
    return loss


def reads_in_one_step(loss, seed=1):
    emb, labels = batch(seed)
    with HostReads() as mode:
        loss(emb, labels).backward()
    return mode.calls


def test_a_training_step_of_the_loss_reads_the_device_once():
    loss = engine_loss("happier_sop")
    first = reads_in_one_step(loss, seed=0)
    later = reads_in_one_step(loss)
    # the widths of the smoothed-rank blocks, read together; the labels were checked at the first call
    assert later == ["tolist"], later
    assert len(first) > len(later)


def test_checking_every_call_reads_more_and_is_the_default():
    loss = engine_loss("happier_sop", check_labels=True)
    reads_in_one_step(loss, seed=0)
    assert len(reads_in_one_step(loss)) > 1
    fresh = build_loss(load_recipe("happier_sop", overrides=["model.embedding_size=16"]),
                       np.stack([np.arange(64) // 4] * 3, axis=1) // [1, 2, 4], embedding_size=16)
    assert fresh.check_labels and fresh.hap.check_labels


def test_the_first_call_still_checks_the_labels_and_the_positives():
    loss = engine_loss("happier_sop")
    emb, labels = batch(0)
    with pytest.raises(ValueError, match="tree"):
        loss(emb, torch.stack([labels[:, 0], torch.arange(32) % 3, labels[:, 2]], dim=1))
    alone = torch.arange(16)[:, None].expand(16, 3)  # 16 classes of one image: no positive
    with pytest.raises(NoPositiveError):
        loss(emb[:16], alone)
    loss(emb, labels)  # a call that returns: the later ones do not check again
    loss(emb[:16], alone)  # not refused any more
