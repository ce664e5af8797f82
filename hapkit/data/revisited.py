"""Revisited Oxford and Paris (Radenović et al., CVPR 2018) and their R1M distractors.

Layout (as filipradenovic/revisitop's download.py leaves it)::

    roxford5k/gnd_roxford5k.pkl   roxford5k/jpg/<name>.jpg    # 4,993 database images, 70 queries
    rparis6k/gnd_rparis6k.pkl     rparis6k/jpg/<name>.jpg     # 6,322 database images, 70 queries
    revisitop1m/revisitop1m.txt   revisitop1m/jpg/<entry>     # about a million distractors

``gnd_<name>.pkl`` is a pickled dict: ``imlist`` (database image names without extension, the
gallery order), ``qimlist`` (query names) and ``gnd``, one dict per query with ``bbx`` (the
query's box x1, y1, x2, y2 in pixels of the full image) and the 0-based ``imlist`` index lists
``easy``, ``hard`` and ``junk``. Queries are not part of the database.

The protocol evaluates each query CROPPED to its box (PIL's crop of the box, as the reference
Python code does). Labels: one level, the landmark named by the image name without its final
``_<number>`` (``all_souls_000013`` -> ``all_souls``), for figures only; the evaluation uses the
ground truth (:func:`eval_sets`, :func:`hapkit.evaluate.evaluate_revisited`).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from hapkit.data.base import (
    AnnotationError,
    DatasetNotFoundError,
    EvalSet,
    ImageFileDataset,
    check_images_exist,
    locate,
    reindex_levels,
    require_file,
    spread_indices,
)

__all__ = [
    "load", "eval_sets", "landmark_benchmarks", "benchmark_from_labels", "read_gnd", "read_distractor_list",
    "image_file", "CroppedImageFileDataset", "CITIES", "DISTRACTORS",
]

CITIES = {"roxford5k": "Revisited Oxford (ROxford5k)", "rparis6k": "Revisited Paris (RParis6k)"}
DISTRACTORS = "revisitop1m"
DISTRACTORS_TITLE = "R1M distractors (revisitop1m)"
LEVEL_NAMES = ["landmark"]


class CroppedImageFileDataset(ImageFileDataset):
    """Images cropped to a box ``(x1, y1, x2, y2)`` in pixels (PIL's ``crop``: coordinates rounded,
    right and bottom edges excluded), as the revisited protocol crops its queries."""

    def __init__(self, paths, boxes, labels, **kwargs):
        super().__init__(paths, labels, **kwargs)
        if len(boxes) != len(self.paths):
            raise ValueError(f"{self.name}: {len(boxes)} boxes for {len(self.paths)} images")
        self.boxes = [tuple(float(v) for v in box) for box in boxes]

    def load_image(self, index: int):
        return super().load_image(index).crop(self.boxes[index])


def _index_list(path, q: int, entry: dict, key: str, size: int) -> list[int]:
    values = entry.get(key, [])
    arr = np.asarray(values).reshape(-1)
    if arr.size and (arr.dtype.kind not in "iu" and not np.all(np.mod(arr, 1) == 0)):
        raise AnnotationError(path, None, f"query {q}: '{key}' must hold integer image indices, got {arr[:5].tolist()}")
    arr = arr.astype(np.int64)
    outside = arr[(arr < 0) | (arr >= size)]
    if outside.size:
        raise AnnotationError(path, None, f"query {q}: '{key}' holds index {int(outside[0])}, outside imlist (0..{size - 1})")
    return arr.tolist()


def read_gnd(path) -> dict:
    """Load and check a ``gnd_<name>.pkl``: returns ``{"imlist", "qimlist", "gnd"}`` with plain
    lists (``gnd``: per query ``bbx`` (4 floats), ``easy``, ``hard``, ``junk`` (int lists))."""
    try:
        with open(path, "rb") as fh:
            try:
                raw = pickle.load(fh)
            except UnicodeDecodeError:  # a pickle written by Python 2
                fh.seek(0)
                raw = pickle.load(fh, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError, AttributeError, ImportError) as err:
        raise AnnotationError(path, None, f"not a readable ground-truth pickle ({err}); download it again") from err
    if not isinstance(raw, dict) or not {"imlist", "qimlist", "gnd"} <= set(raw):
        found = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise AnnotationError(path, None, f"expected a dict with 'imlist', 'qimlist' and 'gnd', got {found}")
    imlist, qimlist = [str(x) for x in raw["imlist"]], [str(x) for x in raw["qimlist"]]
    if len(raw["gnd"]) != len(qimlist):
        raise AnnotationError(path, None, f"'gnd' has {len(raw['gnd'])} entries but 'qimlist' {len(qimlist)} queries")
    gnd = []
    for q, entry in enumerate(raw["gnd"]):
        if not isinstance(entry, dict) or "bbx" not in entry or "easy" not in entry or "hard" not in entry:
            keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            raise AnnotationError(
                path, None, f"query {q} ({qimlist[q]}): expected 'bbx', 'easy', 'hard' and 'junk', got {keys}"
                + (" (an 'ok' list: the classic, not revisited, ground truth)" if isinstance(entry, dict) and "ok" in entry else "")
            )
        bbx = [float(v) for v in np.asarray(entry["bbx"], dtype=np.float64).reshape(-1)]
        if len(bbx) != 4 or not (bbx[0] < bbx[2] and bbx[1] < bbx[3]):
            raise AnnotationError(path, None, f"query {q} ({qimlist[q]}): bbx must be x1 < x2, y1 < y2, got {bbx}")
        gnd.append({"bbx": bbx, **{k: _index_list(path, q, entry, k, len(imlist)) for k in ("easy", "hard", "junk")}})
    return {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}


def read_distractor_list(path) -> list[str]:
    """The entries of ``revisitop1m.txt``: one relative image path per line (blank lines skipped)."""
    with open(path, encoding="utf-8") as fh:
        entries = [line.strip() for line in fh if line.strip()]
    if not entries:
        raise AnnotationError(path, None, "no image listed")
    return entries


def image_file(base: Path, entry: str) -> str:
    """Path of an image of ``imlist`` / ``qimlist`` / ``revisitop1m.txt`` under the dataset folder."""
    # revisitop appends '.jpg' to Oxford / Paris names; R1M entries carry their own extension
    # (the MATLAB code appends one only when missing)
    return str(base / "jpg" / (entry if Path(entry).suffix else entry + ".jpg"))


def _landmark(name: str) -> str:
    stem = Path(name).name
    head, sep, tail = stem.rpartition("_")
    return head if sep and tail.isdigit() else stem


def _city(root, city: str):
    if city not in CITIES:
        raise ValueError(f"unknown revisited dataset {city!r}; choose one of {list(CITIES)}")
    base = locate(root, city, CITIES[city], [f"gnd_{city}.pkl"], [city])
    return base, (root if root is not None else base.parent)


def _load_city(root, city: str, transform):
    base, where = _city(root, city)
    gt = read_gnd(require_file(base / f"gnd_{city}.pkl", city, CITIES[city], where, "ground-truth file"))
    names = gt["qimlist"] + gt["imlist"]
    labels, class_names = reindex_levels(np.array([_landmark(n) for n in names])[:, None], [None])
    nq = len(gt["qimlist"])
    q_paths = [image_file(base, n) for n in gt["qimlist"]]
    g_paths = [image_file(base, n) for n in gt["imlist"]]
    check_images_exist(q_paths + g_paths, city, CITIES[city], where)
    common = dict(name=city, level_names=LEVEL_NAMES, class_names=class_names, transform=transform)
    query = CroppedImageFileDataset(q_paths, [g["bbx"] for g in gt["gnd"]], labels[:nq], split="query", **common)
    gallery = ImageFileDataset(g_paths, labels[nq:], split="gallery", **common)
    return query, gallery, gt


def _load_distractors(root, transform) -> ImageFileDataset:
    base = locate(root, DISTRACTORS, DISTRACTORS_TITLE, [f"{DISTRACTORS}.txt"], [DISTRACTORS])
    where = root if root is not None else base.parent
    entries = read_distractor_list(base / f"{DISTRACTORS}.txt")
    paths = [image_file(base, e) for e in entries]
    check_images_exist(paths, DISTRACTORS, DISTRACTORS_TITLE, where)
    return ImageFileDataset(
        paths, np.zeros((len(paths), 1), dtype=np.int64), name=DISTRACTORS, split="distractors",
        level_names=["distractor"], class_names=[["distractor"]], transform=transform,
    )


def load(root=None, split: str = "gallery", transform=None, city: str = "roxford5k") -> ImageFileDataset:
    """``query`` (the cropped queries), ``gallery`` (the database, in ``imlist`` order) or, for
    ``city="revisitop1m"``, ``distractors``."""
    if city == DISTRACTORS:
        if split != "distractors":
            raise ValueError(f"{DISTRACTORS_TITLE} has only the split 'distractors', not {split!r}")
        return _load_distractors(root, transform)
    if split not in ("query", "gallery"):
        raise ValueError(f"{CITIES.get(city, city)}: unknown split {split!r}; choose 'query' or 'gallery'")
    query, gallery, _ = _load_city(root, city, transform)
    return query if split == "query" else gallery


def eval_sets(root=None, transform=None, city: str = "roxford5k", distractors: bool = False) -> list[EvalSet]:
    """The revisited benchmark as one query/gallery :class:`EvalSet` with its ground truth
    (``gnd``); ``distractors=True`` adds the R1M images (prepared under the same root)."""
    if city == DISTRACTORS:
        raise ValueError(
            f"{DISTRACTORS_TITLE} has no protocol of its own: use get_eval_sets('roxford5k', distractors=True)"
        )
    query, gallery, gt = _load_city(root, city, transform)
    extra = _load_distractors(root, transform) if distractors else None
    return [EvalSet(city, query, gallery, gnd=gt["gnd"], distractors=extra)]


def landmark_benchmarks(root=None, transform=None, distractors: bool = False) -> list[EvalSet]:
    """ROxford5k and RParis6k, both prepared under ``root``: the evaluation of the landmark
    training sets (SfM-120k in ROADMAP, H-GLDv2 in SupRank)."""
    try:
        return [s for city in CITIES for s in eval_sets(root, transform, city, distractors)]
    except DatasetNotFoundError:
        if root is None or Path(root).expanduser().resolve().parent == Path(root).expanduser().resolve():
            raise
        # root may be the training set's own folder (DIR/sfm120k): the benchmarks sit beside it
        parent = Path(root).expanduser().resolve().parent
        if not all((parent / city / f"gnd_{city}.pkl").is_file() for city in CITIES):
            raise
        return [s for city in CITIES for s in eval_sets(parent, transform, city, distractors)]


def benchmark_from_labels(dataset, num_queries: int = 16, gallery_size: int | None = None, seed: int = 0,
                          name: str = "toy") -> EvalSet:
    """A benchmark in the revisited format made from a dataset with (at least 2-level) tree labels,
    to try the protocol without the real images: ``num_queries`` queries of distinct fine
    classes, the other images (``gallery_size`` of them, evenly spread; None: all) as gallery,
    and for each query the statuses

    - easy: same fine class (column 0), e.g. the same variant of a generated shape;
    - hard: same class in column 1 only (the same shape in another colour: the same landmark
      seen at night, say);
    - junk: same class in column 2 only, when there is a column 2 (an ambiguous image);
    - negative: the rest.

    As in the real benchmarks, the queries are not in the gallery.
    """
    labels = np.asarray(dataset.labels)
    labels = labels[:, None] if labels.ndim == 1 else labels
    if labels.shape[1] < 2:
        raise ValueError("benchmark_from_labels needs labels with at least 2 levels (easy: column 0, hard: column 1)")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels[:, 0])
    if not 1 <= num_queries <= len(classes):
        raise ValueError(f"num_queries must be between 1 and the {len(classes)} fine classes, got {num_queries}")
    picked = rng.choice(classes, num_queries, replace=False)
    q_idx = np.array([rng.choice(np.flatnonzero(labels[:, 0] == c)) for c in picked])
    rest = np.setdiff1d(np.arange(len(labels)), q_idx)
    g_idx = rest[spread_indices(len(rest), gallery_size)]
    gl = labels[g_idx]
    gnd = []
    for q in q_idx:
        same = gl == labels[q]
        junk = same[:, 2] & ~same[:, 1] if labels.shape[1] > 2 else np.zeros(len(gl), bool)
        gnd.append({"easy": np.flatnonzero(same[:, 0]).tolist(), "hard": np.flatnonzero(same[:, 1] & ~same[:, 0]).tolist(),
                    "junk": np.flatnonzero(junk).tolist()})

    def subset(idx):
        sub = torch.utils.data.Subset(dataset, idx.tolist())
        sub.labels = labels[idx]
        return sub

    return EvalSet(name, subset(q_idx), subset(g_idx), gnd=gnd)
