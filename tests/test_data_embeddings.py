"""Embedding sets and the evenly spread subsets the notebooks embed."""

import numpy as np
import pytest
import torch

from hapkit.data import EmbeddingSet, label_frame, spread_indices, spread_subset


def test_spread_indices_and_label_frame():
    assert spread_indices(10, None).tolist() == list(range(10))
    assert spread_indices(10, 50).tolist() == list(range(10))
    idx = spread_indices(1000, 100)
    assert len(idx) == 100 and idx[0] == 0 and idx[-1] == 999 and np.all(np.diff(idx) >= 9)
    with pytest.raises(ValueError, match="at least 1"):
        spread_indices(10, 0)
    labels = np.array([[0, 1], [1, 1], [2, 0]])
    frame = label_frame(labels, ["fine", "coarse"], [["a", "b", "c"], ["x", "y"]])
    assert frame.to_dict("list") == {"fine": ["a", "b", "c"], "coarse": ["y", "y", "x"]}
    assert label_frame(labels).columns.tolist() == ["level 0", "level 1"]
    with pytest.raises(ValueError, match="level name"):
        label_frame(labels, ["only one"])


def test_spread_subset_keeps_labels_and_returns_small_datasets_whole():
    class Tiny(torch.utils.data.Dataset):
        labels = np.stack([np.arange(20), np.arange(20) // 5], 1)

        def __len__(self):
            return 20

        def __getitem__(self, i):
            return torch.tensor([float(i)]), torch.from_numpy(self.labels[i])

    ds = Tiny()
    assert spread_subset(ds, None) is ds and spread_subset(ds, 50) is ds
    sub = spread_subset(ds, 5)
    idx = spread_indices(20, 5)
    assert len(sub) == 5 and sub.indices == idx.tolist()
    np.testing.assert_array_equal(sub.labels, ds.labels[idx])
    assert [float(sub[i][0]) for i in range(5)] == idx.astype(float).tolist()


def test_embedding_set_names_its_labels():
    items = EmbeddingSet(np.zeros((2, 3), np.float32), np.array([[0, 1], [1, 1]]), np.array([4, 7]), ["fine", "coarse"],
                         class_names=[["a", "b"], ["x", "y"]])
    assert len(items) == 2 and items.num_levels == 2
    assert items.label_names().to_dict("list") == {"fine": ["a", "b"], "coarse": ["y", "y"]}
