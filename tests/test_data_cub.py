"""CUB-200-2011 loader (flat and order/family/species) and its packaged taxonomy."""

import csv
from importlib import resources

import numpy as np
import pytest
from PIL import Image

from hapkit.data import AnnotationError, DataError, DatasetNotFoundError, get_dataset, get_eval_sets
from hapkit.data.cub import read_taxonomy
from hapkit.hierarchy import as_label_tensor

CLASSES = {1: "001.Black_footed_Albatross", 2: "002.Laysan_Albatross", 36: "036.Northern_Flicker",
           101: "101.White_Pelican", 188: "188.Pileated_Woodpecker", 200: "200.Common_Yellowthroat"}
# image id -> class id (ids deliberately not in class order)
IMAGES = {1: 1, 2: 36, 3: 2, 4: 1, 5: 101, 6: 188, 7: 200, 8: 188}


def write_cub(root, classes=CLASSES, images=IMAGES):
    base = root / "CUB_200_2011"
    (base / "images").mkdir(parents=True)
    paths = {}
    for i, c in images.items():
        rel = f"{classes[c]}/{classes[c].split('.')[1]}_{i:04d}.jpg"
        (base / "images" / rel).parent.mkdir(exist_ok=True)
        Image.fromarray(np.full((3, 7, 3), 20 * i, dtype=np.uint8)).save(base / "images" / rel)
        paths[i] = rel
    (base / "images.txt").write_text("".join(f"{i} {p}\n" for i, p in paths.items()))
    (base / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, c in images.items()))
    (base / "classes.txt").write_text("".join(f"{c} {n}\n" for c, n in sorted(classes.items())))
    return base


def test_flat_splits_by_class_id(tmp_path):
    write_cub(tmp_path)
    tr = get_dataset("cub", root=tmp_path, split="train")
    assert tr.level_names == ["species"] and tr.name == "cub"
    # images 1,2,3,4 (classes 1,36,2,1) in image-id order; classes 1,2,36 -> 0,1,2
    assert tr.labels[:, 0].tolist() == [0, 2, 1, 0]
    assert tr.class_names == [["001.Black_footed_Albatross", "002.Laysan_Albatross", "036.Northern_Flicker"]]
    te = get_dataset("cub", root=tmp_path / "CUB_200_2011", split="test")
    assert te.labels[:, 0].tolist() == [0, 1, 2, 1]
    x, y = te[0]
    assert x.shape == (3, 3, 7) and y.tolist() == [0]
    (es,) = get_eval_sets("cub", root=tmp_path)
    assert len(es.query) == 4 and es.gallery is None


def test_hierarchy_species_family_order(tmp_path):
    write_cub(tmp_path)
    tr = get_dataset("cub_hierarchy", root=tmp_path, split="train")
    assert tr.level_names == ["species", "family", "order"] and tr.name == "cub_hierarchy"
    as_label_tensor(tr.labels)
    named = [[tr.class_names[c][v] for c, v in enumerate(row)] for row in tr.labels]
    assert named[0] == ["001.Black_footed_Albatross", "Diomedeidae", "Procellariiformes"]
    assert named[1] == ["036.Northern_Flicker", "Picidae", "Piciformes"]
    assert named[2][1:] == named[0][1:]  # both albatrosses share family and order
    te = get_dataset("cub_hierarchy", root=tmp_path, split="test")
    by_species = {te.class_names[0][r[0]]: [te.class_names[c][r[c]] for c in (1, 2)] for r in te.labels}
    assert by_species["101.White_Pelican"] == ["Pelecanidae", "Pelecaniformes"]
    assert by_species["200.Common_Yellowthroat"] == ["Parulidae", "Passeriformes"]


def test_packaged_taxonomy_covers_the_200_classes_as_a_tree():
    with resources.files("hapkit.data").joinpath("cub_taxonomy.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 200
    assert [int(r["class"][:3]) for r in rows] == list(range(1, 201))
    families = sorted({r["family"] for r in rows})
    orders = sorted({r["order"] for r in rows})
    labels = np.array([[families.index(r["family"]), orders.index(r["order"])] for r in rows])
    as_label_tensor(labels)  # every family in exactly one order
    assert len(families) == 37 and len(orders) == 13
    tax = read_taxonomy()
    assert tax["cardinal"] == ("Cardinalidae", "Passeriformes")
    assert tax["geococcyx"] == ("Cuculidae", "Cuculiformes")


def test_custom_taxonomy_and_its_errors(tmp_path):
    write_cub(tmp_path)
    custom = tmp_path / "tax.csv"
    custom.write_text("class,family,order\n" + "".join(f"{n},F{c % 2},O\n" for c, n in CLASSES.items()))
    tr = get_dataset("cub_hierarchy", root=tmp_path, split="train", taxonomy=custom)
    assert tr.class_names[1] == ["F0", "F1"] and tr.class_names[2] == ["O"]
    custom.write_text("class,family,order\n001.Black_footed_Albatross,A,B\n")
    with pytest.raises(DataError, match=r"class '002.Laysan_Albatross' \(and 1 more\) has no family/order"):
        get_dataset("cub_hierarchy", root=tmp_path, split="train", taxonomy=custom)
    custom.write_text("species;family\n")
    with pytest.raises(AnnotationError, match="class,family,order"):
        get_dataset("cub_hierarchy", root=tmp_path, split="train", taxonomy=custom)
    with pytest.raises(DataError, match="does not exist"):
        get_dataset("cub_hierarchy", root=tmp_path, split="train", taxonomy=tmp_path / "nope.csv")


def test_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="CUB-200-2011 not found.*prepare-data cub --root"):
        get_dataset("cub", root=tmp_path)
    base = write_cub(tmp_path)
    (base / "images.txt").write_text("1 a.jpg\n2\n")
    with pytest.raises(AnnotationError, match=r"images.txt, line 2: expected '<id> <value>'"):
        get_dataset("cub", root=tmp_path)
    (base / "images.txt").write_text("1 a.jpg\n")
    with pytest.raises(AnnotationError, match="image ids differ"):
        get_dataset("cub", root=tmp_path)
    (base / "image_class_labels.txt").unlink()
    with pytest.raises(DatasetNotFoundError, match="image_class_labels.txt is missing"):
        get_dataset("cub", root=tmp_path)
