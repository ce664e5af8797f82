"""Google Landmarks v2, clean training set (Weyand et al., CVPR 2020), flat or with SupRank's
hierarchy (H-GLDv2, Ramzi et al., TPAMI).

Layout (the public files of cvdfoundation/google-landmark)::

    gldv2/train_clean.csv                      # landmark_id,images (space-separated image ids)
    gldv2/train_label_to_hierarchical.csv      # landmark_id,category,supercategory,
                                               #   hierarchical_label,natural_or_human_made
    gldv2/train/<a>/<b>/<c>/<id>.jpg           # a, b, c: the first three characters of the id

- ``gldv2``: one level, the landmark (81,313 landmarks, 1,580,470 images in the public file).
- ``gldv2_hier``: three levels, landmark -> hierarchical_label -> natural_or_human_made.
  Landmarks without a hierarchical label are dropped, as in SupRank (its config counts 46,593
  landmarks, 970,981 images and 78 hierarchical labels: :data:`SUPRANK_COUNTS`, the check for a
  real copy). SupRank's own code reads the same hierarchy from its
  ``train_label_to_subcategory_with_clusters.csv`` under the older column names ``cluster`` and
  ``overall_cluster``; such a file is read too when the public one is absent.

The images may also sit under ``images/train/`` (SupRank's layout). Training sets are evaluated
on ROxford5k and RParis6k prepared under the same root (:func:`eval_sets`).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from hapkit.data.base import AnnotationError, ImageFileDataset, check_images_exist, locate, reindex_levels, require_file

__all__ = ["load", "eval_sets", "read_train_clean", "read_hierarchy", "image_path", "SUPRANK_COUNTS", "HIERARCHY_FILES"]

SUBDIR = "gldv2"
TITLES = {"gldv2": "Google Landmarks v2 (clean)", "gldv2_hier": "H-GLDv2 (hierarchical Google Landmarks v2)"}
TRAIN_FILE = "train_clean.csv"
# file -> (column of level 1, column of level 2); the public file first
HIERARCHY_FILES = {
    "train_label_to_hierarchical.csv": ("hierarchical_label", "natural_or_human_made"),
    "train_label_to_subcategory_with_clusters.csv": ("cluster", "overall_cluster"),
}
LEVEL_NAMES = {False: ["landmark"], True: ["landmark", "hierarchical_label", "natural_or_human_made"]}
SUPRANK_COUNTS = {"landmarks": 46_593, "images": 970_981, "hierarchical_labels": 78}


def image_path(image_id: str) -> str:
    """Relative path of a GLDv2 image: ``<a>/<b>/<c>/<id>.jpg``."""
    return f"{image_id[0]}/{image_id[1]}/{image_id[2]}/{image_id}.jpg"


def _rows(path, wanted: tuple[str, ...]):
    """(line number, row dict) of a csv file whose header holds the ``wanted`` columns."""
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        missing = [c for c in wanted if c not in header]
        if missing:
            raise AnnotationError(path, 1, f"expected the columns {', '.join(wanted)}; missing {missing} in the header {header}")
        for row in reader:
            yield reader.line_num, row


def read_train_clean(path) -> list[tuple[int, int, list[str]]]:
    """Rows of ``train_clean.csv`` as (line number, landmark id, image ids)."""
    out = []
    for line, row in _rows(path, ("landmark_id", "images")):
        try:
            landmark = int(row["landmark_id"])
        except (TypeError, ValueError):
            raise AnnotationError(path, line, f"landmark_id must be an integer, got {row['landmark_id']!r}") from None
        ids = (row["images"] or "").split()
        bad = next((i for i in ids if len(i) < 3 or not i.isalnum()), None)
        if not ids or bad is not None:
            raise AnnotationError(path, line, f"'images' must be space-separated image ids, got {(row['images'] or '')[:60]!r}")
        out.append((line, landmark, ids))
    if not out:
        raise AnnotationError(path, None, "no landmark listed")
    return out


def read_hierarchy(path) -> dict[int, tuple[str, str]]:
    """``{landmark_id: (hierarchical label, natural or human-made)}`` from the hierarchy csv, for
    the landmarks that have one (rows with an empty label are skipped). Either the public column
    names or SupRank's (``cluster``, ``overall_cluster``)."""
    columns = HIERARCHY_FILES.get(Path(path).name)
    with open(path, encoding="utf-8", newline="") as fh:
        header = next(csv.reader(fh), [])
    if columns is None or not set(columns) <= set(header):
        columns = next((c for c in HIERARCHY_FILES.values() if set(c) <= set(header)), HIERARCHY_FILES["train_label_to_hierarchical.csv"])
    mid, top = columns
    table: dict[int, tuple[str, str]] = {}
    parent: dict[str, tuple[str, int]] = {}  # hierarchical label -> (its coarse label, first line)
    for line, row in _rows(path, ("landmark_id", mid, top)):
        try:
            landmark = int(row["landmark_id"])
        except (TypeError, ValueError):
            raise AnnotationError(path, line, f"landmark_id must be an integer, got {row['landmark_id']!r}") from None
        label, coarse = (row[mid] or "").strip(), (row[top] or "").strip()
        if not label:
            continue  # no hierarchical label: the landmark is left out of H-GLDv2
        if not coarse:
            raise AnnotationError(path, line, f"landmark {landmark} has the {mid} {label!r} but no {top}")
        if landmark in table and table[landmark] != (label, coarse):
            raise AnnotationError(path, line, f"landmark {landmark} is listed again with another label: {(label, coarse)} vs {table[landmark]}")
        known = parent.setdefault(label, (coarse, line))
        if known[0] != coarse:
            raise AnnotationError(
                path, line, f"the {mid} {label!r} is under {top} {coarse!r} here but {known[0]!r} on line {known[1]}: not a tree"
            )
        table[landmark] = (label, coarse)
    return table


def _base(root, name):
    return locate(root, name, TITLES[name], [TRAIN_FILE], [SUBDIR])


def load(root=None, split: str = "train", transform=None, hierarchy: bool = True) -> ImageFileDataset:
    """The clean training set: ``hierarchy=False`` one level (landmark), ``True`` the three
    levels of H-GLDv2 (landmarks without a hierarchical label dropped). Attribute ``dropped``:
    the landmarks and images left out."""
    name = "gldv2_hier" if hierarchy else "gldv2"
    title = TITLES[name]
    if split != "train":
        raise ValueError(f"{title}: unknown split {split!r}; it has only 'train' (evaluate on roxford5k / rparis6k)")
    base = _base(root, name)
    where = root if root is not None else base.parent
    rows = read_train_clean(require_file(base / TRAIN_FILE, name, title, where))
    table = None
    if hierarchy:
        found = next((base / f for f in HIERARCHY_FILES if (base / f).is_file()), None)
        table = read_hierarchy(found or require_file(base / next(iter(HIERARCHY_FILES)), name, title, where, "hierarchy file"))
    ids, raw, dropped = [], [], {"landmarks": 0, "images": 0}
    for _, landmark, images in rows:
        if table is not None and landmark not in table:
            dropped["landmarks"] += 1
            dropped["images"] += len(images)
            continue
        ids += images
        raw += [(landmark, *table[landmark]) if table is not None else (landmark,)] * len(images)
    if not ids:
        raise AnnotationError(base / TRAIN_FILE, None, "no landmark of the file has a hierarchical label")
    labels, names = reindex_levels(np.array(raw, dtype=object), [None] * len(raw[0]))
    images_dir = base / "train" if (base / "train").is_dir() or not (base / "images" / "train").is_dir() else base / "images" / "train"
    paths = [str(images_dir / image_path(i)) for i in ids]
    check_images_exist(paths, name, title, where)
    ds = ImageFileDataset(paths, labels, name=name, split=split, level_names=LEVEL_NAMES[hierarchy], class_names=names,
                          transform=transform)
    ds.dropped = dropped
    return ds


def eval_sets(root=None, transform=None, hierarchy: bool = True, distractors: bool = False):
    """ROxford5k and RParis6k with their ground truth (SupRank's evaluation of H-GLDv2)."""
    from hapkit.data.revisited import landmark_benchmarks

    return landmark_benchmarks(root, transform, distractors)
