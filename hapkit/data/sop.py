"""Stanford Online Products (Song et al., CVPR 2016): 2 levels, product -> category.

Layout (as extracted from Stanford_Online_Products.zip)::

    Stanford_Online_Products/
        Ebay_train.txt   Ebay_test.txt     # "image_id class_id super_class_id path", 1-based ids
        bicycle_final/<file>.JPG  ...      # 12 "<category>_final" folders

59,551 train images of 11,318 products, 60,502 test images of 11,316 other products; both share
the 12 categories. Evaluation: same-set protocol on the test split.
"""

from __future__ import annotations

from pathlib import Path

from hapkit.data.base import (
    AnnotationError,
    EvalSet,
    ImageFileDataset,
    check_images_exist,
    locate,
    parse_id,
    reindex_levels,
    require_file,
)

__all__ = ["load", "eval_sets", "read_ebay_file", "SUBDIR"]

NAME, TITLE = "sop", "Stanford Online Products"
SUBDIR = "Stanford_Online_Products"
LEVEL_NAMES = ["product", "category"]
_HEADER = ["image_id", "class_id", "super_class_id", "path"]


def read_ebay_file(path) -> tuple[list[str], list[int], list[int]]:
    """Parse an ``Ebay_{train,test}.txt`` file into (relative paths, class ids, super-class ids)."""
    paths, classes, supers = [], [], []
    with open(path, encoding="utf-8") as fh:
        header = fh.readline().split()
        if header != _HEADER:
            raise AnnotationError(
                path, 1, f"expected the header {' '.join(_HEADER)!r}, got {' '.join(header)!r}"
            )
        for lineno, line in enumerate(fh, start=2):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 4:
                raise AnnotationError(
                    path,
                    lineno,
                    f"expected 4 space-separated fields ({' '.join(_HEADER)}), got {len(fields)}: "
                    f"{line.strip()!r}",
                )
            not_int = f"class_id and super_class_id must be integers: {line.strip()!r}"
            class_id, super_id = (parse_id(f, path, lineno, not_int) for f in fields[1:3])
            paths.append(fields[3])
            classes.append(class_id)
            supers.append(super_id)
    if not paths:
        raise AnnotationError(path, None, "no image listed")
    return paths, classes, supers


def load(root=None, split: str = "train", transform=None) -> ImageFileDataset:
    """Split ``train`` or ``test``; labels (product, category) re-indexed 0..n-1 within the split."""
    if split not in ("train", "test"):
        raise ValueError(f"{TITLE}: unknown split {split!r}; choose 'train' or 'test'")
    base = locate(root, NAME, TITLE, ["Ebay_train.txt", "Ebay_test.txt"], [SUBDIR])
    ann = require_file(base / f"Ebay_{split}.txt", NAME, TITLE, root if root is not None else base)
    rel, classes, supers = read_ebay_file(ann)
    # category name = image folder without its "_final" suffix
    super_names = {}
    for p, s in zip(rel, supers):
        super_names.setdefault(s, Path(p).parts[0].removesuffix("_final"))
    labels, names = reindex_levels(list(zip(classes, supers)), [None, super_names])
    paths = [str(base / p) for p in rel]
    check_images_exist(paths, NAME, TITLE, root if root is not None else base)
    return ImageFileDataset(
        paths, labels, name=NAME, split=split, level_names=LEVEL_NAMES, class_names=names, transform=transform
    )


def eval_sets(root=None, transform=None) -> list[EvalSet]:
    """Same-set protocol on the test split, every level."""
    return [EvalSet("test", load(root, "test", transform))]
