"""GLDv2 / H-GLDv2 loaders on tiny fixtures in the real formats: train_clean.csv and
train_label_to_hierarchical.csv (or SupRank's cluster / overall_cluster file), images under
train/<a>/<b>/<c>/<id>.jpg."""

import csv

import numpy as np
import pytest
from PIL import Image

from hapkit.data import AnnotationError, DatasetNotFoundError, get_dataset
from hapkit.hierarchy import as_label_tensor

# landmark_id -> image ids (16 hex characters, as in the public files)
CLEAN = {
    7: ["0a1b2c3d4e5f6071", "1a2b3c4d5e6f7081"],
    12: ["2b3c4d5e6f708192"],
    30: ["3c4d5e6f708192a3", "4d5e6f708192a3b4", "5e6f708192a3b4c5"],
    41: ["6f708192a3b4c5d6"],  # no hierarchical label: dropped from H-GLDv2
}
HIER_HEADER = ["landmark_id", "category", "supercategory", "hierarchical_label", "natural_or_human_made"]
HIER = [
    [7, "http://commons.wikimedia.org/wiki/Category:Big_Ben", "clock tower, tower", "tower", "human-made"],
    [12, "http://commons.wikimedia.org/wiki/Category:Loch_Ness", "lake", "lake", "natural"],
    [30, "http://commons.wikimedia.org/wiki/Category:Eiffel_Tower", "tower", "tower", "human-made"],
    [41, "http://commons.wikimedia.org/wiki/Category:Somewhere", "", "", ""],
    [99, "http://commons.wikimedia.org/wiki/Category:Not_in_clean", "bridge", "bridge", "human-made"],
]


def write_gldv2(root, hier=HIER, header=HIER_HEADER, hier_name="train_label_to_hierarchical.csv", images="train",
                clean=CLEAN, size=(5, 7)):
    base = root / "gldv2"
    base.mkdir(parents=True, exist_ok=True)
    with open(base / "train_clean.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["landmark_id", "images"])
        for landmark, ids in clean.items():
            w.writerow([landmark, " ".join(ids)])
    if hier is not None:
        with open(base / hier_name, "w", newline="") as fh:  # csv quoting: supercategories hold commas
            w = csv.writer(fh)
            w.writerow(header)
            w.writerows(hier)
    for k, image_id in enumerate(i for ids in clean.values() for i in ids):
        path = base / images / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((*size, 3), (20 * k) % 256, np.uint8)).save(path)
    return base


def test_flat_gldv2_keeps_every_clean_landmark(tmp_path):
    base = write_gldv2(tmp_path, hier=None)
    ds = get_dataset("gldv2", root=tmp_path)
    assert len(ds) == 7 and ds.level_names == ["landmark"] and ds.dropped == {"landmarks": 0, "images": 0}
    assert ds.labels[:, 0].tolist() == [0, 0, 1, 2, 2, 2, 3] and ds.class_names == [["7", "12", "30", "41"]]
    assert ds.paths[0] == str(base / "train" / "0" / "a" / "1" / "0a1b2c3d4e5f6071.jpg")
    x, _ = ds[6]
    assert x.shape == (3, 5, 7)


def test_hierarchy_three_levels_and_unlabelled_landmarks_dropped(tmp_path):
    write_gldv2(tmp_path)
    ds = get_dataset("gldv2_hier", root=tmp_path)
    assert ds.level_names == ["landmark", "hierarchical_label", "natural_or_human_made"]
    assert ds.dropped == {"landmarks": 1, "images": 1}  # landmark 41
    as_label_tensor(ds.labels)  # a tree
    names = ds.class_names
    rows = [tuple(names[c][ds.labels[i, c]] for c in range(3)) for i in range(len(ds))]
    assert rows == [("7", "tower", "human-made")] * 2 + [("12", "lake", "natural")] + [("30", "tower", "human-made")] * 3
    assert ds.num_classes == [3, 2, 2]


def test_suprank_column_names_are_read_too(tmp_path):
    header = ["landmark_id", "category", "cluster", "overall_cluster"]
    rows = [[r[0], r[1], r[3], r[4]] for r in HIER]
    write_gldv2(tmp_path, hier=rows, header=header, hier_name="train_label_to_subcategory_with_clusters.csv",
                images="images/train")
    ds = get_dataset("gldv2_hier", root=tmp_path / "gldv2")
    assert len(ds) == 6 and ds.num_classes == [3, 2, 2] and "images/train/" in ds.paths[0]


@pytest.mark.parametrize("rows, problem, line", [
    (HIER[:1] + [[12, "c", "lake", "lake", ""]], "landmark 12 has the hierarchical_label 'lake' but no natural_or_human_made", 3),
    (HIER[:1] + [[30, "c", "tower", "tower", "natural"]], "'tower' is under natural_or_human_made 'natural' here but 'human-made' on line 2", 3),
    (HIER[:2] + [["x", "c", "s", "lake", "natural"]], "landmark_id must be an integer", 4),
])
def test_malformed_hierarchy_names_file_and_line(tmp_path, rows, problem, line):
    base = write_gldv2(tmp_path, hier=rows)
    with pytest.raises(AnnotationError, match=problem) as err:
        get_dataset("gldv2_hier", root=tmp_path)
    assert err.value.path == base / "train_label_to_hierarchical.csv" and err.value.line == line


def test_missing_files_and_bad_header(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=rf"train_clean.csv.*hapkit prepare-data gldv2_hier --root {tmp_path}"):
        get_dataset("gldv2_hier", root=tmp_path)
    write_gldv2(tmp_path, hier=None)
    with pytest.raises(DatasetNotFoundError, match="hierarchy file .*train_label_to_hierarchical.csv is missing"):
        get_dataset("gldv2_hier", root=tmp_path)
    base = write_gldv2(tmp_path / "b", header=["landmark_id", "category", "label", "kind", "x"])
    with pytest.raises(AnnotationError, match="line 1.*expected the columns landmark_id, hierarchical_label, natural_or_human_made"):
        get_dataset("gldv2_hier", root=tmp_path / "b")
    (base / "train_clean.csv").write_text("landmark_id,images\n7,0a1b2c3d4e5f6071\n8,\n")
    with pytest.raises(AnnotationError, match="line 3: 'images' must be space-separated image ids"):
        get_dataset("gldv2", root=tmp_path / "b")
