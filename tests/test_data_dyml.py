"""DyML loaders on tiny fixtures reproducing the real csv files, header quirk included."""

import numpy as np
import pytest
from PIL import Image

from hapkit.data import AnnotationError, DatasetNotFoundError, get_dataset, get_eval_sets
from hapkit.data.dyml import TRAIN_HEADER, read_dyml_csv
from hapkit.hierarchy import as_label_tensor

# train rows: fname, coarse, middle, fine
TRAIN = [("0.jpg", 7, 30, 500), ("1.jpg", 7, 30, 501), ("2.jpg", 7, 31, 502), ("3.jpg", 9, 40, 600), ("4.jpg", 9, 40, 600)]
QUERY = {"fine": [("0.jpg", 900), ("1.jpg", 905)], "middle": [("0.jpg", 55), ("1.jpg", 56)], "coarse": [("0.jpg", 3), ("1.jpg", 4)]}
GALLERY = {"fine": [("0.jpg", 905), ("1.jpg", 901), ("2.jpg", 900)], "middle": [("0.jpg", 56), ("1.jpg", 55)], "coarse": [("0.jpg", 4), ("1.jpg", 3)]}


def write_csv(path, header, rows, glued=True):
    """The distributed files: fields joined by ', ' and NO newline after the header (glued=True)."""
    body = "\n".join(", ".join(str(f) for f in row) for row in rows) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + ("" if glued else "\n") + body)


def write_images(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names):
        Image.fromarray(np.full((4, 4, 3), 40 * k, dtype=np.uint8)).save(folder / name)


def write_dyml(root, variant="vehicle", glued=True, bmk=True, all_in_one=False):
    base = root / f"dyml_{variant}"
    write_csv(base / "train" / "label.csv", "fname, coarse_id, middle_id, fine_id", TRAIN, glued)
    write_images(base / "train" / "imgs", [r[0] for r in TRAIN])
    if bmk:
        for g in ("fine", "middle", "coarse"):
            for kind, table in (("query", QUERY), ("gallery", GALLERY)):
                write_csv(base / f"bmk_{g}" / f"{kind}.csv", "fname, labels", table[g], glued)
                write_images(base / f"bmk_{g}" / kind, [r[0] for r in table[g]])
    if all_in_one:
        write_csv(base / "mini-bmk_all_in_one" / "label.csv", "fname, coarse_id, middle_id, fine_id", TRAIN[1:], glued)
        write_images(base / "mini-bmk_all_in_one" / "imgs", [r[0] for r in TRAIN[1:]])
    return base


def test_fixture_reproduces_the_quirk(tmp_path):
    base = write_dyml(tmp_path)
    first_line = (base / "train" / "label.csv").read_text().splitlines()[0]
    assert first_line == "fname, coarse_id, middle_id, fine_id0.jpg, 7, 30, 500"
    assert (base / "bmk_fine" / "query.csv").read_text().startswith("fname, labels0.jpg, 900\n")


@pytest.mark.parametrize("glued", [True, False])
def test_train_labels_fine_first_and_first_row_kept(tmp_path, glued):
    write_dyml(tmp_path, glued=glued)
    ds = get_dataset("dyml_vehicle", root=tmp_path, split="train")
    assert len(ds) == 5  # the row glued to the header is not lost
    assert ds.level_names == ["fine", "middle", "coarse"] and ds.name == "dyml_vehicle"
    assert ds.labels.tolist() == [[0, 0, 0], [1, 0, 0], [2, 1, 0], [3, 2, 1], [3, 2, 1]]
    assert ds.class_names == [["500", "501", "502", "600"], ["30", "31", "40"], ["7", "9"]]
    as_label_tensor(ds.labels)
    assert ds.paths[0].endswith("dyml_vehicle/train/imgs/0.jpg")
    x, y = ds[3]
    assert x.shape == (3, 4, 4) and y.tolist() == [3, 2, 1]


def test_eval_sets_one_per_level_with_joint_reindexing(tmp_path):
    write_dyml(tmp_path, variant="animal")
    sets = get_eval_sets("dyml_animal", root=tmp_path)
    assert [(s.name, s.column) for s in sets] == [("fine", 0), ("middle", 1), ("coarse", 2)]
    fine = sets[0]
    assert fine.gallery_contains_queries and fine.label_column == 0
    assert fine.query.num_levels == fine.gallery.num_levels == 1
    assert fine.query.level_names == ["fine"] and fine.query.split == "query_fine"
    # raw 900, 905 / 905, 901, 900 -> one mapping for both: 900->0, 901->1, 905->2
    assert fine.query.labels[:, 0].tolist() == [0, 2]
    assert fine.gallery.labels[:, 0].tolist() == [2, 1, 0]
    assert fine.gallery.paths[2].endswith("bmk_fine/gallery/2.jpg")
    assert len(fine.query) == 2  # first row kept here too
    g = get_dataset("dyml_animal", root=tmp_path, split="gallery_coarse")
    assert g.labels[:, 0].tolist() == [1, 0]


def test_product_all_in_one_test_set(tmp_path):
    write_dyml(tmp_path, variant="product", bmk=False, all_in_one=True)
    (es,) = get_eval_sets("dyml_product", root=tmp_path)
    assert es.gallery is None and es.column is None and es.query.num_levels == 3 and len(es.query) == 4
    assert get_dataset("dyml_product", root=tmp_path, split="test").labels.shape == (4, 3)
    write_dyml(tmp_path / "v", variant="vehicle")
    with pytest.raises(ValueError, match="get_eval_sets"):
        get_dataset("dyml_vehicle", root=tmp_path / "v", split="test")


def test_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="DyML-Vehicle not found.*prepare-data dyml_vehicle --root"):
        get_dataset("dyml_vehicle", root=tmp_path)
    base = write_dyml(tmp_path)
    train = base / "train" / "label.csv"
    text = train.read_text()
    train.write_text(text + "5.jpg, 9, 40\n")
    with pytest.raises(AnnotationError, match=r"label.csv, line 6: expected 4 fields"):
        get_dataset("dyml_vehicle", root=tmp_path)
    train.write_text(text.replace("1.jpg, 7, 30, 501", "1.jpg, 7, x, 501"))
    with pytest.raises(AnnotationError, match=r"line 2: label 'x' is not an integer"):
        get_dataset("dyml_vehicle", root=tmp_path)
    train.write_text("name, a, b, c\n" + text)
    with pytest.raises(AnnotationError, match="line 1: expected the header"):
        get_dataset("dyml_vehicle", root=tmp_path)
    train.write_text(text)
    (base / "bmk_middle" / "gallery.csv").unlink()
    with pytest.raises(DatasetNotFoundError, match="benchmark file .*bmk_middle/gallery.csv"):
        get_eval_sets("dyml_vehicle", root=tmp_path)
    with pytest.raises(ValueError, match="query_fine"):
        get_dataset("dyml_vehicle", root=tmp_path, split="query_tiny")


def test_reader_handles_label_spelling(tmp_path):
    path = tmp_path / "q.csv"
    path.write_text("fname, label0.jpg, 3\n1.jpg, 4\n")
    rows = read_dyml_csv(path, ("fname", ("labels", "label")))
    assert [f for _, f in rows] == [["0.jpg", "3"], ["1.jpg", "4"]]
    path.write_text("fname, coarse_id, middle_id, fine_id\n")
    with pytest.raises(AnnotationError, match="no image listed"):
        read_dyml_csv(path, TRAIN_HEADER)
