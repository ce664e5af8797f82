"""DyML-Vehicle / Animal / Product (Sun et al., "Dynamic Metric Learning", CVPR 2021): 3 levels.

Layout of each dataset folder (``dyml_vehicle``, ``dyml_animal``, ``dyml_product``)::

    train/label.csv   train/imgs/<fname>                 # rows: fname, coarse, middle, fine
    bmk_{fine,middle,coarse}/{query,gallery}.csv         # rows: fname, label
    bmk_{fine,middle,coarse}/{query,gallery}/<fname>
    mini-bmk_all_in_one/label.csv  .../imgs/<fname>      # DyML-Product's test set (train format)

Fields are separated by ", ". Quirk of the distributed files: the header line has no newline at
its end, so the first data row is glued to it (``fname, coarse_id, middle_id, fine_id0.jpg, 3,
17, 250``). :func:`read_dyml_csv` splits it back; the reference code reads such files with
pandas, which turns the glued row into column names and so loses it.

Labels: training labels are (fine, middle, coarse), re-indexed 0..n-1 per level. A benchmark
file carries ONE label per image (the label at its level), so benchmark datasets have a single
label column, re-indexed jointly over query and gallery (the same raw label gets the same index
in both). :func:`eval_sets` returns one :class:`~hapkit.data.base.EvalSet` per level with
``column`` = 0 (fine), 1 (middle), 2 (coarse) and ``gallery_contains_queries=True`` (the
galleries hold the query images: each query's own copy leaves its ranking).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

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

__all__ = ["load", "eval_sets", "read_dyml_csv", "GRANULARITIES", "VARIANTS"]

VARIANTS = ("vehicle", "animal", "product")
GRANULARITIES = ("fine", "middle", "coarse")
LEVEL_NAMES = list(GRANULARITIES)
TRAIN_HEADER = ("fname", "coarse_id", "middle_id", "fine_id")
BMK_HEADER = ("fname", ("labels", "label"))  # last header name: longest match first
ALL_IN_ONE = "mini-bmk_all_in_one"


def _names(variant: str) -> tuple[str, str]:
    if variant not in VARIANTS:
        raise ValueError(f"DyML: variant must be one of {VARIANTS}, got {variant!r}")
    return f"dyml_{variant}", f"DyML-{variant.title()}"


def read_dyml_csv(path, header) -> list[tuple[int, list[str]]]:
    """Rows of a DyML csv as (line number, fields), the header removed, coping with the glued row.

    ``header``: expected column names; the last entry may be a tuple of accepted spellings.
    """
    n = len(header)
    last = header[-1] if isinstance(header[-1], tuple) else (header[-1],)
    wanted = ", ".join(list(header[:-1]) + [last[0]])
    with open(path, encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    if not lines:
        raise AnnotationError(path, 1, f"empty file; expected the header {wanted!r}")
    first = [f.strip() for f in lines[0].split(",")]
    if [f.lower() for f in first[: n - 1]] != list(header[:-1]):
        raise AnnotationError(path, 1, f"expected the header {wanted!r}, got {lines[0][:80]!r}")
    tail = first[n - 1] if len(first) >= n else ""
    name = next((s for s in last if tail.lower().startswith(s)), None)
    if name is None:
        raise AnnotationError(path, 1, f"expected the header {wanted!r}, got {lines[0][:80]!r}")
    rows: list[tuple[int, list[str]]] = []
    glued = tail[len(name):].strip()
    if glued or len(first) > n:
        # header without its newline: the rest of line 1 is the first data row
        rows.append((1, [glued] + first[n:]))
    for lineno, line in enumerate(lines[1:], start=2):
        if line.strip():
            rows.append((lineno, [f.strip() for f in line.split(",")]))
    for lineno, fields in rows:
        if len(fields) != n:
            raise AnnotationError(path, lineno, f"expected {n} fields ({wanted}), got {len(fields)}: {fields}")
        if not fields[0]:
            raise AnnotationError(path, lineno, "empty file name")
        for f in fields[1:]:
            parse_id(f, path, lineno, f"label {f!r} is not an integer")
    if not rows:
        raise AnnotationError(path, None, "no image listed")
    return rows


def _train_like(
    base: Path, folder: str, name: str, title: str, where, split: str, transform
) -> ImageFileDataset:
    ann = require_file(base / folder / "label.csv", name, title, where)
    rows = read_dyml_csv(ann, TRAIN_HEADER)
    raw = np.array([[int(f[3]), int(f[2]), int(f[1])] for _, f in rows], dtype=np.int64)  # fine first
    labels, names = reindex_levels(raw, [None, None, None])
    paths = [str(base / folder / "imgs" / f[0]) for _, f in rows]
    check_images_exist(paths, name, title, where)
    return ImageFileDataset(
        paths, labels, name=name, split=split, level_names=LEVEL_NAMES, class_names=names, transform=transform
    )


def _benchmark(
    base: Path, granularity: str, name: str, title: str, where, transform
) -> dict[str, ImageFileDataset]:
    tables = {}
    for kind in ("query", "gallery"):
        ann = require_file(base / f"bmk_{granularity}" / f"{kind}.csv", name, title, where, "benchmark file")
        tables[kind] = read_dyml_csv(ann, BMK_HEADER)
    # joint re-indexing: query and gallery must agree on what label k means
    uniq = np.unique(np.concatenate([[int(f[1]) for _, f in rows] for rows in tables.values()]))
    out = {}
    for kind, rows in tables.items():
        raw = np.array([int(f[1]) for _, f in rows], dtype=np.int64)
        paths = [str(base / f"bmk_{granularity}" / kind / f[0]) for _, f in rows]
        check_images_exist(paths, name, title, where)
        out[kind] = ImageFileDataset(
            paths,
            np.searchsorted(uniq, raw)[:, None],
            name=name,
            split=f"{kind}_{granularity}",
            level_names=[granularity],
            class_names=[[str(u) for u in uniq]],
            transform=transform,
        )
    return out


def _base(root, variant):
    name, title = _names(variant)
    markers = ["train/label.csv", "bmk_fine/query.csv", f"{ALL_IN_ONE}/label.csv"]
    base = locate(root, name, title, markers, [name, f"DyML-{variant.title()}", f"dyml-{variant}"])
    return base, name, title, (root if root is not None else base)


def load(root=None, split: str = "train", transform=None, variant: str = "vehicle") -> ImageFileDataset:
    """``train`` (3 levels), a benchmark half ``{query,gallery}_{fine,middle,coarse}`` (1 level),
    or for DyML-Product ``test`` (its mini-bmk_all_in_one set, 3 levels)."""
    base, name, title, where = _base(root, variant)
    if split == "train":
        return _train_like(base, "train", name, title, where, "train", transform)
    if split == "test":
        if not (base / ALL_IN_ONE).is_dir():
            raise ValueError(
                f"{title} has no single 'test' split here (no {base / ALL_IN_ONE}); its test sets are the "
                f"per-level query/gallery benchmarks: use hapkit.data.get_eval_sets('{name}')"
            )
        return _train_like(base, ALL_IN_ONE, name, title, where, "test", transform)
    kind, _, granularity = split.partition("_")
    if kind not in ("query", "gallery") or granularity not in GRANULARITIES:
        raise ValueError(
            f"{title}: unknown split {split!r}; choose 'train' or '<query|gallery>_<fine|middle|coarse>'"
        )
    return _benchmark(base, granularity, name, title, where, transform)[kind]


def eval_sets(root=None, transform=None, variant: str = "vehicle") -> list[EvalSet]:
    """One query/gallery EvalSet per level (fine, middle, coarse); DyML-Product without bmk_*
    folders: its mini-bmk_all_in_one set in the same-set protocol, every level."""
    base, name, title, where = _base(root, variant)
    if variant == "product" and not (base / "bmk_fine").is_dir() and (base / ALL_IN_ONE).is_dir():
        return [EvalSet("test", _train_like(base, ALL_IN_ONE, name, title, where, "test", transform))]
    out = []
    for column, granularity in enumerate(GRANULARITIES):
        sets = _benchmark(base, granularity, name, title, where, transform)
        out.append(
            EvalSet(granularity, sets["query"], sets["gallery"], column=column, gallery_contains_queries=True)
        )
    return out
