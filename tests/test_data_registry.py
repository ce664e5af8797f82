"""Dataset registry: names, errors, contract of HierarchicalDataset / EvalSet, DataLoader use."""

import numpy as np
import pytest
import torch

import hapkit.data as D
from hapkit.data import EvalSet, InMemoryImageDataset
from hapkit.hierarchy import LabelError

NAMES = ["generated", "sop", "inaturalist", "inaturalist_full", "dyml_vehicle", "dyml_animal", "dyml_product",
         "cub", "cub_hierarchy", "cifar100", "roxford5k", "rparis6k", "revisitop1m", "sfm120k", "gldv2", "gldv2_hier"]


def test_names_and_unknown_name_lists_them():
    assert D.dataset_names() == NAMES
    with pytest.raises(ValueError) as err:
        D.get_dataset("imagenet")
    assert all(n in str(err.value) for n in NAMES)
    with pytest.raises(ValueError, match="known datasets"):
        D.get_eval_sets("imagenet")
    assert D.dataset_info("inaturalist_full").levels[-1] == "kingdom"


def test_unknown_split(tmp_path):
    with pytest.raises(ValueError, match=r"no split 'val'.*\('train', 'test'\)"):
        D.get_dataset("sop", root=tmp_path, split="val")
    with pytest.raises(ValueError, match="get_eval_sets"):
        D.get_dataset("dyml_vehicle", root=tmp_path, split="test")


def test_default_root_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("HAPKIT_DATA", str(tmp_path / "here"))
    with pytest.raises(D.DatasetNotFoundError, match=str(tmp_path / "here")):
        D.get_dataset("cub")


def test_generated_through_a_dataloader_with_the_train_transform(tmp_path):
    ds = D.get_dataset("generated", root=tmp_path, transform=D.build_transforms("generated", True), images_per_class=4)
    assert list(D.dataset_info("generated").levels) == ds.level_names
    sampler = D.MPerClassBatchSampler(ds.labels, batch_size=32, m=4, seed=0)
    images, labels = next(iter(torch.utils.data.DataLoader(ds, batch_sampler=sampler)))
    assert images.shape == (32, 3, 32, 32) and images.dtype == torch.float32
    assert labels.shape == (32, 3) and labels.dtype == torch.int64
    assert abs(float(images.mean())) < 1.5  # normalised


def test_dataset_base_validation():
    img = np.zeros((3, 4, 4, 3), np.uint8)
    kw = dict(name="toy", split="train", level_names=["a", "b"])
    with pytest.raises(LabelError, match="two parents"):
        InMemoryImageDataset(img, [[0, 0], [0, 1], [1, 1]], **kw)
    with pytest.raises(ValueError, match="level name"):
        InMemoryImageDataset(img, [0, 1, 1], **kw)
    with pytest.raises(ValueError, match="uint8 array"):
        InMemoryImageDataset(img.astype(float), [[0, 0]] * 3, **kw)
    with pytest.raises(ValueError, match="class name"):
        InMemoryImageDataset(img, [[0, 0], [1, 0], [2, 0]], class_names=[["x"], ["y"]], **kw)
    ds = InMemoryImageDataset(img, [[0, 0], [1, 0], [2, 1]], **kw)
    assert ds.num_classes == [3, 2] and "images=3" in repr(ds)


def test_eval_set_label_column():
    ds = InMemoryImageDataset(np.zeros((2, 2, 2, 3), np.uint8), [[0, 0], [1, 0]], name="t", split="test", level_names=["a", "b"])
    single = InMemoryImageDataset(np.zeros((2, 2, 2, 3), np.uint8), [0, 1], name="t", split="q", level_names=["b"])
    assert EvalSet("all", ds).label_column is None
    assert EvalSet("b", ds, column=1).label_column == 1
    assert EvalSet("b", single, single, column=1).label_column == 0
    assert EvalSet("all", ds).gnd is None and EvalSet("all", ds).distractors is None  # landmark benchmarks only
