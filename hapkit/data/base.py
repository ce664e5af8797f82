"""The dataset base class shared by every loader, the evaluation-set record and the data errors.

A :class:`HierarchicalDataset` holds an (N, L) int64 label array (finest level in column 0, each
level re-indexed to 0..n-1) and yields ``(image, labels_row)`` pairs. Subclasses only say how to
load image ``i``: :class:`ImageFileDataset` opens files lazily with PIL (real datasets),
:class:`InMemoryImageDataset` serves a uint8 array held in memory (the generated dataset,
CIFAR-100).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from hapkit.errors import HapkitError
from hapkit.hierarchy import as_label_tensor

__all__ = [
    "HierarchicalDataset",
    "ImageFileDataset",
    "InMemoryImageDataset",
    "EvalSet",
    "DataError",
    "DatasetNotFoundError",
    "AnnotationError",
    "ImageReadError",
    "parse_id",
    "reindex_levels",
    "default_cache_dir",
    "default_data_root",
    "prepare_command",
    "spread_indices",
    "spread_subset",
    "own_copies",
]


class DataError(HapkitError, RuntimeError):
    """Base class of the errors raised by :mod:`hapkit.data`."""


class DatasetNotFoundError(DataError, FileNotFoundError):
    """A dataset (or part of it) is missing on disk; the message says how to prepare it."""


class AnnotationError(DataError, ValueError):
    """An annotation file is malformed; the message names the file and the line."""

    def __init__(self, path, line: int | None, problem: str):
        where = f"{path}, line {line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {problem}")
        self.path = Path(str(path))
        self.line = line


class ImageReadError(DataError, OSError):
    """An image file exists in the annotations but cannot be decoded."""


def parse_id(text: str, path, line: int | None, not_integer: str) -> int:
    """The integer id ``text`` of an annotation file, or an :class:`AnnotationError` at ``path``,
    ``line``: ``not_integer`` when it is not an integer, another when it does not fit the int64
    label arrays."""
    try:
        value = int(text)
    except ValueError:
        raise AnnotationError(path, line, not_integer) from None
    if not -(2**63) <= value < 2**63:
        raise AnnotationError(path, line, f"id {value} does not fit in 64 bits; ids must lie in [-2**63, 2**63)")
    return value


def prepare_command(name: str, root) -> str:
    """The shell command that downloads / lays out dataset ``name`` under ``root``."""
    return f"hapkit prepare-data {name} --root {root}"


def default_cache_dir() -> Path:
    """Cache directory of the generated dataset: ``$HAPKIT_CACHE`` or ``~/.cache/hapkit``."""
    env = os.environ.get("HAPKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hapkit"


def default_data_root() -> Path:
    """Root of the real datasets when none is given: ``$HAPKIT_DATA`` or ``./data``."""
    return Path(os.environ.get("HAPKIT_DATA", "data")).expanduser()


def reindex_levels(
    raw: np.ndarray, names: Sequence[dict] | None = None
) -> tuple[np.ndarray, list[list[str]] | None]:
    """Map each column of ``raw`` (N, L) to 0..n-1 (sorted order of the raw values).

    ``names`` is an optional list (one dict per level) from raw value to a readable name; the
    result lists the names in the new index order. Returns (labels int64 (N, L), class_names).
    """
    raw = np.asarray(raw)
    if raw.ndim == 1:
        raw = raw[:, None]
    labels = np.empty(raw.shape, dtype=np.int64)
    class_names: list[list[str]] | None = [] if names is not None else None
    for c in range(raw.shape[1]):
        uniq, inverse = np.unique(raw[:, c], return_inverse=True)
        labels[:, c] = inverse.reshape(-1)
        if class_names is not None:
            table = names[c] if names[c] is not None else {}
            keys = [u.item() if isinstance(u, np.generic) else u for u in uniq]
            class_names.append([str(table.get(k, k)) for k in keys])
    return labels, class_names


def _to_float_image(image) -> torch.Tensor:
    """PIL image or uint8 CxHxW tensor -> float32 CxHxW tensor in [0, 1]."""
    if isinstance(image, Image.Image):
        arr = np.asarray(image.convert("RGB"), dtype=np.uint8)
        image = torch.from_numpy(arr.copy()).permute(2, 0, 1)
    if image.dtype == torch.uint8:
        return image.float().div_(255.0)
    return image.float()


class HierarchicalDataset(torch.utils.data.Dataset):
    """Images with tree labels, finest level first.

    Attributes: ``labels`` (np.ndarray (N, L) int64, each level re-indexed 0..n-1),
    ``level_names`` (finest first), ``class_names`` (one list of names per level, or None),
    ``num_levels``, ``name``, ``split``, ``transform``.

    ``dataset[i]`` returns ``(image, labels_row)``: the image (PIL image or uint8 CxHxW tensor)
    passed through ``transform``, or without a transform a float32 CxHxW tensor in [0, 1]; and the
    labels of row i as a LongTensor of shape (L,).
    """

    def __init__(
        self,
        labels,
        *,
        name: str,
        split: str,
        level_names: Sequence[str],
        class_names: Sequence[Sequence[str]] | None = None,
        transform: Callable | None = None,
    ):
        labels = as_label_tensor(labels, name=f"{name} ({split}) labels").numpy()
        if len(level_names) != labels.shape[1]:
            raise ValueError(
                f"{name}: {len(level_names)} level name(s) {list(level_names)} for labels with "
                f"{labels.shape[1]} column(s)"
            )
        if class_names is not None:
            if len(class_names) != labels.shape[1]:
                raise ValueError(f"{name}: class_names needs one list per level ({labels.shape[1]})")
            for c, names in enumerate(class_names):
                if len(labels) and len(names) <= int(labels[:, c].max()):
                    raise ValueError(
                        f"{name}: level {c} has labels up to {int(labels[:, c].max())} but only "
                        f"{len(names)} class name(s)"
                    )
            class_names = [list(n) for n in class_names]
        self.labels = np.ascontiguousarray(labels, dtype=np.int64)
        self.name = name
        self.split = split
        self.level_names = list(level_names)
        self.class_names = class_names
        self.transform = transform

    @property
    def num_levels(self) -> int:
        return self.labels.shape[1]

    @property
    def num_classes(self) -> list[int]:
        """Number of distinct labels at each level, finest first."""
        return [int(np.unique(self.labels[:, c]).size) for c in range(self.num_levels)]

    def __len__(self) -> int:
        return self.labels.shape[0]

    def load_image(self, index: int):
        """The raw image of row ``index``: a PIL RGB image or a uint8 CxHxW tensor."""
        raise NotImplementedError

    def __getitem__(self, index: int):
        image = self.load_image(index)
        image = self.transform(image) if self.transform is not None else _to_float_image(image)
        return image, torch.from_numpy(self.labels[index].copy())

    def __repr__(self) -> str:
        counts = ", ".join(f"{n}={k}" for n, k in zip(self.level_names, self.num_classes))
        return (
            f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, "
            f"images={len(self)}, classes: {counts})"
        )


class ImageFileDataset(HierarchicalDataset):
    """Images read lazily from files with PIL (converted to RGB)."""

    def __init__(self, paths: Sequence, labels, **kwargs):
        super().__init__(labels, **kwargs)
        if len(paths) != len(self.labels):
            raise ValueError(f"{self.name}: {len(paths)} paths for {len(self.labels)} label rows")
        # strings, not Path objects: cheaper to pickle into DataLoader workers
        self.paths = [os.fspath(p) for p in paths]

    def load_image(self, index: int) -> Image.Image:
        path = self.paths[index]
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except FileNotFoundError as err:
            raise ImageReadError(
                f"{self.name} ({self.split}): image {path} is listed in the annotations but does "
                f"not exist; the dataset is incomplete"
            ) from err
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise ImageReadError(f"{self.name} ({self.split}): cannot read image {path}: {err}") from err


class InMemoryImageDataset(HierarchicalDataset):
    """Images held in memory as a uint8 array of shape (N, H, W, 3)."""

    def __init__(self, images: np.ndarray, labels, **kwargs):
        super().__init__(labels, **kwargs)
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"{self.name}: images must be a uint8 array (N, H, W, 3), got {images.dtype} "
                f"{images.shape}"
            )
        if len(images) != len(self.labels):
            raise ValueError(f"{self.name}: {len(images)} images for {len(self.labels)} label rows")
        self.images = images

    def load_image(self, index: int) -> torch.Tensor:
        # a CxHxW view of the stored HxWxC row: no copy until the transform needs one
        return torch.from_numpy(self.images[index]).permute(2, 0, 1)


def spread_indices(n: int, max_items: int | None) -> np.ndarray:
    """``max_items`` row indices evenly spread over ``range(n)`` (all of them when None or >= n).

    Datasets are stored class by class, so an even spread keeps every class with about the same
    number of items, unlike taking the first rows.
    """
    if max_items is None or max_items >= n:
        return np.arange(n)
    if max_items < 1:
        raise ValueError(f"max_items must be at least 1, got {max_items}")
    return np.unique(np.linspace(0, n - 1, int(max_items)).round().astype(np.int64))


def spread_subset(dataset, max_items: int | None):
    """``max_items`` items of ``dataset`` evenly spread (:func:`spread_indices`), as a
    ``torch.utils.data.Subset`` that keeps a ``labels`` array; the dataset itself when all fit."""
    idx = spread_indices(len(dataset), max_items)
    if len(idx) == len(dataset):
        return dataset
    sub = torch.utils.data.Subset(dataset, idx.tolist())
    labels = np.asarray(dataset.labels)
    sub.labels = (labels[:, None] if labels.ndim == 1 else labels)[idx]
    return sub


@dataclass
class EvalSet:
    """One evaluation protocol of a dataset.

    - ``gallery is None``: same-set protocol, every query is ranked against all other images of
      ``query``; ``column is None`` means every label column is evaluated.
    - ``gallery`` given: query/gallery protocol. DyML's benchmarks are of this kind, one set per
      level of the hierarchy (``column`` = the label column of the training hierarchy it probes:
      0 fine, 1 middle, 2 coarse). Their csv files carry one label per image, so
      ``query.labels`` and ``gallery.labels`` have a SINGLE column (the label of that level,
      re-indexed jointly over query and gallery): evaluate column :attr:`label_column`, not
      column ``column``.
    - ``gallery_contains_queries``: the gallery also holds the query images (DyML's benchmark
      galleries do). Each query's own copy must leave its ranking: the reference evaluation
      drops each query's top-ranked gallery item, taken to be the query itself; hapkit removes
      the gallery item with the query's file name (:meth:`gallery_exclude`), which agrees
      whenever the copy ranks first.
    - ``gnd`` given: a landmark benchmark with per-query ground truth (revisited Oxford / Paris).
      ``query`` holds the query images cropped to their box, ``gallery`` the database in the
      ground truth's order, and ``gnd`` one dict per query with the gallery index lists
      ``easy``, ``hard`` and ``junk``; evaluate it with :func:`hapkit.evaluate.evaluate_revisited`
      (the labels are not used). ``distractors`` (optional): images related to no query that
      only extend the gallery (the R1M distractors).
    """

    name: str
    query: HierarchicalDataset
    gallery: HierarchicalDataset | None = None
    column: int | None = None
    gallery_contains_queries: bool = False
    gnd: list[dict] | None = None
    distractors: HierarchicalDataset | None = None

    @property
    def label_column(self) -> int | None:
        """Column of ``query.labels`` holding the evaluated level (None: every column)."""
        if self.column is None:
            return None
        return 0 if self.query.num_levels == 1 else self.column

    def gallery_exclude(self) -> np.ndarray | None:
        """For each query, the gallery index of its own copy (-1: none), found by file name, when
        ``gallery_contains_queries``; None otherwise."""
        if not self.gallery_contains_queries or self.gallery is None:
            return None
        return own_copies(getattr(self.query, "paths", None), getattr(self.gallery, "paths", None), self.name)


def own_copies(query_paths, gallery_paths, what: str = "eval set") -> np.ndarray:
    """Index in ``gallery_paths`` of the file with the same name as each query (-1: none)."""
    if query_paths is None or gallery_paths is None:
        raise ValueError(f"{what}: the gallery holds the queries, but the datasets have no .paths to match them by")
    index: dict[str, int] = {}
    for i, p in enumerate(gallery_paths):
        name = os.path.basename(p)
        if name in index:
            raise ValueError(f"{what}: file name {name!r} appears twice in the gallery; the query copies are ambiguous")
        index[name] = i
    return np.array([index.get(os.path.basename(p), -1) for p in query_paths], dtype=np.int64)


def locate(root, name: str, title: str, markers: Sequence[str], subdirs: Sequence[str] = ()) -> Path:
    """The directory of dataset ``name``: ``root`` itself or ``root/<subdir>``, whichever holds
    one of ``markers`` (relative paths). Raises :class:`DatasetNotFoundError` otherwise."""
    root = Path(root).expanduser() if root is not None else default_data_root()
    candidates = [root] + [root / s for s in subdirs]
    for cand in candidates:
        if any((cand / m).exists() for m in markers):
            return cand
    looked = ", ".join(str(c) for c in candidates)
    wanted = " or ".join(markers)
    raise DatasetNotFoundError(
        f"{title} not found: looked for {wanted} in {looked}. Prepare it with "
        f"`{prepare_command(name, root)}` (or pass root= the folder that holds it)."
    )


def require_file(path, name: str, title: str, root, what: str = "annotation file") -> Path:
    """``path`` if it exists, else a :class:`DatasetNotFoundError` naming it and the fix."""
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(
            f"{title} is incomplete: {what} {path} is missing. Prepare it with "
            f"`{prepare_command(name, root)}`."
        )
    return path


def check_images_exist(paths: Sequence[str], name: str, title: str, root, sample: int = 16) -> None:
    """Check that a spread-out sample of image files exists (a full check would stat every file).

    Raises :class:`DatasetNotFoundError` (an incomplete extraction, a wrong root) naming the
    missing files and the command that prepares the dataset.
    """
    if not len(paths):
        return
    picks = np.unique(np.linspace(0, len(paths) - 1, num=min(sample, len(paths))).astype(int))
    missing = [paths[i] for i in picks if not os.path.exists(paths[i])]
    if missing:
        raise DatasetNotFoundError(
            f"{title} is incomplete: {len(missing)} of {len(picks)} sampled images are missing, "
            f"e.g. {missing[0]}. Prepare it with `{prepare_command(name, root)}`."
        )
