"""Datasets and transforms from a recipe's ``data`` section: the one place that turns a recipe
into the images a model sees.

``data`` is any object with the fields of :class:`hapkit.training.config.DataConfig` (``dataset``,
``root``, ``transform``, ``train_transform``, ``test_transform``); the training engine, the cached
runs of the notebooks and the command line all build their datasets here, so a change of
transform or of loader options reaches all of them at once.
"""

from __future__ import annotations

import copy
from typing import Mapping

from hapkit.data.base import EvalSet, HierarchicalDataset
from hapkit.data.registry import dataset_info, get_dataset, get_eval_sets
from hapkit.data.transforms import build_transforms

__all__ = ["recipe_transform", "build_split", "build_train_set", "build_eval_sets", "with_transform", "evaluation_split"]


def recipe_transform(data, train: bool):
    """The train (augmenting) or test transform of a recipe's data section."""
    return build_transforms(data.transform, train=train, spec=data.train_transform if train else data.test_transform)


def _root(data, root):
    return root if root is not None else data.root


def build_split(
    data, split: str, *, train: bool = False, root=None, options: Mapping | None = None, transform="recipe"
) -> HierarchicalDataset:
    """Split ``split`` of the recipe's dataset, with its train or test transform (``transform=None``:
    raw images; any other callable replaces the recipe's). ``options`` go to the loader."""
    if transform == "recipe":
        transform = recipe_transform(data, train)
    return get_dataset(data.dataset, root=_root(data, root), split=split, transform=transform, **dict(options or {}))


def build_train_set(data, root=None, options: Mapping | None = None) -> HierarchicalDataset:
    """The training split with the recipe's augmentation."""
    return build_split(data, "train", train=True, root=root, options=options)


def build_eval_sets(data, root=None, options: Mapping | None = None) -> list[EvalSet]:
    """The dataset's evaluation protocol(s) (:func:`hapkit.data.get_eval_sets`) with the test transform."""
    return get_eval_sets(data.dataset, root=_root(data, root), transform=recipe_transform(data, False),
                         **dict(options or {}))


def with_transform(dataset: HierarchicalDataset, transform) -> HierarchicalDataset:
    """A shallow copy of ``dataset`` that shares its images and labels but uses ``transform``."""
    out = copy.copy(dataset)
    out.transform = transform
    return out


def evaluation_split(dataset: str) -> str:
    """The split a trained model is looked at on: ``test`` (classes unseen in training)."""
    splits = dataset_info(dataset).splits
    if "test" in splits:
        return "test"
    raise ValueError(f"dataset {dataset!r} has no 'test' split (splits: {splits}); pass split= explicitly")
