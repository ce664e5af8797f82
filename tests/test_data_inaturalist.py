"""iNaturalist-2018 loader (Smooth-AP split) on a tiny fixture in the real file format."""

import json

import numpy as np
import pytest
from PIL import Image

from hapkit.data import AnnotationError, DatasetNotFoundError, get_dataset, get_eval_sets
from hapkit.hierarchy import as_label_tensor


def cat(id_, name, genus, family, order, class_, phylum, kingdom, supercategory):
    return dict(
        id=id_, name=name, genus=genus, family=family, order=order, phylum=phylum, kingdom=kingdom,
        supercategory=supercategory, **{"class": class_},
    )


CATEGORIES = [
    cat(10, "Quercus alba", "Quercus", "Fagaceae", "Fagales", "Magnoliopsida", "Tracheophyta", "Plantae", "Plantae"),
    cat(11, "Quercus rubra", "Quercus", "Fagaceae", "Fagales", "Magnoliopsida", "Tracheophyta", "Plantae", "Plantae"),
    cat(20, "Parus major", "Parus", "Paridae", "Passeriformes", "Aves", "Chordata", "Animalia", "Aves"),
    # a genus name shared by two unrelated taxa (happens in real taxonomies): must stay two classes
    cat(21, "Morus bassanus", "Morus", "Sulidae", "Suliformes", "Aves", "Chordata", "Animalia", "Aves"),
    cat(30, "Morus alba", "Morus", "Moraceae", "Rosales", "Magnoliopsida", "Tracheophyta", "Plantae", "Plantae"),
    cat(40, "Apis mellifera", "Apis", "Apidae", "Hymenoptera", "Insecta", "Arthropoda", "Animalia", "Insecta"),
]
TRAIN = [(10, "Plantae"), (10, "Plantae"), (11, "Plantae"), (20, "Aves"), (21, "Aves"), (30, "Plantae")]
TEST = [(40, "Insecta"), (40, "Insecta"), (20, "Aves")]


def write_inat(root, train=TRAIN, test=TEST, categories=CATEGORIES):
    base = root / "inaturalist2018"
    (base / "Inat_dataset_splits").mkdir(parents=True)
    for split, rows in (("train", train), ("test", test)):
        lines = []
        for k, (cid, sup) in enumerate(rows):
            rel = f"train_val2018/{sup}/{cid}/{split}{k}.jpg"
            (base / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((5, 5, 3), 30 * k, dtype=np.uint8)).save(base / rel)
            lines.append(rel)
        (base / "Inat_dataset_splits" / f"Inaturalist_{split}_set1.txt").write_text("\n".join(lines) + "\n")
    db = {"info": {}, "images": [], "annotations": [], "categories": categories}
    (base / "train2018.json").write_text(json.dumps(db))
    return base


def test_base_hierarchy_species_and_supercategory(tmp_path):
    write_inat(tmp_path)
    ds = get_dataset("inaturalist", root=tmp_path, split="train")
    assert ds.level_names == ["species", "supercategory"] and ds.name == "inaturalist"
    # species ids 10,10,11,20,21,30 -> 0,0,1,2,3,4; supercategories Aves < Plantae
    assert ds.labels.tolist() == [[0, 1], [0, 1], [1, 1], [2, 0], [3, 0], [4, 1]]
    assert ds.class_names[0] == ["Quercus alba", "Quercus rubra", "Parus major", "Morus bassanus", "Morus alba"]
    assert ds.class_names[1] == ["Aves", "Plantae"]
    x, y = ds[4]
    assert x.shape == (3, 5, 5) and y.tolist() == [3, 0]


def test_full_hierarchy_has_seven_levels_and_is_a_tree(tmp_path):
    write_inat(tmp_path)
    ds = get_dataset("inaturalist_full", root=tmp_path, split="train")
    assert ds.level_names == ["species", "genus", "family", "order", "class", "phylum", "kingdom"]
    as_label_tensor(ds.labels)
    lab = ds.labels
    genus = {ds.class_names[0][s]: ds.class_names[1][g] for s, g in lab[:, :2]}
    assert genus["Quercus alba"] == genus["Quercus rubra"] == "Quercus"
    # the two "Morus" genera (a bird and a tree) are different classes at the genus level
    rows = {ds.class_names[0][s]: r for r, s in zip(lab, lab[:, 0])}
    assert rows["Morus bassanus"][1] != rows["Morus alba"][1]
    assert rows["Morus bassanus"][6] != rows["Morus alba"][6]  # Animalia vs Plantae
    assert [len(n) for n in ds.class_names] == [5, 4, 4, 4, 2, 2, 2]
    for c in range(7):
        assert np.array_equal(np.unique(lab[:, c]), np.arange(lab[:, c].max() + 1))


def test_test_split_reindexed_and_eval_set(tmp_path):
    write_inat(tmp_path)
    (es,) = get_eval_sets("inaturalist_full", root=tmp_path)
    assert es.gallery is None and es.query.split == "test"
    assert es.query.labels[:, 0].tolist() == [1, 1, 0]  # Parus (20) < Apis (40) by id
    assert es.query.labels[:, 6].tolist() == [0, 0, 0]  # one kingdom left: Animalia


def test_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="prepare-data inaturalist --root"):
        get_dataset("inaturalist", root=tmp_path)
    base = write_inat(tmp_path)
    split = base / "Inat_dataset_splits" / "Inaturalist_train_set1.txt"
    lines = split.read_text().splitlines()
    split.write_text("\n".join(lines[:2] + ["train_val2018/Aves/99/x.jpg"] + lines[2:]))
    with pytest.raises(AnnotationError, match=r"line 3: category id 99"):
        get_dataset("inaturalist", root=tmp_path)
    split.write_text("\n".join(lines[:1] + ["just_a_file.jpg"]))
    with pytest.raises(AnnotationError, match=r"Inaturalist_train_set1.txt, line 2: expected a path"):
        get_dataset("inaturalist", root=tmp_path)
    split.write_text("\n".join(lines[:1] + ["train_val2018/Aves/abc/x.jpg"]))
    with pytest.raises(AnnotationError, match="not an integer"):
        get_dataset("inaturalist", root=tmp_path)
    split.write_text("\n".join(lines))
    (base / "train2018.json").write_text(json.dumps({"images": []}))
    with pytest.raises(AnnotationError, match="categories"):
        get_dataset("inaturalist", root=tmp_path)
    (base / "train2018.json").unlink()
    with pytest.raises(DatasetNotFoundError, match="taxonomy file"):
        get_dataset("inaturalist", root=tmp_path)
