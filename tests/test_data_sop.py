"""Stanford Online Products loader on a tiny fixture in the real file format."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hapkit.data import AnnotationError, DatasetNotFoundError, ImageReadError, get_dataset, get_eval_sets
from hapkit.hierarchy import as_label_tensor

# (class_id, super_class_id, folder) per image; 1-based ids as in the real files
TRAIN = [(1, 1, "bicycle_final"), (1, 1, "bicycle_final"), (2, 1, "bicycle_final"), (3, 3, "chair_final"), (3, 3, "chair_final")]
TEST = [(11, 1, "bicycle_final"), (11, 1, "bicycle_final"), (12, 2, "cabinet_final"), (13, 3, "chair_final")]


def write_sop(root, train=TRAIN, test=TEST):
    base = root / "Stanford_Online_Products"
    for split, rows in (("train", train), ("test", test)):
        lines = ["image_id class_id super_class_id path"]
        for k, (cls, sup, folder) in enumerate(rows, start=1):
            rel = f"{folder}/{split}_{cls}_{k}.JPG"
            (base / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((6, 8, 3), 10 * k, dtype=np.uint8)).save(base / rel, format="JPEG")
            lines.append(f"{k} {cls} {sup} {rel}")
        (base / f"Ebay_{split}.txt").write_text("\n".join(lines) + "\n")
    return base


def test_labels_levels_and_images(tmp_path):
    write_sop(tmp_path)
    ds = get_dataset("sop", root=tmp_path, split="train")
    assert ds.name == "sop" and ds.split == "train" and len(ds) == 5
    assert ds.level_names == ["product", "category"] and ds.num_levels == 2
    # products 1,1,2,3,3 -> 0,0,1,2,2; categories 1,1,1,3,3 -> 0,0,0,1,1
    assert ds.labels.tolist() == [[0, 0], [0, 0], [1, 0], [2, 1], [2, 1]]
    assert ds.class_names == [["1", "2", "3"], ["bicycle", "chair"]]
    as_label_tensor(ds.labels)
    x, y = ds[3]
    assert x.shape == (3, 6, 8) and x.dtype == torch.float32 and y.tolist() == [2, 1]
    assert abs(float(x.mean()) - 40 / 255) < 0.02
    seen = []
    ds.transform = lambda img: seen.append(img) or 0
    ds[0]
    assert isinstance(seen[0], Image.Image) and seen[0].mode == "RGB"


def test_test_split_is_reindexed_on_its_own_and_evaluated_same_set(tmp_path):
    write_sop(tmp_path)
    te = get_dataset("sop", root=tmp_path / "Stanford_Online_Products", split="test")  # the folder itself works too
    assert te.labels.tolist() == [[0, 0], [0, 0], [1, 1], [2, 2]]
    assert te.class_names[1] == ["bicycle", "cabinet", "chair"]
    (es,) = get_eval_sets("sop", root=tmp_path)
    assert es.name == "test" and es.gallery is None and es.column is None and len(es.query) == 4


def test_missing_dataset_names_path_and_command(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        get_dataset("sop", root=tmp_path)
    msg = str(err.value)
    assert "Stanford Online Products" in msg and str(tmp_path / "Stanford_Online_Products") in msg
    assert f"hapkit prepare-data sop --root {tmp_path}" in msg
    base = write_sop(tmp_path)
    (base / "Ebay_test.txt").unlink()
    with pytest.raises(DatasetNotFoundError, match="Ebay_test.txt"):
        get_dataset("sop", root=tmp_path, split="test")


def test_incomplete_images(tmp_path):
    base = write_sop(tmp_path)
    for f in (base / "chair_final").iterdir():
        f.unlink()
    with pytest.raises(DatasetNotFoundError, match=r"incomplete: 2 of 5 sampled images are missing.*prepare-data sop"):
        get_dataset("sop", root=tmp_path)


@pytest.mark.parametrize(
    "line, problem",
    [
        ("6 4 bicycle_final/x.JPG", "expected 4 space-separated fields"),
        ("6 four 1 bicycle_final/x.JPG", "must be integers"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, line, problem):
    base = write_sop(tmp_path)
    ann = base / "Ebay_train.txt"
    lines = ann.read_text().splitlines()
    lines.insert(3, line)
    ann.write_text("\n".join(lines))
    with pytest.raises(AnnotationError, match=problem) as err:
        get_dataset("sop", root=tmp_path)
    assert f"{ann}, line 4" in str(err.value)


def test_bad_header(tmp_path):
    base = write_sop(tmp_path)
    ann = base / "Ebay_train.txt"
    ann.write_text(ann.read_text().replace("image_id class_id", "id class", 1))
    with pytest.raises(AnnotationError, match="line 1: expected the header"):
        get_dataset("sop", root=tmp_path)


def test_unreadable_image_names_the_file(tmp_path):
    write_sop(tmp_path)
    ds = get_dataset("sop", root=tmp_path)
    Path(ds.paths[2]).write_bytes(b"not a jpeg")
    with pytest.raises(ImageReadError, match=ds.paths[2]):
        ds[2]
