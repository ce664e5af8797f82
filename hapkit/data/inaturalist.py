"""iNaturalist-2018 with the Smooth-AP retrieval split (Brown et al., ECCV 2020).

Layout (``hapkit prepare-data inaturalist --root DIR`` builds it under ``DIR/inaturalist2018``)::

    train2018.json                      # its "categories" hold the taxonomy
    Inat_dataset_splits/Inaturalist_train_set1.txt   Inaturalist_test_set1.txt
    train_val2018/<supercategory>/<category_id>/<file>.jpg

Each split file lists one image path per line. 325,846 train / 136,093 test images with disjoint
species. Two label sets:

- ``hierarchy="base"`` (name "inaturalist"): species + supercategory (the path's folder), 2 levels;
- ``hierarchy="full"`` (name "inaturalist_full"): species, genus, family, order, class, phylum,
  kingdom (7 levels).

Every level is re-indexed 0..n-1 within the split. A taxon is identified by its whole lineage
(kingdom down to it), so two genera that share a name in different families stay two classes and
the labels always form a tree (the reference code keys taxa by name alone).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np

from hapkit.data.base import (
    AnnotationError,
    EvalSet,
    ImageFileDataset,
    check_images_exist,
    locate,
    parse_id,
    require_file,
)

__all__ = ["load", "eval_sets", "read_split_file", "read_taxonomy", "FULL_LEVELS", "SUBDIR"]

TITLES = {"base": "iNaturalist-2018", "full": "iNaturalist-2018 (full hierarchy)"}
NAMES = {"base": "inaturalist", "full": "inaturalist_full"}
SUBDIR = "inaturalist2018"
FULL_LEVELS = ["species", "genus", "family", "order", "class", "phylum", "kingdom"]
BASE_LEVELS = ["species", "supercategory"]
_TAXON_KEYS = ["kingdom", "phylum", "class", "order", "family", "genus", "name"]


def read_split_file(path) -> list[tuple[str, str, int, int]]:
    """Parse a Smooth-AP split list into (path, supercategory, category_id, line number) per image."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            rel = line.strip()
            if not rel:
                continue
            parts = rel.split("/")
            if len(parts) < 4:
                raise AnnotationError(
                    path, lineno,
                    f"expected a path like train_val2018/<supercategory>/<category_id>/<file>.jpg, got {rel!r}",
                )
            category = parse_id(parts[-2], path, lineno, f"the category folder of {rel!r} is not an integer id")
            out.append((rel, parts[-3], category, lineno))
    if not out:
        raise AnnotationError(path, None, "no image listed")
    return out


@lru_cache(maxsize=2)
def _categories(path: str, stamp: tuple) -> dict[int, dict]:
    with open(path, encoding="utf-8") as fh:
        try:
            db = json.load(fh)
        except json.JSONDecodeError as err:
            raise AnnotationError(path, err.lineno, f"invalid JSON: {err.msg}") from None
    cats = db.get("categories") if isinstance(db, dict) else None
    if not isinstance(cats, list) or not cats:
        raise AnnotationError(path, None, "no 'categories' list (the iNaturalist-2018 taxonomy) found")
    table = {}
    for k, cat in enumerate(cats):
        if not isinstance(cat, dict):
            raise AnnotationError(path, None, f"categories[{k}] is {type(cat).__name__}, not a record with an id and taxa")
        missing = [key for key in ["id", *_TAXON_KEYS] if key not in cat]
        if missing:
            raise AnnotationError(path, None, f"categories[{k}] lacks the field(s) {missing}")
        if isinstance(cat["id"], bool) or not isinstance(cat["id"], int):
            raise AnnotationError(path, None, f"categories[{k}] has the id {cat['id']!r}; ids are integers")
        table[cat["id"]] = cat
    return table


def read_taxonomy(path) -> dict[int, dict]:
    """category id -> its record (name, genus, family, order, class, phylum, kingdom, ...)."""
    path = Path(path)
    st = path.stat()  # the parsed file is cached while it is unchanged (train2018.json is large)
    return _categories(str(path), (st.st_mtime_ns, st.st_size))


def load(root=None, split: str = "train", transform=None, hierarchy: str = "base") -> ImageFileDataset:
    """Split ``train`` or ``test`` with the ``base`` (2-level) or ``full`` (7-level) hierarchy."""
    if hierarchy not in TITLES:
        raise ValueError(f"iNaturalist: hierarchy must be 'base' or 'full', got {hierarchy!r}")
    name, title = NAMES[hierarchy], TITLES[hierarchy]
    if split not in ("train", "test"):
        raise ValueError(f"{title}: unknown split {split!r}; choose 'train' or 'test'")
    base = locate(
        root, name, title, ["train2018.json", "Inat_dataset_splits"], [SUBDIR, "Inaturalist", "inaturalist"]
    )
    where = root if root is not None else base
    split_file = base / "Inat_dataset_splits" / f"Inaturalist_{split}_set1.txt"
    require_file(split_file, name, title, where, "split list")
    taxonomy = read_taxonomy(require_file(base / "train2018.json", name, title, where, "taxonomy file"))
    rows = read_split_file(split_file)
    for rel, _, cat, lineno in rows:
        if cat not in taxonomy:
            raise AnnotationError(
                split_file, lineno, f"category id {cat} of {rel!r} is not in {base / 'train2018.json'}"
            )

    cats = [taxonomy[c] for _, _, c, _ in rows]
    # species = the category id; a coarser taxon = the names from the kingdom down to it
    lineages = [[str(cat[k]) for k in _TAXON_KEYS[:-1]] for cat in cats]
    if hierarchy == "full":
        coarse = [["/".join(lin[:depth]) for lin in lineages] for depth in range(6, 0, -1)]  # genus..kingdom
        level_names = FULL_LEVELS
    else:
        coarse = [[sup for _, sup, _, _ in rows]]
        level_names = BASE_LEVELS
    species = np.array([c for _, _, c, _ in rows], dtype=np.int64)
    uniq, inverse = np.unique(species, return_inverse=True)
    labels = np.empty((len(rows), 1 + len(coarse)), dtype=np.int64)
    labels[:, 0] = inverse
    class_names = [[str(taxonomy[int(u)]["name"]) for u in uniq]]
    for c, col in enumerate(coarse, start=1):
        uniq, inverse = np.unique(np.asarray(col), return_inverse=True)
        labels[:, c] = inverse
        class_names.append([u.rsplit("/", 1)[-1] for u in uniq.tolist()])
    paths = [str(base / rel) for rel, _, _, _ in rows]
    check_images_exist(paths, name, title, where)
    return ImageFileDataset(
        paths,
        labels,
        name=name,
        split=split,
        level_names=level_names,
        class_names=class_names,
        transform=transform,
    )


def eval_sets(root=None, transform=None, hierarchy: str = "base") -> list[EvalSet]:
    """Same-set protocol on the test split, every level."""
    return [EvalSet("test", load(root, "test", transform, hierarchy))]
