"""Dataset names -> loaders, evaluation protocols and preparation, in one table."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import import_module
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # the table is read by the command line's parser, which must not import torch
    from hapkit.data.base import EvalSet, HierarchicalDataset

__all__ = ["DatasetInfo", "DATASETS", "dataset_names", "dataset_info", "get_dataset", "get_eval_sets"]


@dataclass(frozen=True)
class DatasetInfo:
    """What hapkit knows about a dataset name."""

    name: str
    title: str
    module: str  # submodule of hapkit.data holding `load` and `eval_sets`
    levels: tuple[str, ...]  # level names, finest first
    splits: tuple[str, ...]
    options: dict = field(default_factory=dict)  # fixed keyword arguments of the module's loader
    needs_root: bool = True

    def _fn(self, attr: str) -> Callable:
        return getattr(import_module(f"hapkit.data.{self.module}"), attr)


_DYML_LEVELS = ("fine", "middle", "coarse")
_DYML_SPLITS = ("train",) + tuple(f"{t}_{g}" for g in _DYML_LEVELS for t in ("query", "gallery"))

DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in [
        DatasetInfo(
            "generated", "embedded generated shapes", "generated", ("variant", "shape", "family"),
            ("train", "test"), needs_root=False,
        ),
        DatasetInfo("sop", "Stanford Online Products", "sop", ("product", "category"), ("train", "test")),
        DatasetInfo(
            "inaturalist", "iNaturalist-2018 (base hierarchy)", "inaturalist", ("species", "supercategory"),
            ("train", "test"), {"hierarchy": "base"},
        ),
        DatasetInfo(
            "inaturalist_full", "iNaturalist-2018 (full 7-level taxonomy)", "inaturalist",
            ("species", "genus", "family", "order", "class", "phylum", "kingdom"), ("train", "test"),
            {"hierarchy": "full"},
        ),
        DatasetInfo("dyml_vehicle", "DyML-Vehicle", "dyml", _DYML_LEVELS, _DYML_SPLITS, {"variant": "vehicle"}),
        DatasetInfo("dyml_animal", "DyML-Animal", "dyml", _DYML_LEVELS, _DYML_SPLITS, {"variant": "animal"}),
        DatasetInfo(
            "dyml_product", "DyML-Product", "dyml", _DYML_LEVELS, _DYML_SPLITS + ("test",), {"variant": "product"}
        ),
        DatasetInfo("cub", "CUB-200-2011", "cub", ("species",), ("train", "test"), {"hierarchy": False}),
        DatasetInfo(
            "cub_hierarchy", "CUB-200-2011 (order / family / species)", "cub", ("species", "family", "order"),
            ("train", "test"), {"hierarchy": True},
        ),
        DatasetInfo("cifar100", "CIFAR-100", "cifar100", ("class", "superclass"), ("train", "test")),
        DatasetInfo("roxford5k", "Revisited Oxford (ROxford5k)", "revisited", ("landmark",), ("query", "gallery"),
                    {"city": "roxford5k"}),
        DatasetInfo("rparis6k", "Revisited Paris (RParis6k)", "revisited", ("landmark",), ("query", "gallery"),
                    {"city": "rparis6k"}),
        DatasetInfo("revisitop1m", "R1M distractors (revisitop1m)", "revisited", ("distractor",), ("distractors",),
                    {"city": "revisitop1m"}),
        DatasetInfo("sfm120k", "retrieval-SfM-120k", "sfm120k", ("cluster",), ("train",)),
        DatasetInfo("gldv2", "Google Landmarks v2 (clean)", "gldv2", ("landmark",), ("train",), {"hierarchy": False}),
        DatasetInfo(
            "gldv2_hier", "H-GLDv2 (hierarchical Google Landmarks v2)", "gldv2",
            ("landmark", "hierarchical_label", "natural_or_human_made"), ("train",), {"hierarchy": True},
        ),
    ]
}


def dataset_names() -> list[str]:
    return list(DATASETS)


def dataset_info(name: str) -> DatasetInfo:
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}") from None


def get_dataset(
    name: str, root=None, split: str = "train", transform: Callable | None = None, **options
) -> HierarchicalDataset:
    """Load split ``split`` of dataset ``name`` (see :func:`dataset_names`).

    ``root``: where the dataset was prepared (``hapkit prepare-data NAME --root DIR``); either
    that directory or the dataset's own folder inside it. Default ``$HAPKIT_DATA`` or ``./data``;
    for "generated" the cache directory (default ``$HAPKIT_CACHE`` or ``~/.cache/hapkit``).
    Extra ``options`` go to the loader (e.g. ``images_per_class=8`` for "generated").
    """
    info = dataset_info(name)
    if split not in info.splits:
        hint = ""
        if info.module == "dyml":
            hint = " (use hapkit.data.get_eval_sets for its query/gallery test sets)"
        elif info.module in ("sfm120k", "gldv2"):
            hint = " (it is evaluated on roxford5k / rparis6k: use hapkit.data.get_eval_sets)"
        raise ValueError(f"dataset {name!r} has no split {split!r}; choose one of {info.splits}{hint}")
    return info._fn("load")(root=root, split=split, transform=transform, **info.options, **options)


def get_eval_sets(name: str, root=None, transform: Callable | None = None, **options) -> list[EvalSet]:
    """The evaluation protocol(s) of dataset ``name`` as a list of :class:`EvalSet`.

    Same-set protocol on the test split for every dataset except DyML-Vehicle / Animal, which give
    one query/gallery set per level (fine, middle, coarse; see :class:`EvalSet`). DyML-Product
    does the same when its ``bmk_*`` folders exist, else evaluates its ``mini-bmk_all_in_one``
    set in the same-set protocol at every level, as the HAPPIER code does.

    Landmarks: ROxford5k / RParis6k give one query/gallery set with its ground truth (``gnd``;
    ``distractors=True`` adds R1M); the landmark training sets (sfm120k, gldv2, gldv2_hier) are
    evaluated on both, prepared under the same root.
    """
    info = dataset_info(name)
    return info._fn("eval_sets")(root=root, transform=transform, **info.options, **options)
