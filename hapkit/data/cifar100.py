"""CIFAR-100 (Krizhevsky, 2009): 2 levels, class (100) -> superclass (20), 32 px, in memory.

Layout (as extracted from cifar-100-python.tar.gz)::

    cifar-100-python/train   test   meta     # python pickles

``train`` / ``test`` hold ``data`` (N, 3072 uint8, channel-major), ``fine_labels`` and
``coarse_labels``; ``meta`` the names. Train and test share their classes (50,000 / 10,000
images); evaluation: same-set protocol on the test split.
"""

from __future__ import annotations

import pickle

import numpy as np

from hapkit.data.base import (
    AnnotationError,
    EvalSet,
    InMemoryImageDataset,
    locate,
    reindex_levels,
    require_file,
)

__all__ = ["load", "eval_sets", "read_pickle", "SUBDIR"]

NAME, TITLE = "cifar100", "CIFAR-100"
SUBDIR = "cifar-100-python"
LEVEL_NAMES = ["class", "superclass"]


def read_pickle(path) -> dict:
    """Unpickle a CIFAR file (keys as str)."""
    try:
        with open(path, "rb") as fh:
            obj = pickle.load(fh, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        raise AnnotationError(path, None, f"not a CIFAR-100 python pickle: {err}") from None
    if not isinstance(obj, dict):
        raise AnnotationError(path, None, f"expected a dict, got {type(obj).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def load(root=None, split: str = "train", transform=None) -> InMemoryImageDataset:
    """Split ``train`` or ``test``, images in memory, labels (class, superclass)."""
    if split not in ("train", "test"):
        raise ValueError(f"{TITLE}: unknown split {split!r}; choose 'train' or 'test'")
    base = locate(root, NAME, TITLE, ["train", "test", "meta"], [SUBDIR])
    where = root if root is not None else base
    path = require_file(base / split, NAME, TITLE, where, "data file")
    batch = read_pickle(path)
    missing = [k for k in ("data", "fine_labels", "coarse_labels") if k not in batch]
    if missing:
        raise AnnotationError(
            path, None, f"missing key(s) {missing} (expected data, fine_labels, coarse_labels)"
        )
    data = np.asarray(batch["data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise AnnotationError(path, None, f"'data' must have shape (N, 3072), got {data.shape}")
    raw = np.stack([np.asarray(batch["fine_labels"]), np.asarray(batch["coarse_labels"])], axis=1)
    if len(raw) != len(data):
        raise AnnotationError(path, None, f"{len(data)} images but {len(raw)} labels")
    meta = read_pickle(base / "meta") if (base / "meta").is_file() else {}
    tables = [dict(enumerate(meta.get(key) or [])) for key in ("fine_label_names", "coarse_label_names")]
    labels, names = reindex_levels(raw, tables)
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return InMemoryImageDataset(
        images, labels, name=NAME, split=split, level_names=LEVEL_NAMES, class_names=names, transform=transform
    )


def eval_sets(root=None, transform=None) -> list[EvalSet]:
    """Same-set protocol on the test split, every level."""
    return [EvalSet("test", load(root, "test", transform))]
