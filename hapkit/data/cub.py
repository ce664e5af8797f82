"""CUB-200-2011 (Wah et al., 2011): flat species labels, or species -> family -> order.

Layout (as extracted from CUB_200_2011.tgz)::

    CUB_200_2011/
        images.txt               # "<image_id> <relative path>"
        image_class_labels.txt   # "<image_id> <class_id>"
        classes.txt              # "<class_id> <NNN.Name>"
        images/<NNN.Name>/<file>.jpg

Retrieval split (not the archive's train_test_split.txt): classes 1-100 train (5,864 images),
101-200 test (5,924 images).

The archive has no taxonomy. The 3-level hierarchy (order / family / species, used by SupRank)
comes from ``cub_taxonomy.csv`` shipped beside this module, compiled for hapkit from the
current AOS/IOC classification (13 orders, 37 families): one row ``class,family,order`` per CUB
class name. Another mapping in the same format can be given with ``taxonomy=PATH``.
"""

from __future__ import annotations

import csv
from importlib import resources
from pathlib import Path

import numpy as np

from hapkit.data.base import (
    AnnotationError,
    DataError,
    EvalSet,
    ImageFileDataset,
    check_images_exist,
    locate,
    parse_id,
    require_file,
)

__all__ = ["load", "eval_sets", "read_id_file", "read_taxonomy", "SUBDIR"]

NAME, TITLE = "cub", "CUB-200-2011"
SUBDIR = "CUB_200_2011"
TRAIN_CLASSES = range(1, 101)


def read_id_file(path) -> dict[int, str]:
    """Parse a CUB ``<id> <value>`` file (images.txt, classes.txt, image_class_labels.txt)."""
    out: dict[int, str] = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            fields = line.split()
            if len(fields) != 2:
                raise AnnotationError(path, lineno, f"expected '<id> <value>', got {line.strip()!r}")
            try:
                key = int(fields[0])
            except ValueError:
                raise AnnotationError(path, lineno, f"id {fields[0]!r} is not an integer") from None
            if key in out:
                raise AnnotationError(path, lineno, f"id {key} appears twice")
            out[key] = fields[1]
    if not out:
        raise AnnotationError(path, None, "empty file")
    return out


def _key(class_name: str) -> str:
    """'001.Black_footed_Albatross' -> 'black_footed_albatross' (matching ignores the number)."""
    return class_name.split(".", 1)[-1].strip().lower()


def read_taxonomy(path=None) -> dict[str, tuple[str, str]]:
    """class-name key -> (family, order), from ``path`` or the packaged ``cub_taxonomy.csv``."""
    source = resources.files("hapkit.data").joinpath("cub_taxonomy.csv") if path is None else Path(path)
    if path is not None and not Path(path).is_file():
        raise DataError(f"CUB taxonomy file {path} does not exist (expected a csv 'class,family,order')")
    out: dict[str, tuple[str, str]] = {}
    with source.open(encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or [h.strip().lower() for h in header] != ["class", "family", "order"]:
            raise AnnotationError(source, 1, f"expected the header 'class,family,order', got {header}")
        for lineno, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != 3 or not all(x.strip() for x in row):
                raise AnnotationError(source, lineno, f"expected 'class,family,order', got {row}")
            out[_key(row[0])] = (row[1].strip(), row[2].strip())
    return out


def load(
    root=None, split: str = "train", transform=None, hierarchy: bool = False, taxonomy=None
) -> ImageFileDataset:
    """Split ``train`` (classes 1-100) or ``test`` (101-200); 1 level, or 3 with ``hierarchy``."""
    name = "cub_hierarchy" if hierarchy else NAME
    title = TITLE + (" (order / family / species)" if hierarchy else "")
    if split not in ("train", "test"):
        raise ValueError(f"{title}: unknown split {split!r}; choose 'train' or 'test'")
    base = locate(root, name, title, ["images.txt"], [SUBDIR])
    where = root if root is not None else base
    images = read_id_file(require_file(base / "images.txt", name, title, where))
    class_file = require_file(base / "image_class_labels.txt", name, title, where)
    image_class = {
        k: parse_id(v, class_file, None, f"image {k} has the class id {v!r}, not an integer")
        for k, v in read_id_file(class_file).items()
    }
    classes = read_id_file(require_file(base / "classes.txt", name, title, where))
    if set(images) != set(image_class):
        odd = sorted(set(images) ^ set(image_class))[0]
        raise AnnotationError(class_file, None, f"image ids differ from images.txt (e.g. id {odd})")

    keep = [i for i in sorted(images) if (image_class[i] in TRAIN_CLASSES) == (split == "train")]
    species = np.array([image_class[i] for i in keep], dtype=np.int64)
    unknown = sorted(set(species.tolist()) - set(classes))
    if unknown:
        raise AnnotationError(class_file, None, f"class id {unknown[0]} is not listed in classes.txt")
    uniq, inverse = np.unique(species, return_inverse=True)
    columns = [inverse]
    names = [[classes[int(u)] for u in uniq]]
    level_names = ["species"]
    if hierarchy:
        tax = read_taxonomy(taxonomy)
        missing = [classes[int(u)] for u in uniq if _key(classes[int(u)]) not in tax]
        if missing:
            where_tax = taxonomy or "the packaged cub_taxonomy.csv"
            raise DataError(
                f"{title}: class {missing[0]!r} (and {len(missing) - 1} more) has no family/order in "
                f"{where_tax}; pass taxonomy=<csv with class,family,order rows>"
            )
        for pos, what in ((0, "family"), (1, "order")):
            col = np.array([tax[_key(classes[int(s)])][pos] for s in species])
            u, inv = np.unique(col, return_inverse=True)
            columns.append(inv)
            names.append(u.tolist())
            level_names.append(what)
    labels = np.stack(columns, axis=1)
    paths = [str(base / "images" / images[i]) for i in keep]
    check_images_exist(paths, name, title, where)
    return ImageFileDataset(
        paths, labels, name=name, split=split, level_names=level_names, class_names=names, transform=transform
    )


def eval_sets(root=None, transform=None, hierarchy: bool = False, taxonomy=None) -> list[EvalSet]:
    """Same-set protocol on the test classes (101-200), every level."""
    return [EvalSet("test", load(root, "test", transform, hierarchy, taxonomy))]
