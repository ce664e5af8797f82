"""CIFAR-100 loader on a tiny pickle in the real python format."""

import pickle

import numpy as np
import pytest

from hapkit.data import AnnotationError, DatasetNotFoundError, get_dataset, get_eval_sets
from hapkit.hierarchy import as_label_tensor

FINE_NAMES = [f"fine{i}" for i in range(100)]
COARSE_NAMES = [f"coarse{i}" for i in range(20)]


def write_cifar(root, n=6, seed=0):
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        fine = rng.choice(100, size=n).tolist()
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        batch = {b"filenames": [b"x.png"] * n, b"fine_labels": fine, b"coarse_labels": [f // 5 for f in fine], b"data": data}
        with open(base / split, "wb") as fh:
            pickle.dump(batch, fh)
    with open(base / "meta", "wb") as fh:
        pickle.dump({b"fine_label_names": FINE_NAMES, b"coarse_label_names": COARSE_NAMES}, fh)
    return base


def test_images_labels_and_names(tmp_path):
    base = write_cifar(tmp_path)
    ds = get_dataset("cifar100", root=tmp_path, split="train")
    with open(base / "train", "rb") as fh:
        raw = pickle.load(fh, encoding="bytes")
    assert ds.level_names == ["class", "superclass"] and len(ds) == 6
    as_label_tensor(ds.labels)
    fine = np.array(raw[b"fine_labels"])
    assert [ds.class_names[0][v] for v in ds.labels[:, 0]] == [FINE_NAMES[f] for f in fine]
    assert [ds.class_names[1][v] for v in ds.labels[:, 1]] == [COARSE_NAMES[f // 5] for f in fine]
    # channel-major rows: pixel (row 1, col 2) of channel c is data[c * 1024 + 1 * 32 + 2]
    x, y = ds[4]
    for c in range(3):
        assert x[c, 1, 2] * 255 == pytest.approx(raw[b"data"][4, c * 1024 + 34])
    assert y.tolist() == ds.labels[4].tolist()
    (es,) = get_eval_sets("cifar100", root=tmp_path / "cifar-100-python")
    assert es.query.split == "test" and es.gallery is None


def test_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="CIFAR-100 not found.*prepare-data cifar100 --root"):
        get_dataset("cifar100", root=tmp_path)
    base = write_cifar(tmp_path)
    with open(base / "test", "wb") as fh:
        pickle.dump({"data": np.zeros((2, 3072), np.uint8), "fine_labels": [1, 2]}, fh)
    with pytest.raises(AnnotationError, match=r"test: missing key\(s\) \['coarse_labels'\]"):
        get_dataset("cifar100", root=tmp_path, split="test")
    (base / "test").write_bytes(b"garbage")
    with pytest.raises(AnnotationError, match="not a CIFAR-100 python pickle"):
        get_dataset("cifar100", root=tmp_path, split="test")
